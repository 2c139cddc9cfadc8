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
//! Which records count. A header names the boot of the host that wrote it (Linux's
//! `boot_id`): after a reboot the page cache is gone, the data a record points at may
//! never have reached the disk, and replaying it could show a block's stale contents, so
//! a journal from another boot is ignored (the unflushed writes are lost, as on a power
//! loss). A header also names the committed superblock its records extend
//! ([`crate::thin::metadata::ThinMetadata::committed_ident`]) and a generation; records
//! carry the generation in their checksum, and the valid ones form a prefix (they are
//! written one at a time, in order, under the metadata lock), ended by the first record
//! that does not check.
//!
//! Two halves. A commit freezes its transaction and writes it while the data path goes on
//! in the next one ([`crate::thin::metadata::ThinMetadata::freeze_commit`]), so the
//! changes made meanwhile must survive a crash on either side of the superblock write.
//! At the freeze the journal switches to its other half, whose header names the frozen
//! superblock, the next generation, and the generation it *follows*. At open, with the
//! superblock `S` on disk: the half whose header names `S` is replayed; if the other half
//! follows it (the crash came before the frozen superblock was durable) its records are
//! replayed after it. A half is only ever rewritten at a freeze, when the superblock its
//! header names is durable, so the records of the last durable commit and of the
//! transaction after it are never overwritten. A freeze that names the same superblock
//! (nothing changed since) cannot happen: the journal only switches when there is a
//! transaction to commit.
//!
//! Layout (little-endian): the file in two halves at offset 0 and `half` (the file's
//! length / 2, rounded down to 32 bytes), each a 4 KiB header block then 32-byte records. A
//! version 1 file (one header at 0, records to the end) is read as one half.
//!
//! | header offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `VTJOURN1` |
//! | 8 | 4 | crc32c of bytes 12..56 |
//! | 12 | 4 | version (2; 1 had no `follows` and a crc of bytes 12..48) |
//! | 16 | 16 | boot id |
//! | 32 | 8 | generation |
//! | 40 | 8 | identity of the committed superblock the records extend |
//! | 48 | 8 | generation of the other half whose records come first (0: none) |
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
const VERSION: u32 = 2;
/// One header, records to the end of the file, no `follows`.
const VERSION_1: u32 = 1;
const HEADER_BYTES: u64 = 4096;
const RECORD_BYTES: u64 = 32;
const KIND_MAP: u8 = 1;
const KIND_UNMAP: u8 = 2;

/// The size of a journal file made by [`create_file`]: room for 130,944 changes in each
/// half (8 GiB of newly provisioned 64 KiB blocks per commit); a full half makes the pool
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
    /// The half appended to (0 or 1).
    active: usize,
    /// Generation of the active half.
    generation: u64,
    /// Records appended to the active half since its header was written.
    next: u64,
    /// Records a half holds.
    capacity: u64,
    /// Why appending is refused, if it is: a header could not be written (records would
    /// not be replayed), or the transaction was rolled back after a failure (its records
    /// are kept for the next open; new ones would interleave with them).
    refused: Option<String>,
}

/// What a header says, when it is valid.
#[derive(Clone, Copy)]
struct Header {
    boot_id: [u8; 16],
    generation: u64,
    committed: u64,
    follows: u64,
    /// Records this half can hold (a version 1 file: to the end of the file).
    capacity: u64,
}

impl Journal {
    /// Opens a journal file (made by [`create_file`] or zeroed) written by this boot of
    /// the host as `boot_id`.
    pub fn open(storage: Arc<dyn Storage>, boot_id: [u8; 16]) -> Result<Self> {
        let len = storage.len();
        if half_offset(len) < HEADER_BYTES + RECORD_BYTES {
            return Err(Error::InvalidArgument(format!(
                "a journal of {len} bytes is too small"
            )));
        }
        let headers = read_headers(storage.as_ref())?;
        // Without a valid header, start from an arbitrary generation: records of an old one
        // that may lie in the file (a header lost to corruption) then do not check.
        let generation = match headers.iter().flatten().map(|h| h.generation).max() {
            Some(g) => g,
            None => {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
                    ^ (std::process::id() as u64) << 32
            }
        };
        Ok(Journal {
            capacity: half_capacity(len),
            storage,
            boot_id,
            active: 0,
            generation,
            next: 0,
            refused: None,
        })
    }

    /// The changes a process that did not stop cleanly left for the committed superblock
    /// `committed` (its [`ThinMetadata::committed_ident`](crate::thin::metadata::ThinMetadata::committed_ident)):
    /// those of the half that extends it, then those of the other half if it follows that
    /// one (see the module doc); none when no half of this boot extends it.
    pub fn pending(&self, committed: u64) -> Result<Vec<Change>> {
        let headers = read_headers(self.storage.as_ref())?;
        let ours = |h: &Option<Header>| h.filter(|h| h.boot_id == self.boot_id);
        let Some(first) =
            (0..2).find(|&i| ours(&headers[i]).is_some_and(|h| h.committed == committed))
        else {
            return Ok(Vec::new());
        };
        let h = headers[first].expect("found");
        let mut out = Vec::new();
        self.read_records(first, &h, &mut out)?;
        if let Some(then) = ours(&headers[1 - first]) {
            if then.follows == h.generation && then.generation != h.generation {
                self.read_records(1 - first, &then, &mut out)?;
            }
        }
        Ok(out)
    }

