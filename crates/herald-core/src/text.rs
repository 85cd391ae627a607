//! Answer text streamed as deltas, and its compaction in history.
//!
//! An agent streams a part of its answer (a `part` id within a run) as
//! `agent_text_delta` events, each carrying the text to append. Live, every
//! delta is an event like any other, with its own seq. In history,
//! consecutive deltas of one part — no other event of the stream between
//! them — are kept as one [`Compacted`] entry: the text so far and the seq
//! range it covers. Reading any sub-range of it gives one frame carrying the
//! text of exactly those deltas, marked with the range (`from_seq` … `seq`),
//! so a resume from inside a part sends the unseen text once and the seq
//! continues from the range's end.
//!
//! Text is held as the content of a JSON string (escaped, without quotes):
//! JSON escapes character by character, so the escaped form of two texts
//! joined is the two escaped forms joined, and a frame is assembled without
//! parsing or re-escaping.

/// The event name of a text delta.
pub const TEXT_DELTA: &str = "agent_text_delta";

/// Most bytes of a part id.
pub const MAX_PART_LEN: usize = 128;

/// A text delta on its way into a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The part of the run it extends.
    pub part: String,
    /// Its text, escaped as the content of a JSON string.
    pub text: String,
    /// Its position among the part's deltas (0-based), when the publisher
    /// numbers them: below the next expected index it is a duplicate (not
    /// appended again), above it the publish is refused.
    pub index: Option<u64>,
    /// The frame around the text.
    pub template: Template,
}

impl Delta {
    /// A delta of `part` appending `text` (plain text; escaped here).
    pub fn new(part: &str, text: &str, index: Option<u64>, template: Template) -> Self {
        Self {
            part: part.to_owned(),
            text: escape(text),
            index,
            template,
        }
    }
}

/// `text` as the content of a JSON string: escaped, without the quotes.
pub fn escape(text: &str) -> String {
    if !needs_escape(text) {
        return text.to_owned();
    }
    let quoted = json_string(text);
    quoted[1..quoted.len() - 1].to_owned()
}

/// Whether JSON must escape some of `s` (a quote, a backslash or a control
/// character); most ids and tokens need none and are copied as they are.
fn needs_escape(s: &str) -> bool {
    s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
}

fn json_string(s: &str) -> String {
    // Serializing a string cannot fail.
    serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""))
}

/// Append `s` to `out` as a JSON string (quoted, escaped).
fn push_json_string(out: &mut String, s: &str) {
    if needs_escape(s) {
        out.push_str(&json_string(s));
    } else {
        out.push('"');
        out.push_str(s);
        out.push('"');
    }
}

/// The JSON of a delta frame around its text:
/// `{"type":"event","seq":N` [`,"from_seq":M`] `pre` text `post`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pre: Box<str>,
    post: Box<str>,
}

impl Template {
    /// The frame of a delta of `part` in `run_id` (and `thread_id`), published at `ts`.
    pub fn new(run_id: &str, thread_id: Option<&str>, part: &str, ts: &str) -> Self {
        // Written in place at its exact size when nothing needs escaping
        // (ids and timestamps rarely do): one allocation for each half.
        const EVENT: &str = ",\"event\":\"";
        const THREAD: &str = "\",\"thread_id\":";
        const RUN: &str = ",\"run_id\":";
        const PART: &str = ",\"data\":{\"part\":";
        const TEXT: &str = ",\"text\":\"";
        const TS: &str = "\"},\"ts\":";
        let quoted = |s: &str| s.len() + 2;
        let mut pre = String::with_capacity(
            EVENT.len()
                + TEXT_DELTA.len()
                + thread_id.map_or(1, |t| THREAD.len() + quoted(t))
                + RUN.len()
                + quoted(run_id)
                + PART.len()
                + quoted(part)
                + TEXT.len(),
        );
        pre.push_str(EVENT);
        pre.push_str(TEXT_DELTA);
        match thread_id {
            Some(thread) => {
                pre.push_str(THREAD);
                push_json_string(&mut pre, thread);
            }
            None => pre.push('"'),
        }
        pre.push_str(RUN);
        push_json_string(&mut pre, run_id);
        pre.push_str(PART);
        push_json_string(&mut pre, part);
        pre.push_str(TEXT);
        let mut post = String::with_capacity(TS.len() + quoted(ts) + 1);
        post.push_str(TS);
        push_json_string(&mut post, ts);
        post.push('}');
        Self {
            pre: pre.into(),
            post: post.into(),
        }
    }

