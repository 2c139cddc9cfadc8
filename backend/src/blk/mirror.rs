//! Active mirroring: every guest write, write-zeroes and discard of a disk is also applied
//! to a second thin device (of another pool) before the guest's request completes, except
//! where the background copy will bring it (see "Deferred regions" below).
//!
//! `disk-migrate` installs one (see `manager/migrate.rs` for the whole protocol): first
//! *forward*, from the disk's device in its old pool to the device that becomes it in the
//! new pool, while the migration copies what changed before the mirror began; then, for the
//! few milliseconds the switch takes to become durable, *backward*, from the new device to
//! the old one, so that the old pool keeps every acknowledged write until the new one is
//! where a restart looks for the disk.
//!
//! The unit of ordering is a *region*: one block of the primary device's pool. Every
//! mirrored request holds the regions it touches (a lock table of its own, in ascending
//! order, so two requests cannot deadlock) across both its primary and its secondary part,
//! and [`Mirror::copy_region`] holds one region while it reads that region's current bytes
//! from the primary (and, unless the region is deferred, while it writes them to the
//! secondary). So, per region, the secondary sees the same sequence of changes as the
//! primary, and a copy of a region is never stale: whatever it read was what the primary
//! held, and no write could come between its read and its write (or, deferred, any write
//! that came makes the copy move the region again). A region written by the guest before
//! the copier reaches it is copied again, whole, from the primary (which holds the guest's
//! bytes): a partial-block write never leaves the secondary's block without the bytes
//! around it.
//!
//! Discard unmaps only whole blocks of the primary, and what such a block then reads (zeroes,
//! or an external origin's bytes) is not what a discard of the same range would leave on the
//! secondary, whose blocks may be of another size: a discarded region is copied from the
//! primary instead (a region that reads as zeroes is written as zeroes, unmapped where the
//! secondary's blocks allow).
//!
//! The copy writes the secondary's data back every [`COPY_WRITE_BACK_BYTES`] it copied,
//! and waits for that. Without it, the copy (as fast as the page cache takes it) leaves
//! the whole disk dirty, and its write-back (a commit's data sync, the kernel's flusher)
//! then writes hundreds of MiB at once while the guest writes the same file: a guest write
//! that needs a page under write-back waits for it, and with it every request of its
//! queue. Written back in small steps, the copy goes at the speed of the host's disk and
//! no write-back is ever large (docs/BENCHMARKS.md, "The copy written back as it goes").
//!
//! # Deferred regions
//!
//! Even so, a guest write into a region the copy has just written may wait for write-back:
//! on a file system with delayed allocation (ext4), the copy's pages are new blocks, and
//! write-back keeps a whole extent of them (up to MiBs) locked while it allocates and
//! submits it, for as long as the block layer throttles it (hundreds of milliseconds on a
//! busy host; docs/BENCHMARKS.md, "Deferred regions"). Once written back, the same pages are
//! overwrites, written out a page at a time. So while the background copy runs
//! ([`Mirror::defer_to_copy`] to [`Mirror::end_deferral`]), a guest request to a region the
//! copy has not *settled* (not copied yet, being copied, or copied but not yet written
//! back) goes to the primary alone and leaves the region to the copy, which moves it
//! (again) from the primary. Nothing else writes a deferred region's secondary blocks, so
//! the copy holds the region only while it reads it. A region once settled is mirrored as
//! above. At the end of the deferral the copy is written back, every guest write is
//! mirrored from then on, and the regions the guest wrote meanwhile are copied once more,
//! each held until its copy is written (overwrites by then). Until the switch the old pool
//! is where a restart finds the disk, so a write to the primary alone loses nothing.

mod deferral;

use deferral::Deferral;
use std::io::IoSlice;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use thinpool::cells::{CellGuard, CellTable};
use thinpool::pool::Pool;

/// How many bytes the background copy writes before it writes the secondary's data back
/// (see the module's comment).
pub const COPY_WRITE_BACK_BYTES: u64 = 8 << 20;

