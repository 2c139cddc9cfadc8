//! Discard passdown: giving the space of freed data blocks back to the host, as dm-thin
//! does unless `no_discard_passdown` (hole punches in a data file, discards on a block
//! device).
//!
//! A durable commit withholds the data blocks it freed from allocation
//! ([`ThinMetadata::set_withhold_freed_data`]): nothing writes them until they are punched,
//! and no crash can bring back a mapping to them. [`Pool::pass_down`] punches them and
//! releases them a piece at a time. It runs outside the commit: a commit, a FLUSH among
//! them ([`Pool::flush`] never punches), waits for the piece being punched at most (no
//! punch runs during a flush of the data device), and a guest's request only for the
//! metadata lock, briefly, per piece. A large deletion given back over seconds or minutes
//! holds nothing up for longer than that. A full
//! pool takes back a block not being punched yet, unpunched, for each new block it needs,
//! and waits for the piece being punched if that is all (`Pool::alloc_data`). An abort
//! keeps them withheld ([`ThinMetadata::abort`]). What a stopped process did not give
//! back is found again by [`Pool::reclaim_free_space`].
//!
//! [`ThinMetadata::set_withhold_freed_data`]: crate::thin::metadata::ThinMetadata::set_withhold_freed_data
//! [`ThinMetadata::abort`]: crate::thin::metadata::ThinMetadata::abort

use super::{Inner, Pool, PoolMode};
use crate::storage::Punched;
use crate::Result;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The most one punch gives back at a time (discard passdown) where the storage is a file: a
/// hole punch holds the file's inode lock throughout, which the guests' writes into the
/// file wait for, and punching costs about a quarter of a millisecond per MiB on ext4 (a
/// 1 GiB run in one punch held them for 180–295 ms: docs/BENCHMARKS.md, "A receive into a
/// busy pool").
pub const PUNCH_PIECE_BYTES: u64 = 1 << 20;

/// Punches go on back to back for this long, then pause for [`PUNCH_PAUSE`]: a writer that
/// waited for the file's lock is woken when a punch lets it go, but the next punch takes
/// the lock again before that writer has run. Many small runs (a device of scattered
/// blocks) then cost no more than a pause per half millisecond of punching. A pause lasts
/// at least [`PUNCH_PAUSE`]: about twice that with the default timer slack of the thread
/// that punches.
const PUNCH_RUN: Duration = Duration::from_micros(500);
const PUNCH_PAUSE: Duration = Duration::from_micros(50);

/// A pool closed gives back the space its durable commits freed that nobody gave back
/// yet ([`Pool::flush`] and [`crate::pool::CommitHold::commit`] leave it).
impl Drop for Pool {
    fn drop(&mut self) {
        if self.pass_down_on_drop.load(Ordering::SeqCst) {
            self.pass_down();
        }
    }
}

/// The most runs of free blocks [`Pool::reclaim_free_space`] withholds at a time: an
/// allocation steps over every withheld run past the space map's cursor, and the free space
/// of a pool can be in millions of runs.
const RECLAIM_RUNS: usize = 64;

/// The most free blocks [`Pool::reclaim_free_space`] looks at per call, with the metadata
/// lock held (every guest request waits for it): a few milliseconds' worth.
const RECLAIM_SCAN: u64 = 1 << 16;

/// How long a punch lets flushes of the data device waiting go first, at most: a steady
/// stream of them must not keep the space from coming back.
const FLUSHES_FIRST: Duration = Duration::from_millis(10);

/// Lowers [`Inner::passing_down`] if [`Pool::pass_down`] unwinds.
struct PassingDown<'a>(Option<&'a Pool>);

impl Drop for PassingDown<'_> {
    fn drop(&mut self) {
        if let Some(pool) = self.0 {
            pool.lock().passing_down = false;
            pool.freed.notify_all();
        }
    }
}

impl Pool {
    /// Gives the space of the data blocks durable commits freed back to the host, unless
    /// another thread is at it: that one then gives back these too. Commits, a FLUSH among
    /// them, go on meanwhile. A failed punch is logged, not returned: the space is only not
    /// given back.
    pub fn pass_down(&self) {
        {
            let mut g = self.lock();
            if g.passing_down {
                return;
            }
            g.passing_down = true;
        }
        let mut unwinding = PassingDown(Some(self));
        loop {
            let runs = {
                let mut g = self.lock();
                let runs = g.md.take_freed_data();
                if runs.is_empty() {
                    // With the last look: a commit that frees more after it finds the
                    // flag down, and passes down itself (or wakes the thread waiting).
                    g.passing_down = false;
                    self.freed.notify_all();
                    unwinding.0 = None;
                    return;
                }
                runs
            };
            self.give_back(&runs);
        }
    }

    /// Dropping the pool leaves the freed space nobody gave back yet, which may take
    /// minutes to punch, to the next open's [`reclaim_free_space`](Self::reclaim_free_space):
    /// for a daemon stopping.
    pub fn leave_passdown_to_next_start(&self) {
        self.pass_down_on_drop.store(false, Ordering::SeqCst);
    }

    /// [`pass_down`](Self::pass_down), after waiting for a thread at it to end: for the
    /// thread that gives back what [`reclaim_free_space`](Self::reclaim_free_space) lists,
    /// a batch at a time.
    pub fn pass_down_waiting(&self) {
        drop(
            self.freed
                .wait_while(self.lock(), |g| g.passing_down)
                .unwrap_or_else(|p| p.into_inner()),
        );
        self.pass_down();
    }

