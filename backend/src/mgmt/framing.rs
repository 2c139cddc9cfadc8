//! QMP wire framing: a stream of JSON objects in, one object per message.
//!
//! Clients may split an object over several reads or lines, or send several on one line;
//! QEMU accepts all of that, and so do we. The splitter tracks strings and nesting to find
//! where each top-level value ends, then serde_json parses it. Bad input is reported and
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
                out.push(match serde_json::from_slice::<serde_json::Value>(&text) {
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
