//! Per-user event streams: an `epoch` and a gap-free `seq` within it.
//!
//! A stream numbers events `1, 2, 3, …` within an epoch. The epoch is chosen by
//! the caller (the core has no randomness) and changes whenever the stream's
//! history is lost, so a client can tell "I missed nothing" from "the server
//! forgot".

/// The numbering state of one user's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    epoch: String,
    last_seq: u64,
}

impl Stream {
    /// An empty stream in `epoch`.
    pub fn new(epoch: impl Into<String>) -> Self {
        Self {
            epoch: epoch.into(),
            last_seq: 0,
        }
    }

    /// The stream's epoch.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The seq of the latest event (0 when none was published).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Assign the next seq to a new event.
    pub fn next_seq(&mut self) -> u64 {
        self.last_seq += 1;
        self.last_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_starts_at_one_and_increments() {
        let mut s = Stream::new("e1");
        assert_eq!(s.last_seq(), 0);
        assert_eq!(s.next_seq(), 1);
        assert_eq!(s.next_seq(), 2);
        assert_eq!(s.epoch(), "e1");
    }
}
