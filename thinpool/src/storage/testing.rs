//! Storage implementations for tests: fault injection and crash recording.
//!
//! These live in the library (not under `#[cfg(test)]`) so that integration tests, the
//! property tests and the daemon's tests can all use them.

use super::Storage;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Which operation a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Sync,
    /// A write-back without a flush ([`Storage::writeback`]).
    Writeback,
    /// A hole punched or a discard ([`Storage::punch`]).
    Punch,
}

/// Wraps a store and fails the Nth read, write or sync (counting from 1) with EIO. With
/// `sticky`, every operation of that kind after the Nth fails too (a dead disk).
pub struct FaultyStorage<S> {
    inner: S,
    counts: [AtomicU64; 5],
    fail_at: [AtomicU64; 5],
    sticky: std::sync::atomic::AtomicBool,
}

impl<S: Storage> FaultyStorage<S> {
    pub fn new(inner: S) -> Self {
        FaultyStorage {
            inner,
            counts: Default::default(),
            fail_at: Default::default(),
            sticky: Default::default(),
        }
    }

    fn idx(op: FaultOp) -> usize {
        match op {
            FaultOp::Read => 0,
            FaultOp::Write => 1,
            FaultOp::Sync => 2,
            FaultOp::Writeback => 3,
            FaultOp::Punch => 4,
        }
    }

    /// Fails the `n`th operation of kind `op` from now on (1 = the next one).
    pub fn fail_nth(&self, op: FaultOp, n: u64, sticky: bool) {
        let i = Self::idx(op);
        let now = self.counts[i].load(Ordering::SeqCst);
        self.fail_at[i].store(now + n, Ordering::SeqCst);
        self.sticky.store(sticky, Ordering::SeqCst);
    }

    /// Stops injecting faults.
    pub fn heal(&self) {
        for f in &self.fail_at {
            f.store(0, Ordering::SeqCst);
        }
    }

    pub fn count(&self, op: FaultOp) -> u64 {
        self.counts[Self::idx(op)].load(Ordering::SeqCst)
    }

    fn tick(&self, op: FaultOp) -> io::Result<()> {
        let i = Self::idx(op);
        let n = self.counts[i].fetch_add(1, Ordering::SeqCst) + 1;
        let at = self.fail_at[i].load(Ordering::SeqCst);
        if at != 0 && (n == at || (n > at && self.sticky.load(Ordering::SeqCst))) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl<S: Storage> Storage for FaultyStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.tick(FaultOp::Read)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.tick(FaultOp::Write)?;
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.tick(FaultOp::Sync)?;
        self.inner.sync()
    }
    fn writeback(&self) -> io::Result<()> {
        self.tick(FaultOp::Writeback)?;
        self.inner.writeback()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn refresh_len(&self) -> io::Result<u64> {
        self.inner.refresh_len()
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<super::Punched> {
        self.tick(FaultOp::Punch)?;
        self.inner.punch(offset, len)
    }
    fn punch_blocks_writes(&self) -> bool {
        self.inner.punch_blocks_writes()
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.tick(FaultOp::Write)?;
        self.inner.zero_range(offset, len)
    }
    fn holes(&self) -> io::Result<Option<Vec<(u64, u64)>>> {
        self.inner.holes()
    }
}

/// One operation seen by a [`RecordingStorage`].
#[derive(Clone, Debug)]
pub enum Recorded {
    Write { offset: u64, data: Arc<[u8]> },
    Sync,
}

/// How the writes issued after the last sync fared in a simulated crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// None of them reached the disk.
    DropUnsynced,
    /// All of them reached the disk (the crash came before the sync returned).
    KeepUnsynced,
    /// All but the last reached the disk; the last one was torn: only the first
    /// `bytes` bytes of its first 4 KiB block made it.
    TearLast { bytes: usize },
}

/// Records every write and sync on top of a base image so that a test can rebuild the
/// image a crash would leave after any prefix of the log.
pub struct RecordingStorage {
    base: Vec<u8>,
    current: super::MemStorage,
    log: Mutex<Vec<Recorded>>,
}

impl RecordingStorage {
    pub fn new(base: Vec<u8>) -> Self {
        RecordingStorage {
            current: super::MemStorage::from_vec(base.clone()),
            base,
            log: Mutex::new(Vec::new()),
        }
    }

    pub fn log(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }

    pub fn log_len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// The image after a crash once the first `point` operations of the log had been issued.
    pub fn image_at(&self, point: usize, mode: CrashMode) -> Vec<u8> {
        let log = self.log.lock().unwrap();
        let point = point.min(log.len());
        let last_sync = log[..point]
            .iter()
            .rposition(|r| matches!(r, Recorded::Sync))
            .map(|i| i + 1)
            .unwrap_or(0);
        let mut img = self.base.clone();
        let apply = |img: &mut Vec<u8>, r: &Recorded, limit: Option<usize>| {
            if let Recorded::Write { offset, data } = r {
                let n = limit.unwrap_or(data.len()).min(data.len());
                let o = *offset as usize;
                img[o..o + n].copy_from_slice(&data[..n]);
            }
        };
        for r in &log[..last_sync] {
            apply(&mut img, r, None);
        }
        let unsynced = &log[last_sync..point];
        match mode {
            CrashMode::DropUnsynced => {}
            CrashMode::KeepUnsynced => {
                for r in unsynced {
                    apply(&mut img, r, None);
                }
            }
            CrashMode::TearLast { bytes } => {
                if let Some((last, rest)) = unsynced.split_last() {
                    for r in rest {
                        apply(&mut img, r, None);
                    }
                    apply(&mut img, last, Some(bytes.min(4096)));
                }
            }
        }
        img
    }
}

impl Storage for RecordingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.current.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.current.write_at(buf, offset)?;
        self.log.lock().unwrap().push(Recorded::Write {
            offset,
            data: Arc::from(buf),
        });
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.log.lock().unwrap().push(Recorded::Sync);
        Ok(())
    }
    fn len(&self) -> u64 {
        self.current.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_nth_and_sticky() {
        let s = FaultyStorage::new(super::super::MemStorage::new(4096));
        s.fail_nth(FaultOp::Write, 2, false);
        assert!(s.write_at(&[1], 0).is_ok());
        assert!(s.write_at(&[1], 0).is_err());
        assert!(s.write_at(&[1], 0).is_ok());
        s.fail_nth(FaultOp::Sync, 1, true);
        assert!(s.sync().is_err());
        assert!(s.sync().is_err());
        s.heal();
        assert!(s.sync().is_ok());
    }

    #[test]
    fn recording_rebuilds_crash_images() {
        let s = RecordingStorage::new(vec![0; 8192]);
        s.write_at(&[1; 4096], 0).unwrap();
        s.sync().unwrap();
        s.write_at(&[2; 4096], 4096).unwrap();
        s.write_at(&[3; 4096], 0).unwrap();
        let img = s.image_at(4, CrashMode::DropUnsynced);
        assert_eq!(img[0], 1);
        assert_eq!(img[4096], 0);
        let img = s.image_at(4, CrashMode::KeepUnsynced);
        assert_eq!((img[0], img[4096]), (3, 2));
        let img = s.image_at(4, CrashMode::TearLast { bytes: 512 });
        assert_eq!((img[0], img[511], img[512], img[4096]), (3, 3, 1, 2));
        let img = s.image_at(1, CrashMode::DropUnsynced);
        assert_eq!(img[0], 0);
    }
}
