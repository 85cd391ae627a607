//! The Pusher protocol side of `herald-bench --target sockudo`: the same
//! fanout and idle measurements driven against a Pusher-compatible server
//! (Sockudo), so it can be compared with Herald on the same machine.
//!
//! - Clients connect to `/app/<key>?protocol=7`, wait for
//!   `pusher:connection_established`, subscribe to the public channel of
//!   their group (`bench-u<N>`, shared by `--per-user` sockets like a Herald
//!   user's stream) and wait for `pusher_internal:subscription_succeeded`.
//! - Events are published through the HTTP API (`POST
//!   /apps/<id>/batch_events`), signed as Pusher specifies (`auth_key`,
//!   `auth_timestamp`, `auth_version=1.0`, `body_md5`, and `auth_signature` =
//!   HMAC-SHA256 of `POST\n<path>\n<sorted query>`).
//! - Each event's data string carries the publish time (`t`, ns since the
//!   epoch) and a per-channel sequence number (`s`) assigned by the
//!   generator, so latency and gaps are measured as for Herald (where the
//!   server assigns `seq`).
//!
//! No new dependency: HMAC-SHA256 comes from `jsonwebtoken` (HS256 signs
//! exactly that) and MD5 is implemented below (RFC 1321).

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use crate::bench::{Counters, Shards, Ws, now_ns};

/// Which server the generator drives.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Herald's own protocol (`/ws`, `POST /api/v1/events`).
    #[default]
    Herald,
    /// A Pusher-protocol server (Sockudo): `/app/<key>`, `batch_events`.
    Sockudo,
}

/// The public channel of fanout group `g` (the `--per-user` sockets of one
/// Herald user share one Pusher channel).
pub(crate) fn channel_of(g: usize) -> String {
    format!("bench-u{g}")
}

/// The WebSocket URL of app `key` on the server at `http` (`http://IP:PORT`).
pub(crate) fn ws_url(http: &str, key: &str) -> String {
    format!(
        "{}/app/{key}?protocol=7&client=herald-bench&version=1.0",
        http.trim_end_matches('/').replacen("http", "ws", 1)
    )
}

/// Wait for the next text frame whose `event` is one of `want`, failing on
/// an error event (Pusher protocol 7's `pusher:` or Sockudo V2's `sockudo:`
/// prefix) or after 10 s.
pub(crate) async fn expect_event(ws: &mut Ws, want: &[&str]) -> anyhow::Result<String> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .with_context(|| format!("no {want:?} within 10 s"))?
            .with_context(|| format!("closed before {want:?}"))??;
        match msg {
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t)?;
                let event = v["event"].as_str().unwrap_or_default();
                if want.contains(&event) {
                    return Ok(t.to_string());
                }
                if matches!(
                    event,
                    "pusher:error"
                        | "pusher_internal:subscription_error"
                        | "sockudo:error"
                        | "sockudo_internal:subscription_error"
                ) {
                    bail!("server refused: {t}");
                }
            }
            Message::Close(f) => bail!("closed while waiting for {want:?}: {f:?}"),
            _ => {}
        }
    }
}

/// Open one Pusher connection from `source`, subscribe it to `channel` and
/// wait until the subscription succeeded.
pub(crate) async fn open_client(
    addr: SocketAddr,
    url: &str,
    source: IpAddr,
    channel: &str,
) -> anyhow::Result<Ws> {
    // The same client as the Herald target's.
    let mut ws = crate::bench::dial(addr, url, source).await?;
    expect_event(&mut ws, &["pusher:connection_established"]).await?;
    let sub = serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel}});
    ws.send(Message::text(sub.to_string())).await?;
    expect_event(&mut ws, &["pusher_internal:subscription_succeeded"]).await?;
    Ok(ws)
}

