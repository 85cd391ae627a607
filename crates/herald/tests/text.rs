//! Answer text streamed as `agent_text_delta` events (issue 18), against the
//! real server on the memory broker and on a real `redis-server`: live
//! deltas in order, history that keeps one entry per part, a resume from
//! inside a part that sends exactly the unseen text once, a page opened or
//! reloaded mid-answer, numbered deltas that a retry does not append twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis_server::Redis;
use common::*;
use herald::broker::redis::{RedisConfig, RedisNodes};
use herald::{Config, Server};
use serde_json::{Value, json};

/// Where the server keeps its streams.
struct Setup {
    redis: Option<Redis>,
}

impl Setup {
    async fn start(&self, mut cfg: Config) -> Server {
        if let Some(redis) = &self.redis {
            cfg.redis = Some(RedisConfig {
                nodes: RedisNodes::Single(redis.url()),
                prefix: "t".into(),
            });
        }
        start_with(cfg).await
    }

    /// Compacted texts still held in Redis for `user` (0 on memory).
    fn texts_held(&self, user: &str) -> usize {
        match &self.redis {
            Some(r) => r
                .cli(&["--scan", "--pattern", &format!("t:{{user:{user}}}:*")])
                .lines()
                .filter(|k| k.contains(":txt:") || k.contains(":off:"))
                .count(),
            None => 0,
        }
    }

    /// Entries in the stream's log (Redis), or in the whole history (memory).
    fn entries(&self, server: &Server, user: &str) -> u64 {
        match &self.redis {
            Some(r) => r
                .cli(&["XLEN", &format!("t:{{user:{user}}}:log")])
                .trim()
                .parse()
                .unwrap(),
            None => server.broker_stats().events as u64,
        }
    }
}

/// Run one scenario on each broker.
macro_rules! on_both_brokers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$name(super::Setup { redis: None }).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name(super::Setup { redis: Some(super::Redis::start()) }).await;
            }
        }
    )*};
}

on_both_brokers!(
    live_deltas_arrive_in_order_and_assemble_the_text,
    history_keeps_one_entry_per_part_and_the_run_start,
    a_resume_inside_a_part_sends_the_unseen_text_once_then_live,
    a_page_opened_mid_answer_gets_the_text_so_far_as_one_frame,
    a_page_reloaded_mid_answer_gets_the_whole_text_once,
    a_retried_delta_is_not_appended_twice,
    an_open_runs_text_outlives_the_window_and_goes_when_the_run_closes,
);

/// The words of the answer: `n` deltas, some needing JSON escapes.
fn words(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 7 {
            0 => format!("w{i} "),
            1 => "\"quoted\" ".to_owned(),
            2 => "line\n".to_owned(),
            3 => "tab\t\\ ".to_owned(),
            4 => "é😀 ".to_owned(),
            5 => "</script> ".to_owned(),
            _ => format!("{i}. "),
        })
        .collect()
}

fn delta(user: &str, part: &str, index: Option<usize>, text: &str) -> Value {
    let mut data = json!({"part": part, "text": text});
    if let Some(i) = index {
        data["index"] = json!(i);
    }
    json!({"user_id": user, "event": "agent_text_delta", "run_id": "r1", "data": data})
}

async fn publish_all(server: &Server, events: Vec<Value>) -> Vec<Value> {
    let mut results = Vec::new();
    for chunk in events.chunks(500) {
        let (status, body) = post(server, "/api/v1/events", json!({ "events": chunk })).await;
        assert_eq!(status, 200, "{body}");
        results.extend(body["results"].as_array().unwrap().iter().cloned());
    }
    results
}