    /// The same frame in shared stream `stream` (its frames name it right
    /// after their seq, as every event of a shared stream does).
    pub fn in_stream(self, stream: Option<&str>) -> Self {
        match stream {
            None => self,
            Some(stream) => Self {
                pre: format!(",\"stream\":{}{}", json_string(stream), self.pre).into(),
                post: self.post,
            },
        }
    }

    /// What follows `"seq":N` in a single delta's frame with this (escaped) text.
    pub fn tail(&self, text: &str) -> String {
        let mut out = String::with_capacity(self.pre.len() + text.len() + self.post.len());
        out.push_str(&self.pre);
        out.push_str(text);
        out.push_str(&self.post);
        out
    }

    /// The frame covering seqs `from..=to` with this (escaped) text; a frame
    /// of one delta (`from == to`) has no `from_seq`.
    pub fn frame(&self, from: u64, to: u64, text: &str) -> String {
        let mut out = head(from, to);
        out.push_str(&self.tail(text));
        out
    }

    /// The JSON before and after the text.
    pub fn parts(&self) -> (&str, &str) {
        (&self.pre, &self.post)
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.pre.len() + self.post.len()
    }

    /// Never true (a template always has its fields); for clippy's `len` rule.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The start of an event frame covering seqs `from..=to`, up to where a
/// [`Template`]'s `pre` follows: `{"type":"event","seq":to` and, for more
/// than one seq, `,"from_seq":from`.
pub fn head(from: u64, to: u64) -> String {
    if from < to {
        format!("{{\"type\":\"event\",\"seq\":{to},\"from_seq\":{from}")
    } else {
        format!("{{\"type\":\"event\",\"seq\":{to}")
    }
}

/// Where the pieces of one live text delta's event frame lie in its JSON
/// (byte offsets): the frame is `{"type":"event","seq":N`, then its
/// template's `pre` (`json[pre..text]`), the escaped text
/// (`json[text..post]`), then the template's `post` (`json[post..]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spans {
    /// Where `pre` starts (right after the seq).
    pub pre: usize,
    /// Where the text starts (right after `pre`).
    pub text: usize,
    /// Where `post` starts (right after the text).
    pub post: usize,
}

/// The [`Spans`] of `json` if it is the frame of a single text delta as
/// [`Template::frame`] writes it (one seq, no `from_seq`); `None` for any
/// other event and for anything malformed. Reads the JSON once, without
/// allocating; decides nothing about the text but where it ends.
pub fn spans(json: &[u8]) -> Option<Spans> {
    let mut at = Cursor { json, at: 0 };
    at.literal(b"{\"type\":\"event\",\"seq\":")?;
    at.digits()?;
    let pre = at.at;
    if at.peek(b",\"stream\":") {
        at.literal(b",\"stream\":")?;
        at.string()?;
    }
    at.literal(b",\"event\":\"agent_text_delta\"")?;
    if at.peek(b",\"thread_id\":") {
        at.literal(b",\"thread_id\":")?;
        at.string()?;
    }
    at.literal(b",\"run_id\":")?;
    at.string()?;
    at.literal(b",\"data\":{\"part\":")?;
    at.string()?;
    at.literal(b",\"text\":")?;
    let text = at.at + 1;
    at.string()?;
    let post = at.at - 1;
    at.literal(b"},\"ts\":")?;
    at.string()?;
    at.literal(b"}")?;
    (at.at == json.len()).then_some(Spans { pre, text, post })
}

/// A position in JSON being matched against a template.
struct Cursor<'a> {
    json: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self, lit: &[u8]) -> bool {
        self.json
            .get(self.at..)
            .is_some_and(|rest| rest.starts_with(lit))
    }

    fn literal(&mut self, lit: &[u8]) -> Option<()> {
        self.peek(lit).then(|| self.at += lit.len())
    }

    /// One or more ASCII digits.
    fn digits(&mut self) -> Option<()> {
        let start = self.at;
        while self.json.get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
        (self.at > start).then_some(())
    }

    /// A JSON string, quotes included (escapes skipped over, not checked).
    fn string(&mut self) -> Option<()> {
        self.literal(b"\"")?;
        loop {
            match self.json.get(self.at)? {
                b'"' => {
                    self.at += 1;
                    return Some(());
                }
                b'\\' => self.at += 2,
                _ => self.at += 1,
            }
        }
    }
}

/// Consecutive deltas of one part, as one history entry: the text so far and
/// where each delta ends in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compacted {
    first: u64,
    part: Box<str>,
    template: Template,
    text: String,
    /// Byte offset in `text` where each delta ends (`ends[i]` for seq `first + i`).
    ends: Vec<u32>,
}