/// A Pusher (or Sockudo V2) frame: its event and its data, borrowed.
#[derive(Deserialize)]
pub(crate) struct Frame<'a> {
    #[serde(borrow)]
    pub(crate) event: Cow<'a, str>,
    #[serde(default, borrow)]
    pub(crate) data: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct BenchData {
    #[serde(default)]
    t: u64,
    #[serde(default)]
    s: u64,
}

/// Read events until the socket ends: record latency, count gaps in the
/// per-channel sequence, answer the server's `pusher:ping`.
pub(crate) async fn read_events(
    mut ws: Ws,
    idx: usize,
    counters: Arc<Counters>,
    hist: Arc<Shards>,
) {
    let mut last = 0u64;
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Text(t)) => {
                let Ok(f) = serde_json::from_str::<Frame>(&t) else {
                    continue;
                };
                if f.event == "pusher:ping" {
                    let pong = Message::text(r#"{"event":"pusher:pong","data":{}}"#);
                    if ws.send(pong).await.is_err() {
                        break;
                    }
                    continue;
                }
                if f.event != "bench" {
                    continue;
                }
                let Some(Ok(d)) = f.data.map(|d| serde_json::from_str::<BenchData>(&d)) else {
                    continue;
                };
                if d.s != last + 1 {
                    counters.gaps.fetch_add(1, Ordering::Relaxed);
                }
                last = d.s;
                counters.received.fetch_add(1, Ordering::Relaxed);
                counters.bytes.fetch_add(t.len() as u64, Ordering::Relaxed);
                if d.t > 0 {
                    hist.record(idx, now_ns().saturating_sub(d.t) / 1000);
                }
            }
            Ok(Message::Close(_)) => {
                counters.closed_by_server.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

/// A Pusher HTTP API client for one app.
#[derive(Clone)]
pub(crate) struct Publisher {
    http: reqwest::Client,
    base: String,
    app_id: String,
    key: String,
    secret: String,
}

impl Publisher {
    pub(crate) fn new(
        http: reqwest::Client,
        base: &str,
        app_id: &str,
        key: &str,
        secret: &str,
    ) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            app_id: app_id.to_owned(),
            key: key.to_owned(),
            secret: secret.to_owned(),
        }
    }

    /// The body of a `batch_events` call: one event named `bench` per
    /// `(channel, seq)`, its data a JSON string `{"t":…,"s":…,"pad":"…"}`.
    pub(crate) fn batch_body(events: &[(usize, u64)], t: u64, pad: &str) -> Vec<u8> {
        let batch: Vec<_> = events
            .iter()
            .map(|(g, s)| {
                serde_json::json!({
                    "name": "bench",
                    "channel": channel_of(*g),
                    "data": format!(r#"{{"t":{t},"s":{s},"pad":"{pad}"}}"#),
                })
            })
            .collect();
        serde_json::json!({ "batch": batch })
            .to_string()
            .into_bytes()
    }

    /// `POST /apps/<id>/batch_events` with `body`, signed; Ok when the
    /// server answered 2xx.
    pub(crate) async fn post_batch(&self, body: Vec<u8>) -> anyhow::Result<()> {
        self.post_signed("/batch_events", body, None).await?;
        Ok(())
    }

    /// `POST /apps/<id><path>` with the JSON `body`, signed; the answer's
    /// JSON when the server answered 2xx (the AI transport's creates and
    /// appends, `sockudo_text.rs`).
    pub(crate) async fn post_json(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<serde_json::Value> {
        let text = self
            .post_signed(path, body, Some(Duration::from_secs(30)))
            .await?;
        Ok(serde_json::from_str(&text)?)
    }

    /// `POST /apps/<id><path>` with `body`, signed; the answer's body when
    /// the server answered 2xx.
    async fn post_signed(
        &self,
        path: &str,
        body: Vec<u8>,
        timeout: Option<Duration>,
    ) -> anyhow::Result<String> {
        let path = format!("/apps/{}{path}", self.app_id);
        let query = signed_query(&self.key, &self.secret, "POST", &path, &body, unix_secs());
        let mut request = self
            .http
            .post(format!("{}{path}?{query}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(t) = timeout {
            request = request.timeout(t);
        }
        let r = request.send().await?;
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("HTTP {status}: {text}");
        }
        Ok(text)
    }
}

fn unix_secs() -> u64 {
    now_ns() / 1_000_000_000
}

/// The query string of a signed Pusher API request (auth_signature last).
pub(crate) fn signed_query(
    key: &str,
    secret: &str,
    method: &str,
    path: &str,
    body: &[u8],
    timestamp: u64,
) -> String {
    // Sorted by key, as the signature requires.
    let params = format!(
        "auth_key={key}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={}",
        md5_hex(body)
    );
    let signature = hmac_sha256_hex(secret, &format!("{method}\n{path}\n{params}"));
    format!("{params}&auth_signature={signature}")
}

/// HMAC-SHA256 of `message` under `secret`, lowercase hex. jsonwebtoken's
/// HS256 signer computes exactly this (and returns it base64url-encoded).
pub(crate) fn hmac_sha256_hex(secret: &str, message: &str) -> String {
    let sig = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        jsonwebtoken::Algorithm::HS256,
    )
    .unwrap_or_default();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig)
        .unwrap_or_default();
    hex(&raw)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// MD5 (RFC 1321) of `data`, lowercase hex: Pusher's `body_md5`.
pub(crate) fn md5_hex(data: &[u8]) -> String {
    const S: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5,
        9, 14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10,
        15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ];
    const K: [u32; 64] = [
        0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613,
        0xfd469501, 0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193,
        0xa679438e, 0x49b40821, 0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d,
        0x02441453, 0xd8a1e681, 0xe7d3fbc8, 0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed,
        0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a, 0xfffa3942, 0x8771f681, 0x6d9d6122,
        0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70, 0x289b7ec6, 0xeaa127fa,
        0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665, 0xf4292244,
        0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
        0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb,
        0xeb86d391,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_le_bytes());
    let mut h: [u32; 4] = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476];
    for chunk in msg.chunks_exact(64) {
        let mut m = [0u32; 16];
        for (i, w) in chunk.chunks_exact(4).enumerate() {
            m[i] = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        }
        let [mut a, mut b, mut c, mut d] = h;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(K[i]).wrapping_add(m[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(S[i]));
        }
        h[0] = h[0].wrapping_add(a);
        h[1] = h[1].wrapping_add(b);
        h[2] = h[2].wrapping_add(c);
        h[3] = h[3].wrapping_add(d);
    }
    let mut out = Vec::with_capacity(16);
    for w in h {
        out.extend_from_slice(&w.to_le_bytes());
    }
    hex(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_matches_rfc_1321() {
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(
            md5_hex(b"The quick brown fox jumps over the lazy dog"),
            "9e107d9d372bb6826bd81d3542a419d6"
        );
        // Longer than one block, and a length whose padding spills over.
        assert_eq!(md5_hex(&[b'a'; 1000]), "cabe45dcc9ae5b66ba86600cca6b8ba8");
        assert_eq!(md5_hex(&[b'x'; 56]), "668a72d5ba17f08e62dabcafad6db14b");
    }

    #[test]
    fn signature_matches_pushers_documented_example() {
        // The example of Pusher's HTTP API reference ("Generating authentication signatures").
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let q = signed_query(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            "POST",
            "/apps/3/events",
            body,
            1353088179,
        );
        assert_eq!(
            q,
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn batch_body_carries_time_and_sequence() {
        let body = Publisher::batch_body(&[(3, 7)], 42, "xx");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["batch"][0]["channel"], "bench-u3");
        let d: BenchData = serde_json::from_str(v["batch"][0]["data"].as_str().unwrap()).unwrap();
        assert_eq!((d.t, d.s), (42, 7));
    }
}
