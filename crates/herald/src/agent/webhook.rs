//! The webhook agent backend: a signed JSON POST per request, with a timeout
//! and bounded retries (exponential backoff with full jitter) on 5xx, 429,
//! timeouts and connection errors; no retry on other 4xx.
//!
//! Signature: `X-Herald-Signature: v2=<hex HMAC-SHA256(secret, "<timestamp>.<delivery>.<body>")>`
//! with `X-Herald-Timestamp: <unix seconds>` and `X-Herald-Delivery: <id>`. A
//! receiver recomputes it over the raw body and rejects timestamps outside its
//! replay window ([`verify`]). The delivery id is the same for every retry of
//! one request and is signed, so a backend can deduplicate on it: a captured
//! request replayed with another id does not verify.
//!
//! The webhook URL may carry secrets (userinfo, a query token): it never
//! reaches clients, and logs show it [`redact`]ed.

use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;

use super::{AgentBackend, BackendRequest, DeliveryError};
use crate::BoxFuture;
pub use crate::config::WebhookConfig;

/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-herald-signature";
/// Header carrying the signing timestamp (unix seconds).
pub const TIMESTAMP_HEADER: &str = "x-herald-timestamp";
/// Header carrying the delivery id (stable across retries).
pub const DELIVERY_HEADER: &str = "x-herald-delivery";

/// Longest wait between two attempts (backoff or Retry-After).
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The webhook backend.
#[derive(Debug)]
pub struct Webhook {
    cfg: WebhookConfig,
    client: reqwest::Client,
}

impl Webhook {
    /// A webhook backend; fails if the HTTP client cannot be built.
    pub fn new(cfg: WebhookConfig) -> Result<Self, reqwest::Error> {
        // Redirects are never followed: a 307 would re-POST the signed body
        // to wherever it points, a 302 would turn it into a GET.
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self { cfg, client })
    }
}

/// `hex(HMAC-SHA256(secret, "<timestamp>.<delivery>.<body>"))`.
pub fn sign(secret: &str, timestamp: u64, delivery: &str, body: &[u8]) -> String {
    hex::encode(
        signed(secret, timestamp, delivery, body)
            .finalize()
            .into_bytes(),
    )
}

fn signed(secret: &str, timestamp: u64, delivery: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = mac(secret);
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(delivery.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// `url` without userinfo, query or fragment, for logs (the webhook URL may
/// carry a backend's secret there).
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "<unparsable url>".to_owned(),
    }
}

fn mac(secret: &str) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any size"),
    }
}

/// Why a webhook signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The timestamp header is missing or not a number.
    #[error("missing or malformed timestamp")]
    BadTimestamp,
    /// The timestamp is outside the replay window.
    #[error("timestamp outside the replay window")]
    Stale,
    /// The delivery id header is missing.
    #[error("missing delivery id")]
    MissingDelivery,
    /// The signature header is missing or not `v2=<hex>`.
    #[error("missing or malformed signature")]
    BadSignature,
    /// The signature does not match.
    #[error("signature mismatch")]
    Mismatch,
}

/// The three signing headers of a webhook request, as received.
#[derive(Debug, Clone, Copy, Default)]
pub struct SignedHeaders<'a> {
    /// `X-Herald-Timestamp`.
    pub timestamp: Option<&'a str>,
    /// `X-Herald-Delivery`.
    pub delivery: Option<&'a str>,
    /// `X-Herald-Signature`.
    pub signature: Option<&'a str>,
}

/// Verify a webhook request as a backend would: `headers` are the signing
/// headers, `now` is the receiver's unix time, `window` the accepted clock
/// difference. Deduplicate on the delivery id afterwards: it is signed.
pub fn verify(
    secret: &str,
    headers: SignedHeaders<'_>,
    body: &[u8],
    now: u64,
    window: Duration,
) -> Result<(), VerifyError> {
    let ts: u64 = headers
        .timestamp
        .and_then(|t| t.parse().ok())
        .ok_or(VerifyError::BadTimestamp)?;
    if now.abs_diff(ts) > window.as_secs() {
        return Err(VerifyError::Stale);
    }
    let delivery = headers.delivery.ok_or(VerifyError::MissingDelivery)?;
    let given = headers
        .signature
        .and_then(|s| s.strip_prefix("v2="))
        .and_then(|h| hex::decode(h).ok())
        .ok_or(VerifyError::BadSignature)?;
    signed(secret, ts, delivery, body)
        .verify_slice(&given)
        .map_err(|_| VerifyError::Mismatch)
}

