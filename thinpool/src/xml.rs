//! Reader and writer for the XML metadata dump format produced by
//! `thin_dump` and consumed by `thin_restore` (thin-provisioning-tools 0.9.0).
//!
//! # The format
//!
//! A dump is a single `<superblock>` element holding zero or more `<device>`
//! elements, each of which holds the device's mappings:
//!
//! ```text
//! <superblock uuid="" time="T" transaction="X" flags="F" version="V" data_block_size="S" nr_data_blocks="D">
//!   <device dev_id="I" mapped_blocks="M" transaction="Y" creation_time="C" snap_time="N">
//!     <range_mapping origin_begin="O" data_begin="B" length="L" time="t"/>
//!     <single_mapping origin_block="O" data_block="B" time="t"/>
//!   </device>
//! </superblock>
//! ```
//!
//! * `superblock` carries the pool-wide fields: the (usually empty) `uuid`, the
//!   current `time` counter, the userspace `transaction` id, the superblock
//!   `flags`, the metadata format `version`, the data block size in 512-byte
//!   sectors and the number of data blocks in the pool.
//! * `device` carries one thin device's id, its count of mapped blocks, its
//!   transaction id and its creation and snapshot times.
//! * A mapping says that a virtual (origin) block of the device lives in a data
//!   block of the pool and was written at a given `time`. `thin_dump` lists
//!   mappings in ascending virtual block order and folds every maximal run of
//!   consecutive virtual blocks, mapped to consecutive data blocks with the
//!   same time, into one `range_mapping` if the run is at least two blocks
//!   long; a run of one block is written as a `single_mapping`.
//!
//! The writer reproduces `thin_dump` output byte for byte: each element on a
//! line of its own, indented by two spaces per nesting level, attributes in the
//! order shown above, and every line (including the last) ending in `\n`.
//! A device without mappings is written as an opening and a closing tag.
//!
//! The parser is deliberately more lenient about layout, and deliberately strict
//! about content:
//!
//! * whitespace between elements, attribute order, single or double quotes,
//!   an `<?xml ...?>` declaration, `<!-- comments -->`, a leading byte order
//!   mark, self-closing `<device .../>` and mappings written as an open/close
//!   tag pair are all accepted;
//! * the optional `metadata_snap` attribute of `<superblock>` is accepted and
//!   ignored;
//! * the entities `&quot;` `&amp;` `&lt;` `&gt;` `&apos;` and numeric character
//!   references are decoded in `uuid` (the writer escapes the first five);
//! * unknown elements or attributes, missing or duplicate attributes, numbers
//!   that are not plain unsigned decimals or do not fit their field, text
//!   between elements, zero-length runs, runs whose last virtual or data block
//!   would not fit in 64 bits, mappings that overlap or go backwards within a
//!   device, duplicate device ids and the shared-subtree `<def>`/`<ref>`
//!   elements of thin-provisioning-tools 1.x are all rejected with an
//!   [`XmlError`] naming the line and what was expected there.
//!
//! The parser never panics, whatever the input.

use std::collections::HashSet;
use std::io::{self, Write};

/// Pool-wide fields of the `<superblock>` element.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DumpSuperblock {
    pub uuid: String,
    pub time: u32,
    pub transaction: u64,
    pub flags: u32,
    pub version: u32,
    pub data_block_size: u32,
    pub nr_data_blocks: u64,
}

/// Per-device fields of a `<device>` element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DumpDevice {
    pub dev_id: u32,
    pub mapped_blocks: u64,
    pub transaction: u64,
    pub creation_time: u32,
    pub snap_time: u32,
}

/// One mapped block: virtual block `vblock` lives in data block `data_block`
/// and was written at `time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DumpMapping {
    pub vblock: u64,
    pub data_block: u64,
    pub time: u32,
}

/// A run of `length` consecutive virtual blocks starting at `vbegin`, mapped to
/// consecutive data blocks starting at `data_begin`, all with the same `time`.
///
/// A `single_mapping` parses to a run of length 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DumpRun {
    pub vbegin: u64,
    pub data_begin: u64,
    pub length: u64,
    pub time: u32,
}

impl DumpRun {
    /// Last virtual block of the run (inclusive), or `None` if the run is empty
    /// or its end does not fit in a `u64`.
    pub fn last_vblock(&self) -> Option<u64> {
        self.vbegin.checked_add(self.length.checked_sub(1)?)
    }

    /// Last data block of the run (inclusive), or `None` if the run is empty or
    /// its end does not fit in a `u64`.
    pub fn last_data_block(&self) -> Option<u64> {
        self.data_begin.checked_add(self.length.checked_sub(1)?)
    }

    /// The individual block mappings of the run, in ascending order.
    pub fn mappings(&self) -> impl Iterator<Item = DumpMapping> {
        let run = *self;
        (0..run.length).map_while(move |i| {
            Some(DumpMapping {
                vblock: run.vbegin.checked_add(i)?,
                data_block: run.data_begin.checked_add(i)?,
                time: run.time,
            })
        })
    }
}

