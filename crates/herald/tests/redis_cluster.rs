//! Herald on a three-master Redis Cluster (real `redis-server --cluster-enabled
//! yes` processes joined by `redis-cli --cluster create`): fan-out across
//! nodes, resume on another node, kick and listing across nodes, a silent run
//! closed once — and streams spread over every master.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::redis_server::{
    Partition, cli, event_of, expect_seqs, free_port, publish_in_background, wait_for_sweeps,
};
use common::*;
use herald::broker::redis::{RedisConfig, RedisNodes};
use herald::{Config, Server};
use serde_json::json;

/// Three masters, killed on drop.
struct Cluster {
    ports: Vec<u16>,
    children: Vec<Child>,
    dir: std::path::PathBuf,
}

impl Cluster {
    fn start() -> Cluster {
        let ports: Vec<u16> = (0..3).map(|_| cluster_port()).collect();
        Cluster::start_announcing(ports, |p| p)
    }

    /// Masters on `ports` that tell clients to reach each at `announce(port)`
    /// (a proxy in front of it); the cluster bus stays direct.
    fn start_announcing(ports: Vec<u16>, announce: impl Fn(u16) -> u16) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "herald-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let children = ports
            .iter()
            .map(|p| {
                Command::new("redis-server")
                    .current_dir(&dir)
                    .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                    .args(["--cluster-enabled", "yes"])
                    .args(["--cluster-config-file", &format!("nodes-{p}.conf")])
                    .args(["--cluster-announce-port", &announce(*p).to_string()])
                    .args(["--cluster-announce-bus-port", &(p + 10_000).to_string()])
                    .args(["--save", "", "--appendonly", "no"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server is installed (scripts/test.sh installs it)")
            })
            .collect();
        let mut cluster = Cluster {
            ports,
            children,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        for i in 0..cluster.ports.len() {
            let p = cluster.ports[i];
            while cli(p, &["PING"]) != "PONG" {
                let exited = cluster.children[i].try_wait().ok().flatten();
                assert!(exited.is_none(), "redis-server on {p} exited: {exited:?}");
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            // The answer came from this test's server, not another's that
            // took the port first (this one then exits).
            let pid = format!("process_id:{}", cluster.children[i].id());
            assert!(
                cli(p, &["INFO", "server"]).lines().any(|l| l == pid),
                "port {p} is another redis-server's"
            );
        }
        let addrs: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli is installed");
        assert!(created.success(), "cluster create");
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in &cluster.ports {
            while !cli(*p, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three masters, each behind a [`Partition`] whose port it announces, and
/// a node config that reaches them through the proxies.
async fn proxied_cluster() -> (Cluster, Vec<Partition>, Config) {
    let ports: Vec<u16> = (0..3).map(|_| cluster_port()).collect();
    let mut paths = Vec::new();
    for p in &ports {
        paths.push(Partition::start(*p).await);
    }
    let proxy: std::collections::HashMap<u16, u16> = ports
        .iter()
        .zip(&paths)
        .map(|(p, path)| (*p, path.port))
        .collect();
    let cluster = Cluster::start_announcing(ports, |p| proxy[&p]);
    let mut cfg = config();
    cfg.redis = Some(RedisConfig {
        nodes: RedisNodes::Cluster(
            paths
                .iter()
                .map(|p| format!("redis://127.0.0.1:{}", p.port))
                .collect(),
        ),
        prefix: "c".into(),
        timing: Default::default(),
    });
    (cluster, paths, cfg)
}

/// A free port whose cluster bus port (10,000 above) is free too: a
/// master whose bus port is taken exits at start.
fn cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p <= 55_535 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

async fn node(cluster: &Cluster) -> Server {
    let mut cfg = config();
    cfg.redis = Some(RedisConfig {
        nodes: RedisNodes::Cluster(cluster.urls()),
        prefix: "c".into(),
        timing: Default::default(),
    });
    cfg.stream_limits.run_ttl = Duration::from_millis(800);
    start_with(cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_a_redis_cluster() {
    let cluster = Cluster::start();
    let (a, b, c) = (
        node(&cluster).await,
        node(&cluster).await,
        node(&cluster).await,
    );

    // Fan-out across nodes, in publish order.
    let (mut on_a, w) = connect(&a, "ann").await;
    let (mut on_b, _) = connect(&b, "ann").await;
    let nodes = [&a, &b, &c];
    for n in 1..=30u64 {
        publish(nodes[n as usize % 3], "ann", "note", json!({ "n": n })).await;
    }
    for ws in [&mut on_a, &mut on_b] {
        for n in 1..=30u64 {
            let e = event_of(ws).await;
            assert_eq!(
                (e["seq"].as_u64(), e["data"]["n"].as_u64()),
                (Some(n), Some(n))
            );
        }
    }

    // Resume on another node: exactly the missed events, then live.
    drop(on_a);
    for _ in 0..5 {
        publish(&b, "ann", "note", json!({})).await;
    }
    let mut again = open(&c, &[], None).await;
    send_json(
        &mut again,
        json!({"type": "hello", "token": token("ann"), "resume": {"epoch": w["epoch"], "seq": 30}}),
    )
    .await;
    assert_eq!(next_json(&mut again).await["resumed"], true);
    for seq in 31..=35 {
        assert_eq!(event_of(&mut again).await["seq"], seq);
    }
    publish(&a, "ann", "note", json!({})).await;
    assert_eq!(event_of(&mut again).await["seq"], 36);

    // Streams spread over every master.
    for u in 0..30 {
        publish(&a, &format!("spread-{u}"), "note", json!({})).await;
    }
    for p in &cluster.ports {
        let keys: u64 = cli(*p, &["DBSIZE"]).parse().unwrap();
        assert!(keys > 0, "master {p} holds streams");
    }

    // The heartbeats: every node records itself each sweep and forgets nodes
    // silent for a minute; one silent for 30 s is kept (it is not counted as
    // live: the listing below waits for three answers, not four).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let p = cluster.ports[0];
    let (old, quiet) = ((now - 61_000).to_string(), (now - 30_000).to_string());
    cli(p, &["-c", "HSET", "c:nodes", "gone", &old, "quiet", &quiet]);
    wait_until(
        Duration::from_secs(10),
        || cli(p, &["-c", "HEXISTS", "c:nodes", "gone"]) == "0",
        || "a node silent for a minute was kept".into(),
    )
    .await;
    assert_eq!(cli(p, &["-c", "HEXISTS", "c:nodes", "quiet"]), "1");

    // Kick and listing from a node that holds none of the sockets.
    // Every node's heartbeat is in: three live nodes and the quiet one.
    wait_until(
        Duration::from_secs(10),
        || cli(p, &["-c", "HLEN", "c:nodes"]) == "4",
        || "three live nodes and the quiet one".into(),
    )
    .await;
    let (_, list) = get_json(&a, "/api/v1/connections?user_id=ann").await;
    assert_eq!(list["total"], 2, "{list}");
    let (status, body) = post(&a, "/api/v1/disconnect", json!({"user_id": "ann"})).await;
    assert_eq!(
        (status, body["disconnected"].as_u64()),
        (200, Some(2)),
        "{body}"
    );
    expect_close(&mut on_b, 4409).await;
    expect_close(&mut again, 4409).await;
    // Both waited for exactly the three live nodes' answers, not for the
    // 2 s timeout (the quiet node is not counted; no other test here asks
    // the fleet, and the recorder is the process's).
    let text = metrics_text(&a).await;
    assert!(
        !text.contains("herald_fleet_requests_incomplete_total"),
        "{text}"
    );

    // A silent run is closed once by the fleet's three sweepers.
    let (mut ws, _) = connect(&b, "dee").await;
    post(
        &c,
        "/api/v1/events",
        json!({"user_id": "dee", "event": "agent_started", "run_id": "r9"}),
    )
    .await;
    assert_eq!(event_of(&mut ws).await["event"], "agent_started");
    let e = event_of(&mut ws).await;
    assert_eq!(
        (e["event"].as_str(), e["seq"].as_u64()),
        (Some("agent_error"), Some(2))
    );
    assert_eq!(e["data"]["reason"], "run_timeout");
    // Once every node has swept twice more, the next event is seq 3.
    wait_for_sweeps(&[&a, &b, &c]).await;
    assert_eq!(publish(&a, "dee", "note", json!({})).await["seq"], 3);

    // The pub/sub audit (CLIENT INFO, every second) reaches every master,
    // each of which holds sharded subscriptions that could go half-open or
    // be lost without a word.
    let pings = |p: u16| -> u64 {
        let stats = cli(p, &["INFO", "commandstats"]);
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_client|info:calls="))
            .and_then(|l| l.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    let before: Vec<u64> = cluster.ports.iter().map(|p| pings(*p)).collect();
    wait_until(
        Duration::from_secs(12),
        || {
            cluster
                .ports
                .iter()
                .zip(&before)
                .all(|(p, b)| pings(*p) > *b)
        },
        || format!("not every master was audited: {before:?}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_cluster_pubsub_connections_under_load_loses_nothing() {
    let cluster = Cluster::start();
    let (a, b) = (node(&cluster).await, node(&cluster).await);
    let (mut ws, _) = connect(&a, "ed").await;
    const N: u64 = 200;
    let publisher = publish_in_background(b.local_addr(), "ed", N);
    let mut killed = 0;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        for p in &cluster.ports {
            killed += cli(*p, &["CLIENT", "KILL", "TYPE", "pubsub"])
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    assert!(killed > 0, "the nodes' pub/sub connections were killed");
    publisher.await.unwrap();
    expect_seqs(&mut ws, N).await;
}

/// The master owning `slot`, and its node id, as `CLUSTER NODES` says.
fn owner(port: u16, slot: u16) -> (u16, String) {
    for line in cli(port, &["CLUSTER", "NODES"]).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 9 || !f[2].contains("master") {
            continue;
        }
        for range in &f[8..] {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            if let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>())
                && (lo..=hi).contains(&slot)
            {
                let p = f[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
                return (p, f[0].to_owned());
            }
        }
    }
    panic!("no owner for slot {slot}");
}

/// A stream's slot moves to another master (IMPORTING/MIGRATING, MIGRATE
/// of its keys, SETSLOT NODE) while events are published to it: the client
/// gets every event once, in order, and the stream is live afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_slot_moves_under_load_loses_nothing() {
    let cluster = Cluster::start();
    let (a, b) = (node(&cluster).await, node(&cluster).await);
    let (mut ws, _) = connect(&a, "mig").await;
    let slot: u16 = cli(
        cluster.ports[0],
        &["CLUSTER", "KEYSLOT", "c:{user:mig}:meta"],
    )
    .parse()
    .unwrap();
    let (from, from_id) = owner(cluster.ports[0], slot);
    let to = *cluster.ports.iter().find(|p| **p != from).unwrap();
    let to_id = cli(to, &["CLUSTER", "MYID"]);

    const N: u64 = 200;
    // Publishes retry (same idempotency key) while the slot is in flight.
    let url = format!("http://{}/api/v1/events", b.local_addr());
    let publisher = tokio::spawn(async move {
        let c = client();
        for i in 1..=N {
            let body =
                json!({"user_id": "mig", "event": "note", "idempotency_key": format!("k{i}")});
            let mut tries = 0;
            loop {
                let r = c
                    .post(&url)
                    .bearer_auth(API_KEY)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                if r.status() == 200 {
                    break;
                }
                tries += 1;
                assert!(tries < 100, "publish {i} kept failing: {}", r.status());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Move the slot from its master to another, keys and all.
    let moved = tokio::task::spawn_blocking(move || {
        cli(
            to,
            &[
                "CLUSTER",
                "SETSLOT",
                &slot.to_string(),
                "IMPORTING",
                &from_id,
            ],
        );
        cli(
            from,
            &["CLUSTER", "SETSLOT", &slot.to_string(), "MIGRATING", &to_id],
        );
        loop {
            let keys = cli(
                from,
                &["CLUSTER", "GETKEYSINSLOT", &slot.to_string(), "100"],
            );
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1"];
            let to_port = to.to_string();
            args.extend([to_port.as_str(), "", "0", "5000", "KEYS"]);
            args.extend(keys);
            cli(from, &args);
        }
        for p in [from, to] {
            cli(
                p,
                &["CLUSTER", "SETSLOT", &slot.to_string(), "NODE", &to_id],
            );
        }
    });
    moved.await.unwrap();
    assert_eq!(owner(to, slot).0, to, "the slot moved");
    // The node reading the stream followed it to the new master (the
    // mechanism this test names; the pub/sub audit's rebuild is a second
    // line that would also deliver): eventually, once the move's push came.
    wait_until(
        Duration::from_secs(10),
        || a.broker_stats().slot_follows >= 1,
        || "node a followed the moved slot".into(),
    )
    .await;
    publisher.await.unwrap();
    expect_seqs(&mut ws, N).await;
    // And the stream is live again on its new master: a publish reaches a
    // subscriber there (`delivered` counts the new master's receivers, so a
    // catch-up cannot stand in for a lost subscription). Until the follow
    // has resubscribed, a publish may count none.
    let mut published = N;
    let mut live = false;
    for _ in 0..100 {
        let r = publish(&b, "mig", "note", json!({})).await;
        published += 1;
        assert_eq!(r["seq"].as_u64(), Some(published));
        if r["delivered"].as_u64() >= Some(1) {
            live = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        live,
        "no publish reached a subscriber on the slot's new master"
    );
    for seq in N + 1..=published {
        assert_eq!(event_of(&mut ws).await["seq"].as_u64(), Some(seq));
    }
}

/// Issue 18 on a Cluster: text deltas published through one node compact in
/// the stream's slot; a reader on another node resumes from inside the part
/// on a third and gets exactly the unseen text, once; a page opened there
/// gets the run's text so far as one frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_deltas_compact_and_resume_across_a_cluster() {
    let cluster = Cluster::start();
    let (a, b, c) = (
        node(&cluster).await,
        node(&cluster).await,
        node(&cluster).await,
    );
    let (mut on_a, w) = connect(&a, "tex").await;
    let epoch = w["epoch"].as_str().unwrap().to_owned();
    let delta = |i: usize| {
        json!({"user_id": "tex", "event": "agent_text_delta", "run_id": "r1",
               "data": {"part": "answer", "index": i, "text": format!("w{i} ")}})
    };
    let (status, _) = post(
        &b,
        "/api/v1/events",
        json!({"user_id": "tex", "event": "agent_started", "run_id": "r1"}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = post(
        &b,
        "/api/v1/events",
        json!({"events": (0..10).map(delta).collect::<Vec<_>>()}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The reader sees the first ten (as one frame or several: every seq
    // once), then leaves; thirty more come.
    let mut seen = String::new();
    assert_eq!(event_of(&mut on_a).await["event"], "agent_started");
    let mut last = 1;
    while last < 11 {
        let e = event_of(&mut on_a).await;
        let seq = e["seq"].as_u64().unwrap();
        assert_eq!(e["from_seq"].as_u64().unwrap_or(seq), last + 1, "{e}");
        seen.push_str(e["data"]["text"].as_str().unwrap());
        last = seq;
    }
    drop(on_a);
    let (status, body) = post(
        &b,
        "/api/v1/events",
        json!({"events": (10..40).map(delta).collect::<Vec<_>>()}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let whole: String = (0..40).map(|i| format!("w{i} ")).collect();
    let mut ws = open(&c, &[], None).await;
    send_json(
        &mut ws,
        json!({"type": "hello", "token": token("tex"), "resume": {"epoch": epoch, "seq": 11}}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["resumed"], true);
    let e = event_of(&mut ws).await;
    assert_eq!(
        (e["from_seq"].as_u64(), e["seq"].as_u64()),
        (Some(12), Some(41))
    );
    assert_eq!(seen + e["data"]["text"].as_str().unwrap(), whole);
    let mut page = open(&a, &[], None).await;
    send_json(
        &mut page,
        json!({"type": "hello", "token": token("tex"), "replay_active_runs": true}),
    )
    .await;
    next_json(&mut page).await;
    assert_eq!(event_of(&mut page).await["event"], "agent_started");
    let e = event_of(&mut page).await;
    assert_eq!(e["data"]["text"].as_str(), Some(whole.as_str()));
    assert_eq!(
        (e["from_seq"].as_u64(), e["seq"].as_u64()),
        (Some(2), Some(41))
    );
}

/// A half-open path to a Redis Cluster (every connection of the nodes to
/// every master silenced at once: no FIN, no RST) is found by the audit's
/// `CLIENT INFO` to every master and the command timeout; both connections are replaced and
/// the events published meanwhile arrive in order on the same WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_path_to_the_cluster_is_replaced_and_nothing_is_lost() {
    let (cluster, paths, cfg) = proxied_cluster().await;
    let (a, b) = (start_with(cfg.clone()).await, start_with(cfg).await);
    let (mut ws, _) = connect(&a, "hc").await;
    publish_note(&b, "hc", 1, Duration::ZERO).await;
    assert_eq!(event_of(&mut ws).await["seq"], 1);
    for path in &paths {
        path.cut();
    }
    // b's command connection times out once (an honest 503), then is replaced.
    for n in [2, 3] {
        publish_note(&b, "hc", n, Duration::from_secs(30)).await;
    }
    expect_notes(&mut ws, &[2, 3], Duration::from_secs(30), "after the cut").await;
    then_only(&mut ws, &b, "hc", 4).await;
    drop(cluster);
}

/// Note `n` for `user` (its idempotency key and data name `n`).
fn note(user: &str, n: u64) -> serde_json::Value {
    json!({"user_id": user, "event": "note", "idempotency_key": format!("{user}-{n}"), "data": {"n": n}})
}

/// Publish note `n` through `node` until it is stored as seq `n`,
/// retrying within `limit` while the node answers an honest 503 (its path
/// to the cluster being replaced); any other answer fails.
async fn publish_note(node: &Server, user: &str, n: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body) = post(node, "/api/v1/events", note(user, n)).await;
        if status == 200 {
            assert_eq!(body["results"][0]["seq"], n, "{body}");
            return;
        }
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("broker_unavailable")),
            "{body}"
        );
        assert!(
            Instant::now() < deadline,
            "note {n} was never published: {body}"
        );
    }
}

/// Nothing came after the notes read so far but what `node` publishes
/// next: note `n` is the next event on `ws` (a late duplicate of an earlier
/// note, e.g. from a resync that replayed what the live path had delivered,
/// would come first).
async fn then_only(ws: &mut Ws, node: &Server, user: &str, n: u64) {
    publish_note(node, user, n, Duration::from_secs(10)).await;
    expect_notes(ws, &[n], Duration::from_secs(20), "the next note").await;
}

/// The next events on `ws` are the notes `ns`, in order, each within `limit`.
async fn expect_notes(ws: &mut Ws, ns: &[u64], limit: Duration, what: &str) {
    for &n in ns {
        let e = event_within(ws, limit, what).await;
        assert_eq!(
            (e["seq"].as_u64(), e["data"]["n"].as_u64()),
            (Some(n), Some(n))
        );
    }
}

/// A sharded subscription the cluster drops without a word (the master's
/// end of the pub/sub connection is replaced under it, as when a client
/// library swaps a connection and resubscribes by a stale slot map): the
/// audit of what each master holds notices, the connection is rebuilt and
/// the stream's events still arrive, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_lost_without_notice_is_noticed_and_nothing_is_lost() {
    let (cluster, paths, cfg) = proxied_cluster().await;
    let (a, b) = (start_with(cfg.clone()).await, start_with(cfg).await);
    let (mut ws, _) = connect(&a, "ls").await;
    publish_note(&b, "ls", 1, Duration::ZERO).await;
    assert_eq!(event_of(&mut ws).await["seq"], 1);
    // The stream's master, as the cluster announces it: its proxy.
    let slot: u16 = cli(
        cluster.ports[0],
        &["CLUSTER", "KEYSLOT", "c:{user:ls}:meta"],
    )
    .parse()
    .unwrap();
    let (announced, _) = owner(cluster.ports[0], slot);
    let path = paths.iter().find(|p| p.port == announced).unwrap();
    path.redial();
    for n in [2, 3] {
        publish_note(&b, "ls", n, Duration::from_secs(10)).await;
    }
    expect_notes(
        &mut ws,
        &[2, 3],
        Duration::from_secs(20),
        "after the redial",
    )
    .await;
    then_only(&mut ws, &b, "ls", 4).await;
    drop(cluster);
}

/// Issue 39 on a Redis Cluster: shared streams whose keys sit on every
/// master carry events, presence and typing between two nodes (sharded
/// pub/sub per stream, presence hashes in the stream's slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_streams_presence_and_typing_across_a_cluster() {
    let cluster = Cluster::start();
    let (a, b) = (node(&cluster).await, node(&cluster).await);
    // Two streams per master.
    let mut per_master: std::collections::HashMap<u16, Vec<String>> = Default::default();
    for i in 0.. {
        let stream = format!("room:{i}");
        let slot: u16 = cli(
            cluster.ports[0],
            &["CLUSTER", "KEYSLOT", &format!("c:{{{stream}}}:presence")],
        )
        .trim()
        .parse()
        .unwrap();
        let (port, _) = owner(cluster.ports[0], slot);
        let list = per_master.entry(port).or_default();
        if list.len() < 2 {
            list.push(stream);
        }
        if per_master.len() == 3 && per_master.values().all(|l| l.len() == 2) {
            break;
        }
    }
    let streams: Vec<String> = per_master.into_values().flatten().collect();
    let grant = |user: &str| {
        let s = [("room:*".to_owned(), "rw".to_owned())]
            .into_iter()
            .collect();
        herald::auth::mint_hs256_with_streams(SECRET, user, Duration::from_secs(3600), &s).unwrap()
    };
    let (mut ann, _) = hello_at(&a.local_addr().to_string(), &grant("ann")).await;
    let (mut bo, _) = hello_at(&b.local_addr().to_string(), &grant("bo")).await;
    // Ann is a member of every stream before Bo joins (a join is told to
    // the members at that moment).
    for s in &streams {
        send_json(&mut ann, json!({"type": "subscribe", "stream": s})).await;
    }
    let mut subscribed = 0;
    while subscribed < streams.len() {
        let v = next_json(&mut ann).await;
        assert_ne!(v["type"], "error", "{v}");
        subscribed += usize::from(v["type"] == "subscribed");
    }
    for s in &streams {
        send_json(&mut bo, json!({"type": "subscribe", "stream": s})).await;
    }
    // Ann sees Bo join every stream, whichever master holds it.
    let mut joined: std::collections::HashSet<String> = Default::default();
    while joined.len() < streams.len() {
        let v = next_json(&mut ann).await;
        if v["type"] == "presence_join" && v["user_id"] == "bo" {
            joined.insert(v["stream"].as_str().unwrap().to_owned());
        }
    }
    for s in &streams {
        let (status, p) = get_json(&a, &format!("/api/v1/streams/presence?stream={s}")).await;
        assert_eq!(status, 200, "{p}");
        assert_eq!(p["total_users"], 2, "{s}: {p}");
        let (status, _) = post(&b, "/api/v1/events", json!({"stream": s, "event": "note"})).await;
        assert_eq!(status, 200);
        send_json(&mut bo, json!({"type": "typing", "stream": s})).await;
    }
    // Every stream's note and Bo's typing reach Ann on the other node.
    let (mut notes, mut typing) = (
        std::collections::HashSet::<String>::new(),
        std::collections::HashSet::<String>::new(),
    );
    while notes.len() < streams.len() || typing.len() < streams.len() {
        let v = next_json(&mut ann).await;
        let s = v["stream"].as_str().unwrap_or_default().to_owned();
        match v["type"].as_str() {
            Some("event") if v["event"] == "note" => assert!(notes.insert(s), "each note once"),
            Some("typing") => assert!(typing.insert(s)),
            _ => {}
        }
    }
}
