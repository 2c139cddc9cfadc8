//! The send/receive stream, version 1: encoding and checked decoding. Pure: no pool here.
//!
//! ```text
//! stream  = header record* end
//! header  = "VTHNSTRM" version:u32 json_len:u32 json crc32c:u32      (crc over all before it)
//! record  = kind:u8 0:u8[3] offset:u64 length:u64 payload crc32c:u32 (crc over kind..payload)
//!   kind 1 DATA   bytes [offset, offset+length) of the device; payload = the bytes (≤ 1 MiB)
//!   kind 2 ZERO   [offset, offset+length) reads as zeros (unmapped or zero-filled); no payload
//!   kind 3 END    offset = number of records before it, length = DATA payload bytes; no
//!                 payload; nothing may follow
//! ```
//! All integers little-endian. Records are in increasing device order and do not overlap,
//! so a receiver that stopped after byte X of the device can resume from a stream that
//! starts at X. The JSON header is [`StreamHeader`].

use super::StreamError;
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

pub const MAGIC: &[u8; 8] = b"VTHNSTRM";
pub const VERSION: u32 = 1;
/// The largest JSON header accepted (a real one is a few hundred bytes).
pub const MAX_HEADER: usize = 64 * 1024;
/// The largest DATA payload written and accepted.
pub const MAX_DATA: u64 = 1 << 20;

const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_END: u8 = 3;
const RECORD_HEAD: usize = 20;

/// Which snapshot a stream carries or builds on. The guid is the identity: a received
/// snapshot keeps its sender's guid, so an incremental stream finds its base by guid in
/// any pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SnapshotRef {
    pub guid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Virtual size in bytes.
    pub size: u64,
    /// Creation time at the source, seconds since the epoch.
    #[serde(default)]
    pub created: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StreamHeader {
    /// The snapshot the stream recreates.
    pub snapshot: SnapshotRef,
    /// For an incremental stream, the snapshot it applies on top of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<SnapshotRef>,
    /// The sender's pool block size in bytes (records are aligned to it where the device
    /// size allows). The receiver's pool may use another.
    pub block_size: u64,
    /// The stream carries the device from this byte on (0, or where an interrupted receive
    /// stopped).
    #[serde(default)]
    pub resume_offset: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Data { offset: u64, data: Vec<u8> },
    Zero { offset: u64, length: u64 },
}

impl Record {
    /// The device byte just past this record.
    pub fn end(&self) -> u64 {
        match self {
            Record::Data { offset, data } => offset + data.len() as u64,
            Record::Zero { offset, length } => offset + length,
        }
    }
}

/// Writes a stream: the header at once, then records, then `finish`.
pub struct StreamWriter<W: Write> {
    out: W,
    records: u64,
    data_bytes: u64,
    written: u64,
}

impl<W: Write> StreamWriter<W> {
    pub fn new(mut out: W, header: &StreamHeader) -> io::Result<Self> {
        let json = serde_json::to_vec(header).map_err(io::Error::other)?;
        let mut buf = Vec::with_capacity(20 + json.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
        buf.extend_from_slice(&json);
        let crc = crc32c::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        out.write_all(&buf)?;
        Ok(StreamWriter {
            out,
            records: 0,
            data_bytes: 0,
            written: buf.len() as u64,
        })
    }

    fn record(&mut self, kind: u8, offset: u64, length: u64, payload: &[u8]) -> io::Result<()> {
        let mut head = [0u8; RECORD_HEAD];
        head[0] = kind;
        head[4..12].copy_from_slice(&offset.to_le_bytes());
        head[12..20].copy_from_slice(&length.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head), payload);
        self.out.write_all(&head)?;
        self.out.write_all(payload)?;
        self.out.write_all(&crc.to_le_bytes())?;
        self.written += (RECORD_HEAD + payload.len() + 4) as u64;
        Ok(())
    }

    /// Device bytes at `offset`; at most [`MAX_DATA`] of them.
    pub fn data(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        debug_assert!(data.len() as u64 <= MAX_DATA && !data.is_empty());
        self.record(KIND_DATA, offset, data.len() as u64, data)?;
        self.records += 1;
        self.data_bytes += data.len() as u64;
        Ok(())
    }

    /// `length` bytes at `offset` read as zeros.
    pub fn zero(&mut self, offset: u64, length: u64) -> io::Result<()> {
        self.record(KIND_ZERO, offset, length, &[])?;
        self.records += 1;
        Ok(())
    }

    /// Writes the end record; returns the output and the stream's length in bytes.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.record(KIND_END, self.records, self.data_bytes, &[])?;
        self.out.flush()?;
        Ok((self.out, self.written))
    }
}

/// Reads a stream, checking every checksum, bound and the order of the records.
pub struct StreamReader<R: Read> {
    input: R,
    header: StreamHeader,
    records: u64,
    data_bytes: u64,
    /// Device byte just past the last record (records may not go back).
    position: u64,
    /// Stream bytes consumed, for error messages.
    consumed: u64,
    ended: bool,
}