async fn start_run(server: &Server, user: &str) -> u64 {
    let (status, body) = post(
        server,
        "/api/v1/events",
        json!({"user_id": user, "event": "agent_started", "run_id": "r1"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["results"][0]["seq"].as_u64().unwrap()
}

/// Publish `texts` as deltas `first_index..` of part `answer`.
async fn stream_words(server: &Server, user: &str, texts: &[String], first_index: usize) {
    let events = texts
        .iter()
        .enumerate()
        .map(|(i, t)| delta(user, "answer", Some(first_index + i), t))
        .collect();
    publish_all(server, events).await;
}

async fn next_event(ws: &mut Ws) -> Value {
    loop {
        let v = next_json(ws).await;
        if v["type"] == "event" {
            return v;
        }
    }
}

async fn hello(server: &Server, body: Value) -> (Ws, Value) {
    let mut ws = open(server, &[], None).await;
    send_json(&mut ws, body).await;
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

/// Read delta frames until the text reaches `want` bytes; each frame must
/// start right after the one before (`from_seq`, else `seq`).
async fn read_text(ws: &mut Ws, mut last_seq: u64, want: usize) -> (String, usize, u64) {
    let mut text = String::new();
    let mut frames = 0;
    while text.len() < want {
        let e = next_event(ws).await;
        assert_eq!(e["event"], "agent_text_delta", "{e}");
        let seq = e["seq"].as_u64().unwrap();
        let from = e["from_seq"].as_u64().unwrap_or(seq);
        assert_eq!(from, last_seq + 1, "no gap, no overlap: {e}");
        assert!(seq >= from);
        assert_eq!(e["data"]["part"], "answer");
        assert_eq!(e["run_id"], "r1");
        text.push_str(e["data"]["text"].as_str().unwrap());
        last_seq = seq;
        frames += 1;
    }
    (text, frames, last_seq)
}

async fn live_deltas_arrive_in_order_and_assemble_the_text(setup: Setup) {
    let server = setup.start(config()).await;
    let (mut ws, _) = connect(&server, "ada").await;
    let started = start_run(&server, "ada").await;
    assert_eq!(next_event(&mut ws).await["seq"], started);
    let texts = words(300);
    stream_words(&server, "ada", &texts, 0).await;
    let want: String = texts.concat();
    for (i, t) in texts.iter().enumerate() {
        let e = next_event(&mut ws).await;
        assert_eq!(e["seq"].as_u64(), Some(started + 1 + i as u64), "{e}");
        assert!(e.get("from_seq").is_none(), "live deltas are one each: {e}");
        assert_eq!(e["data"]["text"].as_str(), Some(t.as_str()));
    }
    // The same text, assembled from history: one frame.
    let (mut again, w) = hello(
        &server,
        json!({"type": "hello", "token": token("ada"), "resume": {"epoch": "none", "seq": 0}, "replay_active_runs": true}),
    )
    .await;
    assert_eq!(w["reset"], true);
    assert_eq!(next_event(&mut again).await["event"], "agent_started");
    let (text, frames, _) = read_text(&mut again, started, want.len()).await;
    assert_eq!((text, frames), (want, 1));
}

async fn history_keeps_one_entry_per_part_and_the_run_start(setup: Setup) {
    let mut cfg = config();
    cfg.stream_limits.max_events = 10;
    let server = setup.start(cfg).await;
    let started = start_run(&server, "bo").await;
    let (status, body) = post(
        &server,
        "/api/v1/events",
        json!({"user_id": "bo", "event": "agent_thinking", "run_id": "r1", "data": {"text": "hmm"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let texts = words(2000);
    stream_words(&server, "bo", &texts, 0).await;
    assert_eq!(
        setup.entries(&server, "bo"),
        3,
        "agent_started, agent_thinking, one entry for 2,000 deltas"
    );
    // Well within the 10-entry window: a resume from just after the run's
    // start replays the thinking and the whole text, in two frames.
    let (mut ws, w) = hello(
        &server,
        json!({"type": "hello", "token": token("bo"), "resume": {"epoch": epoch_of(&server, "bo").await, "seq": started}}),
    )
    .await;
    assert_eq!(w["resumed"], true, "{w}");
    assert_eq!(next_event(&mut ws).await["event"], "agent_thinking");
    let want: String = texts.concat();
    let (text, frames, last) = read_text(&mut ws, started + 1, want.len()).await;
    assert_eq!((text == want, frames, last), (true, 1, started + 2001));
    // A second part after another event is a second entry.
    let (status, _) = post(
        &server,
        "/api/v1/events",
        json!({"events": [
            {"user_id": "bo", "event": "tool_executing", "run_id": "r1", "data": {"tool": "search"}},
            {"user_id": "bo", "event": "agent_text_delta", "run_id": "r1", "data": {"part": "more", "text": "a"}},
            {"user_id": "bo", "event": "agent_text_delta", "run_id": "r1", "data": {"part": "more", "text": "b"}},
        ]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(setup.entries(&server, "bo"), 5);
}

async fn epoch_of(server: &Server, user: &str) -> String {
    let (_ws, w) = connect(server, user).await;
    w["epoch"].as_str().unwrap().to_owned()
}

async fn a_resume_inside_a_part_sends_the_unseen_text_once_then_live(setup: Setup) {
    let server = setup.start(config()).await;
    let (mut ws, w) = connect(&server, "cy").await;
    let epoch = w["epoch"].as_str().unwrap().to_owned();
    let started = start_run(&server, "cy").await;
    let texts = words(100);
    stream_words(&server, "cy", &texts[..60], 0).await;
    assert_eq!(next_event(&mut ws).await["seq"], started);
    // The client saw 25 deltas, then its connection dropped.
    let mut seen = String::new();
    for _ in 0..25 {
        seen.push_str(next_event(&mut ws).await["data"]["text"].as_str().unwrap());
    }
    drop(ws);
    let at = started + 25;
    let (mut ws, w) = hello(
        &server,
        json!({"type": "hello", "token": token("cy"), "resume": {"epoch": epoch, "seq": at}}),
    )
    .await;
    assert_eq!(w["resumed"], true, "{w}");
    let unseen: String = texts[25..60].concat();
    let e = next_event(&mut ws).await;
    assert_eq!(
        (e["from_seq"].as_u64(), e["seq"].as_u64()),
        (Some(at + 1), Some(started + 60)),
        "one frame covering the unseen deltas: {e}"
    );
    assert_eq!(e["data"]["text"].as_str(), Some(unseen.as_str()));
    assert_eq!(e["replayed"], true);
    // Then live deltas continue from the range's end.
    stream_words(&server, "cy", &texts[60..], 60).await;
    let rest: String = texts[60..].concat();
    let (text, frames, _) = read_text(&mut ws, started + 60, rest.len()).await;
    assert_eq!((text, frames), (rest, 40));
    assert_eq!(seen + &unseen + &texts[60..].concat(), texts.concat());
}

async fn a_page_opened_mid_answer_gets_the_text_so_far_as_one_frame(setup: Setup) {
    let server = setup.start(config()).await;
    let started = start_run(&server, "di").await;
    let texts = words(50);
    stream_words(&server, "di", &texts[..30], 0).await;
    let (mut ws, _) = hello(
        &server,
        json!({"type": "hello", "token": token("di"), "replay_active_runs": true}),
    )
    .await;
    assert_eq!(next_event(&mut ws).await["seq"], started);
    let so_far: String = texts[..30].concat();
    let e = next_event(&mut ws).await;
    assert_eq!(
        (e["from_seq"].as_u64(), e["seq"].as_u64()),
        (Some(started + 1), Some(started + 30))
    );
    assert_eq!(e["data"]["text"].as_str(), Some(so_far.as_str()));
    stream_words(&server, "di", &texts[30..], 30).await;
    let rest: String = texts[30..].concat();
    let (text, frames, _) = read_text(&mut ws, started + 30, rest.len()).await;
    assert_eq!((text, frames), (rest, 20));
}

async fn a_page_reloaded_mid_answer_gets_the_whole_text_once(setup: Setup) {
    let server = setup.start(config()).await;
    let (_w, welcome) = connect(&server, "ed").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let started = start_run(&server, "ed").await;
    let texts = words(40);
    stream_words(&server, "ed", &texts, 0).await;
    // The page had shown up to delta 15, then reloaded: it lost what it showed.
    let at = started + 15;
    let (mut ws, w) = hello(
        &server,
        json!({"type": "hello", "token": token("ed"), "resume": {"epoch": epoch, "seq": at}, "replay_active_runs": true}),
    )
    .await;
    assert_eq!(w["resumed"], true);
    assert_eq!(next_event(&mut ws).await["seq"], started);
    let whole: String = texts.concat();
    let (text, frames, last) = read_text(&mut ws, started, whole.len()).await;
    assert_eq!(text, whole);
    assert_eq!(
        (frames, last),
        (2, started + 40),
        "the run up to the resume point, then the rest"
    );
}

async fn a_retried_delta_is_not_appended_twice(setup: Setup) {
    let server = setup.start(config()).await;
    let (mut ws, _) = connect(&server, "fa").await;
    let started = start_run(&server, "fa").await;
    let r = publish_all(
        &server,
        vec![
            delta("fa", "answer", Some(0), "a"),
            delta("fa", "answer", Some(1), "b"),
        ],
    )
    .await;
    assert_eq!(
        (r[0]["seq"].as_u64(), r[1]["seq"].as_u64()),
        (Some(started + 1), Some(started + 2))
    );
    // The retry of a batch that had landed: 1 is a duplicate, 2 is new.
    let r = publish_all(
        &server,
        vec![
            delta("fa", "answer", Some(1), "b"),
            delta("fa", "answer", Some(2), "c"),
        ],
    )
    .await;
    assert_eq!(r[0]["duplicate"], true);
    assert_eq!(r[0]["seq"].as_u64(), Some(started + 2));
    assert!(r[1].get("duplicate").is_none());
    assert_eq!(r[1]["seq"].as_u64(), Some(started + 3));
    // Skipping ahead refuses the whole batch and says where the part stands.
    let (status, body) = post(
        &server,
        "/api/v1/events",
        json!({"events": [delta("fa", "answer", Some(3), "d"), delta("fa", "answer", Some(5), "f")]}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "delta_out_of_order");
    assert_eq!(body["field"], "events[1].data.index");
    assert_eq!(body["expected"], 4);
    let (status, body) = post(
        &server,
        "/api/v1/events",
        delta("fa", "answer", Some(9), "z"),
    )
    .await;
    assert_eq!(
        (status, body["expected"].as_u64()),
        (409, Some(3)),
        "{body}"
    );
    assert_eq!(body["field"], "data.index");
    // Nothing of the refused batch was appended: the next delta is seq +4.
    let r = publish_all(&server, vec![delta("fa", "answer", Some(3), "d")]).await;
    assert_eq!(r[0]["seq"].as_u64(), Some(started + 4));
    let mut text = String::new();
    for _ in 0..5 {
        let e = next_event(&mut ws).await;
        text.push_str(e["data"]["text"].as_str().unwrap_or(""));
    }
    assert_eq!(text, "abcd");
}

async fn an_open_runs_text_outlives_the_window_and_goes_when_the_run_closes(setup: Setup) {
    let mut cfg = config();
    cfg.stream_limits.max_events = 3;
    let server = setup.start(cfg).await;
    let started = start_run(&server, "gu").await;
    let texts = words(10);
    stream_words(&server, "gu", &texts, 0).await;
    let note = |n: u64| json!({"user_id": "gu", "event": "note", "data": {"n": n}});
    publish_all(&server, (0..5).map(note).collect()).await;
    // The window holds three notes; the run's start and text are kept for it.
    let (mut ws, _) = hello(
        &server,
        json!({"type": "hello", "token": token("gu"), "replay_active_runs": true}),
    )
    .await;
    assert_eq!(next_event(&mut ws).await["seq"], started);
    let e = next_event(&mut ws).await;
    assert_eq!(e["data"]["text"].as_str(), Some(texts.concat().as_str()));
    assert_eq!(
        (e["from_seq"].as_u64(), e["seq"].as_u64()),
        (Some(started + 1), Some(started + 10))
    );
    if setup.redis.is_some() {
        assert_eq!(setup.texts_held("gu"), 2, "the text and its offsets");
    }
    let (status, _) = post(
        &server,
        "/api/v1/events",
        json!({"user_id": "gu", "event": "agent_completed", "run_id": "r1"}),
    )
    .await;
    assert_eq!(status, 200);
    publish_all(&server, (5..8).map(note).collect()).await;
    assert_eq!(
        setup.texts_held("gu"),
        0,
        "nothing left behind once the run closed"
    );
    assert_eq!(setup.entries(&server, "gu"), 3);
    // The other order: the run closes while its text is in the window, and
    // the text goes when the window lets go of it.
    start_run(&server, "gu").await;
    stream_words(&server, "gu", &texts[..5], 0).await;
    let (status, _) = post(
        &server,
        "/api/v1/events",
        json!({"user_id": "gu", "event": "agent_completed", "run_id": "r1"}),
    )
    .await;
    assert_eq!(status, 200);
    if setup.redis.is_some() {
        assert_eq!(setup.texts_held("gu"), 2, "still in the window");
    }
    publish_all(&server, (8..11).map(note).collect()).await;
    assert_eq!(setup.texts_held("gu"), 0);
    assert_eq!(setup.entries(&server, "gu"), 3);
}
