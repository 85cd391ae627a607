//! Real `redis-server` processes for the tests (on free loopback ports), and
//! helpers the Redis tests share.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{API_KEY, Ws, client, config, next_json};

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
        // Its own directory: a replica's full sync writes an RDB file there,
        // which a later server started in the same directory would load.
        let dir = std::env::temp_dir().join(format!("herald-redis-{}-{port}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let child = Command::new("redis-server")
            .args(&listen)
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
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
        // The answer came from this test's server, not another's that took
        // the port first (this one then exits).
        let pid = format!("process_id:{}", redis.child.id());
        assert!(
            redis.cli(&["INFO", "server"]).lines().any(|l| l == pid),
            "port {port} is another redis-server's"
        );
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
/// the cut are forwarded. [`Partition::redial`] replaces the server's end of
/// every open connection under the client. Stops on drop.
pub struct Partition {
    pub port: u16,
    cut_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Milliseconds each new connection waits before it is forwarded.
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    redials: tokio::sync::watch::Sender<u64>,
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
        let (redials, redialed) = tokio::sync::watch::channel(0);
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (cut, n, delay) = (cut_below.clone(), next.clone(), delay_ms.clone());
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let id = n.fetch_add(1, Ordering::SeqCst);
                let live = {
                    let cut = cut.clone();
                    move || cut.load(Ordering::SeqCst) <= id
                };
                let wait = std::time::Duration::from_millis(delay.load(Ordering::SeqCst));
                let redialed = redialed.clone();
                tokio::spawn(async move {
                    // A slow path: the client's handshake waits this long.
                    tokio::time::sleep(wait).await;
                    proxy(down, upstream, live, redialed).await
                });
            }
        });
        Partition {
            port,
            cut_below,
            next,
            delay_ms,
            redials,
            accept,
        }
    }

    /// Make every connection made from now on wait `d` before it is
    /// forwarded (a slow handshake; connections open now are not affected).
    pub fn slow_new(&self, d: Duration) {
        self.delay_ms
            .store(d.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
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

    /// Give every open connection a new connection to the server, without a
    /// word to the client: the server drops the old one and its
    /// subscriptions; the client keeps talking (a RESP3 client's `HELLO` is
    /// replayed first) and hears no push. Call it while the path is quiet.
    pub fn redial(&self) {
        self.redials.send_modify(|n| *n += 1);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Forward one connection both ways while `live()` (after that, read and
/// drop everything: the client sees an open connection that never answers);
/// on a redial, reconnect to `upstream` and go on.
async fn proxy(
    mut down: tokio::net::TcpStream,
    upstream: u16,
    live: impl Fn() -> bool,
    mut redials: tokio::sync::watch::Receiver<u64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const MARK: &[u8] = b"herald-redialed\r\n";
    // Only redials asked for after this connection opened.
    redials.borrow_and_update();
    let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let (mut from_down, mut from_up) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    // The client's first command when it is a HELLO (RESP3), for a redial.
    let mut hello: Option<Option<Vec<u8>>> = None;
    loop {
        tokio::select! {
            r = down.read(&mut from_down) => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let got = &from_down[..n];
                hello.get_or_insert_with(|| {
                    first_command(got)
                        .filter(|c| {
                            let c = String::from_utf8_lossy(c).to_ascii_uppercase();
                            c.split("\r\n").nth(2) == Some("HELLO")
                        })
                        .map(<[u8]>::to_vec)
                });
                if live() && up.write_all(got).await.is_err() {
                    return;
                }
            }
            r = up.read(&mut from_up) => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if live() && down.write_all(&from_up[..n]).await.is_err() {
                    return;
                }
            }
            changed = redials.changed() => {
                if changed.is_err() {
                    return;
                }
                let Ok(new) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                    return;
                };
                up = new;
                if let Some(Some(hello)) = &hello {
                    // Replay the HELLO; its answer (and the marker's) is
                    // read here, never reaching the client.
                    let _ = up.write_all(hello).await;
                    let _ = up.write_all(b"ECHO herald-redialed\r\n").await;
                    let mut seen = Vec::new();
                    while !seen.windows(MARK.len()).any(|w| w == MARK) {
                        match up.read(&mut from_up).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&from_up[..n]),
                        }
                    }
                }
            }
        }
    }
}

/// The first RESP command (an array of bulk strings) in `bytes`, if whole.
fn first_command(bytes: &[u8]) -> Option<&[u8]> {
    fn line(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = at + bytes.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        Some((&bytes[at..end], end + 2))
    }
    let (head, mut at) = line(bytes, 0)?;
    let args: usize = std::str::from_utf8(head.strip_prefix(b"*")?)
        .ok()?
        .parse()
        .ok()?;
    for _ in 0..args {
        let (len, next) = line(bytes, at)?;
        let len: usize = std::str::from_utf8(len.strip_prefix(b"$")?)
            .ok()?
            .parse()
            .ok()?;
        at = next + len + 2;
    }
    bytes.get(..at)
}

/// A test server's config on `redis` (prefix `t`, default timing).
pub fn node_config(redis: &Redis) -> herald::Config {
    let mut cfg = config();
    cfg.redis = Some(herald::broker::redis::RedisConfig {
        nodes: herald::broker::redis::RedisNodes::Single(redis.url()),
        prefix: "t".into(),
        timing: Default::default(),
    });
    cfg
}

/// Wait until every one of `nodes` has completed two more sweeper passes
/// (so each swept whole after the moment this is called).
pub async fn wait_for_sweeps(nodes: &[&herald::Server]) {
    let swept: Vec<u64> = nodes.iter().map(|n| n.sweeps()).collect();
    super::wait_until(
        Duration::from_secs(10),
        || nodes.iter().zip(&swept).all(|(n, s)| n.sweeps() >= s + 2),
        || "every node swept twice more".into(),
    )
    .await;
}
