//! The pool: thin devices over a data device, with the data path the daemon calls.
//!
//! Locking: the metadata sits behind one mutex, held only for lookups and metadata
//! changes; data I/O happens outside it. Per-block cells (see [`crate::cells`]) order
//! the operations on one virtual block, and a per-device gate lets a snapshot wait for
//! in-flight writes to its origin and hold new ones for the moment it takes.
//!
//! A write to an unmapped block allocates a data block, writes the data (zero-filling the
//! rest of the block unless `skip_block_zeroing`, or unless the block is a known hole of
//! the data file, see [`Holes`]), then maps it. A write to a block that
//! may be shared with a snapshot copies the old block (unless the write covers it all)
//! into a new one and remaps. A write to an exclusively owned block goes in place, with no
//! metadata change. New mappings become durable at [`Pool::commit`], which flushes the
//! data device first — the contract of a disk with a volatile write cache.
//!
//! A device may have an external origin ([`crate::origin`]): its unmapped blocks then read
//! from the origin instead of as zeroes, a partial write to one copies the rest of the
//! block from the origin (as breaking sharing copies the old block), and write-zeroes
//! provisions zeroed blocks where unmapping would bring the origin's bytes back.
//!
//! Discard passdown: the data blocks a commit frees are given back to the host once the
//! commit is durable, by [`Pool::pass_down`], outside the commit (see [`passdown`]).
//!
//! Failures: a metadata error aborts the transaction back to the last commit, sets
//! NEEDS_CHECK and leaves the pool read-only (reads and in-place writes still work); if
//! the abort fails too, or the data device cannot be flushed, the pool fails. A data
//! read or write error fails only that request.

use crate::cells::CellTable;
use crate::journal::Journal;
use crate::origin::ExternalOrigin;
use crate::pdata::block::SECTOR_SIZE;
use crate::storage::Storage;
use crate::thin::device::{DeviceDetails, Mapping};
use crate::thin::metadata::{MetadataOptions, SpaceUsage, ThinMetadata};
use crate::{Error, Result};
use gate::DeviceGate;
pub use gate::EarlierWrites;
pub use passdown::PUNCH_PIECE_BYTES;
use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Do not zero the unwritten part of a newly provisioned block (faster; a guest may
    /// then read stale data from a previously freed block — only for trusted guests).
    pub skip_block_zeroing: bool,
    /// Metadata cache size in 4 KiB blocks.
    pub cache_blocks: usize,
    /// Open without writing anything.
    pub read_only: bool,
    /// Give the space of data blocks that become free back to the host once the commit
    /// that freed them is durable: a hole punched in a data file, a discard sent to a data
    /// block device (dm-thin's default; `false` is its `no_discard_passdown`).
    pub discard_passdown: bool,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            skip_block_zeroing: false,
            cache_blocks: crate::pdata::block_manager::DEFAULT_CACHE_BLOCKS,
            read_only: false,
            discard_passdown: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    /// Normal operation.
    Write,
    /// After a metadata error or with needs_check set: reads work, and writes to blocks
    /// the device owns alone; nothing that changes metadata is allowed.
    ReadOnly,
    /// Every request fails.
    Fail,
}

/// A snapshot just made by [`Pool::create_snap`].
#[derive(Debug)]
pub struct NewSnapshot {
    /// Making it in memory, with the metadata lock held: the longest any block lookup of
    /// the pool waited for it.
    pub in_memory: Duration,
    /// The origin's writes in flight when it was made: until they have landed the
    /// snapshot may still change where they write. None: there were none.
    pub in_flight: Option<EarlierWrites>,
}

