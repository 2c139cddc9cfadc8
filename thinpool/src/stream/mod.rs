//! Send and receive: a snapshot as a byte stream (full, or incremental on top of a base
//! snapshot the receiver already has), applied to another pool of any block size, and
//! resumable after an interruption. The format is in [`format`]; docs/STREAMS.md is its
//! reference for other implementations.

pub mod format;
pub mod receive;
pub mod send;
#[cfg(test)]
mod tests;

use crate::registry::RegistryError;
use std::io;

pub use format::{SnapshotRef, StreamHeader};
pub use receive::{abort, receive, Interrupted, ReceiveError, ReceiveOptions, Received};
pub use send::{assign_guids, ensure_guids, send, SendOptions, SendStats};

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("not a vhost-thin stream: {0}")]
    NotAStream(String),
    #[error("stream format version {0} is not supported (this build reads version 1)")]
    Version(u32),
    #[error("the stream header is invalid: {0}")]
    BadHeader(String),
    #[error("the stream is corrupt at record {record} (stream byte {stream_offset}): {why}")]
    Corrupt {
        record: u64,
        stream_offset: u64,
        why: String,
    },
    #[error("the stream ended early: {records} records, device bytes up to {device_offset} received, no end record")]
    Truncated { records: u64, device_offset: u64 },
    #[error("{0}")]
    Refused(String),
    #[error("stream I/O: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Pool(#[from] crate::Error),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
}

/// Where an interrupted resumable receive stopped: what the sender needs to send the rest.
/// Written as `vt1-GUID-OFFSET` (offset in hexadecimal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeToken {
    /// The guid of the snapshot being received.
    pub guid: String,
    /// The device byte the rest starts at.
    pub offset: u64,
}

impl std::fmt::Display for ResumeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vt1-{}-{:x}", self.guid, self.offset)
    }
}

impl std::str::FromStr for ResumeToken {
    type Err = StreamError;
    fn from_str(s: &str) -> Result<Self, StreamError> {
        let bad = || StreamError::Refused(format!("{s:?} is not a resume token (vt1-GUID-OFFSET)"));
        let rest = s.strip_prefix("vt1-").ok_or_else(bad)?;
        let (guid, off) = rest.rsplit_once('-').ok_or_else(bad)?;
        if !format::is_guid(guid) {
            return Err(bad());
        }
        let offset = u64::from_str_radix(off, 16).map_err(|_| bad())?;
        Ok(ResumeToken {
            guid: guid.to_string(),
            offset,
        })
    }
}

/// A new random guid: 128 bits from the kernel, as 32 hex digits.
pub fn new_guid() -> io::Result<String> {
    let mut b = [0u8; 16];
    io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