/// How long to wait before retry number `attempt` (from 1): the backend's
/// `Retry-After` when it sent one, else full jitter — uniform in
/// `[0, base × 2^(attempt-1)]`; both capped at [`MAX_BACKOFF`].
fn retry_wait(
    attempt: u32,
    base: Duration,
    retry_after: Option<Duration>,
    rng: &mut impl Rng,
) -> Duration {
    if let Some(d) = retry_after {
        return d.min(MAX_BACKOFF);
    }
    let cap = base
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    rng.random_range(Duration::ZERO..=cap)
}

/// Most bytes of a 2xx answer's body read back (for a `subscribe_request`).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

impl AgentBackend for Webhook {
    fn deliver<'a>(&'a self, req: &'a BackendRequest) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move { self.post(req, false).await.map(drop) })
    }

    fn ask<'a>(&'a self, req: &'a BackendRequest) -> BoxFuture<'a, Result<Vec<u8>, DeliveryError>> {
        Box::pin(self.post(req, true))
    }
}

impl Webhook {
    /// POST `req`, signed, with the retries; on a 2xx, its body (at most
    /// [`MAX_ANSWER_BYTES`]) when `read_body`, else nothing.
    async fn post(&self, req: &BackendRequest, read_body: bool) -> Result<Vec<u8>, DeliveryError> {
        {
            let body = serde_json::to_vec(req).map_err(|e| DeliveryError::Unavailable {
                detail: e.to_string(),
            })?;
            let delivery = format!("{:032x}", rand::random::<u128>());
            let mut last = String::new();
            let mut retry_after: Option<Duration> = None;
            for attempt in 0..=self.cfg.retries {
                if attempt > 0 {
                    let wait = retry_wait(
                        attempt,
                        self.cfg.backoff,
                        retry_after.take(),
                        &mut rand::rng(),
                    );
                    tokio::time::sleep(wait).await;
                }
                let ts = crate::clock::unix_now();
                let sent = self
                    .client
                    .post(&self.cfg.url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header(TIMESTAMP_HEADER, ts.to_string())
                    .header(
                        SIGNATURE_HEADER,
                        format!("v2={}", sign(&self.cfg.secret, ts, &delivery, &body)),
                    )
                    .header(DELIVERY_HEADER, &delivery)
                    .body(body.clone())
                    .send()
                    .await;
                let outcome = match sent {
                    Ok(mut resp) if resp.status().is_success() => {
                        metrics::counter!(crate::telemetry::WEBHOOK_REQUESTS, "outcome" => "ok")
                            .increment(1);
                        let mut answer = Vec::new();
                        while read_body && answer.len() < MAX_ANSWER_BYTES {
                            match resp.chunk().await {
                                Ok(Some(chunk)) => answer.extend_from_slice(&chunk),
                                Ok(None) => break,
                                Err(e) => {
                                    return Err(DeliveryError::Unavailable {
                                        detail: format!("answer unreadable: {}", e.without_url()),
                                    });
                                }
                            }
                        }
                        return Ok(answer);
                    }
                    Ok(resp) => {
                        let status = resp.status();
                        retry_after = resp
                            .headers()
                            .get(reqwest::header::RETRY_AFTER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.trim().parse::<u64>().ok())
                            .map(Duration::from_secs);
                        if status.is_redirection() {
                            // The target is not logged: it may hold secrets.
                            tracing::warn!(
                                url = %redact(&self.cfg.url),
                                status = status.as_u16(),
                                "the webhook answered a redirect; Herald does not follow redirects: set webhook_url to the final address"
                            );
                        }
                        if (status.is_client_error() && status.as_u16() != 429)
                            || status.is_redirection()
                        {
                            metrics::counter!(crate::telemetry::WEBHOOK_REQUESTS, "outcome" => "rejected").increment(1);
                            return Err(DeliveryError::Rejected {
                                status: status.as_u16(),
                            });
                        }
                        format!("HTTP {status}")
                    }
                    Err(e) if e.is_timeout() => "timeout".to_owned(),
                    // Without the URL: it may hold the backend's secret.
                    Err(e) => format!("request failed: {}", e.without_url()),
                };
                metrics::counter!(crate::telemetry::WEBHOOK_REQUESTS, "outcome" => "retryable_failure").increment(1);
                tracing::debug!(attempt, outcome = %outcome, "webhook attempt failed");
                last = outcome;
            }
            tracing::warn!(
                url = %redact(&self.cfg.url),
                last = %last,
                "webhook delivery failed after retries"
            );
            Err(DeliveryError::Unavailable { detail: last })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Issue 17, finding 12: the backoff is full jitter over a doubling cap
    /// (seeded, so exact), capped; a Retry-After wins, capped too.
    #[test]
    fn retries_wait_with_full_jitter_or_as_the_backend_asks() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let base = Duration::from_millis(100);
        for (attempt, cap_ms) in [(1, 100), (2, 200), (3, 400), (7, 5000), (40, 5000)] {
            let cap = Duration::from_millis(cap_ms);
            let waits: Vec<Duration> = (0..2000)
                .map(|_| retry_wait(attempt, base, None, &mut rng))
                .collect();
            let (min, max) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
            assert!(*max <= cap, "attempt {attempt}: {max:?} over {cap:?}");
            // Spread over the whole range, not a fixed delay.
            assert!(
                *min < cap / 20 && *max > cap * 19 / 20,
                "attempt {attempt}: {min:?}..{max:?}"
            );
            let mean = waits.iter().sum::<Duration>() / waits.len() as u32;
            assert!(
                mean > cap * 2 / 5 && mean < cap * 3 / 5,
                "attempt {attempt}: mean {mean:?}"
            );
        }
        let asked = Some(Duration::from_secs(2));
        assert_eq!(retry_wait(1, base, asked, &mut rng), Duration::from_secs(2));
        assert_eq!(
            retry_wait(1, base, Some(Duration::ZERO), &mut rng),
            Duration::ZERO
        );
        assert_eq!(
            retry_wait(1, base, Some(Duration::from_secs(3600)), &mut rng),
            MAX_BACKOFF
        );
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let body = br#"{"type":"user_message"}"#;
        let sig = format!("v2={}", sign("s", 1000, "d1", body));
        let h = SignedHeaders {
            timestamp: Some("1000"),
            delivery: Some("d1"),
            signature: Some(&sig),
        };
        let w = Duration::from_secs(300);
        assert_eq!(verify("s", h, body, 1100, w), Ok(()));
        assert_eq!(verify("s", h, body, 2000, w), Err(VerifyError::Stale));
        assert_eq!(verify("t", h, body, 1000, w), Err(VerifyError::Mismatch));
        assert_eq!(verify("s", h, b"{}", 1000, w), Err(VerifyError::Mismatch));
        let no_ts = SignedHeaders {
            timestamp: None,
            ..h
        };
        assert_eq!(
            verify("s", no_ts, body, 1000, w),
            Err(VerifyError::BadTimestamp)
        );
        let bad_sig = SignedHeaders {
            signature: Some("nope"),
            ..h
        };
        assert_eq!(
            verify("s", bad_sig, body, 1000, w),
            Err(VerifyError::BadSignature)
        );
        // The old scheme (timestamp and body only) is refused.
        let v1 = SignedHeaders {
            signature: Some("v1=00"),
            ..h
        };
        assert_eq!(
            verify("s", v1, body, 1000, w),
            Err(VerifyError::BadSignature)
        );
    }

    /// A captured request replayed with a fresh delivery id (so that a
    /// receiver deduplicating on it would take it again) does not verify.
    #[test]
    fn the_delivery_id_is_signed() {
        let body = br#"{"type":"user_message"}"#;
        let sig = format!("v2={}", sign("s", 1000, "d1", body));
        let replay = SignedHeaders {
            timestamp: Some("1000"),
            delivery: Some("d2"),
            signature: Some(&sig),
        };
        let w = Duration::from_secs(300);
        assert_eq!(
            verify("s", replay, body, 1000, w),
            Err(VerifyError::Mismatch)
        );
        let missing = SignedHeaders {
            delivery: None,
            ..replay
        };
        assert_eq!(
            verify("s", missing, body, 1000, w),
            Err(VerifyError::MissingDelivery)
        );
    }

    #[test]
    fn redact_drops_userinfo_query_and_fragment() {
        assert_eq!(
            redact("https://user:pw@agent.example:8443/hook?token=SECRET#x"),
            "https://agent.example:8443/hook"
        );
        assert_eq!(redact("not a url"), "<unparsable url>");
    }
}
