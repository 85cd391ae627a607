//! Client authentication: JWT verification (HS256, RS256, ES256) and minting
//! development tokens.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{Config, JwtKey};

/// The claims Herald uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// The shared streams the user may read (`"r"`) or read and write
    /// (`"rw"`): a stream's name, or a prefix ending in `*`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub streams: BTreeMap<String, String>,
}

/// What a user may do with a shared stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Nothing: not readable, and not told apart from a stream that does not exist.
    None,
    /// Read it (`subscribe`).
    Read,
    /// Read it and write to it (`user_message`, `cancel`).
    Write,
}

/// Most entries of a token's `streams` claim.
pub const MAX_STREAM_GRANTS: usize = 64;

impl Claims {
    /// What the token grants on shared stream `stream`: the most any of
    /// its entries gives (an exact name, or a prefix ending in `*`).
    pub fn access(&self, stream: &str) -> Access {
        self.streams
            .iter()
            .filter(|(pattern, _)| match pattern.strip_suffix('*') {
                Some(prefix) => stream.starts_with(prefix),
                None => pattern.as_str() == stream,
            })
            .map(|(_, mode)| {
                if mode == "rw" {
                    Access::Write
                } else {
                    Access::Read
                }
            })
            .max()
            .unwrap_or(Access::None)
    }
}

/// The `streams` claim checked: an object of at most [`MAX_STREAM_GRANTS`]
/// entries, each a name or prefix (`…*`) of 1–201 bytes mapped to `"r"` or `"rw"`.
fn stream_grants(v: Option<serde_json::Value>) -> Result<BTreeMap<String, String>, AuthError> {
    let Some(v) = v else {
        return Ok(BTreeMap::new());
    };
    let serde_json::Value::Object(map) = v else {
        return Err(AuthError::InvalidStreams);
    };
    if map.len() > MAX_STREAM_GRANTS {
        return Err(AuthError::InvalidStreams);
    }
    map.into_iter()
        .map(|(pattern, mode)| match mode.as_str() {
            Some(m @ ("r" | "rw")) if !pattern.is_empty() && pattern.len() <= 201 => {
                Ok((pattern, m.to_owned()))
            }
            _ => Err(AuthError::InvalidStreams),
        })
        .collect()
}

/// The claims as decoded, before Herald checks their presence and types
/// (so a missing or mistyped claim is told apart without reading error text).
#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    sub: Option<serde_json::Value>,
    #[serde(default)]
    exp: Option<serde_json::Value>,
    #[serde(default)]
    streams: Option<serde_json::Value>,
}

/// Why a JWT key could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The public key file is neither a PEM RSA nor a PEM EC key.
    #[error("not a PEM RSA or EC public key: {0}")]
    NotPem(String),
}

/// Why a token was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in hello, header or subprotocol.
    #[error("missing token")]
    Missing,
    /// Longer than the token limit.
    #[error("token too long")]
    TooLong,
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// Not a well-formed JWT, or a claim of the wrong type.
    #[error("malformed token")]
    Malformed,
    /// Signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `alg` is not the configured algorithm (this includes `none`).
    #[error("algorithm not allowed")]
    WrongAlgorithm,
    /// A required claim is absent.
    #[error("missing claim {0}")]
    MissingClaim(String),
    /// `sub` is empty or too long.
    #[error("invalid sub")]
    InvalidSub,
    /// The `streams` claim is not an object of at most 64 names or
    /// prefixes (`…*`) mapped to `"r"` or `"rw"`.
    #[error("invalid streams claim")]
    InvalidStreams,
    /// The header lists critical extensions (`crit`); Herald understands
    /// none, so it must refuse the token (RFC 7515 §4.1.11).
    #[error("unsupported critical header extension")]
    CriticalExtension,
    /// `aud` does not match.
    #[error("wrong audience")]
    WrongAudience,
    /// `iss` does not match.
    #[error("wrong issuer")]
    WrongIssuer,
    /// A `refresh` token names another user.
    #[error("token is for another user")]
    OtherSubject,
}