/// What guids look like: 32 hexadecimal digits (128 bits).
pub fn is_guid(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Reads exactly `buf.len()` bytes; false at end of input before the first one.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl<R: Read> StreamReader<R> {
    pub fn new(mut input: R) -> Result<Self, StreamError> {
        let mut fixed = [0u8; 16];
        match read_full(&mut input, &mut fixed) {
            Ok(true) => {}
            Ok(false) => return Err(StreamError::NotAStream("the input is empty".into())),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(StreamError::NotAStream(
                    "the input is shorter than a header".into(),
                ))
            }
            Err(e) => return Err(e.into()),
        }
        if &fixed[..8] != MAGIC {
            return Err(StreamError::NotAStream(
                "it does not start with VTHNSTRM".into(),
            ));
        }
        let version = u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(StreamError::Version(version));
        }
        let len = u32::from_le_bytes(fixed[12..16].try_into().expect("4 bytes")) as usize;
        if len > MAX_HEADER {
            return Err(StreamError::BadHeader(format!(
                "a header of {len} bytes (the most is {MAX_HEADER})"
            )));
        }
        let mut rest = vec![0u8; len + 4];
        match read_full(&mut input, &mut rest) {
            Ok(true) => {}
            Ok(false) => return Err(StreamError::BadHeader("the header is cut off".into())),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(StreamError::BadHeader("the header is cut off".into()))
            }
            // A failing input is not a damaged stream.
            Err(e) => return Err(e.into()),
        }
        let (json, crc) = rest.split_at(len);
        let want = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        if crc32c::crc32c_append(crc32c::crc32c(&fixed), json) != want {
            return Err(StreamError::BadHeader("checksum mismatch".into()));
        }
        let header: StreamHeader =
            serde_json::from_slice(json).map_err(|e| StreamError::BadHeader(e.to_string()))?;
        for r in std::iter::once(&header.snapshot).chain(header.base.as_ref()) {
            if !is_guid(&r.guid) {
                return Err(StreamError::BadHeader(format!(
                    "{:?} is not a guid (32 hexadecimal digits)",
                    r.guid
                )));
            }
            // The snapshot's name becomes the received one's (unless the receiver gives
            // another): one that is not a name is refused before anything is received.
            if let Some(n) = &r.name {
                crate::names::check_name(n).map_err(|why| {
                    StreamError::BadHeader(format!(
                        "the snapshot name {n:?} is not a valid name: {why}; a name is {}",
                        crate::names::NAME_RULE
                    ))
                })?;
            }
        }
        if header.block_size == 0 || header.block_size % 512 != 0 {
            return Err(StreamError::BadHeader(format!(
                "block size {} is not a positive multiple of 512",
                header.block_size
            )));
        }
        if header.resume_offset > header.snapshot.size {
            return Err(StreamError::BadHeader(format!(
                "resumes at byte {} of a {}-byte device",
                header.resume_offset, header.snapshot.size
            )));
        }
        Ok(StreamReader {
            input,
            records: 0,
            data_bytes: 0,
            position: header.resume_offset,
            consumed: (16 + len + 4) as u64,
            header,
            ended: false,
        })
    }

    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Records read so far (the end record excluded).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Stream bytes read so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    fn corrupt(&self, why: impl Into<String>) -> StreamError {
        StreamError::Corrupt {
            record: self.records,
            stream_offset: self.consumed,
            why: why.into(),
        }
    }

    fn truncated(&self) -> StreamError {
        StreamError::Truncated {
            records: self.records,
            device_offset: self.position,
        }
    }

    /// Reads part of a record: the input ending here means the stream was cut off.
    fn read_part(&mut self, buf: &mut [u8]) -> Result<(), StreamError> {
        match read_full(&mut self.input, buf) {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.truncated()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(self.truncated()),
            Err(e) => Err(e.into()),
        }
    }

    /// The next record; `None` after a valid end record followed by the end of the input.
    pub fn next_record(&mut self) -> Result<Option<Record>, StreamError> {
        if self.ended {
            return Ok(None);
        }
        let mut head = [0u8; RECORD_HEAD];
        self.read_part(&mut head)?;
        let kind = head[0];
        let offset = u64::from_le_bytes(head[4..12].try_into().expect("8 bytes"));
        let length = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
        if head[1..4] != [0, 0, 0] {
            return Err(self.corrupt("reserved bytes are not zero"));
        }
        let payload_len = match kind {
            KIND_DATA if length == 0 || length > MAX_DATA => {
                return Err(self.corrupt(format!("a data record of {length} bytes")))
            }
            KIND_DATA => length as usize,
            KIND_ZERO | KIND_END => 0,
            k => return Err(self.corrupt(format!("unknown record kind {k}"))),
        };
        let mut payload = vec![0u8; payload_len + 4];
        self.read_part(&mut payload)?;
        let crc = u32::from_le_bytes(payload[payload_len..].try_into().expect("4 bytes"));
        payload.truncate(payload_len);
        if crc32c::crc32c_append(crc32c::crc32c(&head), &payload) != crc {
            return Err(self.corrupt("checksum mismatch"));
        }
        if kind == KIND_END {
            if offset != self.records || length != self.data_bytes {
                return Err(self.corrupt(format!(
                    "the end record counts {offset} records and {length} data bytes, the stream had {} and {}",
                    self.records, self.data_bytes
                )));
            }
            // The end record is part of the stream: counted, so that a receiver reports
            // the same length the sender wrote.
            self.consumed += (RECORD_HEAD + 4) as u64;
            let mut extra = [0u8; 1];
            if read_full(&mut self.input, &mut extra)? {
                return Err(self.corrupt("bytes follow the end record"));
            }
            self.ended = true;
            return Ok(None);
        }
        let end = offset.checked_add(length);
        match end {
            Some(end) if offset >= self.position && end <= self.header.snapshot.size => {}
            _ => {
                return Err(self.corrupt(format!(
                    "bytes {offset}+{length} are out of order or past the device's {} bytes (next expected at or after {})",
                    self.header.snapshot.size, self.position
                )))
            }
        }
        self.consumed += (RECORD_HEAD + payload_len + 4) as u64;
        self.records += 1;
        self.position = offset + length;
        Ok(Some(if kind == KIND_DATA {
            self.data_bytes += length;
            Record::Data {
                offset,
                data: payload,
            }
        } else {
            Record::Zero { offset, length }
        }))
    }
}
