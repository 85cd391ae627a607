//! Parts of Redis key names taken from input (stream names, run ids, part
//! names), escaped so that every key name is injective.
//!
//! A stream's keys are `<prefix>:{<stream>}:<kind>[:<id>]`. Redis ends the
//! hash tag at the first `}`, and the script joins a run and a part with a
//! tab and keeps the runs' total under the field `*`; so a user id holding
//! `}`, a run or part holding a tab, or a run named `*` could make two
//! different things share a key, a field or an entry. [`escape`] percent-
//! encodes the bytes that carry meaning there (`%`, `{`, `}`, tab, newline,
//! `*`) and leaves everything else as it is: the names of ordinary ids do
//! not change.

use std::borrow::Cow;

/// The bytes [`escape`] encodes.
const SPECIAL: &[u8] = b"%{}\t\n*";

/// `s` with `%`, `{`, `}`, tab, newline and `*` percent-encoded (`%7D`…).
pub(super) fn escape(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| SPECIAL.contains(&b)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '%' | '{' | '}' | '\t' | '\n' | '*' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The inverse of [`escape`]; `None` for text `escape` cannot produce.
pub(super) fn unescape(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return (!s.bytes().any(|b| SPECIAL.contains(&b))).then_some(Cow::Borrowed(s));
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3)?;
        let byte = u8::from_str_radix(code, 16).ok()?;
        if !SPECIAL.contains(&byte) || code != format!("{byte:02X}") {
            return None;
        }
        out.push(byte as char);
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    (escape(&out) == s).then_some(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ordinary_names_are_unchanged_and_special_bytes_encoded() {
        assert_eq!(escape("user:alice"), "user:alice");
        assert_eq!(escape("user:mallory}:msg:x"), "user:mallory%7D:msg:x");
        assert_eq!(escape("a\tb"), "a%09b");
        assert_eq!(escape("*"), "%2A");
        assert_eq!(escape("100%"), "100%25");
        assert_eq!(escape("{x}\n"), "%7Bx%7D%0A");
        for bad in ["%", "%2", "%zz", "%41", "%7d", "a}", "*"] {
            assert_eq!(unescape(bad), None, "{bad}");
        }
    }

    proptest! {
        /// Round trip, and nothing special is left: so two different
        /// names never give one key, field or joined entry.
        #[test]
        fn escape_is_injective_and_reversible(s in ".{0,24}", t in "[%{}\t\n*a:]{0,12}") {
            for s in [s.as_str(), t.as_str()] {
                let e = escape(s);
                prop_assert!(!e.bytes().any(|b| b"{}\t\n*".contains(&b)), "{:?}", e);
                let back = unescape(&e).map(Cow::into_owned);
                prop_assert_eq!(back.as_deref(), Some(s));
            }
        }
    }
}