/// Bytes charged per delta beyond its text (its end offset).
pub const PER_DELTA_BYTES: usize = 4;

impl Compacted {
    /// An entry holding the delta with seq `seq`.
    pub fn new(seq: u64, delta: Delta) -> Self {
        let end = delta.text.len() as u32;
        Self {
            first: seq,
            part: delta.part.into(),
            template: delta.template,
            text: delta.text,
            ends: vec![end],
        }
    }

    /// The part it holds.
    pub fn part(&self) -> &str {
        &self.part
    }

    /// Seq of its first delta.
    pub fn first(&self) -> u64 {
        self.first
    }

    /// Seq of its last delta.
    pub fn last(&self) -> u64 {
        self.first + self.ends.len() as u64 - 1
    }

    /// Deltas it holds.
    pub fn deltas(&self) -> usize {
        self.ends.len()
    }

    /// Whether a delta of `part` can join it: one more delta must fit the
    /// offsets (4 GiB of text).
    pub fn accepts(&self, part: &str, text: &str) -> bool {
        &*self.part == part && self.text.len() + text.len() <= u32::MAX as usize
    }

    /// Append the delta with seq `last() + 1` (escaped `text`).
    pub fn push(&mut self, text: &str) {
        self.text.push_str(text);
        self.ends.push(self.text.len() as u32);
    }

    /// Bytes held: the text, the offsets and the template.
    pub fn bytes(&self) -> usize {
        self.text.len() + self.ends.len() * PER_DELTA_BYTES + self.template.len() + self.part.len()
    }

    /// The text (escaped) of the deltas `from..=to`, clipped to what it holds;
    /// `None` when the ranges do not meet.
    pub fn text(&self, from: u64, to: u64) -> Option<(u64, u64, &str)> {
        let from = from.max(self.first);
        let to = to.min(self.last());
        if from > to {
            return None;
        }
        let start = match (from - self.first) as usize {
            0 => 0,
            i => self.ends[i - 1] as usize,
        };
        let end = self.ends[(to - self.first) as usize] as usize;
        Some((from, to, &self.text[start..end]))
    }

