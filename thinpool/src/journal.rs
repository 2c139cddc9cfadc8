//! The journal: the mapping changes made since the last commit, kept where they outlive
//! the process that made them.
//!
//! dm-thin commits new mappings on a FLUSH and otherwise once a second: between commits a
//! completed write has its data in the page cache and its mapping only in memory. The
//! kernel target cannot lose its memory without the host losing its page cache too, so
//! that is the contract of a disk with a volatile write cache. A daemon can: it is killed,
//! crashes or is upgraded while the host, its page cache and the guest run on, and the
//! guest then reads zeros where it wrote. So every mapping change the data path makes is
//! appended here before the write that made it completes: a plain write into the page
//! cache, no fsync (a process crash does not lose the page cache, and a host crash is the
//! power loss a FLUSH is for). The next open replays the changes and commits them.
//!
//! Which records count. The header names the boot of the host that wrote it (Linux's
//! `boot_id`): after a reboot the page cache is gone, the data a record points at may
//! never have reached the disk, and replaying it could show a block's stale contents, so
//! a journal from another boot is ignored (the unflushed writes are lost, as on a power
//! loss). The header also names the committed superblock the records extend
//! ([`crate::thin::metadata::ThinMetadata::committed_ident`]) and a generation: it is
//! rewritten after every commit with the new superblock's identity and the next
//! generation, so records of a transaction that a commit already made durable never apply
//! twice (a crash between the superblock write and the header write leaves a header whose
//! superblock is not the one on disk: nothing to replay). Records carry the generation in
//! their checksum; the valid ones form a prefix (they are written one at a time, in
//! order, under the metadata lock), ended by the first record that does not check.
//!
//! Layout (little-endian): a 4 KiB header block, then 32-byte records.
//!
//! | header offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `VTJOURN1` |
//! | 8 | 4 | crc32c of bytes 12..48 |
//! | 12 | 4 | version (1) |
//! | 16 | 16 | boot id |
//! | 32 | 8 | generation |
//! | 40 | 8 | identity of the committed superblock the records extend |
//!
//! | record offset | size | field |
//! |---|---|---|
//! | 0 | 4 | crc32c of the generation (8 bytes) followed by bytes 4..32 |
//! | 4 | 1 | kind: 1 map, 2 unmap |
//! | 5 | 3 | zero |
//! | 8 | 4 | thin id |
//! | 12 | 4 | zero |
//! | 16 | 8 | virtual block |
//! | 24 | 8 | data block (map) or zero (unmap) |
//!
//! The file is written in full when it is made (not sparse), so appending never needs
//! space from a filesystem that may be full by then.

use crate::pdata::block::{get_u32, get_u64, put_u32, put_u64};
use crate::storage::Storage;
use crate::{Error, Result};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"VTJOURN1";
const VERSION: u32 = 1;
const HEADER_BYTES: u64 = 4096;
const RECORD_BYTES: u64 = 32;
const KIND_MAP: u8 = 1;
const KIND_UNMAP: u8 = 2;

/// The size of a journal file made by [`create_file`]: room for 262,016 changes between
/// two commits (16 TiB of newly provisioned 64 KiB blocks); a full journal makes the pool
/// commit early.
pub const DEFAULT_BYTES: u64 = 8 << 20;

/// One mapping change of the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// `vblock` of thin device `dev` now maps to `data_block`, a block that was free at
    /// the last commit (a provisioning write, or one that broke sharing).
    Map {
        dev: u32,
        vblock: u64,
        data_block: u64,
    },
    /// `vblock` of thin device `dev` is no longer mapped (a discard).
    Unmap { dev: u32, vblock: u64 },
}

/// Linux's identity of the running boot of the host, from `/proc/sys/kernel/random/boot_id`.
pub fn host_boot_id() -> std::io::Result<[u8; 16]> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    parse_boot_id(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected boot_id {:?}", text.trim()),
        )
    })
}

