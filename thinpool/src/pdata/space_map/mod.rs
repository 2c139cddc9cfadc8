//! Reference-counting space maps, in core.
//!
//! dm-thin keeps two space maps with the same on-disk structure: one for the data device
//! (`disk`), one for the metadata device itself (`metadata`). Each holds a 2-bit count per
//! block in bitmap blocks, counts of 3 and more in an overflow B-tree, and an index of the
//! bitmaps. This module holds the counts in memory (2 bits per block plus a map of the
//! overflowing ones — 64 MiB for a 16 TiB pool of 64 KiB blocks), loaded at open and
//! written back at commit by [`disk`] and [`metadata`].
//!
//! Allocation follows the kernel's rule: a block that was in use at the last commit is
//! never handed out again before the next commit, even if its count dropped to zero in
//! this transaction, because the committed superblock (or a committed mapping) may still
//! reach it. To know the committed state the first change to a bitmap in a transaction
//! keeps a copy of it.

pub mod bitmap;
pub mod disk;
pub mod metadata;
pub mod root;

use crate::{Error, Result};
use bitmap::{Words, ENTRIES_PER_BITMAP};
use std::collections::{BTreeMap, BTreeSet};

pub struct BitmapState {
    pub words: Box<Words>,
    /// The bitmap as of the last commit, kept from the first change of this transaction.
    pub committed: Option<Box<Words>>,
    /// Where the bitmap block lives on the metadata device (0 = not placed yet).
    pub location: u64,
    pub nr_free: u32,
    pub none_free_before: u32,
    /// Contents or index entry changed since the last commit.
    pub dirty: bool,
    /// The bitmap as of a frozen transaction whose superblock is not durable yet (see
    /// [`SpaceMap::freeze`]): what `committed` becomes once it is.
    frozen: Option<Box<Words>>,
}

impl BitmapState {
    fn fresh() -> Self {
        BitmapState {
            words: bitmap::zero_words(),
            committed: Some(bitmap::zero_words()),
            location: 0,
            nr_free: ENTRIES_PER_BITMAP as u32,
            none_free_before: 0,
            dirty: true,
            frozen: None,
        }
    }

    pub fn loaded(words: Box<Words>, entry: bitmap::IndexEntry) -> Self {
        BitmapState {
            words,
            committed: None,
            location: entry.blocknr,
            nr_free: entry.nr_free,
            none_free_before: entry.none_free_before,
            dirty: false,
            frozen: None,
        }
    }

    pub fn index_entry(&self) -> bitmap::IndexEntry {
        bitmap::IndexEntry {
            blocknr: self.location,
            nr_free: self.nr_free,
            none_free_before: self.none_free_before,
        }
    }
}

pub struct SpaceMap {
    name: &'static str,
    nr_blocks: u64,
    pub bitmaps: Vec<BitmapState>,
    /// Full counts of blocks whose 2-bit entry is 3.
    overflow: BTreeMap<u64, u32>,
    /// Blocks whose overflow-tree entry must be inserted, updated or removed at commit.
    pub overflow_dirty: BTreeSet<u64>,
    nr_allocated: u64,
    /// Blocks in use at the last commit whose count has dropped to zero since.
    pending_frees: u64,
    cursor: u64,
    /// Root of the overflow (reference count) B-tree on the metadata device.
    pub overflow_root: u64,
    /// Data space map: root of the index B-tree. Metadata space map: the index block.
    pub index_root: u64,
    /// Keep the blocks a durable transaction freed from allocation until released (for
    /// discard passdown: they are punched in between, see [`take_freed`](Self::take_freed)).
    withhold_freed: bool,
    /// Runs `[start, end)` freed and withheld, by start.
    withheld: BTreeMap<u64, u64>,
    withheld_blocks: u64,
    /// Runs withheld and not yet taken.
    freed: Vec<(u64, u64)>,
}

/// The withheld state of a map (see [`SpaceMap::take_withheld`]).
pub struct Withheld {
    on: bool,
    runs: BTreeMap<u64, u64>,
    freed: Vec<(u64, u64)>,
}