impl NewSnapshot {
    /// Waits until the writes in flight when it was made have landed.
    pub fn settle(self) {
        if let Some(w) = self.in_flight {
            w.wait();
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PoolStatus {
    pub transaction_id: u64,
    pub time: u32,
    pub data_block_bytes: u64,
    #[serde(flatten)]
    pub usage: SpaceUsage,
    pub held_metadata_root: Option<u64>,
    pub mode: PoolMode,
    pub mode_reason: Option<String>,
    /// This process opened the pool read-only (inspection); says nothing of its health.
    pub opened_read_only: bool,
    pub needs_check: bool,
    /// A metadata failure rolled back writes acknowledged since the last commit: every
    /// FLUSH fails from then on (see [`Error::RolledBack`]).
    pub rolled_back: bool,
    pub devices: usize,
    pub uncommitted_changes: bool,
}

struct Inner {
    md: ThinMetadata,
    mode: PoolMode,
    reason: Option<String>,
    /// Bumped by every abort: data blocks allocated before it are gone from the space map.
    generation: u64,
    /// A frozen transaction is being made durable ([`Pool::commit`]) while the next one
    /// goes on: nothing may reopen or rewrite the superblock meanwhile.
    flipping: bool,
    /// A metadata failure met while `flipping`: the rollback it calls for runs once the
    /// superblock write is over (it reopens from whichever superblock is then on disk).
    failed_while_flipping: Option<String>,
    /// Bumped when a holder of the commit lock lets go (after a commit, or a change that
    /// held commits): what data-path changes wait for when the journal is full while
    /// another thread holds commits ([`Pool::meta_waiting_for_commit`]).
    commits_ended: u64,
    /// The thread holding commits ([`Pool::hold_commits`]), if any: a data-path change it
    /// makes itself cannot wait for its own hold to end.
    commits_held_by: Option<std::thread::ThreadId>,
    /// Aborts under way ([`Pool::abort`]): a data-path change that finds the journal full
    /// fails instead of waiting for commits to be let go.
    aborting: usize,
    /// Devices whose gate is being closed ([`Pool::close_gate`]), by which thread: a
    /// data-path change of one that finds the journal full while that thread holds commits
    /// fails instead of waiting for them to be let go.
    closing: Vec<(u32, std::thread::ThreadId)>,
    /// Data-path changes waiting so (for tests to synchronise on).
    waiting_for_commit: usize,
    /// Read-only mode was asked for (not caused by an error).
    read_only_requested: bool,
    /// A metadata failure rolled the transaction back: writes acknowledged since the last
    /// commit are gone from memory (kept in the journal for the next open, if there is
    /// one), so no FLUSH may succeed for them, ever, in this process.
    rolled_back: Option<String>,
    /// External origins by thin id. Here rather than behind a lock of their own: every
    /// block operation takes this lock for its lookup anyway, so a device without an
    /// origin pays one lookup in an (almost always empty) map for an unmapped block, and
    /// nothing for a mapped one.
    origins: HashMap<u32, Arc<ExternalOrigin>>,
    /// Data blocks known to be holes in the data file (see [`Holes`]).
    holes: Holes,
    /// A thread is giving freed data blocks back to the host ([`Pool::pass_down`]).
    passing_down: bool,
}

/// Data blocks known to be holes in the data device: free, and their whole range in the
/// data file a hole, learnt from the file at open (or when it grows) or punched since by
/// discard passdown. The first write to one need not zero the rest of the block: it
/// reads as zeroes already. In memory only; a block leaves the set when it is allocated
/// (every write to the data device goes to an allocated block), so the set is never
/// more than the truth. Never filled for a block device, which cannot tell its holes.
#[derive(Default)]
struct Holes {
    bits: Vec<u64>,
    /// The data device could tell its holes when the pool was opened (a file).
    known: bool,
}

impl Holes {
    fn set_range(&mut self, start: u64, end: u64) {
        if end > self.bits.len() as u64 * 64 {
            self.bits.resize(end.div_ceil(64) as usize, 0);
        }
        for b in start..end {
            self.bits[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    fn contains(&self, b: u64) -> bool {
        self.bits
            .get((b / 64) as usize)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    /// Whether `b` was known to be a hole; it is not from now on.
    fn take(&mut self, b: u64) -> bool {
        let Some(w) = self.bits.get_mut((b / 64) as usize) else {
            return false;
        };
        let was = *w & (1 << (b % 64)) != 0;
        *w &= !(1 << (b % 64));
        was
    }
}

impl Inner {
    fn origin(&self, dev: u32) -> Option<Arc<ExternalOrigin>> {
        if self.origins.is_empty() {
            return None;
        }
        self.origins.get(&dev).cloned()
    }
}

/// No other commit of the pool happens while this lives (see [`Pool::hold_commits`]).
pub struct CommitHold<'a> {
    pool: &'a Pool,
    one_at_a_time: Option<MutexGuard<'a, ()>>,
}

impl Drop for CommitHold<'_> {
    fn drop(&mut self) {
        self.pool.lock().commits_held_by = None;
        // Let go first: a change woken below may commit at once.
        drop(self.one_at_a_time.take());
        self.pool.lock().commits_ended += 1;
        self.pool.commit_ended.notify_all();
    }
}

impl CommitHold<'_> {
    pub fn pool(&self) -> &Pool {
        self.pool
    }

    /// Commits, as [`Pool::flush`] (the space it frees is given back later, not with
    /// commits held); the hold goes on.
    pub fn commit(&self) -> Result<()> {
        self.pool
            .write_back()
            .and_then(|()| self.pool.commit_held())
    }
}

pub struct Pool {
    inner: Mutex<Inner>,
    commit_lock: Mutex<()>,
    /// Signalled with `commits_ended` bumped, and when a piece of withheld space is
    /// released while a write waits for space (see [`passdown`]).
    commit_ended: Condvar,
    /// Signalled when a durable commit freed data blocks, and when a thread stops giving
    /// them back ([`Pool::wait_for_freed_space`]).
    freed: Condvar,
    /// Data was written since the last flush of the data device.
    data_written: AtomicBool,
    /// One flush of the data device at a time (see [`Pool::flush_device`]), and no hole
    /// punch during one (see [`passdown`]).
    data_flush: Mutex<()>,
    /// Flushes waiting for `data_flush`: the passdown lets them go first.
    flushes_waiting: AtomicUsize,
    /// Dropping the pool gives back the freed space nobody gave back yet (see
    /// [`Pool::leave_passdown_to_next_start`]).
    pass_down_on_drop: AtomicBool,
    /// A flush of the data device failed: none may vouch for its data again.
    data_flush_failed: AtomicBool,
    /// The data device has not refused [`Storage::zero_range`] yet.
    zero_range_works: AtomicBool,
    /// Held shared by every block operation from lookup to the end of its data I/O, and
    /// exclusively by [`Pool::abort`], which frees blocks such I/O may still target.
    io_epoch: RwLock<()>,
    data: Arc<dyn Storage>,
    block_bytes: u64,
    cells: CellTable,
    /// Per thin device: the changing operations in flight on it (see [`gate`]).
    gates: Mutex<HashMap<u32, Arc<DeviceGate>>>,
    opts: PoolOptions,
    zeroes: Vec<u8>,
    /// Journaled mapping changes replayed at open.
    replayed: usize,
}

fn md_opts(opts: &PoolOptions) -> MetadataOptions {
    MetadataOptions {
        cache_blocks: opts.cache_blocks,
        read_only: opts.read_only,
    }
}

/// A data block allocated for a write.
struct NewBlock {
    block: u64,
    /// It was known to be a hole in the data device ([`Holes`]).
    hole: bool,
    /// [`Inner::generation`] when it was allocated.
    generation: u64,
}

/// What a write to a block must do, from what it found there: write in place, provision a
/// new block, or break sharing with a snapshot (copy, then write).
enum WriteKind {
    InPlace(u64),
    /// Unmapped; the rest of the new block comes from the external origin if there is one.
    Provision(Option<Arc<ExternalOrigin>>),
    BreakSharing(u64),
}

impl Pool {
    /// Formats a new pool whose data device is all of `data`.
    pub fn create(
        metadata: Arc<dyn Storage>,
        data: Arc<dyn Storage>,
        block_sectors: u32,
        opts: PoolOptions,
    ) -> Result<Self> {
        crate::thin::superblock::check_data_block_size(block_sectors)?;
        let block_bytes = block_sectors as u64 * SECTOR_SIZE;
        let data_blocks = data.len() / block_bytes;
        if data_blocks == 0 {
            return Err(Error::InvalidArgument(format!(
                "data device of {} bytes holds no whole {block_bytes}-byte block",
                data.len()
            )));
        }
        let mut md = ThinMetadata::format(metadata, block_sectors, data_blocks, md_opts(&opts))?;
        md.set_withhold_freed_data(opts.discard_passdown && !opts.read_only);
        let pool = Self::assemble(md, data, opts, PoolMode::Write, None);
        pool.learn_holes(0);
        Ok(pool)
    }

    /// Opens an existing pool (kernel-made pools included). A data device that grew is
    /// put to use; one that shrank below the pool's size is refused.
    pub fn open(
        metadata: Arc<dyn Storage>,
        data: Arc<dyn Storage>,
        opts: PoolOptions,
    ) -> Result<Self> {
        Self::open_with_journal(metadata, data, None, opts)
    }

    /// [`Pool::open`] with the pool's journal ([`crate::journal`]): the mapping changes a
    /// process that did not stop cleanly left in it are replayed and committed first, and
    /// the data path records its changes there from then on. A read-only open replays them
    /// in memory only (what it shows holds every acknowledged write; nothing is written);
    /// with needs_check set they wait, untouched, for a writable open after the check.
    pub fn open_with_journal(
        metadata: Arc<dyn Storage>,
        data: Arc<dyn Storage>,
        journal: Option<Journal>,
        opts: PoolOptions,
    ) -> Result<Self> {
        let mut md = ThinMetadata::open(metadata, md_opts(&opts))?;
        md.set_withhold_freed_data(opts.discard_passdown && !opts.read_only);
        let block_bytes = md.data_block_bytes();
        let have = data.len() / block_bytes;
        let need = md.usage().data_blocks;
        if have < need {
            return Err(Error::InvalidArgument(format!(
                "data device holds {have} blocks of {block_bytes} bytes, the pool has {need}"
            )));
        }
        let pending = match &journal {
            Some(j) => j.pending(md.committed_ident())?,
            None => Vec::new(),
        };
        let mut replayed = 0;
        if opts.read_only && !pending.is_empty() {
            // Shown, not written: the next writable open commits them.
            replayed = md.replay_in_memory(&pending)?;
        }
        let (mode, reason) = if md.needs_check() {
            let waiting = if pending.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} journaled mapping changes wait for a writable open after the check",
                    pending.len()
                )
            };
            (
                PoolMode::ReadOnly,
                Some(format!("metadata flagged needs_check{waiting}")),
            )
        } else {
            (PoolMode::Write, None)
        };
        // With needs_check set, changes wait (the metadata they extend is in doubt); an
        // empty journal is attached anyway, for writes after the flag is cleared.
        let attach = !opts.read_only && (mode == PoolMode::Write || pending.is_empty());
        if attach {
            if let Some(j) = journal {
                replayed = md.attach_journal(j, &pending)?;
                if !pending.is_empty() {
                    // Their data is in the page cache (the same boot wrote it): durable
                    // before the mappings that point at it.
                    data.sync().map_err(Self::data_err("sync", 0))?;
                    md.commit()?;
                    tracing::warn!(
                        "replayed {replayed} mapping changes of acknowledged writes that the last process using the pool did not commit ({} skipped: their device was never committed)",
                        pending.len() - replayed
                    );
                }
            }
        }
        if mode == PoolMode::Write && !opts.read_only {
            // The metadata device is put to use whole, as dm-thin does on resume; the data
            // device is not: the pool's size changes only when asked (`grow_data`), as a
            // dm-thin pool's changes only with its table, whatever the file's length.
            md.resize_metadata()?;
        }
        if have > need {
            tracing::info!(
                "the data device holds {have} blocks of {block_bytes} bytes, the pool {need}: \
                 growing the pool puts the rest to use"
            );
        }
        let mut pool = Self::assemble(md, data, opts, mode, reason);
        pool.replayed = replayed;
        // Blocks the replay's commit freed, then what the data file says.
        pool.pass_down();
        pool.learn_holes(0);
        Ok(pool)
    }

    /// Notes the free data blocks from `from` on whose whole range is a hole in the data
    /// device, if it can tell (see [`Holes`]). Nothing for a pool that never writes.
    fn learn_holes(&self, from: u64) {
        if self.opts.read_only {
            return;
        }
        let holes = match self.data.holes() {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(
                    "cannot find the holes of the data device: {e}; new blocks are zeroed"
                );
                return;
            }
        };
        let bs = self.block_bytes;
        let mut g = self.lock();
        g.holes.known = true;
        let nr = g.md.usage().data_blocks;
        for (start, end) in holes {
            let (first, end) = (start.div_ceil(bs).max(from), (end / bs).min(nr));
            for b in first..end {
                if g.md.data_block_count(b).is_ok_and(|c| c == 0) {
                    g.holes.set_range(b, b + 1);
                }
            }
        }
    }