/// A parsed `<device>` element with its mappings, as runs in document order
/// (which the parser guarantees to be ascending and non-overlapping).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedDevice {
    pub device: DumpDevice,
    pub runs: Vec<DumpRun>,
}

impl ParsedDevice {
    /// All block mappings of the device, expanded lazily, in ascending order.
    pub fn mappings(&self) -> impl Iterator<Item = DumpMapping> + '_ {
        self.runs.iter().flat_map(DumpRun::mappings)
    }

    /// Number of blocks covered by the runs (saturating). For a consistent
    /// dump this equals `device.mapped_blocks`; the parser does not enforce it.
    pub fn block_count(&self) -> u64 {
        self.runs
            .iter()
            .fold(0u64, |acc, r| acc.saturating_add(r.length))
    }
}

/// A whole parsed dump document.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedDump {
    pub superblock: DumpSuperblock,
    pub devices: Vec<ParsedDevice>,
}

impl ParsedDump {
    /// Serialises the dump in `thin_dump` format (adjacent runs that can be
    /// merged are merged, exactly as `thin_dump` would).
    pub fn write_to<W: Write>(&self, out: W) -> io::Result<W> {
        let mut w = XmlWriter::new(out);
        w.begin_superblock(&self.superblock)?;
        for dev in &self.devices {
            w.begin_device(&dev.device)?;
            for run in &dev.runs {
                w.run(*run)?;
            }
            w.end_device()?;
        }
        w.end_superblock()?;
        Ok(w.into_inner())
    }