impl SpaceMap {
    /// A space map with every block free, as created by a format.
    pub fn new(name: &'static str, nr_blocks: u64) -> Self {
        let mut sm = SpaceMap {
            name,
            nr_blocks: 0,
            bitmaps: Vec::new(),
            overflow: BTreeMap::new(),
            overflow_dirty: BTreeSet::new(),
            nr_allocated: 0,
            pending_frees: 0,
            cursor: 0,
            overflow_root: 0,
            index_root: 0,
            withhold_freed: false,
            withheld: BTreeMap::new(),
            withheld_blocks: 0,
            freed: Vec::new(),
        };
        sm.extend(nr_blocks);
        sm
    }

    /// A space map loaded from disk.
    pub fn loaded(
        name: &'static str,
        nr_blocks: u64,
        bitmaps: Vec<BitmapState>,
        overflow: BTreeMap<u64, u32>,
        roots: (u64, u64),
    ) -> Result<Self> {
        let needed = nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
        if bitmaps.len() != needed {
            return Err(Error::corrupt(format!(
                "{name} space map of {nr_blocks} blocks needs {needed} bitmaps, index has {}",
                bitmaps.len()
            )));
        }
        let mut sm = SpaceMap {
            name,
            nr_blocks,
            bitmaps,
            overflow,
            overflow_dirty: BTreeSet::new(),
            nr_allocated: 0,
            pending_frees: 0,
            cursor: 0,
            index_root: roots.0,
            overflow_root: roots.1,
            withhold_freed: false,
            withheld: BTreeMap::new(),
            withheld_blocks: 0,
            freed: Vec::new(),
        };
        // Count from the bitmaps rather than trusting the root's nr_allocated.
        let mut n = 0u64;
        let mut overflowing = 0u64;
        for (i, bm) in sm.bitmaps.iter().enumerate() {
            let limit = (nr_blocks - i as u64 * ENTRIES_PER_BITMAP).min(ENTRIES_PER_BITMAP);
            for (wi, &w) in bm.words.iter().enumerate() {
                // The entries of this word that describe blocks of the device.
                let inside = limit.saturating_sub(wi as u64 * 32).min(32);
                let mask = if inside == 32 {
                    u64::MAX
                } else {
                    (1u64 << (2 * inside)) - 1
                };
                if w & !mask != 0 {
                    return Err(Error::corrupt(format!(
                        "{name} space map bitmap {i} has counts beyond the end of the device"
                    )));
                }
                n += bitmap::used_mask(w).count_ones() as u64;
                overflowing += (w & (w >> 1) & 0x5555_5555_5555_5555).count_ones() as u64;
            }
        }
        for (&b, &c) in &sm.overflow {
            if b >= nr_blocks || c < 3 || sm.raw(b) != 3 {
                return Err(Error::corrupt(format!(
                    "{name} space map overflow entry for block {b} (count {c}) does not match its bitmap"
                )));
            }
        }
        // Each entry above names a block marked "3 or more", so equal numbers mean each
        // such block has its count (rather than failing the first time it is used).
        if overflowing != sm.overflow.len() as u64 {
            return Err(Error::corrupt(format!(
                "{name} space map bitmaps mark {overflowing} blocks with 3 or more references, its reference-count tree holds {}",
                sm.overflow.len()
            )));
        }
        sm.nr_allocated = n;
        Ok(sm)
    }

    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    pub fn nr_allocated(&self) -> u64 {
        self.nr_allocated
    }

    pub fn nr_free(&self) -> u64 {
        self.nr_blocks - self.nr_allocated
    }

    /// Blocks that can be allocated before the next commit.
    pub fn nr_allocatable(&self) -> u64 {
        self.nr_free() - self.pending_frees - self.withheld_blocks
    }

