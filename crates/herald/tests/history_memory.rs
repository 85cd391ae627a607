//! Memory cost of history: run with
//! `cargo test --release -p herald --test history_memory -- --ignored --nocapture`.
//! Figures go to docs/ARCHITECTURE.md; nothing here is a timed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Weak;

use common::NoSink;
use herald::broker::memory::MemoryBroker;
use herald::broker::{Broker, NewEvent};
use herald_core::protocol::EventFrame;
use herald_core::stream::StreamLimits;
use serde_json::json;

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test]
#[ignore = "measurement, not a check; run by hand"]
async fn bytes_per_stored_event() {
    const USERS: usize = 10_000;
    const PER_USER: usize = 20;
    let store = MemoryBroker::new(StreamLimits::default(), usize::MAX, Weak::<NoSink>::new());
    let before = rss_bytes();
    for i in 0..PER_USER {
        for u in 0..USERS {
            let frame = EventFrame {
                seq: 0,
                stream: None,
                event: "agent_thinking".into(),
                thread_id: Some("thread-1".into()),
                run_id: if i % 2 == 0 {
                    Some(format!("run-{u}"))
                } else {
                    None
                },
                data: json!({"text": "The agent is considering the next step of the plan."}),
                ts: "2026-11-21T23:00:00.123Z".into(),
            };
            store
                .publish(
                    &format!("user:user-{u}"),
                    vec![NewEvent {
                        frame,
                        idempotency_key: None,
                        delta: None,
                    }],
                )
                .await
                .unwrap();
        }
    }
    let after = rss_bytes();
    let stats = store.stats();
    let per_event = (after - before) as f64 / stats.events as f64;
    let payload = stats.bytes as f64 / stats.events as f64;
    println!(
        "{} users x {} events: {} events, {:.0} payload bytes/event, {:.0} RSS bytes/event ({:.0} overhead), {:.1} MiB total",
        USERS,
        PER_USER,
        stats.events,
        payload,
        per_event,
        per_event - payload,
        (after - before) as f64 / (1024.0 * 1024.0)
    );
}