    /// [`ParsedDump::write_to`] into a `String`.
    pub fn to_xml_string(&self) -> io::Result<String> {
        let bytes = self.write_to(Vec::new())?;
        String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterState {
    Start,
    InSuperblock,
    InDevice,
    Done,
}

/// Streaming `thin_dump` format writer.
///
/// Call [`begin_superblock`](Self::begin_superblock), then for each device
/// [`begin_device`](Self::begin_device), its mappings in ascending virtual
/// block order and [`end_device`](Self::end_device), and finally
/// [`end_superblock`](Self::end_superblock). The writer merges consecutive
/// mappings into `range_mapping` runs itself. Calls out of sequence, and
/// mappings that are not strictly ascending, fail with
/// [`io::ErrorKind::InvalidInput`] without writing anything.
///
/// The writer issues one small write per line; wrap unbuffered sinks in a
/// [`std::io::BufWriter`].
#[derive(Debug)]
pub struct XmlWriter<W: Write> {
    out: W,
    state: WriterState,
    /// Run being accumulated; written out when a mapping that does not extend
    /// it arrives, or at `end_device`.
    pending: Option<DumpRun>,
}

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl<W: Write> XmlWriter<W> {
    pub fn new(out: W) -> Self {
        XmlWriter {
            out,
            state: WriterState::Start,
            pending: None,
        }
    }

    fn expect_state(&self, want: WriterState, call: &str) -> io::Result<()> {
        if self.state == want {
            Ok(())
        } else {
            Err(invalid_input(format!(
                "XmlWriter::{call} called in state {:?}, expected {want:?}",
                self.state
            )))
        }
    }

    pub fn begin_superblock(&mut self, sb: &DumpSuperblock) -> io::Result<()> {
        self.expect_state(WriterState::Start, "begin_superblock")?;
        writeln!(
            self.out,
            "<superblock uuid=\"{}\" time=\"{}\" transaction=\"{}\" flags=\"{}\" version=\"{}\" data_block_size=\"{}\" nr_data_blocks=\"{}\">",
            escape_attr(&sb.uuid),
            sb.time,
            sb.transaction,
            sb.flags,
            sb.version,
            sb.data_block_size,
            sb.nr_data_blocks
        )?;
        self.state = WriterState::InSuperblock;
        Ok(())
    }

    pub fn begin_device(&mut self, dev: &DumpDevice) -> io::Result<()> {
        self.expect_state(WriterState::InSuperblock, "begin_device")?;
        writeln!(
            self.out,
            "  <device dev_id=\"{}\" mapped_blocks=\"{}\" transaction=\"{}\" creation_time=\"{}\" snap_time=\"{}\">",
            dev.dev_id, dev.mapped_blocks, dev.transaction, dev.creation_time, dev.snap_time
        )?;
        self.state = WriterState::InDevice;
        self.pending = None;
        Ok(())
    }

    /// Adds one mapped block. Must be called in strictly ascending `vblock`
    /// order within a device.
    pub fn mapping(&mut self, m: DumpMapping) -> io::Result<()> {
        self.run(DumpRun {
            vbegin: m.vblock,
            data_begin: m.data_block,
            length: 1,
            time: m.time,
        })
    }

    /// Adds a run of mapped blocks (merged with the previous run when they are
    /// contiguous in both address spaces and have the same time). Runs must be
    /// non-empty, must not overflow, and must be in strictly ascending,
    /// non-overlapping virtual block order within a device.
    pub fn run(&mut self, r: DumpRun) -> io::Result<()> {
        self.expect_state(WriterState::InDevice, "mapping")?;
        if r.last_vblock().is_none() || r.last_data_block().is_none() {
            return Err(invalid_input(format!(
                "XmlWriter: run {r:?} is empty or extends past block 2^64-1"
            )));
        }
        let Some(mut p) = self.pending else {
            self.pending = Some(r);
            return Ok(());
        };
        // `p` was validated when it became pending, so these are `Some`.
        let p_last_v = p.last_vblock();
        if p_last_v.is_none_or(|last| r.vbegin <= last) {
            return Err(invalid_input(format!(
                "XmlWriter: mapping at virtual block {} is not after the previous mapping (last block {})",
                r.vbegin,
                p_last_v.map_or_else(|| "?".to_string(), |l| l.to_string())
            )));
        }
        let contiguous = p_last_v.and_then(|l| l.checked_add(1)) == Some(r.vbegin)
            && p.last_data_block().and_then(|l| l.checked_add(1)) == Some(r.data_begin)
            && p.time == r.time;
        match p.length.checked_add(r.length) {
            Some(len) if contiguous => {
                p.length = len;
                self.pending = Some(p);
            }
            _ => {
                self.write_run(&p)?;
                self.pending = Some(r);
            }
        }
        Ok(())
    }

    fn write_run(&mut self, r: &DumpRun) -> io::Result<()> {
        if r.length == 1 {
            writeln!(
                self.out,
                "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"{}\"/>",
                r.vbegin, r.data_begin, r.time
            )
        } else {
            writeln!(
                self.out,
                "    <range_mapping origin_begin=\"{}\" data_begin=\"{}\" length=\"{}\" time=\"{}\"/>",
                r.vbegin, r.data_begin, r.length, r.time
            )
        }
    }

    pub fn end_device(&mut self) -> io::Result<()> {
        self.expect_state(WriterState::InDevice, "end_device")?;
        if let Some(p) = self.pending.take() {
            self.write_run(&p)?;
        }
        self.out.write_all(b"  </device>\n")?;
        self.state = WriterState::InSuperblock;
        Ok(())
    }

    /// Closes the document and flushes the underlying writer.
    pub fn end_superblock(&mut self) -> io::Result<()> {
        self.expect_state(WriterState::InSuperblock, "end_superblock")?;
        self.out.write_all(b"</superblock>\n")?;
        self.state = WriterState::Done;
        self.out.flush()
    }

    /// Returns the underlying writer. Anything not yet ended is lost: call
    /// [`end_superblock`](Self::end_superblock) first.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Escapes `s` for use inside a double-quoted attribute value.
fn escape_attr(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().saturating_add(16));
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// A parse error. Every variant carries the 1-based line number it refers to;
/// the message names what was expected there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("line {line}: unterminated {what}; expected {expected}")]
    Unterminated {
        line: usize,
        what: String,
        expected: &'static str,
    },
    #[error("line {line}: malformed markup: expected {expected}, found {found}")]
    Syntax {
        line: usize,
        expected: String,
        found: String,
    },
    #[error("line {line}: unexpected text {text:?}; expected only whitespace between elements")]
    UnexpectedText { line: usize, text: String },
    #[error("line {line}: unknown element <{name}>; expected {expected}")]
    UnknownElement {
        line: usize,
        name: String,
        expected: &'static str,
    },
    #[error("line {line}: shared subtree <def>/<ref> elements (thin-provisioning-tools 1.x) are not supported")]
    SharedSubtree { line: usize },
    #[error("line {line}: <{element}> is not allowed {context}; expected {expected}")]
    Misplaced {
        line: usize,
        element: String,
        context: &'static str,
        expected: &'static str,
    },
    #[error("line {line}: unexpected closing tag </{found}>; expected {expected}")]
    UnexpectedClose {
        line: usize,
        found: String,
        expected: &'static str,
    },
    #[error("line {line}: unexpected end of input; expected {expected}")]
    UnexpectedEof { line: usize, expected: &'static str },
    #[error("line {line}: <{element}> is missing attribute \"{attr}\"")]
    MissingAttribute {
        line: usize,
        element: &'static str,
        attr: &'static str,
    },
    #[error("line {line}: <{element}> has unknown attribute \"{attr}\"; expected only {expected}")]
    UnknownAttribute {
        line: usize,
        element: &'static str,
        attr: String,
        expected: String,
    },
    #[error("line {line}: <{element}> has attribute \"{attr}\" more than once; expected it once")]
    DuplicateAttribute {
        line: usize,
        element: &'static str,
        attr: String,
    },
    #[error("line {line}: attribute \"{attr}\" of <{element}> is {value:?}; expected an unsigned decimal integer that fits in {bits} bits")]
    BadNumber {
        line: usize,
        element: &'static str,
        attr: &'static str,
        value: String,
        bits: u32,
    },
    #[error("line {line}: bad entity or character reference {entity:?} in attribute \"{attr}\"; expected one of &quot; &amp; &lt; &gt; &apos; &#N; &#xH;")]
    BadEntity {
        line: usize,
        attr: &'static str,
        entity: String,
    },
    #[error("line {line}: <range_mapping> has length 0; expected a length of at least 1")]
    ZeroLength { line: usize },
    #[error("line {line}: <{element}> run of {length} block(s) starting at {what} block {begin} extends past block 2^64-1; expected a run that fits in 64 bits")]
    Overflow {
        line: usize,
        element: &'static str,
        what: &'static str,
        begin: u64,
        length: u64,
    },
    #[error("line {line}: mapping at virtual block {vbegin} comes before the previous mapping at virtual block {prev_vbegin}; expected mappings in ascending virtual block order")]
    Descending {
        line: usize,
        vbegin: u64,
        prev_vbegin: u64,
    },
    #[error("line {line}: mapping at virtual block {vbegin} overlaps the previous mapping, which ends at virtual block {prev_last}; expected non-overlapping mappings")]
    Overlap {
        line: usize,
        vbegin: u64,
        prev_last: u64,
    },
    #[error("line {line}: duplicate device dev_id=\"{dev_id}\"; expected each device id once")]
    DuplicateDevice { line: usize, dev_id: u32 },
}

impl XmlError {
    /// The 1-based line number the error refers to.
    pub fn line(&self) -> usize {
        match self {
            XmlError::Unterminated { line, .. }
            | XmlError::Syntax { line, .. }
            | XmlError::UnexpectedText { line, .. }
            | XmlError::UnknownElement { line, .. }
            | XmlError::SharedSubtree { line }
            | XmlError::Misplaced { line, .. }
            | XmlError::UnexpectedClose { line, .. }
            | XmlError::UnexpectedEof { line, .. }
            | XmlError::MissingAttribute { line, .. }
            | XmlError::UnknownAttribute { line, .. }
            | XmlError::DuplicateAttribute { line, .. }
            | XmlError::BadNumber { line, .. }
            | XmlError::BadEntity { line, .. }
            | XmlError::ZeroLength { line }
            | XmlError::Overflow { line, .. }
            | XmlError::Descending { line, .. }
            | XmlError::Overlap { line, .. }
            | XmlError::DuplicateDevice { line, .. } => *line,
        }
    }
}

// ---------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Attr<'a> {
    name: &'a str,
    raw: &'a str,
    line: usize,
}

#[derive(Debug)]
enum Event<'a> {
    Start {
        line: usize,
        name: &'a str,
        attrs: Vec<Attr<'a>>,
        empty: bool,
    },
    End {
        line: usize,
        name: &'a str,
    },
    Eof {
        line: usize,
    },
}

struct Lexer<'a> {
    src: &'a str,
    pos: usize,
    line: usize,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.')
}