/// What a mirrored request does when the secondary fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// The secondary is given up (the mirror is marked failed and writes go to the primary
    /// alone); the guest's request succeeds if the primary's part did. Forward mirroring:
    /// the migration sees the failure and is undone.
    GiveUp,
    /// The guest's request fails. Backward mirroring: until the switch is durable, the old
    /// pool is where a restart finds the disk, so a write is done only once it is there.
    FailRequest,
}

/// A mirrored request's failure.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The primary's part failed: as any request on an unmirrored disk.
    #[error(transparent)]
    Primary(thinpool::Error),
    /// The secondary's part failed, under [`OnError::FailRequest`].
    #[error("mirror to thin device {dev}: {source}")]
    Secondary { dev: u32, source: thinpool::Error },
}

impl MirrorError {
    /// The pool's error, whichever side it came from (the I/O path reports and classifies
    /// it, e.g. out of space).
    pub fn pool_error(&self) -> &thinpool::Error {
        match self {
            MirrorError::Primary(e) | MirrorError::Secondary { source: e, .. } => e,
        }
    }
}

/// What [`Mirror::copy_region`] could not do.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("reading block {block} of the source: {source}")]
    Read { block: u64, source: thinpool::Error },
    #[error("writing block {block} of the copy: {source}")]
    Write { block: u64, source: thinpool::Error },
    #[error("writing back the copy: {0}")]
    WriteBack(thinpool::Error),
    #[error("the mirror failed: {0}")]
    Failed(String),
}

/// A second device that a disk's changes also go to (see the module's comment).
pub struct Mirror {
    /// The secondary: its pool and thin device.
    pub pool: Arc<Pool>,
    pub thin_id: u32,
    /// Region size: the primary pool's block size.
    region: u64,
    regions: CellTable,
    on_error: OnError,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    /// Bytes the guest's requests wrote (or zeroed) on the secondary.
    pub mirrored_bytes: AtomicU64,
    /// Regions [`Mirror::copy_region`] moved.
    pub copied_regions: AtomicU64,
    /// Bytes the copy wrote since it last wrote the secondary back.
    copied_since_write_back: AtomicU64,
    /// While the background copy runs: the regions it has yet to settle (see the
    /// module's comment, "Deferred regions").
    deferral: Mutex<Option<Deferral>>,
}

/// Regions held by one request, released when dropped.
pub struct Held<'a> {
    _cells: Vec<CellGuard<'a>>,
}

impl Mirror {
    /// A mirror to thin device `thin_id` of `pool`, for a primary whose pool has blocks of
    /// `primary_block_bytes`.
    pub fn new(pool: Arc<Pool>, thin_id: u32, primary_block_bytes: u64, on_error: OnError) -> Self {
        Mirror {
            pool,
            thin_id,
            region: primary_block_bytes.max(512),
            regions: CellTable::default(),
            on_error,
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            mirrored_bytes: AtomicU64::new(0),
            copied_regions: AtomicU64::new(0),
            copied_since_write_back: AtomicU64::new(0),
            deferral: Mutex::new(None),
        }
    }

    /// The background copy is to move `runs` (regions) of a disk of `regions`: until
    /// [`Mirror::end_deferral`], a guest write to a region the copy has not settled goes to
    /// the primary alone, and the copy moves that region (again).
    pub fn defer_to_copy(&self, regions: u64, runs: &[Range<u64>]) {
        *self.deferral() = Some(Deferral::new(regions, runs));
    }

    fn deferral(&self) -> MutexGuard<'_, Option<Deferral>> {
        self.deferral.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a guest request on `[offset, offset + len)` (its regions held) goes to the
    /// primary alone, its regions left to the copy.
    fn deferred(&self, offset: u64, len: u64) -> bool {
        let first = offset / self.region;
        let end = offset.saturating_add(len.max(1)).div_ceil(self.region);
        self.deferral()
            .as_mut()
            .is_some_and(|d| d.defers(first, end))
    }

