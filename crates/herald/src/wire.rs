//! The socket's write half: server-to-client WebSocket framing and the
//! bytes on their way to the kernel.
//!
//! Server frames are unmasked, so an event's frame (header and payload) is
//! the same bytes for every recipient: it is built once ([`frame`]) and
//! shared by reference. [`Wire`] lives under the connection's lock next to
//! its lifecycle, and whoever holds that lock may write: a publisher hands a
//! frame to a connection and writes it to the socket in the same step, so a
//! delivery costs one enqueue and one `write` — no wake-up, no task poll, no
//! copy. Everything queued for a connection leaves in one vectored write.
//! Only when the socket is full (or a ping or the close frame is due, which
//! the actor frames) is the actor woken; it then waits for the socket to
//! drain, under the write timeout.
//!
//! Every write passes the last-line check of invariant I1: once a close
//! frame was written or received, data is refused and counted in
//! [`Stats::frames_after_close`] (which must stay 0).

use std::io::{self, IoSlice};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use herald_core::Connection;
use herald_core::aisdk::View;
use herald_core::queue::InlineQueue;
use herald_core::text;
use tokio::net::TcpStream;

use herald_core::lifecycle::Payload;

use crate::broker::StoredEvent;
use crate::telemetry::{self, Stats, latency};

/// The opcode of a text frame.
pub(crate) const TEXT: u8 = 0x1;
/// The opcode of a binary frame.
pub(crate) const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// Frames taken from the queue per vectored write.
const BATCH: usize = 64;

/// A complete, final, unmasked frame with this opcode whose payload is the
/// concatenation of `parts`; returns the frame and its header's length.
pub(crate) fn frame(opcode: u8, parts: &[&[u8]]) -> (Bytes, u8) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = BytesMut::with_capacity(len + 10);
    out.extend_from_slice(&[0x80 | opcode]);
    let header = if len < 126 {
        out.extend_from_slice(&[len as u8]);
        2
    } else if let Ok(short) = u16::try_from(len) {
        out.extend_from_slice(&[126]);
        out.extend_from_slice(&short.to_be_bytes());
        4
    } else {
        out.extend_from_slice(&[127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
        10
    };
    for p in parts {
        out.extend_from_slice(p);
    }
    (out.freeze(), header)
}

/// How a replayed event frame ends (the stored frame's closing `}` replaced),
/// so its `{"type":"event"` start stays the same for clients that match it.
const REPLAYED: &[u8] = br#","replayed":true}"#;

/// An outbound message: a complete WebSocket frame (header and payload).
/// Cloning shares the bytes, so a fan-out frames an event once for all
/// connections.
#[derive(Debug, Clone)]
pub struct OutFrame {
    wire: Bytes,
    header: u8,
    /// When a live event was published (for the publish→write latency
    /// histogram); `None` for replies and replayed history. A frame that
    /// joined several deltas keeps its first one's.
    pub published: Option<Instant>,
    /// For a live text delta's frame (alone or joined with later deltas of
    /// its part): where its pieces lie in the payload.
    delta: Option<DeltaSpans>,
}

/// Where a text delta frame's template `pre`, text and `post` start in its
/// payload ([`herald_core::text::Spans`], kept in 12 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeltaSpans {
    pre: NonZeroU32,
    text: u32,
    post: u32,
}

impl DeltaSpans {
    fn new(s: text::Spans) -> Option<Self> {
        Some(Self {
            pre: NonZeroU32::new(u32::try_from(s.pre).ok()?)?,
            text: u32::try_from(s.text).ok()?,
            post: u32::try_from(s.post).ok()?,
        })
    }

    /// The payload's `pre`, text and `post` (with this layout).
    fn split(self, payload: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
        let (pre, text, post) = (
            self.pre.get() as usize,
            self.text as usize,
            self.post as usize,
        );
        Some((
            payload.get(pre..text)?,
            payload.get(text..post)?,
            payload.get(post..)?,
        ))
    }
}

/// Most bytes of text a joined delta frame carries: a connection that has
/// fallen further behind gets several frames. Each join copies the frame
/// so far (one allocation, at most this much text), so the bound is what
/// a connection that is behind pays per delta, against a reference-count
/// increment for a frame of its own.
const JOIN_MAX_TEXT: usize = 2 * 1024;