/// At most `max` characters of `s`, with an ellipsis if truncated.
fn snippet(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).collect();
    if s.chars().nth(max).is_some() {
        out.push_str("...");
    }
    out
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        let mut lx = Lexer {
            src,
            pos: 0,
            line: 1,
        };
        if lx.rest().starts_with("\u{feff}".as_bytes()) {
            lx.pos = 3;
        }
        lx
    }

    fn rest(&self) -> &'a [u8] {
        self.src.as_bytes().get(self.pos..).unwrap_or(&[])
    }

    fn peek(&self) -> Option<u8> {
        self.src.as_bytes().get(self.pos).copied()
    }

    fn bump(&mut self) {
        if let Some(b) = self.peek() {
            if b == b'\n' {
                self.line = self.line.saturating_add(1);
            }
            self.pos = self.pos.saturating_add(1);
        }
    }

    fn advance(&mut self, n: usize) {
        for _ in 0..n {
            self.bump();
        }
    }

    /// Skips whitespace; returns whether there was any.
    fn skip_ws(&mut self) -> bool {
        let start = self.pos;
        while self.peek().is_some_and(is_ws) {
            self.bump();
        }
        self.pos != start
    }

    /// Skips past `terminator`; returns `false` if the input ends first.
    fn skip_past(&mut self, terminator: &[u8]) -> bool {
        loop {
            if self.rest().starts_with(terminator) {
                self.advance(terminator.len());
                return true;
            }
            if self.peek().is_none() {
                return false;
            }
            self.bump();
        }
    }

    fn slice(&self, start: usize, end: usize) -> &'a str {
        self.src.get(start..end).unwrap_or("")
    }

    fn name(&mut self) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(is_name_byte) {
            self.bump();
        }
        self.slice(start, self.pos)
    }

    /// Human-readable description of what is at the current position.
    fn found(&self) -> String {
        match self.src.get(self.pos..).and_then(|s| s.chars().next()) {
            Some(c) => format!("{c:?}"),
            None if self.peek().is_none() => "end of input".to_string(),
            None => "a stray byte".to_string(),
        }
    }

    fn syntax(&self, expected: impl Into<String>) -> XmlError {
        XmlError::Syntax {
            line: self.line,
            expected: expected.into(),
            found: self.found(),
        }
    }

    /// Returns the next element event, skipping whitespace, comments,
    /// declarations and processing instructions.
    fn next_event(&mut self) -> Result<Event<'a>, XmlError> {
        loop {
            self.skip_ws();
            let line = self.line;
            match self.peek() {
                None => return Ok(Event::Eof { line }),
                Some(b'<') => {}
                Some(_) => {
                    let start = self.pos;
                    while self.peek().is_some_and(|b| b != b'<') {
                        self.bump();
                    }
                    let text = self.slice(start, self.pos).trim_end();
                    return Err(XmlError::UnexpectedText {
                        line,
                        text: snippet(text, 40),
                    });
                }
            }
            let rest = self.rest();
            if rest.starts_with(b"<!--") {
                self.advance(4);
                if !self.skip_past(b"-->") {
                    return Err(XmlError::Unterminated {
                        line,
                        what: "comment <!--".to_string(),
                        expected: "\"-->\"",
                    });
                }
            } else if rest.starts_with(b"<?") {
                self.advance(2);
                if !self.skip_past(b"?>") {
                    return Err(XmlError::Unterminated {
                        line,
                        what: "declaration <?".to_string(),
                        expected: "\"?>\"",
                    });
                }
            } else if rest.starts_with(b"<!") {
                return Err(self.syntax(
                    "an element, comment or <?xml?> declaration (DOCTYPE and CDATA are not supported)",
                ));
            } else if rest.starts_with(b"</") {
                self.advance(2);
                let name = self.name();
                if name.is_empty() {
                    return Err(self.syntax("an element name after \"</\""));
                }
                self.skip_ws();
                match self.peek() {
                    Some(b'>') => {
                        self.bump();
                        return Ok(Event::End { line, name });
                    }
                    None => {
                        return Err(XmlError::Unterminated {
                            line,
                            what: format!("closing tag </{name}"),
                            expected: "'>'",
                        })
                    }
                    Some(_) => return Err(self.syntax(format!("'>' to end </{name}"))),
                }
            } else {
                self.bump();
                return self.start_tag(line);
            }
        }
    }

    /// Lexes a start tag; the current position is just after its `<`.
    fn start_tag(&mut self, line: usize) -> Result<Event<'a>, XmlError> {
        let name = self.name();
        if name.is_empty() {
            return Err(self.syntax("an element name after '<'"));
        }
        let unterminated = |name: &str| XmlError::Unterminated {
            line,
            what: format!("tag <{name}"),
            expected: "'>' or \"/>\"",
        };
        let mut attrs = Vec::new();
        loop {
            let had_ws = self.skip_ws();
            match self.peek() {
                None => return Err(unterminated(name)),
                Some(b'>') => {
                    self.bump();
                    return Ok(Event::Start {
                        line,
                        name,
                        attrs,
                        empty: false,
                    });
                }
                Some(b'/') => {
                    self.bump();
                    return match self.peek() {
                        Some(b'>') => {
                            self.bump();
                            Ok(Event::Start {
                                line,
                                name,
                                attrs,
                                empty: true,
                            })
                        }
                        None => Err(unterminated(name)),
                        Some(_) => Err(self.syntax(format!("'>' after '/' in <{name}"))),
                    };
                }
                Some(b'<') => {
                    return Err(XmlError::Unterminated {
                        line,
                        what: format!("tag <{name}"),
                        expected: "'>' or \"/>\" before the next '<'",
                    })
                }
                Some(_) => {}
            }
            if !had_ws {
                return Err(self.syntax(format!(
                    "whitespace, '>' or \"/>\" after the element name or attribute in <{name}"
                )));
            }
            let attr_line = self.line;
            let attr_name = self.name();
            if attr_name.is_empty() {
                return Err(self.syntax(format!("an attribute name, '>' or \"/>\" in <{name}")));
            }
            self.skip_ws();
            match self.peek() {
                Some(b'=') => self.bump(),
                None => return Err(unterminated(name)),
                Some(_) => {
                    return Err(self.syntax(format!("'=' after attribute name \"{attr_name}\"")))
                }
            }
            self.skip_ws();
            let quote = match self.peek() {
                Some(q @ (b'"' | b'\'')) => q,
                None => return Err(unterminated(name)),
                Some(_) => {
                    return Err(self.syntax(format!("a quoted value for attribute \"{attr_name}\"")))
                }
            };
            self.bump();
            let start = self.pos;
            loop {
                match self.peek() {
                    None => {
                        return Err(XmlError::Unterminated {
                            line: attr_line,
                            what: format!("value of attribute \"{attr_name}\" in <{name}"),
                            expected: "a closing quote",
                        })
                    }
                    Some(b) if b == quote => break,
                    Some(b'<') => {
                        return Err(self.syntax(format!(
                            "a closing quote for attribute \"{attr_name}\" ('<' is not allowed in attribute values)"
                        )))
                    }
                    Some(_) => self.bump(),
                }
            }
            let raw = self.slice(start, self.pos);
            self.bump();
            attrs.push(Attr {
                name: attr_name,
                raw,
                line: attr_line,
            });
        }
    }
}

