//! Discard passdown: giving the space of freed data blocks back to the host, as dm-thin
//! does unless `no_discard_passdown` (hole punches in a data file, discards on a block
//! device).
//!
//! A durable commit withholds the data blocks it freed from allocation
//! ([`ThinMetadata::set_withhold_freed_data`]): nothing writes them until they are punched,
//! and no crash can bring back a mapping to them. [`Pool::pass_down`] punches them and
//! releases them a piece at a time. It runs outside the commit and holds no lock a commit
//! or a guest's request waits for (only the metadata lock, briefly, per piece), so a large
//! deletion given back over seconds holds no FLUSH; a full pool takes back the blocks not
//! yet being punched at once, unpunched, and waits for the piece being punched
//! (`Pool::alloc_data`). An abort keeps them withheld ([`ThinMetadata::abort`]).
//!
//! [`ThinMetadata::set_withhold_freed_data`]: crate::thin::metadata::ThinMetadata::set_withhold_freed_data
//! [`ThinMetadata::abort`]: crate::thin::metadata::ThinMetadata::abort

use super::{Inner, Pool, PoolMode};
use crate::storage::Punched;
use crate::Result;
use std::sync::TryLockError;
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
/// yet (a change that held commits leaves it, see [`crate::pool::CommitHold::commit`]).
impl Drop for Pool {
    fn drop(&mut self) {
        self.pass_down();
    }
}

impl Pool {
    /// Gives the space of the data blocks durable commits freed back to the host, unless
    /// another thread is at it: that one then gives back these too. Commits, a FLUSH among
    /// them, go on meanwhile. A failed punch is logged, not returned: the space is only not
    /// given back.
    pub fn pass_down(&self) {
        loop {
            let giving_back = match self.passdown.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            loop {
                let runs = self.lock().md.take_freed_data();
                if runs.is_empty() {
                    break;
                }
                self.give_back(&runs);
            }
            drop(giving_back);
            // Freed after the last look, by a commit that found this thread at it.
            if !self.lock().md.has_freed_data() {
                return;
            }
        }
    }

    /// Waits until a durable commit has freed data blocks not given back yet, or `timeout`
    /// passes; whether there are (for a thread that calls [`pass_down`](Self::pass_down)
    /// when there are, so that the commits themselves need not).
    pub fn wait_for_freed_space(&self, timeout: Duration) -> bool {
        let g = self.lock();
        let (g, _) = self
            .freed
            .wait_timeout_while(g, timeout, |g| !g.md.has_freed_data())
            .unwrap_or_else(|p| p.into_inner());
        g.md.has_freed_data()
    }

    /// After a commit: wakes [`wait_for_freed_space`](Self::wait_for_freed_space) if it
    /// freed data blocks.
    pub(super) fn note_freed(&self, g: &Inner) {
        if g.md.has_freed_data() {
            self.freed.notify_all();
        }
    }

    /// For a write in a full pool: the blocks durable commits freed that no thread is
    /// punching yet become allocatable at once, unpunched (the write takes their space
    /// again anyway); then one is allocated.
    pub(super) fn take_back_freed(&self, g: &mut Inner) -> Result<u64> {
        let runs = g.md.take_freed_data();
        g.md.release_withheld_data(&runs);
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
        let mut punching = self.lock().mode != PoolMode::Fail;
        let mut since_pause = Instant::now();
        for &(start, end) in runs {
            let mut this_run = punching;
            let mut at = start;
            while at < end {
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
                    match self.data.punch(at * bs, (to - at) * bs) {
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
                punching &= g.mode != PoolMode::Fail;
                this_run &= punching;
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