    /// From now on, the blocks each durable transaction frees (in use at the last durable
    /// commit, free in the new one) are withheld from allocation until
    /// [`release_withheld`](Self::release_withheld), and listed for
    /// [`take_freed`](Self::take_freed): in between, nothing can write them, and their
    /// freeing can no longer be undone by a crash.
    pub fn set_withhold_freed(&mut self, on: bool) {
        self.withhold_freed = on;
    }

    pub fn withholds_freed(&self) -> bool {
        self.withhold_freed
    }

    /// The runs `[start, end)` freed by durable transactions since the last call, each
    /// withheld until released.
    pub fn take_freed(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.freed)
    }

    /// Whether durable transactions freed runs that [`take_freed`](Self::take_freed) has
    /// not given yet.
    pub fn has_freed(&self) -> bool {
        !self.freed.is_empty()
    }

    /// Makes allocatable again each run `[start, end)` given by
    /// [`take_freed`](Self::take_freed), or the first part of one (a run given back a
    /// piece at a time: the rest, from `end`, stays withheld). A run not withheld is
    /// ignored.
    pub fn release_withheld(&mut self, runs: &[(u64, u64)]) {
        for &(start, end) in runs {
            let Some(&until) = self.withheld.get(&start) else {
                continue;
            };
            if end > until || end <= start {
                continue;
            }
            self.withheld.remove(&start);
            if end < until {
                self.withheld.insert(end, until);
            }
            self.withheld_blocks -= end - start;
        }
    }

    /// Withholds, and lists for [`take_freed`](Self::take_freed), blocks from `from` on
    /// that are free now and at the last commit, not withheld yet, and for which `pick`
    /// holds: at most `max_runs` runs of them, since every allocation steps over the
    /// withheld runs it meets, among at most `max_scan` free blocks looked at. Returns how
    /// many blocks, and where the next call goes on (None: the end was reached).
    pub fn withhold_free(
        &mut self,
        from: u64,
        max_runs: usize,
        max_scan: u64,
        pick: impl Fn(u64) -> bool,
    ) -> (u64, Option<u64>) {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut at = from;
        let mut next = None;
        let mut scanned = 0;
        while let Some(b) = self.find_allocatable(at, self.nr_blocks) {
            if scanned == max_scan {
                next = Some(b);
                break;
            }
            scanned += 1;
            if pick(b) {
                let full = runs.len() == max_runs;
                match runs.last_mut() {
                    Some(last) if last.1 == b => last.1 = b + 1,
                    _ if full => {
                        next = Some(b);
                        break;
                    }
                    _ => runs.push((b, b + 1)),
                }
            }
            at = b + 1;
        }
        let mut n = 0;
        for &(start, end) in &runs {
            self.withheld.insert(start, end);
            n += end - start;
        }
        self.withheld_blocks += n;
        self.freed.extend(runs);
        (n, next)
    }

    /// Whether a withheld run starts at `b` (a run being given back a piece at a time starts
    /// at the piece to come).
    pub fn withheld_run_at(&self, b: u64) -> bool {
        self.withheld.contains_key(&b)
    }

    /// Makes one block of the runs [`take_freed`](Self::take_freed) would give allocatable
    /// again, unpunched (for a write in a full pool): the last of the last run. The rest
    /// stay withheld and listed.
    pub fn take_back_a_freed_block(&mut self) {
        let Some(&(start, end)) = self.freed.last() else {
            return;
        };
        self.freed.pop();
        if self.withheld.get(&start) != Some(&end) {
            return;
        }
        self.withheld_blocks -= 1;
        if end - 1 == start {
            self.withheld.remove(&start);
        } else {
            self.withheld.insert(start, end - 1);
            self.freed.push((start, end - 1));
        }
        // The next allocation finds it first, without stepping over the withheld runs.
        self.cursor = end - 1;
    }

    /// Takes what is withheld, for [`restore_withheld`](Self::restore_withheld) into the
    /// map an abort reloads from the disk: the blocks are free there too (durable commits
    /// freed them), and some may be being punched.
    pub fn take_withheld(&mut self) -> Withheld {
        self.withheld_blocks = 0;
        Withheld {
            on: self.withhold_freed,
            runs: std::mem::take(&mut self.withheld),
            freed: std::mem::take(&mut self.freed),
        }
    }

    /// See [`take_withheld`](Self::take_withheld). A run this map does not hold free
    /// (which no durable commit allows) is dropped, and logged.
    pub fn restore_withheld(&mut self, w: Withheld) {
        self.withhold_freed = w.on;
        for (start, end) in w.runs {
            if (start..end).all(|b| self.get(b).is_ok_and(|c| c == 0)) {
                self.withheld.insert(start, end);
                self.withheld_blocks += end - start;
            } else {
                tracing::error!(
                    "{} blocks {start}..{end} were withheld as free, but are not free on the \
                     disk: no longer withheld",
                    self.name
                );
            }
        }
        let kept = &self.withheld;
        self.freed = w
            .freed
            .into_iter()
            .filter(|(start, end)| kept.get(start) == Some(end))
            .collect();
    }

    /// Blocks withheld now.
    pub fn nr_withheld(&self) -> u64 {
        self.withheld_blocks
    }

    /// Blocks freed in this transaction that become allocatable after the next commit.
    pub fn pending_frees(&self) -> u64 {
        self.pending_frees
    }

    pub fn overflow(&self) -> &BTreeMap<u64, u32> {
        &self.overflow
    }

    fn locate(&self, b: u64) -> Result<(usize, usize)> {
        if b >= self.nr_blocks {
            return Err(Error::corrupt(format!(
                "{} block {b} is beyond the end of the space map ({} blocks)",
                self.name, self.nr_blocks
            )));
        }
        Ok((
            (b / ENTRIES_PER_BITMAP) as usize,
            (b % ENTRIES_PER_BITMAP) as usize,
        ))
    }

    fn raw(&self, b: u64) -> u8 {
        let (i, j) = (
            (b / ENTRIES_PER_BITMAP) as usize,
            (b % ENTRIES_PER_BITMAP) as usize,
        );
        bitmap::get(&self.bitmaps[i].words, j)
    }

    pub fn get(&self, b: u64) -> Result<u32> {
        let (i, j) = self.locate(b)?;
        let v = bitmap::get(&self.bitmaps[i].words, j);
        if v < 3 {
            return Ok(v as u32);
        }
        self.overflow.get(&b).copied().ok_or_else(|| {
            Error::corrupt(format!(
                "{} block {b}: count 3+ without an overflow entry",
                self.name
            ))
        })
    }

    /// Was `b` in use at the last commit?
    pub fn committed_in_use(&self, b: u64) -> bool {
        let Ok((i, j)) = self.locate(b) else {
            return false;
        };
        let bm = &self.bitmaps[i];
        let w = bm.committed.as_deref().unwrap_or(&bm.words);
        bitmap::get(w, j) != 0
    }

    /// Allocated in this transaction (free at the last commit, in use now)?
    pub fn is_new(&self, b: u64) -> bool {
        !self.committed_in_use(b) && self.get(b).map(|c| c > 0).unwrap_or(false)
    }

    fn set(&mut self, b: u64, count: u32) -> Result<()> {
        let (i, j) = self.locate(b)?;
        let old = bitmap::get(&self.bitmaps[i].words, j);
        let new = count.min(3) as u8;
        let bm = &mut self.bitmaps[i];
        if bm.committed.is_none() {
            bm.committed = Some(bm.words.clone());
        }
        bm.dirty = true;
        bitmap::set(&mut bm.words, j, new);
        // The free counts come from disk, where only their range is checked: saturating.
        if old == 0 && new != 0 {
            bm.nr_free = bm.nr_free.saturating_sub(1);
            if j as u32 == bm.none_free_before {
                bm.none_free_before = j as u32 + 1;
            }
            self.nr_allocated += 1;
            let committed = bitmap::get(bm.committed.as_deref().unwrap(), j) != 0;
            if committed {
                self.pending_frees -= 1;
            }
        } else if old != 0 && new == 0 {
            bm.nr_free = bm.nr_free.saturating_add(1);
            bm.none_free_before = bm.none_free_before.min(j as u32);
            self.nr_allocated -= 1;
            let committed = bitmap::get(bm.committed.as_deref().unwrap(), j) != 0;
            if committed {
                self.pending_frees += 1;
            }
        }
        if count >= 3 {
            if self.overflow.insert(b, count) != Some(count) {
                self.overflow_dirty.insert(b);
            }
        } else if self.overflow.remove(&b).is_some() {
            self.overflow_dirty.insert(b);
        }
        Ok(())
    }

    pub fn inc(&mut self, b: u64) -> Result<()> {
        let c = self.get(b)?;
        if c == u32::MAX {
            return Err(Error::corrupt(format!(
                "{} block {b}: reference count overflow",
                self.name
            )));
        }
        self.set(b, c + 1)
    }

    /// Decrements and returns the new count.
    pub fn dec(&mut self, b: u64) -> Result<u32> {
        let c = self.get(b)?;
        if c == 0 {
            return Err(Error::corrupt(format!(
                "{} block {b}: releasing a block that is not in use",
                self.name
            )));
        }
        self.set(b, c - 1)?;
        Ok(c - 1)
    }

    /// Finds a block free now and at the last commit, gives it count 1.
    pub fn alloc(&mut self) -> Option<u64> {
        let b = self
            .find_allocatable(self.cursor, self.nr_blocks)
            .or_else(|| self.find_allocatable(0, self.cursor.min(self.nr_blocks)))?;
        self.set(b, 1).ok()?;
        self.cursor = b + 1;
        Some(b)
    }

    /// A block free now and at the last commit, and not withheld.
    fn find_allocatable(&self, mut begin: u64, end: u64) -> Option<u64> {
        loop {
            let b = self.find_free(begin, end)?;
            match self.withheld.range(..=b).next_back() {
                Some((_, &e)) if e > b => begin = e,
                _ => return Some(b),
            }
        }
    }

    fn find_free(&self, begin: u64, end: u64) -> Option<u64> {
        if begin >= end {
            return None;
        }
        let first = (begin / ENTRIES_PER_BITMAP) as usize;
        let last = ((end - 1) / ENTRIES_PER_BITMAP) as usize;
        for i in first..=last {
            let bm = &self.bitmaps[i];
            if bm.nr_free == 0 {
                continue;
            }
            let base = i as u64 * ENTRIES_PER_BITMAP;
            let lo = if i == first { begin - base } else { 0 }.max(bm.none_free_before as u64);
            let hi = (end - base).min(ENTRIES_PER_BITMAP);
            if lo >= hi {
                continue;
            }
            let committed = bm.committed.as_deref();
            let mut wi = (lo / 32) as usize;
            while (wi as u64) * 32 < hi {
                let cur = bitmap::used_mask(bm.words[wi]);
                let com = committed.map(|c| bitmap::used_mask(c[wi])).unwrap_or(0);
                let mut free = !(cur | com) & 0x5555_5555_5555_5555;
                let wbase = wi as u64 * 32;
                if wbase < lo {
                    free &= !0u64 << (2 * (lo - wbase));
                }
                if free != 0 {
                    let j = wbase + (free.trailing_zeros() / 2) as u64;
                    if j < hi {
                        return Some(base + j);
                    }
                    break;
                }
                wi += 1;
            }
        }
        None
    }

    /// Grows the space map (new bitmaps have no location yet; the caller places them).
    pub fn extend(&mut self, new_nr_blocks: u64) {
        if new_nr_blocks <= self.nr_blocks {
            return;
        }
        let needed = new_nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
        while self.bitmaps.len() < needed {
            self.bitmaps.push(BitmapState::fresh());
        }
        self.nr_blocks = new_nr_blocks;
    }

    /// Forgets the committed copies: everything now is the committed state.
    pub fn commit_done(&mut self) {
        self.freeze();
        self.durable();
    }

    /// The transaction is frozen: its blocks are written, its superblock is not durable
    /// yet, and the next transaction starts now. Until [`durable`](Self::durable) a block
    /// counts as committed if it is in use at the last durable commit *or* in the frozen
    /// transaction: either superblock may be the one a crash leaves, so neither's blocks
    /// may be handed out again or written in place.
    pub fn freeze(&mut self) {
        for bm in &mut self.bitmaps {
            bm.dirty = false;
            if let Some(mut union) = bm.committed.take() {
                debug_assert!(bm.frozen.is_none(), "a transaction frozen twice");
                for (u, w) in union.iter_mut().zip(bm.words.iter()) {
                    *u |= *w;
                }
                bm.frozen = Some(bm.words.clone());
                bm.committed = Some(union);
            }
        }
        self.overflow_dirty.clear();
        self.recount_pending_frees();
    }

    /// The frozen transaction's superblock is durable: its counts are the committed ones.
    pub fn durable(&mut self) {
        if self.withhold_freed {
            self.withhold_newly_free();
        }
        for bm in &mut self.bitmaps {
            if let Some(frozen) = bm.frozen.take() {
                bm.committed = if frozen[..] == bm.words[..] {
                    None
                } else {
                    Some(frozen)
                };
            }
        }
        self.recount_pending_frees();
    }

    /// Before [`durable`](Self::durable) flips: blocks in use at the last durable commit
    /// (in `committed`, the union with the frozen counts), free in the frozen transaction
    /// and free now become allocatable at the flip; they are withheld instead.
    fn withhold_newly_free(&mut self) {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, bm) in self.bitmaps.iter().enumerate() {
            let (Some(frozen), Some(union)) = (bm.frozen.as_deref(), bm.committed.as_deref())
            else {
                continue;
            };
            let base = i as u64 * ENTRIES_PER_BITMAP;
            for (wi, ((&u, &f), &w)) in union
                .iter()
                .zip(frozen.iter())
                .zip(bm.words.iter())
                .enumerate()
            {
                let mut newly =
                    bitmap::used_mask(u) & !bitmap::used_mask(f) & !bitmap::used_mask(w);
                while newly != 0 {
                    let b = base + wi as u64 * 32 + (newly.trailing_zeros() / 2) as u64;
                    newly &= newly - 1;
                    match runs.last_mut() {
                        Some(last) if last.1 == b => last.1 = b + 1,
                        _ => runs.push((b, b + 1)),
                    }
                }
            }
        }
        for &(start, end) in &runs {
            self.withheld.insert(start, end);
            self.withheld_blocks += end - start;
        }
        self.freed.extend(runs);
    }

    fn recount_pending_frees(&mut self) {
        self.pending_frees = self
            .bitmaps
            .iter()
            .filter_map(|bm| bm.committed.as_deref().map(|c| (c, &bm.words)))
            .map(|(c, w)| {
                c.iter()
                    .zip(w.iter())
                    .map(|(&c, &w)| {
                        (bitmap::used_mask(c) & !bitmap::used_mask(w)).count_ones() as u64
                    })
                    .sum::<u64>()
            })
            .sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_overflow_and_allocation_rules() {
        let mut sm = SpaceMap::new("test", 40000);
        assert_eq!(sm.bitmaps.len(), 3);
        let a = sm.alloc().unwrap();
        assert_eq!(a, 0);
        for _ in 0..5 {
            sm.inc(a).unwrap();
        }
        assert_eq!(sm.get(a).unwrap(), 6);
        assert!(sm.overflow_dirty.contains(&a));
        for _ in 0..4 {
            sm.dec(a).unwrap();
        }
        assert_eq!(sm.get(a).unwrap(), 2);
        assert!(sm.overflow().is_empty());
        sm.commit_done();
        // Freed after a commit: not reusable until the next commit.
        sm.dec(a).unwrap();
        sm.dec(a).unwrap();
        assert_eq!(sm.pending_frees(), 1);
        let b = sm.alloc().unwrap();
        assert_ne!(b, a);
        // Allocated and freed within one transaction: reusable at once.
        sm.dec(b).unwrap();
        sm.cursor = 0;
        assert_eq!(sm.alloc().unwrap(), b);
        sm.commit_done();
        sm.cursor = 0;
        assert_eq!(sm.alloc().unwrap(), a);
        assert!(sm.dec(39999).is_err());
        assert!(sm.get(40000).is_err());
    }

    #[test]
    fn blocks_of_a_frozen_transaction_are_not_reused_until_it_is_durable() {
        let mut sm = SpaceMap::new("test", 100);
        let a = sm.alloc().unwrap();
        sm.commit_done();
        // Frozen: `a` freed in it, `b` allocated in it. Either superblock may survive a
        // crash, so neither block may be handed out again before the flip.
        sm.dec(a).unwrap();
        let b = sm.alloc().unwrap();
        sm.freeze();
        assert!(sm.committed_in_use(a) && sm.committed_in_use(b));
        assert!(!sm.is_new(b), "a frozen block would be written in place");
        sm.dec(b).unwrap();
        assert_eq!(sm.pending_frees(), 2);
        sm.cursor = 0;
        let c = sm.alloc().unwrap();
        assert!(c != a && c != b);
        sm.durable();
        // Durable: `a` was free in it and is reusable; `b` was in use in it, freed after.
        assert!(!sm.committed_in_use(a) && sm.committed_in_use(b));
        assert_eq!(sm.pending_frees(), 1);
        sm.cursor = 0;
        assert_eq!(sm.alloc().unwrap(), a);
        sm.commit_done();
        sm.cursor = 0;
        assert_eq!(sm.alloc().unwrap(), b);
    }

    #[test]
    fn blocks_a_durable_transaction_freed_are_withheld_from_allocation_until_released() {
        let mut sm = SpaceMap::new("test", 100);
        sm.set_withhold_freed(true);
        let (a, b, c) = (
            sm.alloc().unwrap(),
            sm.alloc().unwrap(),
            sm.alloc().unwrap(),
        );
        sm.commit_done();
        assert!(sm.take_freed().is_empty(), "nothing was freed");
        sm.dec(a).unwrap();
        sm.dec(b).unwrap();
        // Allocated and freed in one transaction: never committed, nothing to give back.
        let d = sm.alloc().unwrap();
        sm.dec(d).unwrap();
        sm.freeze();
        assert!(sm.take_freed().is_empty(), "frozen is not durable");
        sm.durable();
        let runs = sm.take_freed();
        assert_eq!(runs, vec![(a, b + 1)]);
        assert!(sm.take_freed().is_empty(), "taken once");
        assert_eq!(sm.nr_free(), 99, "withheld blocks are free");
        assert_eq!(sm.nr_allocatable(), 97);
        sm.cursor = 0;
        let e = sm.alloc().unwrap();
        assert!(
            e != a && e != b && e != c,
            "a withheld block was handed out"
        );
        sm.release_withheld(&runs);
        assert_eq!(sm.nr_allocatable(), 98);
        sm.cursor = 0;
        assert_eq!(sm.alloc().unwrap(), a);
    }

    #[test]
    fn withheld_runs_are_released_a_piece_at_a_time_and_survive_a_reload() {
        let mut sm = SpaceMap::new("test", 100);
        sm.set_withhold_freed(true);
        for _ in 0..10 {
            sm.alloc().unwrap();
        }
        sm.commit_done();
        for b in 0..8 {
            sm.dec(b).unwrap();
        }
        sm.freeze();
        sm.durable();
        assert!(sm.has_freed());
        // A reload from the disk (an abort) before anything was taken, with block 9 in use
        // there; then a run the disk has in use, which is dropped.
        let mut reloaded = SpaceMap::new("test", 100);
        for _ in 0..10 {
            reloaded.alloc().unwrap();
        }
        for b in 0..8 {
            reloaded.dec(b).unwrap();
        }
        reloaded.commit_done();
        let mut w = sm.take_withheld();
        w.runs.insert(9, 10);
        reloaded.restore_withheld(w);
        let mut sm = reloaded;
        assert!(sm.withholds_freed());
        assert_eq!(
            sm.nr_withheld(),
            8,
            "the run in use on the disk was dropped"
        );
        let runs = sm.take_freed();
        assert_eq!(runs, vec![(0, 8)]);
        assert!(!sm.has_freed());
        // The first 3 blocks given back: only they become allocatable.
        sm.release_withheld(&[(0, 3)]);
        assert_eq!(sm.nr_withheld(), 5);
        sm.cursor = 0;
        let got: Vec<u64> = (0..4).map(|_| sm.alloc().unwrap()).collect();
        assert_eq!(got, vec![0, 1, 2, 10]);
        // A piece that does not start the withheld run is ignored; the rest goes whole.
        sm.release_withheld(&[(4, 8)]);
        assert_eq!(sm.nr_withheld(), 5);
        sm.release_withheld(&[(3, 8)]);
        assert_eq!(sm.nr_withheld(), 0);
        sm.cursor = 0;
        assert_eq!(sm.alloc().unwrap(), 3);
    }

    #[test]
    fn free_blocks_are_withheld_a_few_runs_at_a_time() {
        let mut sm = SpaceMap::new("test", 10);
        sm.set_withhold_freed(true);
        // In use: 2 and 6; blocks 8 and 9 are holes (not picked).
        for _ in 0..10 {
            sm.alloc().unwrap();
        }
        for b in [0, 1, 3, 4, 5, 7, 8, 9] {
            sm.dec(b).unwrap();
        }
        sm.commit_done();
        let pick = |b: u64| b < 8;
        assert_eq!(sm.withhold_free(0, 2, 100, pick), (5, Some(7)));
        assert_eq!(sm.take_freed(), vec![(0, 2), (3, 6)]);
        // At most 1 free block looked at: 8 is not picked.
        assert_eq!(sm.withhold_free(8, 2, 1, pick), (0, Some(9)));
        assert_eq!(sm.withhold_free(7, 2, 100, pick), (1, None));
        assert_eq!(sm.take_freed(), vec![(7, 8)]);
        assert_eq!(sm.nr_withheld(), 6);
        sm.cursor = 0;
        assert_eq!(sm.alloc(), Some(8));
    }

    #[test]
    fn a_freed_block_is_taken_back_one_at_a_time() {
        let mut sm = SpaceMap::new("test", 4);
        sm.set_withhold_freed(true);
        for _ in 0..4 {
            sm.alloc().unwrap();
        }
        sm.commit_done();
        for b in [0, 2, 3] {
            sm.dec(b).unwrap();
        }
        sm.freeze();
        sm.durable();
        assert_eq!(sm.nr_allocatable(), 0);
        sm.take_back_a_freed_block();
        assert_eq!(sm.nr_withheld(), 2);
        assert_eq!(sm.alloc(), Some(3));
        assert_eq!(sm.alloc(), None);
        sm.take_back_a_freed_block();
        sm.take_back_a_freed_block();
        assert_eq!(sm.nr_withheld(), 0);
        assert!(!sm.has_freed());
        sm.take_back_a_freed_block();
        assert_eq!(sm.nr_allocatable(), 2);
    }

    #[test]
    fn nothing_is_withheld_unless_asked() {
        let mut sm = SpaceMap::new("test", 100);
        let a = sm.alloc().unwrap();
        sm.commit_done();
        sm.dec(a).unwrap();
        sm.commit_done();
        assert!(sm.take_freed().is_empty());
        sm.cursor = 0;
        assert_eq!(sm.alloc().unwrap(), a);
    }

    #[test]
    fn allocates_every_block_then_runs_out() {
        let mut sm = SpaceMap::new("test", 16320 + 100);
        let mut seen = std::collections::HashSet::new();
        while let Some(b) = sm.alloc() {
            assert!(seen.insert(b));
        }
        assert_eq!(seen.len(), 16420);
        assert_eq!(sm.nr_free(), 0);
    }
}