    fn assemble(
        md: ThinMetadata,
        data: Arc<dyn Storage>,
        opts: PoolOptions,
        mode: PoolMode,
        reason: Option<String>,
    ) -> Self {
        let block_bytes = md.data_block_bytes();
        Pool {
            inner: Mutex::new(Inner {
                md,
                mode,
                reason,
                generation: 0,
                flipping: false,
                failed_while_flipping: None,
                commits_ended: 0,
                commits_held_by: None,
                aborting: 0,
                closing: Vec::new(),
                waiting_for_commit: 0,
                read_only_requested: false,
                rolled_back: None,
                origins: HashMap::new(),
                holes: Holes::default(),
                passing_down: false,
            }),
            commit_lock: Mutex::new(()),
            commit_ended: Condvar::new(),
            freed: Condvar::new(),
            data,
            block_bytes,
            cells: CellTable::default(),
            gates: Mutex::new(HashMap::new()),
            opts,
            zeroes: vec![0; block_bytes.min(1 << 20) as usize],
            data_written: AtomicBool::new(false),
            data_flush: Mutex::new(()),
            data_flush_failed: AtomicBool::new(false),
            flushes_waiting: AtomicUsize::new(0),
            pass_down_on_drop: AtomicBool::new(true),
            zero_range_works: AtomicBool::new(true),
            io_epoch: RwLock::new(()),
            replayed: 0,
        }
    }

    /// How many journaled mapping changes the open replayed (see [`crate::journal`]).
    pub fn replayed_at_open(&self) -> usize {
        self.replayed
    }

    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    pub fn data_storage(&self) -> &Arc<dyn Storage> {
        &self.data
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gate(&self, dev: u32) -> Arc<DeviceGate> {
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(dev)
            .or_default()
            .clone()
    }

    fn check_not_failed(inner: &Inner) -> Result<()> {
        if inner.mode == PoolMode::Fail {
            return Err(Error::Failed(inner.reason.clone().unwrap_or_default()));
        }
        Ok(())
    }

    /// A FLUSH vouches for every write completed before it: after a rollback some of those
    /// are gone, so it fails (dm-thin fails flushes once it is read-only for the same reason).
    fn check_not_rolled_back(inner: &Inner) -> Result<()> {
        match &inner.rolled_back {
            Some(why) => Err(Error::RolledBack(why.clone())),
            None => Ok(()),
        }
    }

    fn check_writable(inner: &Inner) -> Result<()> {
        Self::check_not_failed(inner)?;
        if inner.md.options().read_only {
            return Err(Error::ReadOnly("opened read-only"));
        }
        if inner.mode == PoolMode::ReadOnly {
            if inner.md.needs_check() {
                return Err(Error::NeedsCheck);
            }
            return Err(Error::ReadOnly(if inner.read_only_requested {
                "set read-only on request"
            } else {
                "after a metadata error"
            }));
        }
        Ok(())
    }

    /// Runs a metadata change; a metadata failure rolls back to the last commit. When
    /// only blocks freed in this transaction stand between the change and the metadata
    /// reserve, commits (which makes them reusable) and tries once more.
    fn meta<T>(
        &self,
        inner: &mut Inner,
        mut f: impl FnMut(&mut ThinMetadata) -> Result<T>,
    ) -> Result<T> {
        Self::check_writable(inner)?;
        let r = match f(&mut inner.md) {
            // A commit makes the blocks freed in this transaction reusable, and starts the
            // journal over.
            Err(e @ Error::OutOfMetadataSpace { .. }) if inner.md.pending_metadata_frees() > 0 => {
                self.commit_and_retry(inner, e, &mut f)
            }
            Err(e @ Error::JournalFull { .. }) => self.commit_and_retry(inner, e, &mut f),
            r => r,
        };
        if let Err(e) = &r {
            if e.is_metadata_failure() && inner.mode == PoolMode::Write {
                Self::metadata_failed(inner, e);
            }
        }
        r
    }

    fn commit_and_retry<T>(
        &self,
        inner: &mut Inner,
        e: Error,
        f: &mut impl FnMut(&mut ThinMetadata) -> Result<T>,
    ) -> Result<T> {
        match self.commit_locked(inner) {
            Ok(true) => f(&mut inner.md),
            Ok(false) => Err(e),
            Err(e) => Err(e),
        }
    }

    /// Waits, with the metadata lock let go meanwhile, until a holder of the commit lock
    /// lets go (see [`CommitHold`]'s drop), or `stop` holds (checked whenever the condition
    /// variable is signalled: whoever makes it hold signals it).
    fn wait_for_a_commit_to_end<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inner>,
        stop: impl Fn(&Inner) -> bool,
    ) -> MutexGuard<'a, Inner> {
        let ended = g.commits_ended;
        g.waiting_for_commit += 1;
        while g.commits_ended == ended && !stop(&g) {
            g = self.commit_ended.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.waiting_for_commit -= 1;
        g
    }

