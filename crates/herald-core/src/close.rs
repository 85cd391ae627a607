//! Close reasons, initiators and the WebSocket close codes they map to.

use std::fmt;

/// Who decided that a connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Initiator {
    /// The client (close frame, dropped TCP connection, protocol violation).
    Client,
    /// The server (timeouts, kicks, shutdown, slow consumer).
    Server,
}

impl Initiator {
    /// Stable lowercase name, used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Initiator::Client => "client",
            Initiator::Server => "server",
        }
    }
}

/// Why a connection closed. Every close carries exactly one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client sent a close frame.
    ClientClose,
    /// The peer vanished: EOF without close frame, connection reset, broken pipe.
    PeerGone,
    /// Any other transport error (unexpected).
    IoError,
    /// The client did not answer heartbeats in time.
    HeartbeatTimeout,
    /// The client did not read fast enough; its outbound queue overflowed.
    SlowConsumer,
    /// Authentication failed (bad, missing or malformed token).
    Unauthorized,
    /// The token expired and no valid `refresh` arrived.
    TokenExpired,
    /// No `hello` within the hello timeout.
    HelloTimeout,
    /// A frame that is not valid protocol JSON, wrong field types, or a second `hello`.
    ProtocolError,
    /// An inbound message over the size limit.
    MessageTooBig,
    /// A text frame that is not valid UTF-8.
    InvalidUtf8,
    /// An RFC 6455 violation (masking, reserved bits or opcodes, bad control frames).
    WebSocketViolation,
    /// A binary frame; protocol v1 is JSON text only.
    UnsupportedData,
    /// Abuse, such as a sustained flood over the rate limit.
    PolicyViolation,
    /// Closed through the HTTP API (`POST /api/v1/disconnect`).
    Kicked,
    /// The server is draining (SIGTERM/SIGINT).
    Shutdown,
    /// The connection reached `max_connection_age`: the client reconnects
    /// and resumes (on any node).
    Rotated,
    /// The server or the user is at its connection limit.
    Capacity,
    /// The broker (Redis) cannot serve the connection now; try again later.
    BrokerUnavailable,
    /// A bug or an internal failure.
    Internal,
}

impl CloseReason {
    /// Every reason, for exhaustive tests and metric pre-registration.
    pub const ALL: [CloseReason; 20] = [
        CloseReason::ClientClose,
        CloseReason::PeerGone,
        CloseReason::IoError,
        CloseReason::HeartbeatTimeout,
        CloseReason::SlowConsumer,
        CloseReason::Unauthorized,
        CloseReason::TokenExpired,
        CloseReason::HelloTimeout,
        CloseReason::ProtocolError,
        CloseReason::MessageTooBig,
        CloseReason::InvalidUtf8,
        CloseReason::WebSocketViolation,
        CloseReason::UnsupportedData,
        CloseReason::PolicyViolation,
        CloseReason::Kicked,
        CloseReason::Shutdown,
        CloseReason::Rotated,
        CloseReason::Capacity,
        CloseReason::BrokerUnavailable,
        CloseReason::Internal,
    ];

