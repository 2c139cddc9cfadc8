//! Active mirroring: every guest write, write-zeroes and discard of a disk is also applied
//! to a second thin device (of another pool) before the guest's request completes.
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
//! and [`Mirror::copy_region`] holds one region while it moves that region's current bytes
//! from the primary to the secondary. So, per region, the secondary sees the same sequence
//! of changes as the primary, and a copy of a region is never stale: whatever it read was
//! what the primary held, and no write could come between its read and its write. A region
//! written by the guest before the copier reaches it is copied again, whole, from the
//! primary (which holds the guest's bytes): a partial-block write never leaves the
//! secondary's block without the bytes around it.
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

use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
        }
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
        if self.active() {
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
            if self.active() {
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
            if n == self.region && self.active() {
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
        let held = self.regions.lock(0, k, true);
        let dirtied = self.copy_held(pool, primary, k, buf)?;
        drop(held);
        self.copied_regions.fetch_add(1, Ordering::Relaxed);
        if dirtied > 0 {
            let since = self
                .copied_since_write_back
                .fetch_add(dirtied, Ordering::Relaxed)
                + dirtied;
            if since >= COPY_WRITE_BACK_BYTES {
                self.copied_since_write_back.store(0, Ordering::Relaxed);
                self.pool.write_back().map_err(CopyError::WriteBack)?;
            }
        }
        Ok(())
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
        let at = k * self.region;
        buf.resize(self.region as usize, 0);
        pool.read(primary, at, buf)
            .map_err(|source| CopyError::Read { block: k, source })?;
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