    /// Appends half `half`'s valid records to `out`.
    fn read_records(&self, half: usize, h: &Header, out: &mut Vec<Change>) -> Result<()> {
        let mut buf = vec![0u8; 1 << 16];
        let per_buf = buf.len() as u64 / RECORD_BYTES;
        let mut slot = 0;
        while slot < h.capacity {
            let n = per_buf.min(h.capacity - slot);
            let bytes = (n * RECORD_BYTES) as usize;
            self.storage
                .read_at(
                    &mut buf[..bytes],
                    record_offset(self.storage.len(), half, slot),
                )
                .map_err(io_err("read"))?;
            for r in buf[..bytes].chunks_exact(RECORD_BYTES as usize) {
                match decode(r, h.generation) {
                    Some(c) => out.push(c),
                    None => return Ok(()),
                }
            }
            slot += n;
        }
        Ok(())
    }

    /// Starts over on the committed superblock `committed`: every record written so far
    /// stops counting. At open once the pending changes are committed, and to drop the
    /// changes of a transaction deliberately aborted.
    pub fn reset(&mut self, committed: u64) -> Result<()> {
        self.start_half(self.active, committed, 0)
    }

    /// The transaction is frozen and its superblock, `next_committed`, is being written
    /// (see the module doc): the changes made from now on go to the other half, which
    /// follows this one.
    pub fn switch(&mut self, next_committed: u64) -> Result<()> {
        if let Some(why) = &self.refused {
            return Err(Error::JournalRefused(why.clone()));
        }
        let follows = self.generation;
        self.start_half(1 - self.active, next_committed, follows)
    }

    fn start_half(&mut self, half: usize, committed: u64, follows: u64) -> Result<()> {
        let generation = self.generation.wrapping_add(1).max(1);
        let mut b = [0u8; 56];
        b[..8].copy_from_slice(MAGIC);
        put_u32(&mut b, 12, VERSION);
        b[16..32].copy_from_slice(&self.boot_id);
        put_u64(&mut b, 32, generation);
        put_u64(&mut b, 40, committed);
        put_u64(&mut b, 48, follows);
        let crc = crc32c::crc32c(&b[12..56]);
        put_u32(&mut b, 8, crc);
        match self
            .storage
            .write_at(&b, half_start(self.storage.len(), half))
        {
            Ok(()) => {
                self.active = half;
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
        let at = record_offset(self.storage.len(), self.active, self.next);
        match self.storage.write_at(&r, at) {
            Ok(()) => {
                self.next += 1;
                Ok(())
            }
            Err(e) => Err(io_err("write")(e)),
        }
    }

    /// Records appended since the last reset or switch.
    pub fn len(&self) -> u64 {
        self.next
    }

    pub fn is_empty(&self) -> bool {
        self.next == 0
    }
}

/// Where the second half starts.
fn half_offset(len: u64) -> u64 {
    (len / 2) & !(RECORD_BYTES - 1)
}

fn half_start(len: u64, half: usize) -> u64 {
    if half == 0 {
        0
    } else {
        half_offset(len)
    }
}

fn half_capacity(len: u64) -> u64 {
    (half_offset(len) - HEADER_BYTES) / RECORD_BYTES
}

fn record_offset(len: u64, half: usize, slot: u64) -> u64 {
    half_start(len, half) + HEADER_BYTES + slot * RECORD_BYTES
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::JournalIo { op, source }
}

fn read_headers(storage: &dyn Storage) -> Result<[Option<Header>; 2]> {
    let len = storage.len();
    let first = read_header(storage, 0)?;
    if let Some(h) = first.filter(|h| h.capacity == 0) {
        // Version 1: one journal over the whole file.
        let capacity = (len - HEADER_BYTES) / RECORD_BYTES;
        return Ok([Some(Header { capacity, ..h }), None]);
    }
    Ok([first, read_header(storage, half_offset(len))?])
}

/// The header at `at`; a version 1 header comes back with capacity 0 (the caller knows).
fn read_header(storage: &dyn Storage, at: u64) -> Result<Option<Header>> {
    let mut b = [0u8; 56];
    storage.read_at(&mut b, at).map_err(io_err("read"))?;
    if &b[..8] != MAGIC {
        return Ok(None);
    }
    let (follows, capacity) = match get_u32(&b, 12) {
        VERSION if get_u32(&b, 8) == crc32c::crc32c(&b[12..56]) => {
            (get_u64(&b, 48), half_capacity(storage.len()))
        }
        VERSION_1 if at == 0 && get_u32(&b, 8) == crc32c::crc32c(&b[12..48]) => (0, 0),
        _ => return Ok(None),
    };
    let mut boot_id = [0u8; 16];
    boot_id.copy_from_slice(&b[16..32]);
    Ok(Some(Header {
        boot_id,
        generation: get_u64(&b, 32),
        committed: get_u64(&b, 40),
        follows,
        capacity,
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