fn parse_boot_id(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.trim().bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        id[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(id)
}

/// Makes the journal file at `path`: `len` bytes written in full (so that appends never
/// allocate), readable and writable by the owner only.
pub fn create_file(path: &std::path::Path, len: u64) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

/// The journal of one pool, attached to its metadata (see
/// [`crate::thin::metadata::ThinMetadata::attach_journal`]).
pub struct Journal {
    storage: Arc<dyn Storage>,
    boot_id: [u8; 16],
    generation: u64,
    /// Records appended since the header was last written.
    next: u64,
    capacity: u64,
    /// Why appending is refused, if it is: the header could not be rewritten after a commit
    /// (records would not be replayed), or the transaction was rolled back after a failure
    /// (its records are kept for the next open; new ones would interleave with them).
    refused: Option<String>,
}

/// What the header says, when it is valid.
struct Header {
    boot_id: [u8; 16],
    generation: u64,
    committed: u64,
}

impl Journal {
    /// Opens a journal file (made by [`create_file`] or zeroed) written by this boot of
    /// the host as `boot_id`.
    pub fn open(storage: Arc<dyn Storage>, boot_id: [u8; 16]) -> Result<Self> {
        let len = storage.len();
        if len < HEADER_BYTES + RECORD_BYTES {
            return Err(Error::InvalidArgument(format!(
                "a journal of {len} bytes is too small"
            )));
        }
        // Without a valid header, start from an arbitrary generation: records of an old one
        // that may lie in the file (a header lost to corruption) then do not check.
        let generation = match read_header(storage.as_ref())? {
            Some(h) => h.generation,
            None => {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
                    ^ (std::process::id() as u64) << 32
            }
        };
        Ok(Journal {
            capacity: (len - HEADER_BYTES) / RECORD_BYTES,
            storage,
            boot_id,
            generation,
            next: 0,
            refused: None,
        })
    }

    /// The changes a process that did not stop cleanly left for the committed superblock
    /// `committed` (its [`ThinMetadata::committed_ident`](crate::thin::metadata::ThinMetadata::committed_ident)):
    /// none when the header belongs to another boot or another superblock.
    pub fn pending(&self, committed: u64) -> Result<Vec<Change>> {
        let Some(h) = read_header(self.storage.as_ref())? else {
            return Ok(Vec::new());
        };
        if h.boot_id != self.boot_id || h.committed != committed {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let per_buf = buf.len() as u64 / RECORD_BYTES;
        let mut slot = 0;
        while slot < self.capacity {
            let n = per_buf.min(self.capacity - slot);
            let bytes = (n * RECORD_BYTES) as usize;
            self.storage
                .read_at(&mut buf[..bytes], offset_of(slot))
                .map_err(io_err("read"))?;
            for r in buf[..bytes].chunks_exact(RECORD_BYTES as usize) {
                match decode(r, h.generation) {
                    Some(c) => out.push(c),
                    None => return Ok(out),
                }
            }
            slot += n;
        }
        Ok(out)
    }

    /// Starts a new generation over the committed superblock `committed`: every record
    /// written so far stops counting. Called after every commit, and at open once the
    /// pending changes are committed.
    pub fn reset(&mut self, committed: u64) -> Result<()> {
        let generation = self.generation.wrapping_add(1);
        let mut b = [0u8; 48];
        b[..8].copy_from_slice(MAGIC);
        put_u32(&mut b, 12, VERSION);
        b[16..32].copy_from_slice(&self.boot_id);
        put_u64(&mut b, 32, generation);
        put_u64(&mut b, 40, committed);
        let crc = crc32c::crc32c(&b[12..48]);
        put_u32(&mut b, 8, crc);
        match self.storage.write_at(&b, 0) {
            Ok(()) => {
                self.generation = generation;
                self.next = 0;
                self.refused = None;
                Ok(())
            }
            Err(e) => {
                self.refused = Some(format!("the journal's header could not be written: {e}"));
                Err(io_err("write")(e))
            }
        }
    }

    /// Refuses appends until the next [`reset`](Self::reset): the transaction the records
    /// belong to was rolled back in memory, and they are kept for the next open.
    pub fn freeze(&mut self, why: &str) {
        self.refused = Some(format!("the pool rolled back after {why}; restart it"));
    }

    /// Whether one more change fits before the next commit.
    pub fn check_room(&self) -> Result<()> {
        if let Some(why) = &self.refused {
            return Err(Error::JournalRefused(why.clone()));
        }
        if self.next >= self.capacity {
            return Err(Error::JournalFull {
                records: self.capacity,
            });
        }
        Ok(())
    }

    /// Appends a change (after [`check_room`](Self::check_room)).
    pub fn append(&mut self, c: Change) -> Result<()> {
        self.check_room()?;
        let r = encode(c, self.generation);
        match self.storage.write_at(&r, offset_of(self.next)) {
            Ok(()) => {
                self.next += 1;
                Ok(())
            }
            Err(e) => Err(io_err("write")(e)),
        }
    }

    /// Goes on after the first `records` of the current generation (the pending changes
    /// applied at open, until they are committed).
    pub(crate) fn resume_after(&mut self, records: u64) {
        self.next = records.min(self.capacity);
    }

    /// Records appended since the last reset.
    pub fn len(&self) -> u64 {
        self.next
    }

    pub fn is_empty(&self) -> bool {
        self.next == 0
    }
}

fn offset_of(slot: u64) -> u64 {
    HEADER_BYTES + slot * RECORD_BYTES
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::JournalIo { op, source }
}

fn read_header(storage: &dyn Storage) -> Result<Option<Header>> {
    let mut b = [0u8; 48];
    storage.read_at(&mut b, 0).map_err(io_err("read"))?;
    if &b[..8] != MAGIC
        || get_u32(&b, 8) != crc32c::crc32c(&b[12..48])
        || get_u32(&b, 12) != VERSION
    {
        return Ok(None);
    }
    let mut boot_id = [0u8; 16];
    boot_id.copy_from_slice(&b[16..32]);
    Ok(Some(Header {
        boot_id,
        generation: get_u64(&b, 32),
        committed: get_u64(&b, 40),
    }))
}

fn record_crc(r: &[u8], generation: u64) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&generation.to_le_bytes()), &r[4..])
}

fn encode(c: Change, generation: u64) -> [u8; RECORD_BYTES as usize] {
    let mut r = [0u8; RECORD_BYTES as usize];
    let (kind, dev, vblock, data_block) = match c {
        Change::Map {
            dev,
            vblock,
            data_block,
        } => (KIND_MAP, dev, vblock, data_block),
        Change::Unmap { dev, vblock } => (KIND_UNMAP, dev, vblock, 0),
    };
    r[4] = kind;
    put_u32(&mut r, 8, dev);
    put_u64(&mut r, 16, vblock);
    put_u64(&mut r, 24, data_block);
    let crc = record_crc(&r, generation);
    put_u32(&mut r, 0, crc);
    r
}

fn decode(r: &[u8], generation: u64) -> Option<Change> {
    if get_u32(r, 0) != record_crc(r, generation) {
        return None;
    }
    let dev = get_u32(r, 8);
    let vblock = get_u64(r, 16);
    match r[4] {
        KIND_MAP => Some(Change::Map {
            dev,
            vblock,
            data_block: get_u64(r, 24),
        }),
        KIND_UNMAP => Some(Change::Unmap { dev, vblock }),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
