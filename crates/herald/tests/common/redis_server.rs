//! Real `redis-server` processes for the tests (on free loopback ports), and
//! helpers the Redis tests share.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{API_KEY, Ws, client, next_json};

/// A `redis-server` of this test, killed on drop.
pub struct Redis {
    pub port: u16,
    child: Child,
    cli_args: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Redis {
        Self::start_with(port, &[], &[])
    }

    /// Start with extra server `args`; `cli` are the redis-cli flags that
    /// reach it (password, TLS).
    pub fn start_with(port: u16, args: &[&str], cli: &[&str]) -> Redis {
        let listen = if args.contains(&"--tls-port") {
            vec!["--port".to_owned(), "0".to_owned()]
        } else {
            vec!["--port".to_owned(), port.to_string()]
        };
        let child = Command::new("redis-server")
            .args(&listen)
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        let redis = Redis {
            port,
            child,
            cli_args: cli.iter().map(|s| s.to_string()).collect(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.cli(&["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(&self.cli_args)
            .args(args)
            .output()
            .expect("redis-cli is installed");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Connections this server has accepted since it started.
    pub fn connections_received(&self) -> u64 {
        let info = self.cli(&["INFO", "stats"]);
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("INFO stats has total_connections_received")
    }

    /// The ids of the clients connected now, but for the redis-cli asking.
    pub fn client_ids(&self) -> Vec<String> {
        self.cli(&["CLIENT", "LIST"])
            .lines()
            .filter(|l| !l.contains("cmd=client|list"))
            .filter_map(|l| l.split(' ').next()?.strip_prefix("id=").map(str::to_owned))
            .collect()
    }

    pub fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `redis-cli -p port args…`, trimmed stdout.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli is installed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The next `event` frame (other frames skipped).
pub async fn event_of(ws: &mut Ws) -> Value {
    loop {
        let v = next_json(ws).await;
        if v["type"] == "event" {
            return v;
        }
    }
}

/// Publish events `1..=n` (data `{"n": i}`) to `user` through the node at
/// `addr`, one request at a time, in a task; every publish must succeed.
pub fn publish_in_background(
    addr: std::net::SocketAddr,
    user: &'static str,
    n: u64,
) -> tokio::task::JoinHandle<()> {
    let url = format!("http://{addr}/api/v1/events");
    tokio::spawn(async move {
        let c = client();
        for i in 1..=n {
            let r = c
                .post(&url)
                .bearer_auth(API_KEY)
                .json(&json!({"user_id": user, "event": "note", "data": {"n": i}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    })
}

/// The next `n` events on `ws` are seqs `1..=n`, in order, each once.
pub async fn expect_seqs(ws: &mut Ws, n: u64) {
    for seq in 1..=n {
        let e = event_of(ws).await;
        assert_eq!(e["seq"].as_u64(), Some(seq), "every event once, in order");
    }
}

/// A TCP proxy to a local port whose open connections can be cut silently:
/// after [`Partition::cut`] they stay open and forward nothing either way
/// (a half-open path: no FIN, no RST, bytes vanish). Connections made after
/// the cut are forwarded. Stops on drop.
pub struct Partition {
    pub port: u16,
    cut_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Partition {
    pub async fn start(upstream: u16) -> Partition {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut_below = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let (cut, n) = (cut_below.clone(), next.clone());
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let id = n.fetch_add(1, Ordering::SeqCst);
                let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (down_r, down_w) = down.into_split();
                let (up_r, up_w) = up.into_split();
                let live = {
                    let cut = cut.clone();
                    move || cut.load(Ordering::SeqCst) <= id
                };
                tokio::spawn(forward(down_r, up_w, live.clone()));
                tokio::spawn(forward(up_r, down_w, live));
            }
        });
        Partition {
            port,
            cut_below,
            next,
            accept,
        }
    }

    /// Silence every connection open now.
    pub fn cut(&self) {
        use std::sync::atomic::Ordering;
        self.cut_below
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Silence every connection, open now or made later (they are accepted
    /// and then hear nothing, like a server behind a dead route).
    pub fn cut_for_good(&self) {
        self.cut_below
            .store(u64::MAX, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copy `from` to `to` while `live()`; after that, read and drop everything
/// (the other side sees an open connection that never answers).
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    live: impl Fn() -> bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if live() && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