impl OutFrame {
    /// A live event's frame, published at `published`; `None` if `json`
    /// is not UTF-8 (a broker fault).
    pub fn event(json: &[u8], published: Instant) -> Option<Self> {
        std::str::from_utf8(json).ok()?;
        let mut frame = Self::framed(TEXT, &[json], Some(published));
        frame.delta = text::spans(json).and_then(DeltaSpans::new);
        Some(frame)
    }

    /// A text message that is not a live event (a reply, an echo).
    pub fn text(text: &str) -> Self {
        Self::framed(TEXT, &[text.as_bytes()], None)
    }

    /// A binary message (the echo endpoint).
    pub fn binary(bytes: &[u8]) -> Self {
        Self::framed(BINARY, &[bytes], None)
    }

    fn framed(opcode: u8, parts: &[&[u8]], published: Option<Instant>) -> Self {
        let (wire, header) = frame(opcode, parts);
        Self {
            wire,
            header,
            published,
            delta: None,
        }
    }

    /// The payload (the frame without its header).
    fn payload(&self) -> &[u8] {
        &self.wire[usize::from(self.header)..]
    }

    /// The payload as text (empty for a binary message that is not UTF-8).
    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.wire[usize::from(self.header)..]).unwrap_or_default()
    }

    /// The payload, for a text message.
    #[cfg(test)]
    pub fn as_text(&self) -> Option<&str> {
        if self.wire.first()? & 0x0F != TEXT {
            return None;
        }
        std::str::from_utf8(&self.wire[usize::from(self.header)..]).ok()
    }

    /// Bytes of payload (what the queue bounds count).
    pub fn payload_len(&self) -> usize {
        self.wire.len() - usize::from(self.header)
    }

    /// The frame as it goes on the wire.
    pub(crate) fn into_wire(self) -> Bytes {
        self.wire
    }

    /// A stored event read from history (no publish time), marked
    /// `"replayed":true` for the client; `None` if its bytes are not a JSON
    /// object in UTF-8 (a broker fault). Costs one copy, on replay only.
    pub fn replayed(event: StoredEvent) -> Option<Self> {
        // The object without its closing brace.
        let body = event
            .json
            .strip_suffix(b"}")
            .filter(|b| b.starts_with(b"{"))?;
        std::str::from_utf8(body).ok()?;
        Some(Self::framed(TEXT, &[body, REPLAYED], None))
    }
}

impl Payload for OutFrame {
    fn wire_len(&self) -> usize {
        self.payload_len()
    }

    /// Two live deltas of one part (the same template `pre`: stream, run,
    /// part) join into one covered frame: `from_seq` `from`, `seq` `seq`,
    /// the texts joined, the first delta's `ts` — the frame history would
    /// give for the range. Costs one copy of the frame so far, bounded by
    /// [`JOIN_MAX_TEXT`].
    fn absorb(&mut self, from: u64, seq: u64, next: Self) -> Result<(), Self> {
        let (Some(mine), Some(theirs)) = (self.delta, next.delta) else {
            return Err(next);
        };
        let (Some((pre, text, post)), Some((next_pre, next_text, _))) =
            (mine.split(self.payload()), theirs.split(next.payload()))
        else {
            return Err(next);
        };
        if pre != next_pre || text.len() + next_text.len() > JOIN_MAX_TEXT {
            return Err(next);
        }
        let head = text::head(from, seq);
        let (wire, header) = frame(TEXT, &[head.as_bytes(), pre, text, next_text, post]);
        let spans = text::Spans {
            pre: head.len(),
            text: head.len() + pre.len(),
            post: head.len() + pre.len() + text.len() + next_text.len(),
        };
        let Some(spans) = DeltaSpans::new(spans) else {
            return Err(next);
        };
        self.wire = wire;
        self.header = header;
        self.delta = Some(spans);
        Ok(())
    }
}

impl From<String> for OutFrame {
    fn from(s: String) -> Self {
        Self::text(&s)
    }
}

/// A control frame written by the transport (the actor's WebSocket
/// context), as the I1 check tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    /// A ping or a pong.
    PingPong,
    /// A close frame (ours, or the reply to the peer's).
    Close,
}