    /// The close code the server writes for this reason.
    ///
    /// For [`CloseReason::ClientClose`] the server echoes the client's code, so
    /// the value here (1000) is only the default.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::ClientClose => 1000,
            CloseReason::PeerGone | CloseReason::IoError => 1006,
            CloseReason::HeartbeatTimeout => 1001,
            CloseReason::SlowConsumer => 4001,
            CloseReason::Unauthorized => 4401,
            CloseReason::TokenExpired => 4403,
            CloseReason::HelloTimeout => 4408,
            CloseReason::ProtocolError => 4000,
            CloseReason::MessageTooBig => 1009,
            CloseReason::InvalidUtf8 => 1007,
            CloseReason::WebSocketViolation => 1002,
            CloseReason::UnsupportedData => 1003,
            CloseReason::PolicyViolation => 1008,
            CloseReason::Kicked => 4409,
            CloseReason::Shutdown | CloseReason::Rotated => 1012,
            CloseReason::Capacity | CloseReason::BrokerUnavailable => 1013,
            CloseReason::Internal => 1011,
        }
    }

    /// Stable snake_case name, used in logs, metric labels and close frames.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClose => "client_close",
            CloseReason::PeerGone => "peer_gone",
            CloseReason::IoError => "io_error",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::HelloTimeout => "hello_timeout",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::WebSocketViolation => "websocket_violation",
            CloseReason::UnsupportedData => "unsupported_data",
            CloseReason::PolicyViolation => "policy_violation",
            CloseReason::Kicked => "kicked",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Rotated => "rotated",
            CloseReason::Capacity => "capacity",
            CloseReason::BrokerUnavailable => "broker_unavailable",
            CloseReason::Internal => "internal",
        }
    }

    /// Whether this is an ordinary end of a connection (logged at debug) rather
    /// than something an operator should look at.
    pub fn is_expected(self) -> bool {
        !matches!(
            self,
            CloseReason::IoError | CloseReason::SlowConsumer | CloseReason::Internal
        )
    }

    /// Whether frames already queued are written before the close frame.
    ///
    /// Orderly closes (kick, shutdown, token expiry) flush; closes caused by a
    /// broken or misbehaving client do not, since the client will not read them.
    pub fn flushes_queue(self) -> bool {
        matches!(
            self,
            CloseReason::Kicked
                | CloseReason::Shutdown
                | CloseReason::Rotated
                | CloseReason::TokenExpired
                | CloseReason::Capacity
        )
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The decided close of one connection: reason, initiator, the code on the wire
/// and a short human-readable detail (at most 123 bytes, the close frame limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// Why the connection closes.
    pub reason: CloseReason,
    /// Who decided it.
    pub initiator: Initiator,
    /// The WebSocket close code written (or received).
    pub code: u16,
    /// Short detail for the close frame's reason text.
    pub detail: String,
}

/// Longest reason text a close frame can carry (125 bytes minus the code).
pub const MAX_CLOSE_DETAIL: usize = 123;

impl CloseInfo {
    /// A close for `reason` with its default code; `detail` is cut to fit a close frame.
    pub fn new(reason: CloseReason, initiator: Initiator, detail: impl Into<String>) -> Self {
        Self {
            reason,
            initiator,
            code: reason.code(),
            detail: truncate_utf8(detail.into(), MAX_CLOSE_DETAIL),
        }
    }
}

/// Cut `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_brief() {
        assert_eq!(CloseReason::Shutdown.code(), 1012);
        assert_eq!(CloseReason::SlowConsumer.code(), 4001);
        assert_eq!(CloseReason::Unauthorized.code(), 4401);
        assert_eq!(CloseReason::TokenExpired.code(), 4403);
        assert_eq!(CloseReason::HelloTimeout.code(), 4408);
        assert_eq!(CloseReason::Kicked.code(), 4409);
        assert_eq!(CloseReason::ProtocolError.code(), 4000);
        assert_eq!(CloseReason::MessageTooBig.code(), 1009);
        assert_eq!(CloseReason::InvalidUtf8.code(), 1007);
        assert_eq!(CloseReason::WebSocketViolation.code(), 1002);
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = CloseReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CloseReason::ALL.len());
    }

    #[test]
    fn detail_is_cut_on_a_char_boundary() {
        let info = CloseInfo::new(CloseReason::Internal, Initiator::Server, "é".repeat(100));
        assert!(info.detail.len() <= MAX_CLOSE_DETAIL);
        assert!(info.detail.chars().all(|c| c == 'é'));
    }

    /// Mutation testing (issue 17): the names are a contract (metric
    /// labels, logs, the API), and so is which closes are ordinary.
    #[test]
    fn names_and_expected_closes_are_stable() {
        assert_eq!(Initiator::Client.as_str(), "client");
        assert_eq!(Initiator::Server.as_str(), "server");
        assert_eq!(CloseReason::SlowConsumer.to_string(), "slow_consumer");
        for r in CloseReason::ALL {
            assert_eq!(r.to_string(), r.as_str());
            let alarming = matches!(
                r,
                CloseReason::IoError | CloseReason::SlowConsumer | CloseReason::Internal
            );
            assert_eq!(r.is_expected(), !alarming, "{r}");
        }
    }

    #[test]
    fn truncation_keeps_what_fits() {
        assert_eq!(truncate_utf8("abc".into(), 3), "abc");
        assert_eq!(truncate_utf8("abcd".into(), 3), "abc");
        assert_eq!(truncate_utf8("aé".into(), 2), "a");
    }
}