/// Verifies client tokens against the configured key and claims.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    max_token_bytes: usize,
    max_sub_bytes: usize,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish()
    }
}

impl Verifier {
    /// Build the verifier from the config. Fails when the public key is not a
    /// PEM RSA or EC key.
    pub fn from_config(cfg: &Config) -> Result<Self, KeyError> {
        let (key, alg) = match &cfg.jwt_key {
            JwtKey::Hs256(secret) => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            JwtKey::PublicKeyPem(pem) => match DecodingKey::from_rsa_pem(pem) {
                Ok(k) => (k, Algorithm::RS256),
                Err(_) => match DecodingKey::from_ec_pem(pem) {
                    Ok(k) => (k, Algorithm::ES256),
                    Err(e) => return Err(KeyError::NotPem(e.to_string())),
                },
            },
        };
        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        validation.leeway = cfg.jwt_leeway.as_secs();
        // `nbf`, when present, is checked with the same leeway as `exp`.
        validation.validate_nbf = true;
        // A configured audience or issuer is *required*: jsonwebtoken checks
        // `aud`/`iss` only when present unless they are listed here.
        let mut required = vec!["exp", "sub"];
        match &cfg.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &cfg.jwt_issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Self {
            key,
            validation,
            max_token_bytes: cfg.limits.max_token_bytes,
            max_sub_bytes: cfg.limits.max_sub_bytes,
        })
    }

    /// Verify `token` and return its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > self.max_token_bytes {
            return Err(AuthError::TooLong);
        }
        let data =
            jsonwebtoken::decode::<RawClaims>(token, &self.key, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    ErrorKind::InvalidSignature => AuthError::BadSignature,
                    ErrorKind::InvalidAlgorithm
                    | ErrorKind::MissingAlgorithm
                    | ErrorKind::InvalidAlgorithmName => AuthError::WrongAlgorithm,
                    ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
                    ErrorKind::InvalidAudience => AuthError::WrongAudience,
                    ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                    // `alg: none` (and any name jsonwebtoken does not know)
                    // fails its header parse: say what is wrong. Only read on
                    // this failure path, never for a good token.
                    _ if header_alg(token).is_some_and(|a| a.parse::<Algorithm>().is_err()) => {
                        AuthError::WrongAlgorithm
                    }
                    _ => AuthError::Malformed,
                }
            })?;
        let claims = match data.claims {
            RawClaims { sub: None, .. } => return Err(AuthError::MissingClaim("sub".into())),
            RawClaims { exp: None, .. } => return Err(AuthError::MissingClaim("exp".into())),
            RawClaims {
                sub: Some(serde_json::Value::String(sub)),
                exp: Some(exp),
                streams,
            } => Claims {
                sub,
                exp: numeric_date(&exp).ok_or(AuthError::Malformed)?,
                streams: stream_grants(streams)?,
            },
            RawClaims { .. } => return Err(AuthError::Malformed),
        };
        if claims.sub.is_empty() || claims.sub.len() > self.max_sub_bytes {
            return Err(AuthError::InvalidSub);
        }
        if header_json(token).is_some_and(|h| h.get("crit").is_some()) {
            return Err(AuthError::CriticalExtension);
        }
        Ok(claims)
    }
}

impl Verifier {
    /// When a verified token stops being accepted: its `exp` plus the
    /// configured leeway (the connection's expiry timer fires then).
    pub fn expires_at(&self, claims: &Claims) -> u64 {
        claims.exp.saturating_add(self.validation.leeway)
    }
}

/// The `alg` of a token's header, if the header is readable JSON.
fn header_alg(token: &str) -> Option<String> {
    header_json(token)?.get("alg")?.as_str().map(str::to_owned)
}

/// A token's header as JSON, if it is readable.
fn header_json(token: &str) -> Option<serde_json::Value> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A NumericDate (RFC 7519 §2): seconds since the epoch, integer or not;
/// a fraction is dropped (the earlier second, never a later expiry).
fn numeric_date(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f.floor() as u64)
    })
}

