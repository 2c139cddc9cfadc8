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
//! back), or to a region sharing a block of the secondary with such a region (when the
//! secondary's blocks are bigger), goes to the primary alone and leaves its regions to the
//! copy, which moves them (again) from the primary. So nothing else writes the secondary's
//! blocks of a region being copied, and the copy holds the region only while it reads it.
//! A request whose regions and their neighbours in the secondary's blocks are all settled
//! is mirrored as above. At the end of the deferral the copy is written back, every guest
//! write is mirrored from then on, and the regions the guest's requests left to the copy
//! meanwhile are copied once more, each held until its copy is written (overwrites by then,
//! except for a region first written by such a request). Until the switch the old pool is
//! where a restart finds the disk, so a write to the primary alone loses nothing.

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
        // The regions sharing the secondary's blocks with these: the copy of any of them
        // writes (or its write-back holds) those blocks whole.
        let bs = self.pool.block_bytes().max(self.region);
        let near_first = offset / bs * bs / self.region;
        let near_end = offset
            .saturating_add(len.max(1))
            .div_ceil(bs)
            .saturating_mul(bs)
            .div_ceil(self.region);
        self.deferral()
            .as_mut()
            .is_some_and(|d| d.defers(first, end, near_first..near_end))
    }

    /// The end of the deferral: what the copy wrote is written back, from now on every guest
    /// write goes to both sides, and the regions returned (those the guest's requests left
    /// to the copy after their copy began, or that were never the copy's) are to be copied
    /// again with
    /// [`Mirror::copy_region`], which now holds each region until its copy is written.
    pub fn end_deferral(&self) -> Result<Vec<u64>, CopyError> {
        if self.deferral().is_none() {
            return Ok(Vec::new());
        }
        if self.copied_since_write_back.swap(0, Ordering::Relaxed) > 0 {
            self.pool.write_back_all().map_err(CopyError::WriteBack)?;
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
        self.secondary("flush", |p, _| p.flush())
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

    /// Copies region `k` of device `primary` of `pool` (the disk, live) to the secondary:
    /// the background copy of a migration, one caller at a time. The region is held while
    /// it is read and, unless it is deferred (see the module's comment), while it is
    /// written. A region that reads as zeroes is written as zeroes (unmapped where the
    /// secondary's blocks allow). Every [`COPY_WRITE_BACK_BYTES`] written, the secondary
    /// is written back (not held).
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
                // Not `write_back`, which skips when the pool wrote nothing since its last
                // commit: a commit just begun may still be writing these pages out.
                self.pool.write_back_all().map_err(CopyError::WriteBack)?;
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
            d.end_copy(k, copied.as_ref().ok().map(|&dirtied| dirtied > 0));
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
mod tests;