/// What [`Wire::flush`] left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Everything released was written; nothing is due.
    Done,
    /// The socket is full: the rest waits for it to drain.
    Blocked,
    /// Only the actor can go on: a ping or the close is due, the socket
    /// failed, or none is attached.
    Actor,
}

/// The write half of one connection's socket, kept under its lock.
#[derive(Debug)]
pub(crate) struct Wire {
    sock: Option<Arc<TcpStream>>,
    stats: Arc<Stats>,
    /// Bytes taken for the socket and not yet written, in order (the first
    /// may be partly written).
    pending: InlineQueue<Bytes>,
    /// Since when the socket has refused bytes that are pending.
    blocked_since: Option<Instant>,
    /// How the socket failed, once it did.
    failed: Option<io::Error>,
    close_written: bool,
    close_received: bool,
    /// For a socket of the AI SDK endpoint: what it shows of the user's
    /// stream. The lifecycle's frames (the stream's events) pass through
    /// it, and only what it makes of them is written.
    view: Option<Box<View>>,
}

impl Wire {
    /// A wire with no socket yet: [`Wire::flush`] leaves everything to the actor.
    pub(crate) fn new() -> Self {
        Self {
            sock: None,
            stats: Arc::default(),
            // The one frame usually pending stays inline, as in the
            // lifecycle's queue (`herald_core::queue`).
            pending: InlineQueue::new(),
            blocked_since: None,
            failed: None,
            close_written: false,
            close_received: false,
            view: None,
        }
    }

    /// From now on, write what an AI SDK [`View`] makes of the frames
    /// (the `/ai` endpoint) instead of the frames themselves.
    pub(crate) fn present_ai(&mut self) {
        self.view.get_or_insert_default();
    }

    /// The AI SDK view, on a socket of the `/ai` endpoint.
    pub(crate) fn view(&mut self) -> Option<&mut View> {
        self.view.as_deref_mut()
    }

    /// Write to `sock` from now on, counting in `stats`.
    pub(crate) fn attach(&mut self, sock: Arc<TcpStream>, stats: Arc<Stats>) {
        self.sock = Some(sock);
        self.stats = stats;
    }

    /// The transport ended: drop the socket (with the actor's handle, that
    /// closes it) and whatever was still pending.
    pub(crate) fn detach(&mut self) {
        self.sock = None;
        self.pending.clear();
        self.blocked_since = None;
    }

    /// The peer's close frame arrived: from now on only the close reply may
    /// be written.
    pub(crate) fn close_received(&mut self) {
        self.close_received = true;
    }

    /// Whether our close frame (or the reply to the peer's) was queued.
    pub(crate) fn close_written(&self) -> bool {
        self.close_written
    }

    /// Since when pending bytes wait for the socket without progress, if they do.
    pub(crate) fn blocked_since(&self) -> Option<Instant> {
        self.blocked_since
    }

    /// How the socket failed, once it did (taken once).
    pub(crate) fn take_failure(&mut self) -> Option<io::Error> {
        self.failed.take()
    }

    /// Queue what the transport (the actor's WebSocket context) wrote —
    /// pongs, close frames — behind what is pending, frame by frame.
    pub(crate) fn push_transport(&mut self, out: Bytes) {
        for (bytes, kind) in split_control(out) {
            self.push_control(bytes, kind);
        }
    }

    /// Queue control bytes framed by the transport (`kind` says which),
    /// behind what is pending; refused and counted if I1 forbids them.
    fn push_control(&mut self, bytes: Bytes, kind: Control) {
        if bytes.is_empty() {
            return;
        }
        let permitted = match kind {
            // The reply to the peer's close is the one write allowed after it.
            Control::Close => !self.close_written,
            Control::PingPong => !self.close_written && !self.close_received,
        };
        if !permitted {
            self.violation();
            return;
        }
        if kind == Control::Close {
            self.close_written = true;
        }
        self.pending.push_back(bytes);
    }

    /// Write what is pending, then the frames `core` releases, until
    /// everything is written or the socket is full. Counts and times each
    /// frame as it is taken from the queue.
    pub(crate) fn flush(&mut self, core: &mut Connection<OutFrame>) -> Flushed {
        self.flush_counted(core, &mut Tally::direct())
    }