    /// Lists for [`pass_down`](Self::pass_down) free data blocks from `from` on whose
    /// range in the data file is not known to be a hole (see [`RECLAIM_RUNS`]): space a
    /// passdown did not finish (a daemon stops without waiting for it, and a crash stops
    /// it too; what was listed is in memory only), or that the file held when the pool was
    /// made. Returns how many blocks, and where to go on once they are given back (None:
    /// all done). For a pool that passes down, in write mode, on storage that can tell its
    /// holes (a file); nothing otherwise. Until given back the blocks are withheld, as
    /// freed ones are: a write in a full pool takes one back.
    pub fn reclaim_free_space(&self, from: u64) -> (u64, Option<u64>) {
        if self.opts.read_only || !self.opts.discard_passdown {
            return (0, None);
        }
        let mut g = self.lock();
        if g.mode != PoolMode::Write || !g.holes.known {
            return (0, None);
        }
        let Inner { md, holes, .. } = &mut *g;
        let r = md.withhold_free_data(from, RECLAIM_RUNS, RECLAIM_SCAN, |b| !holes.contains(b));
        self.note_freed(&g);
        r
    }

    /// Waits until durable commits have freed data blocks that no thread is giving back,
    /// or `timeout` passes; whether there are (for a thread that calls
    /// [`pass_down`](Self::pass_down) then, so that the commits themselves need not).
    pub fn wait_for_freed_space(&self, timeout: Duration) -> bool {
        let work = |g: &Inner| g.md.has_freed_data() && !g.passing_down;
        let g = self.lock();
        let (g, _) = self
            .freed
            .wait_timeout_while(g, timeout, |g| !work(g))
            .unwrap_or_else(|p| p.into_inner());
        work(&g)
    }

    /// After a commit: wakes [`wait_for_freed_space`](Self::wait_for_freed_space) if it
    /// freed data blocks.
    pub(super) fn note_freed(&self, g: &Inner) {
        if g.md.has_freed_data() {
            self.freed.notify_all();
        }
    }

    /// For a write in a full pool: one of the blocks durable commits freed that no thread
    /// is punching yet becomes allocatable at once, unpunched (the write takes its space
    /// again anyway), and is allocated. The rest stay to be given back.
    pub(super) fn take_back_a_freed_block(&self, g: &mut Inner) -> Result<u64> {
        g.md.take_back_a_freed_data_block();
        self.meta(g, |md| md.alloc_data_block())
    }

    /// Punches the runs [`take_freed_data`] gave, a piece at a time on a file, and releases
    /// each piece once it is punched (a hole from then on, if the punch made one).
    /// Nothing is punched in a failed pool, nor after the storage said it cannot; the rest
    /// of a run whose punch failed is released unpunched.
    ///
    /// [`take_freed_data`]: crate::thin::metadata::ThinMetadata::take_freed_data
    fn give_back(&self, runs: &[(u64, u64)]) {
        let bs = self.block_bytes;
        // A file: a piece at a time (at least a block), so that its lock is let go between,
        // and now and then for long enough that a writer waiting for it takes it.
        let file = self.data.punch_blocks_writes();
        let piece = if file {
            (PUNCH_PIECE_BYTES / bs).max(1)
        } else {
            u64::MAX
        };
        // False once the storage said it cannot.
        let mut punching = true;
        let mut since_pause = Instant::now();
        // Whether to punch the piece at `at` of a run: not in a failed pool, nor where the
        // run is no longer withheld (an abort's reload found its blocks not free, which no
        // durable commit allows). Asked with the lock that releases the piece before.
        let may_punch =
            |g: &Inner, at: u64| g.mode != PoolMode::Fail && g.md.withheld_data_run_at(at);
        for &(start, end) in runs {
            let mut this_run = may_punch(&self.lock(), start);
            let mut at = start;
            while at < end {
                this_run &= punching;
                let to = if this_run {
                    at.saturating_add(piece).min(end)
                } else {
                    end
                };
                let mut hole = false;
                if this_run {
                    if file && since_pause.elapsed() >= PUNCH_RUN {
                        std::thread::sleep(PUNCH_PAUSE);
                        since_pause = Instant::now();
                    }
                    // On a file, not during a flush of the data device, and after those
                    // waiting: on ext4 a punch started during a sync waits for the sync's
                    // journal commit with the file's lock held, and every guest write with
                    // it (docs/BENCHMARKS.md, "The passdown outside the commit"). A flush
                    // then waits for one piece at most. A block device's discard goes
                    // whole, and takes no lock a flush needs.
                    let no_flush = file.then(|| {
                        let since = Instant::now();
                        while self.flushes_waiting.load(Ordering::SeqCst) > 0
                            && since.elapsed() < FLUSHES_FIRST
                        {
                            std::thread::sleep(PUNCH_PAUSE);
                        }
                        self.data_flush.lock().unwrap_or_else(|p| p.into_inner())
                    });
                    let punched = self.data.punch(at * bs, (to - at) * bs);
                    drop(no_flush);
                    match punched {
                        Ok(Punched::Hole) => hole = true,
                        Ok(Punched::Discarded) => {}
                        Ok(Punched::Unsupported) => punching = false,
                        Err(e) => {
                            tracing::warn!(
                                "discard passdown of data blocks {at}..{end} failed: {e}; \
                                 their space stays allocated"
                            );
                            this_run = false;
                        }
                    }
                }
                let mut g = self.lock();
                if hole {
                    g.holes.set_range(at, to);
                }
                g.md.release_withheld_data(&[(at, to)]);
                this_run &= to == end || may_punch(&g, to);
                // A write in a full pool may be waiting for the piece (`alloc_data`).
                if g.waiting_for_commit > 0 {
                    self.commit_ended.notify_all();
                }
                drop(g);
                at = to;
            }
        }
    }
}