    /// The frame of the deltas `from..=to` (clipped): `(from, to, json)`.
    pub fn frame(&self, from: u64, to: u64) -> Option<(u64, u64, String)> {
        self.text(from, to)
            .map(|(from, to, text)| (from, to, self.template.frame(from, to, text)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn template() -> Template {
        Template::new("r1", Some("t\"1"), "answer", "2026-12-01T00:00:00Z")
    }

    #[test]
    fn a_single_delta_is_an_ordinary_event_frame() {
        let t = template();
        let v: Value = serde_json::from_str(&t.frame(7, 7, &escape("Hi \"you\"\n"))).unwrap();
        assert_eq!(
            v,
            json!({"type":"event","seq":7,"event":"agent_text_delta","thread_id":"t\"1",
                   "run_id":"r1","data":{"part":"answer","text":"Hi \"you\"\n"},
                   "ts":"2026-12-01T00:00:00Z"})
        );
        let no_thread = Template::new("r", None, "p", "x");
        let v: Value = serde_json::from_str(&no_thread.frame(1, 1, "a")).unwrap();
        assert!(v.get("thread_id").is_none());
        assert!(v.get("from_seq").is_none());
    }

    proptest::proptest! {
        /// Any single delta's frame, in the own stream or a shared one,
        /// with any ids and text, is found with its template's pieces
        /// exactly; its covered frames are not (they never travel live).
        #[test]
        fn a_delta_frame_is_found_with_its_pieces(
            run in ".{0,12}",
            thread in proptest::option::of(".{0,12}"),
            part in ".{0,12}",
            stream in proptest::option::of(".{0,12}"),
            text in ".{0,40}",
            seq in 1u64..u64::MAX,
        ) {
            let t = Template::new(&run, thread.as_deref(), &part, "2026-12-01T00:00:00.000Z")
                .in_stream(stream.as_deref());
            let escaped = escape(&text);
            let json = t.frame(seq, seq, &escaped);
            let s = spans(json.as_bytes()).expect("a delta frame");
            let (pre, post) = t.parts();
            proptest::prop_assert_eq!(&json[s.pre..s.text], pre);
            proptest::prop_assert_eq!(&json[s.text..s.post], escaped.as_str());
            proptest::prop_assert_eq!(&json[s.post..], post);
            let start = head(seq, seq);
            proptest::prop_assert_eq!(&json[..s.pre], start.as_str());
            proptest::prop_assert!(spans(t.frame(seq - 1, seq, &escaped).as_bytes()).is_none());
        }

        /// Whatever its ids and text (quotes, backslashes, control and
        /// non-ASCII characters), a delta's frame is the JSON a serializer
        /// writes for the same event, and its text is escaped as one.
        #[test]
        fn a_delta_frame_is_what_a_serializer_writes(
            run in "(.|[\"\\\\\u{0}-\u{1f}]){0,12}",
            thread in proptest::option::of("(.|[\"\\\\\u{0}-\u{1f}]){0,12}"),
            part in "(.|[\"\\\\\u{0}-\u{1f}]){0,12}",
            ts in "(.|[\"\\\\]){0,30}",
            text in "(.|[\"\\\\\u{0}-\u{1f}]){0,40}",
            seq in 1u64..u64::MAX,
        ) {
            let quoted = serde_json::to_string(&text).unwrap();
            proptest::prop_assert_eq!(escape(&text), &quoted[1..quoted.len() - 1]);
            let t = Template::new(&run, thread.as_deref(), &part, &ts);
            let v: Value = serde_json::from_str(&t.frame(seq, seq, &escape(&text))).unwrap();
            let mut want = json!({"type": "event", "seq": seq, "event": TEXT_DELTA,
                "run_id": run, "data": {"part": part, "text": text}, "ts": ts});
            if let Some(thread) = thread {
                want["thread_id"] = json!(thread);
            }
            proptest::prop_assert_eq!(v, want);
        }

        /// Arbitrary bytes never panic the matcher.
        #[test]
        fn any_bytes_are_matched_without_a_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = spans(&bytes);
            let mut framed = b"{\"type\":\"event\",\"seq\":1,\"event\":\"agent_text_delta\"".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = spans(&framed);
        }
    }

    #[test]
    fn other_events_and_cut_frames_are_not_deltas() {
        let other = r#"{"type":"event","seq":3,"event":"agent_started","run_id":"r","data":{"part":"a","text":"x"},"ts":"t"}"#;
        assert_eq!(spans(other.as_bytes()), None);
        let json = template().frame(5, 5, "Hi");
        assert!(spans(json.as_bytes()).is_some());
        for cut in 0..json.len() {
            assert_eq!(spans(&json.as_bytes()[..cut]), None, "{cut}");
        }
        // Anything after the frame, or extra data fields, is not the template.
        assert_eq!(spans(format!("{json} ").as_bytes()), None);
        let extra = json.replace(r#""text":"Hi""#, r#""text":"Hi","more":1"#);
        assert_eq!(spans(extra.as_bytes()), None);
    }

    #[test]
    fn escaped_texts_join_into_the_escaped_join() {
        let pieces = ["a\"", "\\", "\u{1}", "é😀", "\n\t", "</script>"];
        let joined: String = pieces.concat();
        let escaped: String = pieces.iter().map(|p| escape(p)).collect();
        assert_eq!(escaped, escape(&joined));
    }

    #[test]
    fn any_sub_range_is_exactly_its_deltas_text() {
        let words = ["Hello", ", ", "wor", "ld", "!"];
        let mut c = Compacted::new(10, Delta::new("answer", words[0], None, template()));
        for w in &words[1..] {
            assert!(c.accepts("answer", &escape(w)));
            c.push(&escape(w));
        }
        assert!(!c.accepts("other", "x"));
        assert_eq!((c.first(), c.last(), c.deltas()), (10, 14, 5));
        for from in 10..=14u64 {
            for to in from..=14u64 {
                let (f, t, json) = c.frame(from, to).unwrap();
                assert_eq!((f, t), (from, to));
                let v: Value = serde_json::from_str(&json).unwrap();
                let want: String = words[(from - 10) as usize..=(to - 10) as usize].concat();
                assert_eq!(v["data"]["text"], want.as_str());
                assert_eq!(v["seq"], to);
                if from < to {
                    assert_eq!(v["from_seq"], from);
                } else {
                    assert!(v.get("from_seq").is_none());
                }
            }
        }
        // Clipped to what it holds; ranges that miss it give nothing.
        assert_eq!(c.text(0, 11).map(|(f, t, _)| (f, t)), Some((10, 11)));
        assert_eq!(c.text(13, 99), Some((13, 14, "ld!")));
        assert_eq!(c.text(15, 20), None);
        assert_eq!(c.text(0, 9), None);
        assert_eq!(
            c.bytes(),
            "Hello, world!".len() + 5 * PER_DELTA_BYTES + template().len() + "answer".len()
        );
    }
}
