//! QMP wire framing: a stream of JSON objects in, one object per message.
//!
//! Clients may split an object over several reads or lines, or send several on one line;
//! QEMU accepts all of that, and so do we. The splitter tracks strings and nesting to find
//! where each top-level value ends, then serde_json parses it (an object with a key twice is
//! bad input, as in QEMU). Bad input is reported and
//! skipped, and the connection goes on: a lexical error resets the splitter at the next
//! newline, as QEMU's parser recovers.

/// Largest message accepted; a longer one is an error and is discarded. (QEMU's limit is 64
/// MiB of tokens; nothing we take needs more than a few KiB.)
pub const MAX_MESSAGE: usize = 1 << 20;

/// The error for a message over [`MAX_MESSAGE`]: QEMU's words for its own size limit, so a
/// client that knows QEMU's errors knows this one.
pub const TOO_LONG: &str = "JSON token size limit exceeded";

#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A complete JSON value (parsed).
    Value(serde_json::Value),
    /// Something that is not valid JSON, with the parser's message.
    Invalid(String),
}

#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// Discarding an oversized message until its end.
    skipping: bool,
}

impl Splitter {
    /// Feeds bytes; returns the frames they complete.
    pub fn push(&mut self, data: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        for &b in data {
            if self.skipping {
                self.track(b);
                if self.depth == 0 && !self.in_string {
                    self.skipping = false;
                }
                continue;
            }
            if self.depth == 0 && !self.in_string && self.buf.is_empty() && b.is_ascii_whitespace()
            {
                continue;
            }
            self.buf.push(b);
            let was_nested = self.depth > 0;
            self.track(b);
            if self.buf.len() > MAX_MESSAGE {
                out.push(Frame::Invalid(TOO_LONG.into()));
                self.buf.clear();
                self.skipping = self.depth > 0 || self.in_string;
                continue;
            }
            let complete = self.depth == 0 && !self.in_string && (was_nested || b == b'\n');
            if complete {
                let text = std::mem::take(&mut self.buf);
                out.push(match parse(&text) {
                    Ok(v) => Frame::Value(v),
                    Err(e) => Frame::Invalid(format!("JSON parse error, {e}")),
                });
            }
        }
        out
    }

    fn track(&mut self, b: u8) {
        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            // A control character resets the parser (QMP's recovery convention).
            0..=0x08 | 0x0b | 0x0c | 0x0e..=0x1f | 0xff => {
                self.depth = 0;
                self.in_string = false;
            }
            _ => {}
        }
    }
}

/// One message's text as a value: serde_json's parse, then a walk through serde_json's own
/// deserializer that refuses an object with a key twice. serde_json keeps the last of
/// duplicate keys; QEMU's parser refuses them ("duplicate key"), and a message that says
/// `execute` twice must not run whichever came last. The walk sees exactly the JSON
/// serde_json saw (same tokenizer, escapes decoded, its recursion limit): no second parser
/// to disagree with the first.
fn parse(text: &[u8]) -> Result<serde_json::Value, serde_json::Error> {
    let v = serde_json::from_slice(text)?;
    serde::Deserialize::deserialize(&mut serde_json::Deserializer::from_slice(text))
        .map(|UniqueKeys| v)
}

/// Deserializes any JSON value and nothing from it: fails on an object with a key twice.
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

/// The longest key quoted in a "duplicate key" error (a key may be up to a message long).
const KEY_QUOTED_MAX: usize = 64;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(k) = map.next_key::<String>()? {
            if seen.contains(&k) {
                let mut shown = k;
                if shown.len() > KEY_QUOTED_MAX {
                    let mut at = KEY_QUOTED_MAX;
                    while !shown.is_char_boundary(at) {
                        at -= 1;
                    }
                    shown.truncate(at);
                    shown.push('…');
                }
                return Err(serde::de::Error::custom(format!("duplicate key '{shown}'")));
            }
            map.next_value::<UniqueKeys>()?;
            seen.insert(k);
        }
        Ok(UniqueKeys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn splits_joins_and_recovers() {
        let mut s = Splitter::default();
        assert!(s.push(b"{\"execute\": \"a\"").is_empty());
        assert_eq!(
            s.push(b"}{\"x\":\"}{\"} \n"),
            vec![
                Frame::Value(json!({"execute": "a"})),
                Frame::Value(json!({"x": "}{"})),
            ]
        );
        // Garbage up to the newline is one error, then parsing goes on.
        let f = s.push(b"nonsense\n{\"y\": [1, {\"z\": \"\\\"\"}]}");
        assert!(matches!(&f[0], Frame::Invalid(_)), "{f:?}");
        assert_eq!(f[1], Frame::Value(json!({"y": [1, {"z": "\""}]})));
        // Unbalanced input is reset by a control character.
        assert!(s.push(b"{\"a\": [").is_empty());
        let f = s.push(b"\x01\n{\"b\":1}");
        assert!(matches!(&f[0], Frame::Invalid(_)));
        assert_eq!(f[1], Frame::Value(json!({"b": 1})));
    }

    /// QEMU's parser refuses an object with a key twice ("duplicate key"); serde_json keeps
    /// the last, which ran `{"execute": "query-version", "execute": "disk-remove", …}` as a
    /// disk-remove. A key twice at any depth makes the message invalid.
    #[test]
    fn a_key_twice_in_one_object_at_any_depth_is_invalid() {
        let mut s = Splitter::default();
        for (text, key) in [
            (r#"{"execute": "a", "execute": "b"}"#, "execute"),
            (
                r#"{"execute": "a", "arguments": {"n": 1, "m": 2, "n": 3}}"#,
                "n",
            ),
            (
                r#"{"execute": "a", "id": [1, {"x": {"y": {}, "y": null}}]}"#,
                "y",
            ),
            // Keys are compared as the strings they denote, escapes decoded.
            (r#"{"ab": 1, "a\u0062": 2}"#, "ab"),
            (r#"[{"k": 1, "k": 1}]"#, "k"),
        ] {
            let f = s.push(format!("{text}\n").as_bytes());
            let prefix = format!("JSON parse error, duplicate key '{key}'");
            assert!(
                matches!(&f[..], [Frame::Invalid(m)] if m.starts_with(&prefix)),
                "{text}: {f:?}"
            );
        }
        // The same key in two objects, or a key equal to a value, is no duplicate.
        let f = s.push(br#"{"a": {"k": 1}, "b": {"k": "a"}, "c": [{"k": 1}, {"k": 2}]}"#);
        assert_eq!(
            f,
            vec![Frame::Value(
                json!({"a": {"k": 1}, "b": {"k": "a"}, "c": [{"k": 1}, {"k": 2}]})
            )]
        );
        // After a refused message the next one parses.
        let f = s.push(br#"{"k": 1, "k": 2}{"k": 3}"#);
        assert!(matches!(&f[0], Frame::Invalid(_)), "{f:?}");
        assert_eq!(f[1], Frame::Value(json!({"k": 3})));
    }

    #[test]
    fn oversized_messages_are_refused_and_skipped() {
        let mut s = Splitter::default();
        let mut big = b"{\"execute\": \"".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_MESSAGE + 10));
        big.extend(b"\"}{\"ok\": true}");
        let f = s.push(&big);
        assert_eq!(
            f.len(),
            2,
            "{:?}",
            f.iter()
                .map(|x| matches!(x, Frame::Invalid(_)))
                .collect::<Vec<_>>()
        );
        assert!(matches!(&f[0], Frame::Invalid(m) if m == TOO_LONG));
        assert_eq!(f[1], Frame::Value(json!({"ok": true})));
    }
}