/// Mint an HS256 token for `user` valid for `ttl` (for `herald token`, the dev
/// endpoint and tests).
pub fn mint_hs256(
    secret: &str,
    user: &str,
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    mint_hs256_with_streams(secret, user, ttl, &BTreeMap::new())
}

/// [`mint_hs256`] with a `streams` claim (shared streams the user may read,
/// `"r"`, or read and write, `"rw"`; names or prefixes ending in `*`).
pub fn mint_hs256_with_streams(
    secret: &str,
    user: &str,
    ttl: Duration,
    streams: &BTreeMap<String, String>,
) -> Result<String, jsonwebtoken::errors::Error> {
    /// What a minted token says: `iat` and a random `jti` make two tokens
    /// minted for one user in the same second different (a client that must
    /// not reuse a kicked token can tell a fresh one).
    #[derive(Serialize)]
    struct Minted<'a> {
        sub: &'a str,
        exp: u64,
        iat: u64,
        jti: String,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        streams: &'a BTreeMap<String, String>,
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let claims = Minted {
        sub: user,
        exp: (now + ttl).as_secs(),
        iat: now.as_secs(),
        jti: format!("{:016x}", rand::random::<u64>()),
        streams,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// The token of an `Authorization: Bearer <token>` header (scheme matched
/// case-insensitively, as RFC 7235 says), if there is one.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub use crate::clock::unix_now;

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    const S: &str = "s3cret-0123456789-abcdefghijklmnop";

    fn verifier() -> Verifier {
        Verifier::from_config(&Config::for_tests(S, "k-0123456789abcdef")).unwrap()
    }

    fn signed(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(S.as_bytes()),
        )
        .unwrap()
    }

    fn with_leeway(secs: u64) -> Verifier {
        let mut cfg = Config::for_tests(S, "k-0123456789abcdef");
        cfg.jwt_leeway = Duration::from_secs(secs);
        Verifier::from_config(&cfg).unwrap()
    }

    /// Issue 14, finding 9: `nbf` is enforced (with the leeway), a
    /// fractional NumericDate `exp` is accepted, and the expiry the
    /// connection's timer uses includes the leeway.
    #[test]
    fn time_claims_follow_rfc_7519() {
        let now = unix_now();
        let v = verifier();
        let later = signed(serde_json::json!({"sub": "a", "exp": now + 7200, "nbf": now + 3600}));
        assert_eq!(v.verify(&later), Err(AuthError::NotYetValid));
        let soon = signed(serde_json::json!({"sub": "a", "exp": now + 7200, "nbf": now + 30}));
        assert_eq!(v.verify(&soon), Err(AuthError::NotYetValid));
        assert!(
            with_leeway(60).verify(&soon).is_ok(),
            "nbf within the leeway"
        );
        let started = signed(serde_json::json!({"sub": "a", "exp": now + 60, "nbf": now - 1}));
        assert!(v.verify(&started).is_ok());

        let float = signed(serde_json::json!({"sub": "a", "exp": (now + 60) as f64 + 0.75}));
        assert_eq!(v.verify(&float).map(|c| c.exp), Ok(now + 60));
        for bad in [serde_json::json!(-5.0), serde_json::json!("soon")] {
            let t = signed(serde_json::json!({"sub": "a", "exp": bad}));
            assert!(v.verify(&t).is_err(), "{bad}");
        }

        let lenient = with_leeway(120);
        let recent = signed(serde_json::json!({"sub": "a", "exp": now - 30}));
        let claims = lenient.verify(&recent).unwrap();
        assert_eq!(lenient.expires_at(&claims), now + 90);
        assert_eq!(v.expires_at(&claims), now - 30);
    }

    fn b64(v: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let mut h = axum::http::HeaderMap::new();
        for (value, want) in [
            ("Bearer abc", Some("abc")),
            ("bearer  abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer", None),
        ] {
            h.insert(axum::http::header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(bearer_token(&h), want, "{value}");
        }
    }

    /// The size bound is inclusive: a good token of exactly
    /// `max_token_bytes` verifies, one byte more is `TooLong` (a mutant
    /// moving the bound by one survived the suite).
    #[test]
    fn a_token_of_exactly_the_size_bound_verifies() {
        let max = Config::for_tests(S, "k-0123456789abcdef")
            .limits
            .max_token_bytes;
        let exp = unix_now() + 3600;
        let at = |n: usize, sub: &str| {
            signed(serde_json::json!({"sub": sub, "exp": exp, "pad": "x".repeat(n)}))
        };
        let exact = (0..max)
            .flat_map(|n| ["a", "ab"].map(|sub| at(n, sub)))
            .find(|t| t.len() == max)
            .expect("a token of exactly the bound");
        let claims = verifier()
            .verify(&exact)
            .expect("a good token at the bound");
        assert!(claims.sub == "a" || claims.sub == "ab");
        let over = format!("{exact}x");
        assert_eq!(verifier().verify(&over), Err(AuthError::TooLong));
    }

    /// `sub` may be exactly `max_sub_bytes` long, not one byte more (a mutant
    /// moving the bound survived the suite); an `exp` beyond what a u64
    /// holds is refused, not "never expires" (jsonwebtoken refuses it before
    /// `numeric_date` sees it).
    #[test]
    fn sub_and_exp_bounds_are_exact() {
        let max = Config::for_tests(S, "k-0123456789abcdef")
            .limits
            .max_sub_bytes;
        let exp = unix_now() + 3600;
        let sub = "s".repeat(max);
        assert_eq!(
            verifier()
                .verify(&signed(serde_json::json!({"sub": sub, "exp": exp})))
                .unwrap()
                .sub,
            sub
        );
        let long = "s".repeat(max + 1);
        assert_eq!(
            verifier().verify(&signed(serde_json::json!({"sub": long, "exp": exp}))),
            Err(AuthError::InvalidSub)
        );
        assert!(
            verifier()
                .verify(&signed(serde_json::json!({"sub": "a", "exp": 1e30})))
                .is_err()
        );
    }

    /// The verifier's Debug output names its algorithms and never its key.
    #[test]
    fn debug_shows_the_algorithm_not_the_secret() {
        let shown = format!("{:?}", verifier());
        assert!(shown.contains("HS256"), "{shown}");
        assert!(!shown.contains(S), "{shown}");
    }

    #[test]
    fn valid_token_verifies() {
        let t = mint_hs256(S, "alice", Duration::from_secs(60)).unwrap();
        assert_eq!(verifier().verify(&t).unwrap().sub, "alice");
    }

    #[test]
    fn rejections_are_typed() {
        let v = verifier();
        let other = mint_hs256("other", "alice", Duration::from_secs(60)).unwrap();
        assert_eq!(v.verify(&other), Err(AuthError::BadSignature));
        assert_eq!(v.verify("not.a.jwt"), Err(AuthError::Malformed));
        assert_eq!(v.verify(""), Err(AuthError::Missing));
        assert_eq!(v.verify(&"a".repeat(9000)), Err(AuthError::TooLong));
        let exp = unix_now() - 3600;
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&format!(r#"{{"sub":"a","exp":{exp}}}"#))
        );
        assert_eq!(v.verify(&none), Err(AuthError::WrongAlgorithm));
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "a".into(),
                exp,
                streams: BTreeMap::new(),
            },
            &EncodingKey::from_secret(S.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.verify(&expired), Err(AuthError::Expired));
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &Claims {
                sub: "a".into(),
                exp: unix_now() + 60,
                streams: BTreeMap::new(),
            },
            &EncodingKey::from_secret(S.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.verify(&hs384), Err(AuthError::WrongAlgorithm));
        #[derive(Serialize)]
        struct NoSub {
            exp: u64,
        }
        let nosub = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &NoSub {
                exp: unix_now() + 60,
            },
            &EncodingKey::from_secret(S.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.verify(&nosub), Err(AuthError::MissingClaim("sub".into())));
        let empty_sub = mint_hs256(S, "", Duration::from_secs(60)).unwrap();
        assert_eq!(v.verify(&empty_sub), Err(AuthError::InvalidSub));
    }

    /// Issue 37 (also noted): a token whose header lists critical
    /// extensions (`crit`) is refused, as RFC 7515 §4.1.11 requires of a
    /// verifier that understands none; the same token without `crit` passes.
    #[test]
    fn a_token_with_a_critical_header_extension_is_refused() {
        use base64::Engine;
        use hmac::Mac;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let hs256 = |header: &str| {
            let body = format!(r#"{{"sub":"a","exp":{}}}"#, unix_now() + 60);
            let signing = format!("{}.{}", b64(header), b64(&body));
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(S.as_bytes()).unwrap();
            mac.update(signing.as_bytes());
            let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(mac.finalize().into_bytes());
            format!("{signing}.{sig}")
        };
        let v = verifier();
        let plain = hs256(r#"{"alg":"HS256","typ":"JWT"}"#);
        assert!(v.verify(&plain).is_ok());
        let crit = hs256(r#"{"alg":"HS256","typ":"JWT","crit":["x-unknown"],"x-unknown":1}"#);
        assert_eq!(v.verify(&crit), Err(AuthError::CriticalExtension));
    }

    /// Two tokens minted for one user in the same second differ (`iat`,
    /// `jti`), and both verify.
    #[test]
    fn minted_tokens_are_unique() {
        let a = mint_hs256(S, "u", Duration::from_secs(60)).unwrap();
        let b = mint_hs256(S, "u", Duration::from_secs(60)).unwrap();
        assert_ne!(a, b);
        let v = verifier();
        assert_eq!(v.verify(&a).unwrap().sub, "u");
        assert_eq!(v.verify(&b).unwrap().sub, "u");
    }

    /// Issue 39: the `streams` claim grants read or write per name or
    /// prefix (the most any entry gives); any other shape invalidates the
    /// token rather than granting something by accident.
    #[test]
    fn the_streams_claim_grants_per_name_or_prefix() {
        let v = verifier();
        let grants: BTreeMap<String, String> = [
            ("thread:t1", "r"),
            ("thread:*", "r"),
            ("thread:t*", "rw"),
            ("room:a", "rw"),
        ]
        .into_iter()
        .map(|(k, m)| (k.to_owned(), m.to_owned()))
        .collect();
        let token = mint_hs256_with_streams(S, "ana", Duration::from_secs(60), &grants).unwrap();
        let claims = v.verify(&token).unwrap();
        assert_eq!(
            claims.access("thread:t1"),
            Access::Write,
            "the prefix thread:t* gives more"
        );
        assert_eq!(claims.access("thread:x"), Access::Read);
        assert_eq!(claims.access("room:a"), Access::Write);
        assert_eq!(
            claims.access("room:ab"),
            Access::None,
            "an exact name is not a prefix"
        );
        assert_eq!(claims.access("threads:x"), Access::None);
        assert_eq!(
            v.verify(&mint_hs256(S, "bob", Duration::from_secs(60)).unwrap())
                .unwrap()
                .access("thread:t1"),
            Access::None
        );
        let exp = unix_now() + 60;
        for bad in [
            serde_json::json!("thread:t1"),
            serde_json::json!(["thread:t1"]),
            serde_json::json!({"thread:t1": "w"}),
            serde_json::json!({"thread:t1": true}),
            serde_json::json!({"": "r"}),
            serde_json::Value::Object(
                (0..65)
                    .map(|i| (format!("t:{i}"), serde_json::json!("r")))
                    .collect(),
            ),
        ] {
            let token = signed(serde_json::json!({"sub": "a", "exp": exp, "streams": bad}));
            assert_eq!(v.verify(&token), Err(AuthError::InvalidStreams), "{bad}");
        }
    }
}