    /// [`Wire::flush`], counting the frames into `tally` (committed when it
    /// drops): a flush task counts a whole round of connections at once
    /// instead of touching the shared counters once per connection.
    pub(crate) fn flush_counted(
        &mut self,
        core: &mut Connection<OutFrame>,
        tally: &mut Tally,
    ) -> Flushed {
        if self.sock.is_none() || self.failed.is_some() {
            return Flushed::Actor;
        }
        let mut now = None;
        loop {
            if self.pending.is_empty() {
                self.take_frames(core, &mut now, tally);
                if self.pending.is_empty() {
                    self.blocked_since = None;
                    return if core.control_due() {
                        Flushed::Actor
                    } else {
                        Flushed::Done
                    };
                }
            }
            let Some(sock) = self.sock.as_deref() else {
                return Flushed::Actor;
            };
            let mut progressed = false;
            match write_out(sock, &mut self.pending, &mut progressed) {
                Ok(()) => self.blocked_since = None,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The write timeout counts from the last progress.
                    if progressed || self.blocked_since.is_none() {
                        self.blocked_since = Some(crate::clock::now());
                    }
                    return Flushed::Blocked;
                }
                Err(e) => {
                    self.failed = Some(e);
                    self.pending.clear();
                    return Flushed::Actor;
                }
            }
        }
    }

    /// Move up to [`BATCH`] frames from the queue to `pending`.
    fn take_frames(
        &mut self,
        core: &mut Connection<OutFrame>,
        now: &mut Option<Instant>,
        tally: &mut Tally,
    ) {
        let (mut frames, mut bytes) = (0u64, 0u64);
        while self.pending.len() < BATCH {
            let frame = match self.view.as_deref_mut() {
                None => match core.poll_frame() {
                    Some(frame) => frame,
                    None => break,
                },
                // What the view made of earlier frames first, then the
                // next frame through it.
                Some(view) => match view.pop() {
                    Some(text) => OutFrame::text(&text),
                    None => match core.poll_frame() {
                        Some(frame) => {
                            view.on_event(frame.as_str());
                            continue;
                        }
                        None => break,
                    },
                },
            };
            if self.close_written || self.close_received {
                self.violation();
                continue;
            }
            if let Some(at) = frame.published {
                let now = *now.get_or_insert_with(crate::clock::now);
                tally.latency.record(now.saturating_duration_since(at));
            }
            frames += 1;
            bytes += frame.payload_len() as u64;
            self.pending.push_back(frame.into_wire());
        }
        if frames > 0 {
            tally.add(&self.stats, frames, bytes);
        }
        if tally.direct {
            tally.latency.commit();
        }
    }

    fn violation(&self) {
        self.stats
            .frames_after_close
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::INVARIANT_VIOLATIONS, "kind" => "frame_after_close")
            .increment(1);
        tracing::error!("refused a write after the close frame");
    }
}

/// Frames and bytes taken for writing, not yet added to the server's
/// counters: added when it drops, or when a frame of another server's
/// connection is counted (tests run several servers in one process); and
/// their publish→write latencies, added to the process-wide histogram when
/// it drops. A [`Tally::direct`] one adds each count at once.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    direct: bool,
    stats: Option<Arc<Stats>>,
    frames: u64,
    bytes: u64,
    latency: latency::Round,
}

impl Tally {
    /// A tally that adds each count to the counters at once (one write).
    pub(crate) fn direct() -> Tally {
        Tally {
            direct: true,
            stats: None,
            frames: 0,
            bytes: 0,
            latency: latency::Round::default(),
        }
    }

    fn add(&mut self, stats: &Arc<Stats>, frames: u64, bytes: u64) {
        if self.direct {
            count(stats, frames, bytes);
            return;
        }
        if !self.stats.as_ref().is_some_and(|s| Arc::ptr_eq(s, stats)) {
            self.commit();
            self.stats = Some(stats.clone());
        }
        self.frames += frames;
        self.bytes += bytes;
    }

    fn commit(&mut self) {
        if let Some(stats) = &self.stats {
            count(stats, self.frames, self.bytes);
        }
        (self.frames, self.bytes) = (0, 0);
    }
}