    /// [`meta`](Self::meta) for a change of the data path (a new mapping, an unmap). The
    /// journal's half for this transaction may fill while another thread holds commits:
    /// the last transaction's commit writing its superblock (the other half is kept for a
    /// crash meanwhile), or a change that must reach the disk whole ([`Pool::hold_commits`]:
    /// a snapshot being made, a migration's switch). `meta` cannot commit to make room
    /// then. The change waits for the holder to let go and tries again (committing first
    /// if the journal is still full), instead of failing a guest's write. Only the holder's
    /// own thread gets the error: it would wait for itself.
    fn meta_waiting_for_commit<'a, T>(
        &'a self,
        mut g: MutexGuard<'a, Inner>,
        dev: u32,
        mut f: impl FnMut(&mut ThinMetadata) -> Result<T>,
    ) -> (MutexGuard<'a, Inner>, Result<T>) {
        // An abort, or the holder of commits closing this device's gate, waits for this
        // change's I/O: it must not wait for them.
        let give_up = |g: &Inner| g.aborting > 0 || Self::closed_by_holder(g, dev);
        loop {
            let r = self.meta(&mut g, &mut f);
            if !matches!(r, Err(Error::JournalFull { .. }))
                || g.commits_held_by == Some(std::thread::current().id())
            {
                return (g, r);
            }
            if give_up(&g) {
                let r = match g.aborting {
                    0 => r,
                    _ => Err(Error::ReadOnly("the transaction is being rolled back")),
                };
                return (g, r);
            }
            // Checked with the metadata lock held since `meta` found the commit lock
            // taken: a holder bumps `commits_ended` under this lock after letting go, so
            // the wait below cannot miss it. Free now (let go meanwhile): try again.
            if !matches!(
                self.commit_lock.try_lock(),
                Err(std::sync::TryLockError::WouldBlock)
            ) {
                continue;
            }
            let generation = g.generation;
            g = self.wait_for_a_commit_to_end(g, give_up);
            if g.generation != generation {
                return (g, Err(Error::ReadOnly("the transaction was rolled back")));
            }
        }
    }

    /// Commits with the metadata lock held throughout (rare paths: out of space). False,
    /// committing nothing, while commits are held ([`Pool::hold_commits`]): the holder's
    /// change must not become durable halfway.
    fn commit_locked(&self, inner: &mut Inner) -> Result<bool> {
        // Not `lock`: the holder may be waiting for `inner`, which we hold.
        let _one_at_a_time = match self.commit_lock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
        };
        self.flush_data(inner)?;
        let r = inner.md.commit();
        if let Err(e) = &r {
            Self::metadata_failed(inner, e);
        }
        r?;
        self.note_freed(inner);
        Ok(true)
    }

    fn metadata_failed(inner: &mut Inner, e: &Error) {
        if inner.flipping {
            // Rolling back now would reopen from the old superblock while the frozen one is
            // being written. Until the commit under way ends, nothing is read or written:
            // the pool counts as failed, and writes in flight find the generation changed.
            tracing::error!(
                "metadata operation failed: {e}; rolling back once the commit under way ends"
            );
            inner.generation += 1;
            inner.rolled_back = Some(format!("{e}"));
            inner.mode = PoolMode::Fail;
            inner.reason = Some(format!(
                "metadata error: {e} (rolling back once the commit under way ends)"
            ));
            inner
                .failed_while_flipping
                .get_or_insert_with(|| format!("{e}"));
            return;
        }
        // A pool opened read-only (inspection, export) has nothing to roll back and writes
        // nothing, not even the flag; its caller reports the error.
        let read_only = inner.md.options().read_only;
        if !read_only {
            tracing::error!("metadata operation failed: {e}; rolling back to the last commit");
        }
        inner.generation += 1;
        inner.rolled_back = Some(format!("{e}"));
        if read_only && inner.md.is_dirty() {
            // Journaled changes applied in memory (see ThinMetadata::replay_in_memory): a
            // rollback would drop them and show the last commit's stale bytes as the
            // disks' contents. Nothing more is shown instead.
            inner.mode = PoolMode::Fail;
            inner.reason = Some(format!(
                "metadata error: {e} (journaled changes were applied in memory; nothing more is read)"
            ));
            return;
        }
        match inner.md.abort() {
            Ok(()) => {
                if !read_only {
                    if let Err(e2) = inner.md.write_needs_check(true) {
                        tracing::error!("cannot flag the metadata needs_check: {e2}");
                    }
                }
                // A pool failed already (a data flush failed) stays failed: read-only
                // would serve data the page cache may have dropped.
                if inner.mode != PoolMode::Fail {
                    inner.mode = PoolMode::ReadOnly;
                    inner.reason = Some(format!("metadata error: {e}"));
                }
                inner.read_only_requested = false;
            }
            Err(e2) => {
                inner.mode = PoolMode::Fail;
                inner.reason = Some(format!("metadata error: {e}; rollback failed: {e2}"));
            }
        }
    }

    /// Flushes the data device before a commit. A failure fails the pool: the page cache
    /// may have dropped the data, and a later flush that succeeds would not bring it back.
    fn flush_data(&self, inner: &mut Inner) -> Result<()> {
        self.data_written.store(false, Ordering::SeqCst);
        self.flush_device(|d| d.sync())
            .map_err(|source| Self::flush_failed(inner, source))
    }

    /// Every flush of the data device (a sync, a write-back) runs here, one at a time, and
    /// a failure is kept before the next may run. The kernel reports a write-back error to
    /// the first flush that checks the file, and to that one only: a sync that runs after
    /// another flush took the error returns success, and must not vouch for the data (a
    /// commit would make mappings durable over data the page cache dropped).
    fn flush_device(
        &self,
        f: impl FnOnce(&dyn Storage) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        self.flushes_waiting.fetch_add(1, Ordering::SeqCst);
        let _one_at_a_time = self.data_flush.lock().unwrap_or_else(|p| p.into_inner());
        self.flushes_waiting.fetch_sub(1, Ordering::SeqCst);
        if self.data_flush_failed.load(Ordering::SeqCst) {
            return Err(std::io::Error::other(
                "an earlier flush of the data device failed",
            ));
        }
        let r = f(&*self.data);
        if r.is_err() {
            self.data_flush_failed.store(true, Ordering::SeqCst);
        }
        r
    }

    /// Once a flush failed the page cache may have dropped the data: nothing written since
    /// the last commit can be trusted, and a later flush that succeeds would not bring it
    /// back, so the pool fails.
    fn flush_failed(inner: &mut Inner, source: std::io::Error) -> Error {
        inner.mode = PoolMode::Fail;
        inner.reason = Some(format!("data device flush failed: {source}"));
        Error::DataIo {
            op: "sync",
            offset: 0,
            source,
        }
    }

    fn data_err(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::DataIo { op, offset, source }
    }

    fn origin_err(offset: u64) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::OriginIo { offset, source }
    }

    // ----- devices -----

    pub fn create_thin(&self, id: u32) -> Result<()> {
        let mut g = self.lock();
        self.meta(&mut g, |md| md.create_thin(id))?;
        // An id that an aborted transaction created and forgot may have had an origin.
        g.origins.remove(&id);
        Ok(())
    }

    /// Snapshots `origin` as `id`, crash-consistent: every write to the origin completed
    /// before the call is in the snapshot; one in flight may be, in whole or in part, as
    /// after a power loss. The origin's writes are not held: the snapshot is made in
    /// memory under the metadata lock (every block lookup of the pool waits that long).
    /// Writes in flight then may still land in blocks the snapshot now shares: the
    /// snapshot no longer changes once they have ([`NewSnapshot::settle`]; commit after
    /// that to make it durable as it is). The origin keeps such a write: its next write
    /// to the block, which breaks the sharing, waits for it (the block's cell) before
    /// copying. The snapshot shares the origin's external origin, as its unmapped blocks
    /// are the origin's.
    pub fn create_snap(&self, id: u32, origin: u32) -> Result<NewSnapshot> {
        let gate = self.gate(origin);
        let t0 = Instant::now();
        let mut g = self.lock();
        self.meta(&mut g, |md| md.create_snap(id, origin))?;
        match g.origin(origin) {
            Some(o) => g.origins.insert(id, o),
            None => g.origins.remove(&id),
        };
        // Under the lock: a write that looks its block up after this is a later one.
        let in_flight = gate.new_epoch();
        drop(g);
        Ok(NewSnapshot {
            in_memory: t0.elapsed(),
            in_flight,
        })
    }

    /// Deletes a thin device and forgets its external origin. (An abort that brings the
    /// device back does not bring the origin back: attach it again from the registry.)
    pub fn delete(&self, id: u32) -> Result<()> {
        let gate = self.gate(id);
        let quiet = self.close_gate(&gate, id)?;
        let mut g = self.lock();
        self.meta(&mut g, |md| md.delete(id))?;
        g.origins.remove(&id);
        // Before the metadata lock is let go: a device made again with this id (it needs
        // the lock) gets a gate of its own.
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        drop(g);
        // Writes that waited for the gate fail: a device made again with this id is not
        // the one they were sent to.
        quiet.retire();
        Ok(())
    }

    /// Gives device `dev` an external origin, or (None) takes it away. Waits for writes in
    /// flight to the device and holds new ones meanwhile; reads are not held, so set the
    /// origin before the device is served (a read racing the change may see either).
    /// Kept in memory only: the registry records the path.
    pub fn set_external_origin(&self, dev: u32, origin: Option<Arc<ExternalOrigin>>) -> Result<()> {
        let gate = self.gate(dev);
        let _quiet = self.close_gate(&gate, dev)?;
        let mut g = self.lock();
        Self::check_not_failed(&g)?;
        g.md.device(dev)?;
        match origin {
            Some(o) => g.origins.insert(dev, o),
            None => g.origins.remove(&dev),
        };
        Ok(())
    }

    /// Closes device `dev`'s gate: waits for the writes in flight and holds new ones. The
    /// caller may hold commits (the catalog deletes under its hold): a write in flight to
    /// the device that finds the journal full would wait for them to be let go, and the
    /// caller for the write. It fails instead (see [`Pool::meta_waiting_for_commit`]).
    /// Fails if the device was deleted while it waited.
    fn close_gate<'a>(&self, gate: &'a DeviceGate, dev: u32) -> Result<gate::Closed<'a>> {
        let me = std::thread::current().id();
        self.lock().closing.push((dev, me));
        self.commit_ended.notify_all();
        let closed = gate.close();
        let mut g = self.lock();
        if let Some(i) = g.closing.iter().position(|&c| c == (dev, me)) {
            g.closing.swap_remove(i);
        }
        closed.ok_or(Error::NoSuchDevice(dev))
    }

    /// Counts an operation in flight on device `dev` (see [`DeviceGate::enter`]); fails if
    /// the device was deleted while it waited.
    fn enter_gate(gate: &DeviceGate, dev: u32) -> Result<gate::Entered<'_>> {
        gate.enter().ok_or(Error::NoSuchDevice(dev))
    }

    /// Whether device `dev`'s gate is being closed by the thread holding commits: a write to
    /// it waiting for them would wait for ever. (A closer holding none waits only for the
    /// write, which may wait for whoever holds them.)
    fn closed_by_holder(g: &Inner, dev: u32) -> bool {
        g.closing
            .iter()
            .any(|&(d, t)| d == dev && g.commits_held_by == Some(t))
    }

    /// The external origin of device `dev`, if it has one.
    pub fn external_origin(&self, dev: u32) -> Option<Arc<ExternalOrigin>> {
        self.lock().origin(dev)
    }

    pub fn device(&self, id: u32) -> Result<DeviceDetails> {
        self.lock().md.device(id)
    }

    pub fn devices(&self) -> Vec<(u32, DeviceDetails)> {
        self.lock()
            .md
            .devices()
            .iter()
            .map(|(&k, &v)| (k, v))
            .collect()
    }

    pub fn set_transaction_id(&self, old: u64, new: u64) -> Result<()> {
        let mut g = self.lock();
        self.meta(&mut g, |md| md.set_transaction_id(old, new))
    }

    pub fn reserve_metadata_snap(&self) -> Result<u64> {
        self.commit_with(|md| md.reserve_metadata_snap())
    }

    pub fn release_metadata_snap(&self) -> Result<()> {
        self.commit_with(|md| md.release_metadata_snap())
    }

    /// A metadata change that commits (with the data flushed first), as a whole, as
    /// [`flush`](Self::flush) does: the space it frees is given back later.
    fn commit_with<T>(&self, f: impl FnMut(&mut ThinMetadata) -> Result<T>) -> Result<T> {
        // Not while another commit writes its superblock.
        let _one_at_a_time = self.hold_commits();
        let mut g = self.lock();
        self.flush_data(&mut g)?;
        let r = self.meta(&mut g, f);
        self.note_freed(&g);
        r
    }

    /// Grows the pool to the data device's current length.
    pub fn grow_data(&self) -> Result<u64> {
        let len = self.data.refresh_len().map_err(Self::data_err("stat", 0))?;
        let blocks = len / self.block_bytes;
        let mut g = self.lock();
        let before = g.md.usage().data_blocks;
        self.meta(&mut g, |md| md.resize_data(blocks))?;
        drop(g);
        self.learn_holes(before);
        Ok(blocks)
    }

    /// Switches to read-only mode on request (reads and in-place writes go on), or back to
    /// write mode — refused while needs_check is set or after a failure.
    pub fn set_read_only(&self, read_only: bool) -> Result<()> {
        let mut g = self.lock();
        Self::check_not_failed(&g)?;
        if read_only {
            g.mode = PoolMode::ReadOnly;
            g.reason = Some("set read-only on request".into());
        } else {
            if g.md.needs_check() {
                return Err(Error::NeedsCheck);
            }
            if g.mode == PoolMode::ReadOnly && !g.read_only_requested {
                return Err(Error::ReadOnly(
                    "after a metadata error; check the pool and reopen it",
                ));
            }
            g.mode = PoolMode::Write;
            g.reason = None;
        }
        g.read_only_requested = read_only;
        Ok(())
    }

    /// Puts a grown metadata device to use.
    pub fn grow_metadata(&self) -> Result<u64> {
        let mut g = self.lock();
        self.meta(&mut g, |md| md.resize_metadata())
    }

    /// Clears NEEDS_CHECK (after a check passed) and returns to write mode.
    pub fn clear_needs_check(&self) -> Result<()> {
        // It rewrites the superblock: not while a commit writes its own.
        let _one_at_a_time = self.hold_commits();
        let mut g = self.lock();
        Self::check_not_failed(&g)?;
        g.md.write_needs_check(false)?;
        if !g.md.options().read_only {
            g.mode = PoolMode::Write;
            g.reason = None;
        }
        Ok(())
    }

    pub fn status(&self) -> PoolStatus {
        let g = self.lock();
        PoolStatus {
            transaction_id: g.md.transaction_id(),
            time: g.md.time(),
            data_block_bytes: self.block_bytes,
            usage: g.md.usage(),
            held_metadata_root: g.md.held_root(),
            mode: g.mode,
            mode_reason: g.reason.clone(),
            opened_read_only: g.md.options().read_only,
            needs_check: g.md.needs_check(),
            rolled_back: g.rolled_back.is_some(),
            devices: g.md.devices().len(),
            uncommitted_changes: g.md.is_dirty(),
        }
    }

    /// [`flush`](Self::flush), then gives the space the commit freed back to the host
    /// ([`pass_down`](Self::pass_down): unless another thread is at it, which then does).
    pub fn commit(&self) -> Result<()> {
        self.flush()?;
        self.pass_down();
        Ok(())
    }

    /// Flushes the data device, then commits the metadata (see
    /// [`commit_held`](Self::commit_held)): every write completed before the call is
    /// durable after it. Does nothing when nothing changed since the last commit. It waits
    /// for nothing more: the space the commit frees is given back to the host later
    /// ([`pass_down`](Self::pass_down)), as dm-thin's FLUSH does not wait for its passdown.
    ///
    /// The data flush runs without the metadata lock, so lookups and in-place writes go on
    /// during it; only new mappings wait (their data might otherwise miss the flush while
    /// their mapping makes the commit). The metadata writes then run under the lock.
    pub fn flush(&self) -> Result<()> {
        // Written back before taking the commit lock: a change that holds commits (and
        // perhaps a guest's writes) while it waits for this one then waits for a short flush,
        // not for all the data written since the last commit.
        self.write_back()?;
        let _one_at_a_time = self.hold_commits();
        self.commit_held()
    }

    /// The periodic commit (dm-thin's, once a second): a commit when the metadata changed
    /// since the last one (a block provisioned, a shared block copied, a discard), with the
    /// data sync that must come first; nothing otherwise. Data overwritten in place, with no
    /// mapping changed, waits for the next FLUSH or commit, as in the kernel, which commits
    /// on time only what changed in the transaction. (A sync of the whole data file every
    /// second, under an overwriting guest, is a second's worth of its writes written back
    /// while it writes on.) An operation that changes the metadata just after the check
    /// is the next period's. Like a FLUSH ([`flush`](Self::flush)) it leaves the space it
    /// frees to [`pass_down`](Self::pass_down), so that a large passdown does not hold the
    /// next period's commit back.
    pub fn commit_if_changed(&self) -> Result<()> {
        if !self.lock().md.is_dirty() {
            return Ok(());
        }
        self.flush()
    }

    /// Keeps every other commit (periodic, a guest's FLUSH, …) out until the hold is
    /// dropped, for a change of several steps that must reach the disk in one commit or
    /// not at all: device operations plus a file written beside the pool (the registry)
    /// whose transaction id the commit carries. Without it a commit from another thread
    /// could land between the steps and make half of the change durable under the old
    /// transaction id. Block I/O goes on meanwhile; only commits wait.
    ///
    /// A data-path change that finds the journal full meanwhile waits for the hold to end
    /// ([`Pool::meta_waiting_for_commit`]), with the block I/O it is part of still in
    /// flight. So a holder must not wait for block I/O (drain a disk, close a device's
    /// gate for writes in flight) while it holds commits: it waits for that first.
    pub fn hold_commits(&self) -> CommitHold<'_> {
        let one_at_a_time = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.held(one_at_a_time)
    }

    /// [`Pool::hold_commits`] if no other thread holds them (a commit under way): for a
    /// caller that holds something up meanwhile and would rather let go while it waits.
    pub fn try_hold_commits(&self) -> Option<CommitHold<'_>> {
        let one_at_a_time = match self.commit_lock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(self.held(one_at_a_time))
    }

    fn held<'a>(&'a self, one_at_a_time: MutexGuard<'a, ()>) -> CommitHold<'a> {
        self.lock().commits_held_by = Some(std::thread::current().id());
        CommitHold {
            pool: self,
            one_at_a_time: Some(one_at_a_time),
        }
    }

    /// Writes back the data written since the last commit, without holding anything up:
    /// for a caller about to hold writes across a commit (a snapshot of a running disk),
    /// so that the commit then has little left to flush. A write-back error fails the pool
    /// as a failed flush does.
    pub fn write_back(&self) -> Result<()> {
        if !self.data_written.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.write_back_all()
    }

    /// Writes back whatever of the data device is dirty, even when nothing was written
    /// since the last commit: that commit's data sync may still be under way (it waits for
    /// that), and a caller that must know its own writes are out cannot skip it.
    pub fn write_back_all(&self) -> Result<()> {
        Self::check_not_failed(&self.lock())?;
        self.flush_device(|d| d.writeback())
            .map_err(|source| Self::flush_failed(&mut self.lock(), source))
    }

    /// The commit itself, with commits held, in three steps so that it holds no guest
    /// write for longer than it takes to switch transactions:
    ///
    /// 1. under the metadata lock, the transaction is frozen and the next one begins
    ///    ([`ThinMetadata::freeze_commit`]): its metadata blocks go to the page cache, its
    ///    superblock is built;
    /// 2. without the lock (lookups, writes and new mappings go on, in the next
    ///    transaction) the data device is synced (every block the frozen transaction maps
    ///    was written before its mapping was made), then the frozen metadata and its
    ///    superblock ([`FrozenCommit::write`]);
    /// 3. under the lock again, the frozen transaction is marked durable.
    ///
    /// A FLUSH commits this way and so waits for the commit that covers the writes it
    /// vouches for, not for writes made after it. Callers write the data back first
    /// ([`Pool::write_back`]) so that the sync has little left to do.
    fn commit_held(&self) -> Result<()> {
        let t0 = Instant::now();
        let frozen = {
            let mut g = self.lock();
            Self::check_not_failed(&g)?;
            Self::check_not_rolled_back(&g)?;
            let frozen = if g.md.is_dirty() {
                Self::check_writable(&g)?;
                match g.md.freeze_commit() {
                    Ok(f) => f,
                    Err(e) => {
                        Self::metadata_failed(&mut g, &e);
                        return Err(e);
                    }
                }
            } else {
                None
            };
            g.flipping = frozen.is_some();
            frozen
        };
        let t_frozen = t0.elapsed();
        // Taken after the freeze: a write completing after this point sets it again and is
        // flushed next time; every write completed before the FLUSH was issued is covered,
        // and so is the data of every mapping in the frozen transaction.
        let data_dirty = self.data_written.swap(false, Ordering::SeqCst);
        if frozen.is_none() && !data_dirty {
            return Ok(());
        }
        // Overwrites in place change no metadata, but a FLUSH must still make them durable.
        let synced = self.flush_device(|d| d.sync());
        let written = match (&synced, &frozen) {
            (Ok(()), Some(f)) => f.write(),
            _ => Ok(()),
        };
        let t_written = t0.elapsed();
        let mut g = self.lock();
        g.flipping = false;
        let r = match (synced, frozen) {
            (Err(source), _) => Err(Self::flush_failed(&mut g, source)),
            (Ok(()), None) => Ok(()),
            (Ok(()), Some(frozen)) => match written {
                // Rolls back to whichever superblock reached the disk.
                Err(e) => {
                    Self::metadata_failed(&mut g, &e);
                    Err(e)
                }
                Ok(()) => {
                    g.md.commit_durable(frozen);
                    Ok(())
                }
            },
        };
        tracing::debug!(
            "commit: transaction frozen in {t_frozen:?} (metadata locked), durable after {t_written:?}"
        );
        // The data blocks this commit freed are withheld from allocation until given back
        // to the host (`pass_down`), outside the commit.
        self.note_freed(&g);
        if let Some(why) = g.failed_while_flipping.take() {
            // The rollback that failure called for (unless the commit failed too: then the
            // pool has failed, or has rolled back already). The blocks stay free in what
            // it reopens (the commit above is durable), and nothing allocates after it.
            if r.is_ok() {
                Self::metadata_failed(&mut g, &Error::Failed(why));
            }
        }
        r
    }

    /// Drops every change since the last commit (the kernel's abort).
    pub fn abort(&self) -> Result<()> {
        // From here a write that finds the journal full gives up rather than wait for
        // commits to be let go (its transaction is about to be dropped): the abort holds
        // commits below and then waits for that write's I/O.
        self.lock().aborting += 1;
        self.commit_ended.notify_all();
        // Not during a commit's superblock write: the abort reopens from the disk.
        let _no_commit = self.hold_commits();
        // Wait for block I/O in flight: it may target blocks the abort frees.
        let _quiet = self.io_epoch.write().unwrap_or_else(|p| p.into_inner());
        let mut g = self.lock();
        g.aborting -= 1;
        g.generation += 1;
        if let Err(e) = g.md.abort() {
            g.mode = PoolMode::Fail;
            g.reason = Some(format!("abort failed: {e}"));
            return Err(e);
        }
        // Asked for: the dropped changes must not come back at the next open.
        g.md.void_journal()
    }

    /// Runs `f` with the metadata locked (checker, dump, tests).
    pub fn with_metadata<T>(&self, f: impl FnOnce(&mut ThinMetadata) -> T) -> T {
        f(&mut self.lock().md)
    }

    // ----- data path -----

    /// Looks up a block with the metadata locked; a metadata error rolls back.
    fn lookup_locked(g: &mut Inner, dev: u32, vb: u64) -> Result<(Option<Mapping>, DeviceDetails)> {
        Self::check_not_failed(g)?;
        let details = g.md.device(dev)?;
        match g.md.lookup(dev, vb) {
            Ok(m) => Ok((m, details)),
            Err(e) => {
                if e.is_metadata_failure() && g.mode == PoolMode::Write {
                    Self::metadata_failed(g, &e);
                }
                Err(e)
            }
        }
    }

    /// Reads `buf.len()` bytes of device `dev` at byte `offset`; unmapped blocks read from
    /// the device's external origin, or as zeroes when it has none.
    pub fn read(&self, dev: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_vectored(dev, offset, &mut [IoSliceMut::new(buf)])
    }

    pub fn read_vectored(&self, dev: u32, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_span(offset, total)?;
        let bs = self.block_bytes;
        for BlockPiece {
            pos,
            vb,
            within,
            len: n,
        } in block_pieces(bs, offset, total)
        {
            // One buffer (the common case: a request's one data segment): the piece of it
            // for this block, on the stack; several: a Vec of the pieces.
            let (mut one, mut many);
            let segs: &mut [IoSliceMut<'_>] = if let [b] = bufs {
                one = [IoSliceMut::new(&mut b[pos as usize..(pos + n) as usize])];
                &mut one
            } else {
                many = slices_mut(bufs, pos as usize, n as usize);
                &mut many
            };
            let _epoch = self.io_epoch.read().unwrap_or_else(|p| p.into_inner());
            let _cell = self.cells.lock(dev, vb, false);
            let (mapping, origin) = {
                // The lock is dropped before the data I/O.
                let mut g = self.lock();
                let m = Self::lookup_locked(&mut g, dev, vb)?.0;
                let o = if m.is_none() { g.origin(dev) } else { None };
                (m, o)
            };
            match (mapping, origin) {
                (Some(m), _) => {
                    let at = m.data_block * bs + within;
                    self.data
                        .read_vectored_at(segs, at)
                        .map_err(Self::data_err("read", at))?;
                }
                (None, Some(o)) => {
                    let at = vb * bs + within;
                    o.read_vectored_at(segs, at).map_err(Self::origin_err(at))?;
                }
                (None, None) => segs.iter_mut().for_each(|s| s.fill(0)),
            }
        }
        Ok(())
    }

    /// Writes `buf` to device `dev` at byte `offset`.
    pub fn write(&self, dev: u32, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_vectored(dev, offset, &[IoSlice::new(buf)])
    }

    pub fn write_vectored(&self, dev: u32, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_span(offset, total)?;
        let gate = self.gate(dev);
        let _in_flight = Self::enter_gate(&gate, dev)?;
        let bs = self.block_bytes;
        for BlockPiece {
            pos,
            vb,
            within,
            len: n,
        } in block_pieces(bs, offset, total)
        {
            // As in read_vectored: one buffer needs no Vec of pieces.
            let (one, many);
            let segs: &[IoSlice<'_>] = if let [b] = bufs {
                one = [IoSlice::new(&b[pos as usize..(pos + n) as usize])];
                &one
            } else {
                many = slices(bufs, pos as usize, n as usize);
                &many
            };
            self.write_block(dev, vb, within, segs, false)?;
        }
        Ok(())
    }

    /// Writes `segs` (together less than a block) at `within` of virtual block `vb`.
    /// With `only_if_mapped` (the bytes are zeroes), an unmapped block is left alone where
    /// it reads as zeroes already: without an external origin, or past the origin's end.
    fn write_block(
        &self,
        dev: u32,
        vb: u64,
        within: u64,
        segs: &[IoSlice<'_>],
        only_if_mapped: bool,
    ) -> Result<()> {
        let bs = self.block_bytes;
        let len: u64 = segs.iter().map(|s| s.len() as u64).sum();
        let whole = within == 0 && len == bs;
        let _epoch = self.io_epoch.read().unwrap_or_else(|p| p.into_inner());
        let _cell = self.cells.lock(dev, vb, true);
        let mut g = self.lock();
        let (m, details) = Self::lookup_locked(&mut g, dev, vb)?;
        let target = match m {
            Some(m) if !m.maybe_shared(&details) => WriteKind::InPlace(m.data_block),
            None => {
                let origin = g.origin(dev);
                let reads_zeroes = origin.as_ref().is_none_or(|o| o.len() <= vb * bs + within);
                if only_if_mapped && reads_zeroes {
                    return Ok(());
                }
                WriteKind::Provision(origin)
            }
            Some(m) => WriteKind::BreakSharing(m.data_block),
        };
        if let WriteKind::InPlace(b) = target {
            drop(g);
            let at = b * bs + within;
            self.data
                .write_vectored_at(segs, at)
                .map_err(Self::data_err("write", at))?;
            // Only once the write is done: a commit that cleared the flag while it was
            // under way may have synced before it landed, so the next FLUSH must sync.
            self.data_written.store(true, Ordering::SeqCst);
            return Ok(());
        }
        let (mut g, new) = self.alloc_data(g);
        let new = new?;
        let hole = g.holes.take(new);
        let generation = g.generation;
        drop(g);
        let new = NewBlock {
            block: new,
            hole,
            generation,
        };
        self.write_new_block(dev, vb, within, segs, whole, target, new)
    }

    fn alloc_data<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inner>,
    ) -> (MutexGuard<'a, Inner>, Result<u64>) {
        let ood = |r: &Result<u64>| matches!(r, Err(Error::OutOfDataSpace { .. }));
        let generation = g.generation;
        loop {
            let r = self.meta(&mut g, |md| md.alloc_data_block());
            if !ood(&r) {
                return (g, r);
            }
            if g.md.has_freed_data() {
                // Freed by a durable commit, waiting to be given back to the host.
                let r = self.take_back_a_freed_block(&mut g);
                return (g, r);
            }
            if g.md.pending_data_frees() > 0 {
                // Blocks freed in this transaction become usable once it is committed
                // (withheld then, and taken back above).
                match self.commit_locked(&mut g) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => return (g, Err(e)),
                }
            }
            if g.md.withheld_data_blocks() == 0 {
                return (g, r);
            }
            // Freed blocks being punched by another thread: each becomes usable when its
            // piece is over.
            let withheld = g.md.withheld_data_blocks();
            g = self.wait_for_a_commit_to_end(g, |g| {
                g.md.withheld_data_blocks() < withheld
                    || g.md.has_freed_data()
                    || g.generation != generation
            });
            if g.generation != generation {
                return (g, Err(Error::ReadOnly("the transaction was rolled back")));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write_new_block(
        &self,
        dev: u32,
        vb: u64,
        within: u64,
        segs: &[IoSlice<'_>],
        whole: bool,
        target: WriteKind,
        new: NewBlock,
    ) -> Result<()> {
        let NewBlock {
            block: new,
            hole,
            generation,
        } = new;
        let bs = self.block_bytes;
        let at = new * bs;
        let io = (|| -> Result<()> {
            if whole {
                return self
                    .data
                    .write_vectored_at(segs, at)
                    .map_err(Self::data_err("write", at));
            }
            match target {
                WriteKind::BreakSharing(old) => {
                    // Copy the old block, overlay the new bytes, write the whole block.
                    let mut buf = vec![0u8; bs as usize];
                    self.data
                        .read_at(&mut buf, old * bs)
                        .map_err(Self::data_err("read", old * bs))?;
                    self.write_overlaid(buf, within, segs, at)
                }
                WriteKind::Provision(Some(origin)) => {
                    // As above, from the origin: the block must read as it did before the
                    // write wherever the write does not reach. Not subject to
                    // skip_block_zeroing, which is about stale data, not correctness.
                    let mut buf = vec![0u8; bs as usize];
                    origin
                        .read_at(&mut buf, vb * bs)
                        .map_err(Self::origin_err(vb * bs))?;
                    self.write_overlaid(buf, within, segs, at)
                }
                // A hole reads as zeroes already; with skip_block_zeroing, stale bytes
                // are accepted.
                _ if self.opts.skip_block_zeroing || hole => self
                    .data
                    .write_vectored_at(segs, at + within)
                    .map_err(Self::data_err("write", at + within)),
                _ => {
                    // The block reads as zeroes without writing them where the data device
                    // can (a file's FALLOC_FL_ZERO_RANGE, measured cheaper than writing
                    // the zeroes: docs/BENCHMARKS.md), then only the data is written.
                    if self.zero_range_works.load(Ordering::Relaxed) {
                        match self.data.zero_range(at, bs) {
                            Ok(true) => {
                                return self
                                    .data
                                    .write_vectored_at(segs, at + within)
                                    .map_err(Self::data_err("write", at + within))
                            }
                            Ok(false) => self.zero_range_works.store(false, Ordering::Relaxed),
                            Err(e) => return Err(Self::data_err("zero", at)(e)),
                        }
                    }
                    // Zero the rest of the new block in the same write.
                    let len: u64 = segs.iter().map(|s| s.len() as u64).sum();
                    let mut iov: Vec<IoSlice<'_>> = Vec::new();
                    self.push_zeroes(&mut iov, within);
                    iov.extend_from_slice(segs);
                    self.push_zeroes(&mut iov, bs - within - len);
                    self.data
                        .write_vectored_at(&iov, at)
                        .map_err(Self::data_err("write", at))
                }
            }
        })();
        let mut g = self.lock();
        if g.generation != generation {
            // An abort in between already forgot the allocation.
            return io.and(Err(Error::ReadOnly("the transaction was rolled back")));
        }
        if io.is_ok() {
            self.data_written.store(true, Ordering::SeqCst);
        }
        let r = match io {
            Ok(()) => {
                let (g2, r) =
                    self.meta_waiting_for_commit(g, dev, |md| md.insert_mapping(dev, vb, new));
                g = g2;
                r
            }
            Err(e) => Err(e),
        };
        if r.is_err() && g.generation == generation {
            // Not written or not mapped (e.g. out of metadata space): give the block back,
            // directly (a pool set read-only meanwhile must not keep it allocated). After
            // an abort there is nothing to give back.
            if let Err(e2) = g.md.release_data_block(new) {
                tracing::error!("releasing data block {new} after a failed write: {e2}");
            }
        }
        r
    }

    /// Overlays `segs` at `within` of a copy of a block's old contents and writes the
    /// whole block at `at` of the data device.
    fn write_overlaid(
        &self,
        mut buf: Vec<u8>,
        within: u64,
        segs: &[IoSlice<'_>],
        at: u64,
    ) -> Result<()> {
        let mut o = within as usize;
        for s in segs {
            buf[o..o + s.len()].copy_from_slice(s);
            o += s.len();
        }
        self.data
            .write_at(&buf, at)
            .map_err(Self::data_err("write", at))
    }

    fn push_zeroes<'a>(&'a self, iov: &mut Vec<IoSlice<'a>>, mut n: u64) {
        while n > 0 {
            let k = n.min(self.zeroes.len() as u64);
            iov.push(IoSlice::new(&self.zeroes[..k as usize]));
            n -= k;
        }
    }

    /// Unmaps the whole blocks in the range, as dm-thin does: partial blocks at either end
    /// are left alone, and a block shared with a snapshot stays mapped there.
    /// Returns the number of blocks unmapped. On a device with an external origin the
    /// unmapped blocks read from the origin again (as in the kernel): a discard does not
    /// promise zeroes; [`Self::write_zeroes`] does.
    pub fn discard(&self, dev: u32, offset: u64, len: u64) -> Result<u64> {
        check_span(offset, len)?;
        let bs = self.block_bytes;
        let first = offset.div_ceil(bs);
        let end = (offset + len) / bs;
        self.unmap_blocks(dev, first, end)
    }

    fn unmap_blocks(&self, dev: u32, first: u64, end: u64) -> Result<u64> {
        if first >= end {
            self.device(dev)?;
            return Ok(0);
        }
        let gate = self.gate(dev);
        let _in_flight = Self::enter_gate(&gate, dev)?;
        self.unmap_blocks_entered(dev, first, end)
    }

    /// [`Self::unmap_blocks`] for a caller that has entered the device's gate (entering
    /// again could deadlock behind a change waiting to close it).
    fn unmap_blocks_entered(&self, dev: u32, first: u64, end: u64) -> Result<u64> {
        let mut removed = 0;
        let mut next = first;
        while next < end {
            // Find the next mapped block, then take its cell and unmap it.
            let k = {
                let mut g = self.lock();
                match self.meta(&mut g, |md| md.next_mapped(dev, next, end))? {
                    Some(k) => k,
                    None => break,
                }
            };
            let _epoch = self.io_epoch.read().unwrap_or_else(|p| p.into_inner());
            let _cell = self.cells.lock(dev, k, true);
            let g = self.lock();
            removed += self
                .meta_waiting_for_commit(g, dev, |md| md.remove_mapping(dev, k))
                .1? as u64;
            next = k + 1;
        }
        Ok(removed)
    }

    /// Makes the range read as zeroes. With `unmap`, whole blocks are unmapped (their space
    /// returns to the pool); otherwise mapped blocks are overwritten with zeroes. Partial
    /// blocks are zeroed where mapped; unmapped blocks already read as zeroes.
    ///
    /// On a device with an external origin, an unmapped block reads the origin's bytes:
    /// where the origin has any in the range, blocks are provisioned and zeroed instead
    /// (unmapping would bring the origin's bytes back); past the origin's end the above
    /// holds.
    pub fn write_zeroes(&self, dev: u32, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_span(offset, len)?;
        let bs = self.block_bytes;
        let end = offset + len;
        // Entered once for the whole range: a snapshot settles only once all of it is
        // done, and a change of origin waits for it.
        let gate = self.gate(dev);
        let _in_flight = Self::enter_gate(&gate, dev)?;
        // Read under the gate: a change of origin waits for it.
        let origin_end = self.external_origin(dev).map_or(0, |o| o.len());
        let mut pos = offset;
        while pos < end {
            let (vb, within) = (pos / bs, pos % bs);
            let n = (bs - within).min(end - pos);
            if n == bs && unmap && pos >= origin_end {
                // Run of whole blocks.
                let last = end / bs;
                self.unmap_blocks_entered(dev, vb, last)?;
                pos = last * bs;
                continue;
            }
            let mut segs = Vec::new();
            self.push_zeroes(&mut segs, n);
            self.write_block(dev, vb, within, &segs, true)?;
            pos += n;
        }
        Ok(())
    }
}

/// A piece of a byte range that falls in one pool block (see [`block_pieces`]).
pub struct BlockPiece {
    /// Bytes of the range before the piece.
    pub pos: u64,
    /// The virtual block, and where in it the piece begins.
    pub vb: u64,
    pub within: u64,
    pub len: u64,
}

/// The pieces, in order, of the `len` bytes at `offset` that fall in one block of
/// `block_bytes` each.
pub fn block_pieces(block_bytes: u64, offset: u64, len: u64) -> impl Iterator<Item = BlockPiece> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        (pos < len).then(|| {
            let off = offset + pos;
            let (vb, within) = (off / block_bytes, off % block_bytes);
            let piece = BlockPiece {
                pos,
                vb,
                within,
                len: (block_bytes - within).min(len - pos),
            };
            pos += piece.len;
            piece
        })
    })
}