    /// The end of the deferral: what the copy wrote is written back, from now on every guest
    /// write goes to both sides, and the regions returned (those the guest wrote, to the
    /// primary alone, since their copy began) are to be copied again with
    /// [`Mirror::copy_region`], which now holds each region until its copy is written.
    pub fn end_deferral(&self) -> Result<Vec<u64>, CopyError> {
        if self.deferral().is_none() {
            return Ok(Vec::new());
        }
        if self.copied_since_write_back.swap(0, Ordering::Relaxed) > 0 {
            self.pool.write_back().map_err(CopyError::WriteBack)?;
        }
        let d = self.deferral().take();
        Ok(d.map_or_else(Vec::new, |d| d.todo()))
    }

    /// Why the mirror was given up, if it was.
    pub fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::SeqCst) {
            return None;
        }
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn active(&self) -> bool {
        !self.failed.load(Ordering::SeqCst)
    }

    /// Gives the secondary up, keeping the first reason.
    pub fn give_up(&self, why: String) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            tracing::warn!(
                "mirror to thin device {}: {why}; writes go on to the disk alone",
                self.thin_id
            );
            *f = Some(why);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    /// Holds the regions of `[offset, offset + len)`, in ascending order.
    fn hold(&self, offset: u64, len: u64) -> Held<'_> {
        let first = offset / self.region;
        let end = offset.saturating_add(len.max(1)).div_ceil(self.region);
        Held {
            _cells: (first..end)
                .map(|k| self.regions.lock(0, k, true))
                .collect(),
        }
    }

    /// The secondary's part of a request whose primary part succeeded.
    fn secondary(
        &self,
        what: &str,
        f: impl FnOnce(&Pool, u32) -> thinpool::Result<()>,
    ) -> Result<(), MirrorError> {
        if !self.active() {
            return Ok(());
        }
        f(&self.pool, self.thin_id).or_else(|e| self.secondary_failed(what, e))
    }

    /// The secondary's part failed: given up, or the request fails (see [`OnError`]).
    fn secondary_failed(&self, what: &str, e: thinpool::Error) -> Result<(), MirrorError> {
        match self.on_error {
            OnError::GiveUp => {
                self.give_up(format!("{what}: {e}"));
                Ok(())
            }
            OnError::FailRequest => Err(MirrorError::Secondary {
                dev: self.thin_id,
                source: e,
            }),
        }
    }

    /// A guest FLUSH's part on the secondary: its pool committed, so that whichever pool a
    /// restart finds the disk in has every write completed before the FLUSH. A failure
    /// follows [`OnError`]: forward, the old pool (where the disk stays) already holds it
    /// all, so the mirror is given up and the FLUSH succeeds; backward, it fails.
    pub fn commit(&self) -> Result<(), MirrorError> {
        self.secondary("flush", |p, _| p.commit())
    }

    /// A guest write: `primary` (the disk's own device in `pool`) then the secondary, with
    /// the regions held across both.
    pub fn write_vectored(
        &self,
        pool: &Pool,
        primary: u32,
        offset: u64,
        bufs: &[IoSlice<'_>],
    ) -> Result<(), MirrorError> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let _held = self.hold(offset, len);
        pool.write_vectored(primary, offset, bufs)
            .map_err(MirrorError::Primary)?;
        if self.active() && !self.deferred(offset, len) {
            self.secondary("write", |p, id| p.write_vectored(id, offset, bufs))?;
            self.mirrored_bytes.fetch_add(len, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A guest write-zeroes, a region at a time: both sides read zeroes in the range
    /// afterwards, whatever their block sizes.
    pub fn write_zeroes(
        &self,
        pool: &Pool,
        primary: u32,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), MirrorError> {
        self.by_region(offset, len, |at, n| {
            pool.write_zeroes(primary, at, n, unmap)
                .map_err(MirrorError::Primary)?;
            if self.active() && !self.deferred(at, n) {
                self.secondary("write-zeroes", |p, id| p.write_zeroes(id, at, n, unmap))?;
                self.mirrored_bytes.fetch_add(n, Ordering::Relaxed);
            }
            Ok(())
        })
    }

    /// A guest discard, a region at a time; a region the primary unmapped (a whole block) is
    /// copied to the secondary (see the module's comment). Returns the blocks unmapped on
    /// the primary.
    pub fn discard(
        &self,
        pool: &Pool,
        primary: u32,
        offset: u64,
        len: u64,
    ) -> Result<u64, MirrorError> {
        let mut unmapped = 0;
        self.by_region(offset, len, |at, n| {
            unmapped += pool.discard(primary, at, n).map_err(MirrorError::Primary)?;
            if n == self.region && self.active() && !self.deferred(at, n) {
                let mut buf = Vec::new();
                // copy_held fails with Read or Write only.
                if let Err(CopyError::Read { source, .. } | CopyError::Write { source, .. }) =
                    self.copy_held(pool, primary, at / self.region, &mut buf)
                {
                    self.secondary_failed("discard", source)?;
                }
            }
            Ok(())
        })?;
        Ok(unmapped)
    }

    /// Runs `f` on each piece of `[offset, offset + len)` within one region, holding it.
    fn by_region(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64) -> Result<(), MirrorError>,
    ) -> Result<(), MirrorError> {
        let end = offset.saturating_add(len);
        let mut at = offset;
        while at < end {
            let n = (self.region - at % self.region).min(end - at);
            let _held = self.hold(at, n);
            f(at, n)?;
            at += n;
        }
        Ok(())
    }

    /// Copies region `k` of device `primary` of `pool` (the disk, live) to the secondary,
    /// holding the region: the background copy of a migration. A region that reads as
    /// zeroes is written as zeroes (unmapped where the secondary's blocks allow). Every
    /// [`COPY_WRITE_BACK_BYTES`] written, the secondary is written back (not held).
    pub fn copy_region(
        &self,
        pool: &Pool,
        primary: u32,
        k: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), CopyError> {
        if let Some(why) = self.failure() {
            return Err(CopyError::Failed(why));
        }
        let deferred = self.deferral().as_ref().is_some_and(|d| d.is_todo(k));
        let dirtied = if deferred {
            self.copy_deferred(pool, primary, k, buf)?
        } else {
            let _held = self.regions.lock(0, k, true);
            self.copy_held(pool, primary, k, buf)?
        };
        self.copied_regions.fetch_add(1, Ordering::Relaxed);
        if dirtied > 0 {
            let since = self
                .copied_since_write_back
                .fetch_add(dirtied, Ordering::Relaxed)
                + dirtied;
            if since >= COPY_WRITE_BACK_BYTES {
                self.copied_since_write_back.store(0, Ordering::Relaxed);
                self.pool.write_back().map_err(CopyError::WriteBack)?;
                if let Some(d) = self.deferral().as_mut() {
                    d.settle();
                }
            }
        }
        Ok(())
    }

    /// Copies region `k`, which the deferral leaves to the copy: held only while it is
    /// read, since no guest write goes to its secondary's blocks until it is settled.
    fn copy_deferred(
        &self,
        pool: &Pool,
        primary: u32,
        k: u64,
        buf: &mut Vec<u8>,
    ) -> Result<u64, CopyError> {
        let held = self.regions.lock(0, k, true);
        if let Some(d) = self.deferral().as_mut() {
            d.start_copy(k);
        }
        let read = self.read_region(pool, primary, k, buf);
        drop(held);
        let copied = read.and_then(|()| self.write_region(k, buf));
        if let Some(d) = self.deferral().as_mut() {
            d.end_copy(k, copied.is_ok());
        }
        copied
    }

    /// Copies region `k`; the most bytes that may have been written to the secondary's
    /// data device for it (see [`Mirror::dirtied`]).
    fn copy_held(
        &self,
        pool: &Pool,
        primary: u32,
        k: u64,
        buf: &mut Vec<u8>,
    ) -> Result<u64, CopyError> {
        self.read_region(pool, primary, k, buf)?;
        self.write_region(k, buf)
    }

    /// Reads region `k` of device `primary` of `pool` into `buf`.
    fn read_region(
        &self,
        pool: &Pool,
        primary: u32,
        k: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), CopyError> {
        buf.resize(self.region as usize, 0);
        pool.read(primary, k * self.region, buf)
            .map_err(|source| CopyError::Read { block: k, source })
    }

    /// Writes `buf`, region `k` as read, to the secondary (zeroes as zeroes, unmapped where
    /// its blocks allow); the most bytes that may have been written to its data device.
    fn write_region(&self, k: u64, buf: &[u8]) -> Result<u64, CopyError> {
        let at = k * self.region;
        let zeroes = buf.iter().all(|&b| b == 0);
        let w = if zeroes {
            self.pool.write_zeroes(self.thin_id, at, self.region, true)
        } else {
            self.pool.write(self.thin_id, at, buf)
        };
        w.map_err(|source| CopyError::Write { block: k, source })?;
        Ok(self.dirtied(k, zeroes))
    }

    /// The most bytes a copy of region `k` writes to the secondary's data device. Data
    /// may write every block of the secondary that the region touches, whole (a block
    /// shared with the copy of the disk's snapshot is unshared, a new one provisioned).
    /// Zeroes unmap the blocks they cover whole and write only into the ones at either end
    /// that they cover in part: nothing where the region is whole blocks of the secondary.
    fn dirtied(&self, k: u64, zeroes: bool) -> u64 {
        let bs = self.pool.block_bytes();
        let (start, end) = (k * self.region, (k + 1) * self.region);
        let spanned = (end.div_ceil(bs) - start / bs) * bs;
        if !zeroes {
            return spanned;
        }
        let covered = (end / bs).saturating_sub(start.div_ceil(bs)) * bs;
        spanned - covered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinpool::pool::PoolOptions;
    use thinpool::storage::held::HeldWrite;
    use thinpool::storage::testing::{FaultOp, FaultyStorage};
    use thinpool::storage::{MemStorage, Storage};

    const BS: u64 = 64 << 10;
    /// Regions of data that make one write-back.
    const STEP: u64 = COPY_WRITE_BACK_BYTES / BS;

    fn pool(data: Arc<dyn Storage>) -> Arc<Pool> {
        pool_of(data, BS)
    }

    fn pool_of(data: Arc<dyn Storage>, block_bytes: u64) -> Arc<Pool> {
        let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
        let sectors = (block_bytes / 512) as u32;
        let p = Pool::create(meta, data, sectors, PoolOptions::default()).unwrap();
        p.create_thin(0).unwrap();
        Arc::new(p)
    }

    #[test]
    fn the_copy_writes_the_secondary_back_every_few_mib_of_data_it_wrote() {
        let blocks = 2 * STEP + 8;
        let src = pool(Arc::new(MemStorage::new(blocks * BS)));
        let data = Arc::new(FaultyStorage::new(MemStorage::new(blocks * BS)));
        let dst = pool(data.clone());
        // Data in every block but eight, from STEP - 4 on, which read as zeroes.
        let zeroes = STEP - 4..STEP + 4;
        for k in (0..blocks).filter(|k| !zeroes.contains(k)) {
            src.write(0, k * BS, &[k as u8 | 1; 512]).unwrap();
        }
        let m = Mirror::new(dst.clone(), 0, BS, OnError::GiveUp);
        let mut buf = Vec::new();
        let mut write_backs = Vec::new();
        for k in 0..blocks {
            m.copy_region(&src, 0, k, &mut buf).unwrap();
            write_backs.push(data.count(FaultOp::Writeback));
        }
        // After each STEP blocks of data: the blocks of zeroes (unmapped, nothing written)
        // do not count.
        let at = |k: u64| write_backs[k as usize];
        assert_eq!((at(STEP - 1), at(STEP + 6), at(STEP + 7)), (0, 0, 1));
        assert_eq!((at(2 * STEP + 6), at(2 * STEP + 7)), (1, 2));
        let mut b = [0u8; 512];
        dst.read(0, (STEP + 5) * BS, &mut b).unwrap();
        assert_eq!(b, [(STEP + 5) as u8 | 1; 512]);
    }

    #[test]
    fn the_copy_into_bigger_blocks_counts_the_whole_blocks_it_writes() {
        let src = pool(Arc::new(MemStorage::new(STEP * BS)));
        let data = Arc::new(FaultyStorage::new(MemStorage::new(STEP * BS)));
        let dst = pool_of(data.clone(), 2 * BS);
        // The secondary mapped (as where the disk's snapshot was copied), the source all
        // zeroes (discarded since): each region writes zeroes into half a block.
        dst.write(0, 0, &vec![7u8; (STEP * BS) as usize]).unwrap();
        let m = Mirror::new(dst.clone(), 0, BS, OnError::GiveUp);
        let mut buf = Vec::new();
        for k in (0..STEP).step_by(2) {
            m.copy_region(&src, 0, k, &mut buf).unwrap();
        }
        // STEP / 2 regions, each in a block of 2 * BS: the copy's 8 MiB.
        assert_eq!(data.count(FaultOp::Writeback), 1);
        let mut b = vec![9u8; 2 * BS as usize];
        dst.read(0, 2 * BS, &mut b).unwrap();
        assert!(b[..BS as usize].iter().all(|&x| x == 0));
        assert!(b[BS as usize..].iter().all(|&x| x == 7));
    }

    /// Storage whose next write-back, once armed, is held until released, and whose writes
    /// wait while it is held: as the kernel's write-back holds the pages it writes out
    /// locked, and a write into one of them waits (all of them, here).
    struct WriteBackHeld {
        inner: MemStorage,
        hold: Mutex<(bool, bool)>,
        changed: std::sync::Condvar,
    }

    impl WriteBackHeld {
        fn new(inner: MemStorage) -> Self {
            WriteBackHeld {
                inner,
                hold: Mutex::new((false, false)),
                changed: std::sync::Condvar::new(),
            }
        }
        /// (armed, holding)
        fn state(&self) -> std::sync::MutexGuard<'_, (bool, bool)> {
            self.hold.lock().unwrap()
        }
        fn hold_next_write_back(&self) {
            self.state().0 = true;
        }
        fn wait_until_holding(&self) {
            let mut h = self.state();
            while !h.1 {
                h = self.changed.wait(h).unwrap();
            }
        }
        fn release(&self) {
            *self.state() = (false, false);
            self.changed.notify_all();
        }
        fn wait_while_held(&self) {
            let mut h = self.state();
            while h.1 {
                h = self.changed.wait(h).unwrap();
            }
        }
    }

    impl Storage for WriteBackHeld {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.wait_while_held();
            self.inner.write_at(buf, offset)
        }
        fn sync(&self) -> std::io::Result<()> {
            self.inner.sync()
        }
        fn writeback(&self) -> std::io::Result<()> {
            let mut h = self.state();
            if h.0 {
                *h = (false, true);
                self.changed.notify_all();
            }
            drop(h);
            self.wait_while_held();
            Ok(())
        }
        fn len(&self) -> u64 {
            self.inner.len()
        }
    }

    /// Region `k` of `p`'s device 0.
    fn region_of(p: &Pool, k: u64) -> Vec<u8> {
        let mut b = vec![0u8; BS as usize];
        p.read(0, k * BS, &mut b).unwrap();
        b
    }

    /// Whether `f`, on a thread of its own, ends within 10 s.
    fn ends_soon(f: impl FnOnce() + Send + 'static) -> (bool, std::thread::JoinHandle<()>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        let ended = rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok();
        (ended, t)
    }

    #[test]
    fn a_guest_write_to_a_copied_region_does_not_wait_for_the_copys_write_back() {
        let blocks = STEP + 4;
        let src = pool(Arc::new(MemStorage::new(blocks * BS)));
        let data = Arc::new(WriteBackHeld::new(MemStorage::new(blocks * BS)));
        let dst = pool(data.clone());
        for k in 0..blocks {
            src.write(0, k * BS, &[k as u8 | 1; 512]).unwrap();
        }
        let m = Arc::new(Mirror::new(dst.clone(), 0, BS, OnError::GiveUp));
        m.defer_to_copy(blocks, std::slice::from_ref(&(0..blocks)));
        data.hold_next_write_back();
        // The copy's STEPth region writes the copy back, and that is held.
        let copier = {
            let (m, src) = (m.clone(), src.clone());
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                for k in 0..STEP {
                    m.copy_region(&src, 0, k, &mut buf).unwrap();
                }
            })
        };
        data.wait_until_holding();
        let (ended, guest) = {
            let (m, src) = (m.clone(), src.clone());
            ends_soon(move || {
                let w = [IoSlice::new(&[0xee; 4096])];
                m.write_vectored(&src, 0, 3 * BS + 4096, &w).unwrap();
            })
        };
        data.release();
        copier.join().unwrap();
        guest.join().unwrap();
        assert!(ended, "the guest's write waited for the copy's write-back");
        let mut buf = Vec::new();
        for k in STEP..blocks {
            m.copy_region(&src, 0, k, &mut buf).unwrap();
        }
        // Region 3, written after its copy, is copied again; from then on, writes go to
        // both sides.
        let again = m.end_deferral().unwrap();
        assert_eq!(again, [3]);
        for k in again {
            m.copy_region(&src, 0, k, &mut buf).unwrap();
        }
        let w = [IoSlice::new(&[0xdd; 4096])];
        m.write_vectored(&src, 0, 5 * BS, &w).unwrap();
        for k in 0..blocks {
            assert!(region_of(&src, k) == region_of(&dst, k), "region {k}");
        }
        assert_eq!(region_of(&dst, 5)[..4096], [0xdd; 4096]);
    }

    #[test]
    fn a_guest_write_to_a_region_being_copied_does_not_wait_for_the_copys_write() {
        let src = pool(Arc::new(MemStorage::new(4 * BS)));
        let data = Arc::new(HeldWrite::new(MemStorage::new(4 * BS)));
        let dst = pool(data.clone());
        src.write(0, 0, &[7; 8192]).unwrap();
        let m = Arc::new(Mirror::new(dst.clone(), 0, BS, OnError::GiveUp));
        m.defer_to_copy(4, std::slice::from_ref(&(0..4)));
        data.hold_next_write();
        let copier = {
            let (m, src) = (m.clone(), src.clone());
            std::thread::spawn(move || m.copy_region(&src, 0, 0, &mut Vec::new()).unwrap())
        };
        data.wait_until_holding();
        let (ended, guest) = {
            let (m, src) = (m.clone(), src.clone());
            ends_soon(move || {
                let w = [IoSlice::new(&[9; 512])];
                m.write_vectored(&src, 0, 4096, &w).unwrap();
            })
        };
        data.release();
        copier.join().unwrap();
        guest.join().unwrap();
        assert!(ended, "the guest's write waited for the copy's write");
        let mut buf = Vec::new();
        for k in 1..4 {
            m.copy_region(&src, 0, k, &mut buf).unwrap();
        }
        // The copy wrote region 0 as it was before the guest's write: copied again.
        let again = m.end_deferral().unwrap();
        assert_eq!(again, [0]);
        m.copy_region(&src, 0, 0, &mut buf).unwrap();
        for k in 0..4 {
            assert!(region_of(&src, k) == region_of(&dst, k), "region {k}");
        }
    }

    #[test]
    fn a_failed_write_back_of_the_copy_fails_the_copy() {
        let src = pool(Arc::new(MemStorage::new(STEP * BS)));
        let data = Arc::new(FaultyStorage::new(MemStorage::new(STEP * BS)));
        let dst = pool(data.clone());
        for k in 0..STEP {
            src.write(0, k * BS, &[1; 512]).unwrap();
        }
        data.fail_nth(FaultOp::Writeback, 1, false);
        let m = Mirror::new(dst, 0, BS, OnError::GiveUp);
        let mut buf = Vec::new();
        for k in 0..STEP - 1 {
            m.copy_region(&src, 0, k, &mut buf).unwrap();
        }
        let e = m.copy_region(&src, 0, STEP - 1, &mut buf).unwrap_err();
        assert!(matches!(e, CopyError::WriteBack(_)), "{e}");
    }
}