/// Add frames and bytes written to the server's counters.
fn count(stats: &Stats, frames: u64, bytes: u64) {
    if frames > 0 {
        stats.frames_out.fetch_add(frames, Ordering::Relaxed);
        let metrics = stats.wire();
        metrics.frames.increment(frames);
        metrics.bytes.increment(bytes);
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.commit();
        self.latency.commit();
    }
}

/// Write `pending` with vectored writes until it is empty or the socket
/// refuses more (`WouldBlock`); written bytes leave `pending`, and
/// `progressed` is set if any were written.
fn write_out(
    sock: &TcpStream,
    pending: &mut InlineQueue<Bytes>,
    progressed: &mut bool,
) -> io::Result<()> {
    while !pending.is_empty() {
        let mut written = if let (1, Some(one)) = (pending.len(), pending.front()) {
            send(sock, &[IoSlice::new(one)])?
        } else {
            let mut slices = [IoSlice::new(&[]); BATCH];
            let mut n = 0;
            for (slot, bytes) in slices.iter_mut().zip(pending.iter()) {
                *slot = IoSlice::new(bytes);
                n += 1;
            }
            send(sock, &slices[..n])?
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        *progressed = true;
        while written > 0 {
            let Some(front) = pending.front_mut() else {
                break;
            };
            if written >= front.len() {
                written -= front.len();
                pending.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

/// One write of `slices` to `sock`, straight to the kernel: tokio's
/// `try_write` first reads the socket's cached readiness, another cache line
/// per connection per write (a tenth of the write path's own time at 10,000
/// connections). Only a refusal goes through tokio (which then writes again
/// or forgets the readiness), so the actor's wait for the socket to drain
/// still sees it.
fn send(sock: &TcpStream, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    let raw = socket2::SockRef::from(sock);
    let sent = match slices {
        // One buffer: a plain send costs less in the kernel than sendmsg.
        [one] => raw.send(one),
        _ => raw.send_vectored(slices),
    };
    match sent {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => sock.try_write_vectored(slices),
        sent => sent,
    }
}

/// The control frames in bytes the transport wrote (complete, unmasked
/// server frames), each with its kind; anything unparsable is dropped.
fn split_control(mut out: Bytes) -> Vec<(Bytes, Control)> {
    let mut frames = Vec::new();
    while out.len() >= 2 {
        let opcode = out[0] & 0x0F;
        let len = (out[1] & 0x7F) as usize;
        // Control frames carry at most 125 bytes: a 2-byte header.
        let total = 2 + len;
        if len > 125 || out.len() < total {
            tracing::error!(opcode, "unexpected bytes from the WebSocket context");
            break;
        }
        let bytes = out.split_to(total);
        let kind = match opcode {
            CLOSE => Control::Close,
            PING | PONG => Control::PingPong,
            _ => {
                tracing::error!(opcode, "unexpected frame from the WebSocket context");
                continue;
            }
        };
        frames.push((bytes, kind));
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replayed frames are marked for the client; a stored frame that is not
    /// a JSON object is refused (a broker fault), never sent half-marked.
    #[test]
    fn replayed_frames_are_marked() {
        let stored = crate::broker::StoredEvent::new(
            3,
            bytes::Bytes::from_static(br#"{"type":"event","seq":3}"#),
        );
        let frame = OutFrame::replayed(stored).unwrap();
        let text = frame.as_text().unwrap();
        assert_eq!(text, r#"{"type":"event","seq":3,"replayed":true}"#);
        assert_eq!(frame.wire_len(), text.len());
        let broken = crate::broker::StoredEvent::new(4, bytes::Bytes::from_static(b"[1]"));
        assert!(OutFrame::replayed(broken).is_none());
    }

    /// Headers of every length class, as RFC 6455 §5.2 spells them.
    #[test]
    fn frames_have_the_shortest_header_for_their_length() {
        let (f, h) = frame(TEXT, &[b"hi"]);
        assert_eq!((&f[..], h), (&[0x81, 2, b'h', b'i'][..], 2));
        let p125 = [b'x'; 125];
        assert_eq!(frame(TEXT, &[&p125]).0[..2], [0x81, 125]);
        let p126 = [b'x'; 126];
        let (f, h) = frame(BINARY, &[&p126[..100], &p126[100..]]);
        assert_eq!((&f[..4], h, f.len()), (&[0x82, 126, 0, 126][..], 4, 130));
        let p = vec![b'x'; 65_535];
        assert_eq!(frame(TEXT, &[&p]).0[..4], [0x81, 126, 0xFF, 0xFF]);
        let p = vec![b'x'; 65_536];
        let (f, h) = frame(TEXT, &[&p]);
        assert_eq!(h, 10);
        assert_eq!(f[..10], [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(f.len(), 65_546);
    }

    /// A live delta's frame, as the broker delivers it.
    fn delta(seq: u64, run: &str, part: &str, text: &str, ts: &str) -> OutFrame {
        let t = herald_core::text::Template::new(run, Some("th"), part, ts);
        let json = t.frame(seq, seq, &herald_core::text::escape(text));
        OutFrame::event(json.as_bytes(), Instant::now()).unwrap()
    }

    #[test]
    fn deltas_of_one_part_join_into_the_frame_history_would_give() {
        let mut f = delta(7, "r1", "answer", "Hel", "2026-12-07T00:00:00.001Z");
        let first_published = f.published;
        f.absorb(
            7,
            8,
            delta(8, "r1", "answer", "lo \"you\"", "2026-12-07T00:00:00.002Z"),
        )
        .unwrap();
        f.absorb(
            7,
            9,
            delta(9, "r1", "answer", "\n😀", "2026-12-07T00:00:00.003Z"),
        )
        .unwrap();
        let t = herald_core::text::Template::new(
            "r1",
            Some("th"),
            "answer",
            "2026-12-07T00:00:00.001Z",
        );
        let want = t.frame(7, 9, &herald_core::text::escape("Hello \"you\"\n😀"));
        assert_eq!(f.as_text(), Some(want.as_str()));
        assert_eq!(f.published, first_published);
        // The header is the frame's own again (a length that grew past 125).
        let (framed, _) = frame(TEXT, &[want.as_bytes()]);
        assert_eq!(f.clone().into_wire(), framed);
        // Another part, another run, or an event that is not a delta: apart.
        for other in [
            delta(10, "r1", "reasoning", "x", "t"),
            delta(10, "r2", "answer", "x", "t"),
            OutFrame::event(
                br#"{"type":"event","seq":10,"event":"note","data":{},"ts":"t"}"#,
                Instant::now(),
            )
            .unwrap(),
        ] {
            assert!(f.absorb(7, 10, other).is_err());
        }
        assert!(
            OutFrame::text("{}")
                .absorb(1, 2, delta(2, "r1", "answer", "x", "t"))
                .is_err()
        );
        // A replayed (history) frame never joins.
        assert!(
            OutFrame::replayed(crate::broker::StoredEvent::new(1, want.clone()))
                .unwrap()
                .absorb(7, 10, delta(10, "r1", "answer", "x", "t"))
                .is_err()
        );
    }

    #[test]
    fn a_joined_frame_stops_growing_at_its_text_bound() {
        let big = "x".repeat(JOIN_MAX_TEXT / 2);
        let mut f = delta(1, "r", "p", &big, "t");
        assert!(f.absorb(1, 2, delta(2, "r", "p", &big, "t")).is_ok());
        assert!(f.absorb(1, 3, delta(3, "r", "p", "y", "t")).is_err());
        assert_eq!(f.payload_len(), f.as_text().unwrap().len());
    }

    #[test]
    fn transport_output_is_split_into_control_frames() {
        let out = Bytes::from_static(&[0x8A, 1, b'p', 0x88, 2, 0x03, 0xE8]);
        let frames = split_control(out);
        assert_eq!(frames.len(), 2);
        assert_eq!(
            frames[0],
            (Bytes::from_static(&[0x8A, 1, b'p']), Control::PingPong)
        );
        assert_eq!(frames[1].1, Control::Close);
        assert!(split_control(Bytes::from_static(&[0x8A, 5, b'p'])).is_empty());
        // The largest control payload RFC 6455 allows (125 bytes) passes;
        // a 16-bit length (126) is not a control frame.
        let mut big = vec![0x89, 125];
        big.extend_from_slice(&[b'x'; 125]);
        assert_eq!(split_control(Bytes::from(big)).len(), 1);
        let mut long = vec![0x89, 126, 0, 126];
        long.extend_from_slice(&[b'x'; 126]);
        assert!(split_control(Bytes::from(long)).is_empty());
    }

    /// The I1 check on frames the lifecycle releases: once the peer's close
    /// arrived (or ours was written), a frame is refused and counted, not
    /// written — whatever the lifecycle says.
    #[test]
    fn frames_after_a_close_are_refused_and_counted() {
        for ours in [false, true] {
            let mut wire = Wire::new();
            let mut core = core();
            let welcome = OutFrame::from("welcome".to_owned());
            core.authenticate(
                crate::clock::now(),
                welcome,
                herald_core::catchup::Plan::Live { after: 0 },
            )
            .unwrap();
            while core.poll_transmit().is_some() {}
            let event = OutFrame::event(b"{}", crate::clock::now()).unwrap();
            core.send_event(crate::clock::now(), 1, event).unwrap();
            if ours {
                wire.push_control(Bytes::from_static(&[0x88, 0]), Control::Close);
            } else {
                wire.close_received();
            }
            let pending = wire.pending.len();
            let mut now = None;
            wire.take_frames(&mut core, &mut now, &mut Tally::direct());
            assert_eq!(wire.stats.snapshot().frames_after_close, 1, "ours: {ours}");
            assert_eq!(wire.pending.len(), pending, "nothing queued, ours: {ours}");
            assert_eq!(wire.stats.snapshot().frames_out, 0);
        }
    }

    /// The I1 check on control bytes: after a close is written nothing
    /// more; after one is received only the reply.
    #[test]
    fn control_after_close_is_refused_and_counted() {
        let mut wire = Wire::new();
        let close = || Bytes::from_static(&[0x88, 0]);
        let pong = || Bytes::from_static(&[0x8A, 0]);
        wire.push_control(pong(), Control::PingPong);
        assert!(!wire.close_written());
        wire.close_received();
        wire.push_control(pong(), Control::PingPong);
        assert_eq!(wire.stats.snapshot().frames_after_close, 1);
        wire.push_control(close(), Control::Close);
        assert_eq!(wire.stats.snapshot().frames_after_close, 1, "the reply");
        assert!(wire.close_written());
        wire.push_control(close(), Control::Close);
        assert_eq!(wire.stats.snapshot().frames_after_close, 2);
        assert_eq!(wire.pending.len(), 2, "the pong before, the reply");
    }

    /// A connected pair on loopback: (the server's side, the peer's).
    async fn pair() -> (Arc<TcpStream>, std::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = std::net::TcpStream::connect(addr).unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        (Arc::new(ours), peer)
    }

    fn core() -> Connection<OutFrame> {
        Connection::new(crate::clock::now(), herald_core::LifecycleConfig::default())
    }

    /// Chunks [`blocked_wire`] queues, and the size of each.
    const CHUNKS: usize = 256;
    const CHUNK: usize = 64 * 1024;

    /// A wire attached to a socket whose peer does not read, after a flush
    /// of more than the socket takes.
    struct Blocked {
        wire: Wire,
        sock: Arc<TcpStream>,
        peer: std::net::TcpStream,
        core: Connection<OutFrame>,
    }

    /// Queues [`CHUNKS`] chunks of [`CHUNK`] bytes, chunk `i` all bytes `i`,
    /// and flushes once: the wire must say `Blocked`.
    async fn blocked_wire() -> Blocked {
        let (sock, peer) = pair().await;
        // Bytes lost on the way would leave the peer waiting: fail instead.
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut wire = Wire::new();
        wire.attach(sock.clone(), Arc::default());
        let mut core = core();
        for i in 0..CHUNKS {
            wire.pending.push_back(Bytes::from(vec![i as u8; CHUNK]));
        }
        assert_eq!(wire.flush(&mut core), Flushed::Blocked);
        Blocked {
            wire,
            sock,
            peer,
            core,
        }
    }

    /// Writes bypass tokio's readiness, but a refusal must reach it: once
    /// the wire says `Blocked`, waiting for the socket to drain (as the actor
    /// does) waits until the peer reads, instead of returning at once and
    /// spinning on a full socket.
    #[tokio::test]
    async fn a_refused_write_makes_the_wait_for_the_socket_wait() {
        let Blocked {
            mut wire,
            sock,
            mut peer,
            ..
        } = blocked_wire().await;
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(200), sock.writable()).await;
        assert!(waited.is_err(), "the full socket was reported writable");
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = vec![0; 1 << 20];
            while peer.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
        tokio::time::timeout(std::time::Duration::from_secs(5), sock.writable())
            .await
            .expect("writable once the peer reads")
            .unwrap();
        wire.detach();
        drop(sock);
        reader.join().unwrap();
    }

    /// More than the socket takes is pending: the wire says `Blocked` and
    /// keeps since when, counted from the last progress (not from each
    /// attempt); once the peer reads, the rest leaves in order.
    #[tokio::test(start_paused = true)]
    async fn a_full_socket_blocks_from_its_last_progress_and_drains_in_order() {
        let Blocked {
            mut wire,
            sock,
            mut peer,
            mut core,
        } = blocked_wire().await;
        let total = CHUNKS * CHUNK;
        let first = wire
            .blocked_since()
            .expect("blocked since the write that filled it");
        let left = wire.pending.iter().map(|b| b.len()).sum::<usize>();
        assert!(left > 0 && left < total, "part written, {left} left");

        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert_eq!(wire.flush(&mut core), Flushed::Blocked);
        assert_eq!(wire.blocked_since(), Some(first), "no progress: unchanged");

        let mut got = Vec::with_capacity(total);
        let mut buf = vec![0; 1 << 20];
        let mut progressed_later = false;
        while got.len() < total {
            use std::io::Read;
            let n = peer.read(&mut buf).unwrap();
            assert!(n > 0, "the peer saw EOF after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
            // tokio learns that the socket took bytes again from its I/O
            // driver, which runs while this task waits (or the paused
            // clock moves on, if the socket is still full).
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(10), sock.writable()).await;
            match wire.flush(&mut core) {
                Flushed::Blocked => {
                    let since = wire.blocked_since().expect("blocked");
                    progressed_later |= since > first;
                }
                Flushed::Done => assert_eq!(wire.blocked_since(), None),
                Flushed::Actor => panic!("the socket did not fail"),
            }
        }
        assert!(progressed_later, "progress moves the start of the block");
        assert_eq!(wire.flush(&mut core), Flushed::Done);
        assert!(wire.pending.is_empty());
        for (i, c) in got.chunks(CHUNK).enumerate() {
            assert!(c.iter().all(|&b| b == i as u8), "chunk {i} out of order");
        }
    }

    /// A socket whose peer is gone fails once: the error is kept for the
    /// actor (taken once), the pending bytes are dropped, and from then on
    /// only the actor can go on.
    #[tokio::test]
    async fn a_failed_socket_is_reported_once_and_drops_what_was_pending() {
        let (sock, peer) = pair().await;
        let mut wire = Wire::new();
        wire.attach(sock, Arc::default());
        let mut core = core();
        wire.pending.push_back(Bytes::from_static(b"unread"));
        assert_eq!(wire.flush(&mut core), Flushed::Done);
        // Closed with unread data: the peer's side answers with a reset.
        drop(peer);
        let mut outcome = Flushed::Done;
        for _ in 0..100 {
            wire.pending.push_back(Bytes::from(vec![b'x'; 1024]));
            outcome = wire.flush(&mut core);
            if outcome == Flushed::Actor {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(outcome, Flushed::Actor);
        assert!(wire.pending.is_empty());
        let e = wire.take_failure().expect("the failure is kept");
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{e}"
        );
        assert!(wire.take_failure().is_none(), "taken once");
    }

    /// Detaching lets go of the socket (the actor's handle is then the last)
    /// and of what was pending.
    #[tokio::test]
    async fn detach_lets_go_of_the_socket_and_the_pending_bytes() {
        let (sock, _peer) = pair().await;
        let mut wire = Wire::new();
        wire.attach(sock.clone(), Arc::default());
        assert_eq!(Arc::strong_count(&sock), 2);
        wire.pending.push_back(Bytes::from_static(b"left"));
        wire.detach();
        assert_eq!(Arc::strong_count(&sock), 1);
        assert!(wire.pending.is_empty());
        assert_eq!(wire.flush(&mut core()), Flushed::Actor);
    }
}