// ---------------------------------------------------------------------------
// Attribute helpers
// ---------------------------------------------------------------------------

/// Attributes of one element, checked against the list of known names.
struct Fields<'a, const N: usize> {
    element: &'static str,
    line: usize,
    known: [&'static str; N],
    vals: [Option<Attr<'a>>; N],
}

impl<'a, const N: usize> Fields<'a, N> {
    fn new(
        element: &'static str,
        line: usize,
        attrs: &[Attr<'a>],
        known: [&'static str; N],
        ignored: &[&'static str],
    ) -> Result<Self, XmlError> {
        let mut vals: [Option<Attr<'a>>; N] = [None; N];
        let mut seen_ignored: Vec<&str> = Vec::new();
        for a in attrs {
            let duplicate = || XmlError::DuplicateAttribute {
                line: a.line,
                element,
                attr: a.name.to_string(),
            };
            if let Some(slot) = known
                .iter()
                .position(|k| *k == a.name)
                .and_then(|i| vals.get_mut(i))
            {
                if slot.is_some() {
                    return Err(duplicate());
                }
                *slot = Some(*a);
            } else if ignored.contains(&a.name) {
                if seen_ignored.contains(&a.name) {
                    return Err(duplicate());
                }
                seen_ignored.push(a.name);
            } else {
                let mut expected: Vec<&str> = known.to_vec();
                expected.extend_from_slice(ignored);
                return Err(XmlError::UnknownAttribute {
                    line: a.line,
                    element,
                    attr: a.name.to_string(),
                    expected: expected.join(", "),
                });
            }
        }
        Ok(Fields {
            element,
            line,
            known,
            vals,
        })
    }

    fn get(&self, name: &'static str) -> Result<Attr<'a>, XmlError> {
        self.known
            .iter()
            .position(|k| *k == name)
            .and_then(|i| self.vals.get(i).copied().flatten())
            .ok_or(XmlError::MissingAttribute {
                line: self.line,
                element: self.element,
                attr: name,
            })
    }

    fn u64(&self, name: &'static str) -> Result<u64, XmlError> {
        self.number(name, 64)
    }

    fn u32(&self, name: &'static str) -> Result<u32, XmlError> {
        let v = self.number(name, 32)?;
        // `number` already checked the width.
        u32::try_from(v).map_err(|_| self.bad_number(name, self.get(name).ok(), 32))
    }

    fn bad_number(&self, name: &'static str, a: Option<Attr<'a>>, bits: u32) -> XmlError {
        XmlError::BadNumber {
            line: a.map_or(self.line, |a| a.line),
            element: self.element,
            attr: name,
            value: snippet(a.map_or("", |a| a.raw), 40),
            bits,
        }
    }

    fn number(&self, name: &'static str, bits: u32) -> Result<u64, XmlError> {
        let a = self.get(name)?;
        let max = if bits >= 64 {
            u64::MAX
        } else {
            (1u64 << bits).saturating_sub(1)
        };
        parse_decimal(a.raw)
            .filter(|v| *v <= max)
            .ok_or_else(|| self.bad_number(name, Some(a), bits))
    }

    fn string(&self, name: &'static str) -> Result<String, XmlError> {
        let a = self.get(name)?;
        decode_entities(a.raw).map_err(|entity| XmlError::BadEntity {
            line: a.line,
            attr: name,
            entity: snippet(entity, 20),
        })
    }
}

/// Parses a non-empty string of ASCII digits; `None` on anything else or on
/// overflow.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.bytes().try_fold(0u64, |acc, b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Decodes XML entities and character references; on failure returns the
/// offending text.
fn decode_entities(raw: &str) -> Result<String, &str> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(amp) = rest.find('&') {
        out.push_str(rest.get(..amp).unwrap_or(""));
        let after = rest.get(amp..).unwrap_or("");
        let Some(semi) = after.find(';') else {
            return Err(after);
        };
        let entity = after.get(..=semi).unwrap_or(after);
        let body = after.get(1..semi).unwrap_or("");
        let c = match body {
            "quot" => Some('"'),
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "apos" => Some('\''),
            _ => {
                if let Some(hex) = body.strip_prefix("#x").or_else(|| body.strip_prefix("#X")) {
                    if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                        u32::from_str_radix(hex, 16).ok().and_then(char::from_u32)
                    } else {
                        None
                    }
                } else if let Some(dec) = body.strip_prefix('#') {
                    parse_decimal(dec)
                        .and_then(|v| u32::try_from(v).ok())
                        .and_then(char::from_u32)
                } else {
                    None
                }
            }
        };
        match c {
            Some(c) => out.push(c),
            None => return Err(entity),
        }
        rest = after.get(semi.saturating_add(1)..).unwrap_or("");
    }
    out.push_str(rest);
    Ok(out)
}

// ---------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------

const SUPERBLOCK: &str = "superblock";
const DEVICE: &str = "device";
const RANGE: &str = "range_mapping";
const SINGLE: &str = "single_mapping";

/// Parses a `thin_dump` XML document.
pub fn parse(input: &str) -> Result<ParsedDump, XmlError> {
    let mut lx = Lexer::new(input);
    let dump = match lx.next_event()? {
        Event::Start {
            line,
            name: SUPERBLOCK,
            attrs,
            empty,
        } => {
            let superblock = parse_superblock_attrs(line, &attrs)?;
            let devices = if empty {
                Vec::new()
            } else {
                parse_superblock_body(&mut lx)?
            };
            ParsedDump {
                superblock,
                devices,
            }
        }
        Event::Start { line, name, .. } => return Err(misplaced_or_unknown(line, name, Ctx::Top)),
        Event::End { line, name } => {
            return Err(XmlError::UnexpectedClose {
                line,
                found: name.to_string(),
                expected: "<superblock>",
            })
        }
        Event::Eof { line } => {
            return Err(XmlError::UnexpectedEof {
                line,
                expected: "<superblock>",
            })
        }
    };
    match lx.next_event()? {
        Event::Eof { .. } => Ok(dump),
        Event::Start { line, name, .. } => Err(XmlError::Misplaced {
            line,
            element: name.to_string(),
            context: "after </superblock>",
            expected: "end of input",
        }),
        Event::End { line, name } => Err(XmlError::UnexpectedClose {
            line,
            found: name.to_string(),
            expected: "end of input",
        }),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Top,
    Superblock,
    Device,
}

/// The error for a start tag that is not allowed where it appears.
fn misplaced_or_unknown(line: usize, name: &str, ctx: Ctx) -> XmlError {
    let expected = match ctx {
        Ctx::Top => "<superblock>",
        Ctx::Superblock => "<device> or </superblock>",
        Ctx::Device => "<single_mapping>, <range_mapping> or </device>",
    };
    let context = match (name, ctx) {
        ("def" | "ref", _) => return XmlError::SharedSubtree { line },
        (SUPERBLOCK, _) => "inside a <superblock>",
        (DEVICE, Ctx::Top) => "outside a <superblock>",
        (DEVICE, _) => "inside a <device>",
        (RANGE | SINGLE, _) => "outside a <device>",
        _ => {
            return XmlError::UnknownElement {
                line,
                name: name.to_string(),
                expected,
            }
        }
    };
    XmlError::Misplaced {
        line,
        element: name.to_string(),
        context,
        expected,
    }
}

fn parse_superblock_attrs(line: usize, attrs: &[Attr<'_>]) -> Result<DumpSuperblock, XmlError> {
    let f = Fields::new(
        SUPERBLOCK,
        line,
        attrs,
        [
            "uuid",
            "time",
            "transaction",
            "flags",
            "version",
            "data_block_size",
            "nr_data_blocks",
        ],
        &["metadata_snap"],
    )?;
    Ok(DumpSuperblock {
        uuid: f.string("uuid")?,
        time: f.u32("time")?,
        transaction: f.u64("transaction")?,
        flags: f.u32("flags")?,
        version: f.u32("version")?,
        data_block_size: f.u32("data_block_size")?,
        nr_data_blocks: f.u64("nr_data_blocks")?,
    })
}

fn parse_device_attrs(line: usize, attrs: &[Attr<'_>]) -> Result<DumpDevice, XmlError> {
    let f = Fields::new(
        DEVICE,
        line,
        attrs,
        [
            "dev_id",
            "mapped_blocks",
            "transaction",
            "creation_time",
            "snap_time",
        ],
        &[],
    )?;
    Ok(DumpDevice {
        dev_id: f.u32("dev_id")?,
        mapped_blocks: f.u64("mapped_blocks")?,
        transaction: f.u64("transaction")?,
        creation_time: f.u32("creation_time")?,
        snap_time: f.u32("snap_time")?,
    })
}

/// Parses the attributes of a mapping element into a validated run.
fn parse_run(line: usize, name: &'static str, attrs: &[Attr<'_>]) -> Result<DumpRun, XmlError> {
    let run = if name == RANGE {
        let f = Fields::new(
            RANGE,
            line,
            attrs,
            ["origin_begin", "data_begin", "length", "time"],
            &[],
        )?;
        DumpRun {
            vbegin: f.u64("origin_begin")?,
            data_begin: f.u64("data_begin")?,
            length: f.u64("length")?,
            time: f.u32("time")?,
        }
    } else {
        let f = Fields::new(
            SINGLE,
            line,
            attrs,
            ["origin_block", "data_block", "time"],
            &[],
        )?;
        DumpRun {
            vbegin: f.u64("origin_block")?,
            data_begin: f.u64("data_block")?,
            length: 1,
            time: f.u32("time")?,
        }
    };
    if run.length == 0 {
        return Err(XmlError::ZeroLength { line });
    }
    let overflow = |what, begin| XmlError::Overflow {
        line,
        element: name,
        what,
        begin,
        length: run.length,
    };
    if run.last_vblock().is_none() {
        return Err(overflow("virtual", run.vbegin));
    }
    if run.last_data_block().is_none() {
        return Err(overflow("data", run.data_begin));
    }
    Ok(run)
}

fn parse_superblock_body(lx: &mut Lexer<'_>) -> Result<Vec<ParsedDevice>, XmlError> {
    let mut devices = Vec::new();
    let mut seen = HashSet::new();
    loop {
        match lx.next_event()? {
            Event::Start {
                line,
                name: DEVICE,
                attrs,
                empty,
            } => {
                let device = parse_device_attrs(line, &attrs)?;
                if !seen.insert(device.dev_id) {
                    return Err(XmlError::DuplicateDevice {
                        line,
                        dev_id: device.dev_id,
                    });
                }
                let runs = if empty {
                    Vec::new()
                } else {
                    parse_device_body(lx)?
                };
                devices.push(ParsedDevice { device, runs });
            }
            Event::Start { line, name, .. } => {
                return Err(misplaced_or_unknown(line, name, Ctx::Superblock))
            }
            Event::End {
                name: SUPERBLOCK, ..
            } => return Ok(devices),
            Event::End { line, name } => {
                return Err(XmlError::UnexpectedClose {
                    line,
                    found: name.to_string(),
                    expected: "<device> or </superblock>",
                })
            }
            Event::Eof { line } => {
                return Err(XmlError::UnexpectedEof {
                    line,
                    expected: "<device> or </superblock>",
                })
            }
        }
    }
}

fn parse_device_body(lx: &mut Lexer<'_>) -> Result<Vec<DumpRun>, XmlError> {
    let mut runs: Vec<DumpRun> = Vec::new();
    loop {
        match lx.next_event()? {
            Event::Start {
                line,
                name,
                attrs,
                empty,
            } if name == RANGE || name == SINGLE => {
                let elem = if name == RANGE { RANGE } else { SINGLE };
                let run = parse_run(line, elem, &attrs)?;
                if !empty {
                    let close_expected = if elem == RANGE {
                        "</range_mapping>"
                    } else {
                        "</single_mapping>"
                    };
                    match lx.next_event()? {
                        Event::End { name, .. } if name == elem => {}
                        Event::End { line, name } => {
                            return Err(XmlError::UnexpectedClose {
                                line,
                                found: name.to_string(),
                                expected: close_expected,
                            })
                        }
                        Event::Start { line, name, .. } => {
                            return Err(match name {
                                "def" | "ref" => XmlError::SharedSubtree { line },
                                _ => XmlError::Misplaced {
                                    line,
                                    element: name.to_string(),
                                    context: "inside a mapping element",
                                    expected: close_expected,
                                },
                            })
                        }
                        Event::Eof { line } => {
                            return Err(XmlError::UnexpectedEof {
                                line,
                                expected: close_expected,
                            })
                        }
                    }
                }
                if let Some(prev) = runs.last() {
                    // `prev` was validated by `parse_run`, so it has a last block.
                    let prev_last = prev.last_vblock().unwrap_or(u64::MAX);
                    if run.vbegin < prev.vbegin {
                        return Err(XmlError::Descending {
                            line,
                            vbegin: run.vbegin,
                            prev_vbegin: prev.vbegin,
                        });
                    }
                    if run.vbegin <= prev_last {
                        return Err(XmlError::Overlap {
                            line,
                            vbegin: run.vbegin,
                            prev_last,
                        });
                    }
                }
                runs.push(run);
            }
            Event::Start { line, name, .. } => {
                return Err(misplaced_or_unknown(line, name, Ctx::Device))
            }
            Event::End { name: DEVICE, .. } => return Ok(runs),
            Event::End { line, name } => {
                return Err(XmlError::UnexpectedClose {
                    line,
                    found: name.to_string(),
                    expected: "a mapping or </device>",
                })
            }
            Event::Eof { line } => {
                return Err(XmlError::UnexpectedEof {
                    line,
                    expected: "a mapping or </device>",
                })
            }
        }
    }
}

#[cfg(test)]
mod tests;