/// The largest thin device served, in bytes: 4 EiB (2^62). Every byte range a device is
/// read or written by must end at or below it (see `check_span`), so that offset
/// arithmetic (`offset + len`, `virtual block * block size + within`) cannot overflow
/// a u64; virtual block numbers (the mapping tree's keys, u64) are then below 2^62 / 64 KiB,
/// far from their limit, and the size in 512-byte sectors (virtio-blk's capacity, the
/// kernel's sector_t) fits too. Disk sizes are checked against it where they are asked for.
pub const MAX_DEVICE_BYTES: u64 = 1 << 62;

fn check_span(offset: u64, len: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|e| e > MAX_DEVICE_BYTES) {
        return Err(Error::InvalidArgument(format!(
            "range of {len} bytes at {offset} is beyond any device"
        )));
    }
    Ok(())
}

/// Sub-slices covering bytes `[pos, pos + n)` of the concatenation of `bufs`, ready for
/// vectored I/O.
fn slices<'a>(bufs: &'a [IoSlice<'_>], mut pos: usize, mut n: usize) -> Vec<IoSlice<'a>> {
    let mut out = Vec::new();
    for b in bufs {
        if n == 0 {
            break;
        }
        if pos >= b.len() {
            pos -= b.len();
            continue;
        }
        let k = (b.len() - pos).min(n);
        out.push(IoSlice::new(&b[pos..pos + k]));
        n -= k;
        pos = 0;
    }
    out
}

fn slices_mut<'a>(
    bufs: &'a mut [IoSliceMut<'_>],
    mut pos: usize,
    mut n: usize,
) -> Vec<IoSliceMut<'a>> {
    let mut out = Vec::new();
    for b in bufs.iter_mut() {
        if n == 0 {
            break;
        }
        if pos >= b.len() {
            pos -= b.len();
            continue;
        }
        let k = (b.len() - pos).min(n);
        out.push(IoSliceMut::new(&mut b[pos..pos + k]));
        n -= k;
        pos = 0;
    }
    out
}

mod gate;
#[cfg(test)]
mod origin_tests;
mod passdown;
#[cfg(test)]
mod tests;
