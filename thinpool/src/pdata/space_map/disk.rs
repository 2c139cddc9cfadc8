//! The data space map on disk ("disk" space map in the kernel).
//!
//! Bitmaps live on the metadata device; their index is a B-tree keyed by bitmap number
//! (0, 1, 2, …) whose 16-byte values are index entries; counts of 3 and more are in an
//! overflow B-tree keyed by data block with u32 values.

use super::bitmap::{self, IndexEntry};
use super::root::SmRoot;
use super::{BitmapState, SpaceMap};
use crate::pdata::block::BlockKind;
use crate::pdata::btree::{self, ValueKind};
use crate::pdata::tm::Tm;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashSet};

/// The most data blocks the format addresses: a mapping packs the block number in 40 bits
/// (dm-thin's `1 << 40`), so no data space map holds more.
pub const MAX_DATA_BLOCKS: u64 = 1 << 40;

pub const INDEX_VALUE: ValueKind = ValueKind::Plain(16);
pub const OVERFLOW_VALUE: ValueKind = ValueKind::Plain(4);

/// Loads the whole data space map into memory. Its bitmaps are metadata blocks below
/// `metadata_blocks` (the metadata space map's size).
pub fn load(tm: &mut Tm, root: &SmRoot, metadata_blocks: u64) -> Result<SpaceMap> {
    if root.nr_blocks > MAX_DATA_BLOCKS {
        return Err(Error::corrupt(format!(
            "data space map claims {} blocks, the format addresses at most 2^40",
            root.nr_blocks
        )));
    }
    let entries = btree::entries(tm, root.bitmap_root, INDEX_VALUE)?;
    let needed = root.nr_blocks.div_ceil(bitmap::ENTRIES_PER_BITMAP);
    if entries.len() as u64 != needed {
        return Err(Error::corrupt(format!(
            "data space map of {} blocks needs {needed} bitmaps, its index has {}",
            root.nr_blocks,
            entries.len()
        )));
    }
    let mut index = Vec::with_capacity(entries.len());
    for (i, (k, v)) in entries.iter().enumerate() {
        if *k != i as u64 {
            return Err(Error::corrupt(format!(
                "data space map index has key {k} where {i} was expected"
            )));
        }
        index.push(IndexEntry::unpack(v));
    }
    let bitmaps = load_bitmaps(tm, "data", &index, metadata_blocks)?;
    let overflow = load_overflow(tm, root.ref_count_root)?;
    SpaceMap::loaded(
        "data",
        root.nr_blocks,
        bitmaps,
        overflow,
        (root.bitmap_root, root.ref_count_root),
    )
}

/// Loads the bitmaps a space map's index names, each entry checked first: a bitmap lives
/// in a metadata block other than the superblock, inside the metadata space map (below
/// `metadata_blocks`), named by one entry only (two entries sharing a block would count
/// each other's blocks), with counts a bitmap can hold.
pub fn load_bitmaps(
    tm: &mut Tm,
    name: &str,
    index: &[IndexEntry],
    metadata_blocks: u64,
) -> Result<Vec<BitmapState>> {
    let mut seen = HashSet::with_capacity(index.len());
    let mut bitmaps = Vec::with_capacity(index.len());
    for (i, e) in index.iter().enumerate() {
        let bad = |problem: String| {
            Error::corrupt(format!("{name} space map index entry {i}: {problem}"))
        };
        if e.blocknr == 0 || e.blocknr >= metadata_blocks {
            return Err(bad(format!(
                "bitmap at block {}, not a block of the metadata space map (1 to {})",
                e.blocknr,
                metadata_blocks.saturating_sub(1)
            )));
        }
        if e.nr_free as u64 > bitmap::ENTRIES_PER_BITMAP
            || e.none_free_before as u64 > bitmap::ENTRIES_PER_BITMAP
        {
            return Err(bad(format!(
                "{} free and none free before {}, in a bitmap of {} entries",
                e.nr_free,
                e.none_free_before,
                bitmap::ENTRIES_PER_BITMAP
            )));
        }
        if !seen.insert(e.blocknr) {
            return Err(bad(format!(
                "bitmap block {} is named by an earlier entry too",
                e.blocknr
            )));
        }
        let blk = tm.read(e.blocknr, BlockKind::Bitmap)?;
        bitmaps.push(BitmapState::loaded(bitmap::unpack(&blk), *e));
    }
    Ok(bitmaps)
}

pub fn load_overflow(tm: &mut Tm, root: u64) -> Result<BTreeMap<u64, u32>> {
    let mut m = BTreeMap::new();
    for (k, v) in btree::entries(tm, root, OVERFLOW_VALUE)? {
        m.insert(k, u32::from_le_bytes(v[..4].try_into().unwrap()));
    }
    Ok(m)
}

/// Which space map a commit step works on.
#[derive(Clone, Copy)]
pub enum Which {
    Data,
    Metadata,
}

fn sm(tm: &mut Tm, which: Which) -> &mut SpaceMap {
    match which {
        Which::Data => &mut tm.data_sm,
        Which::Metadata => &mut tm.meta_sm,
    }
}

/// Writes changed overflow counts into the overflow tree. Returns whether anything changed.
pub fn sync_overflow(tm: &mut Tm, which: Which) -> Result<bool> {
    let dirty = std::mem::take(&mut sm(tm, which).overflow_dirty);
    if dirty.is_empty() {
        return Ok(false);
    }
    for b in dirty {
        let root = sm(tm, which).overflow_root;
        let count = sm(tm, which).overflow().get(&b).copied();
        let new_root = match count {
            Some(c) => btree::insert(tm, root, b, &c.to_le_bytes(), OVERFLOW_VALUE)?.0,
            None => btree::remove(tm, root, b, OVERFLOW_VALUE)?.0,
        };
        sm(tm, which).overflow_root = new_root;
    }
    Ok(true)
}

/// Refuses blocks the metadata space map counts as free: a space map's own blocks (its
/// bitmaps and index) are in use, and a commit overwrites in place only blocks of its own
/// transaction, which a free block named as committed would pass for.
pub fn check_in_use(
    meta_sm: &SpaceMap,
    what: &str,
    blocks: impl IntoIterator<Item = u64>,
) -> Result<()> {
    for b in blocks {
        if meta_sm.get(b)? == 0 {
            return Err(Error::corrupt(format!(
                "{what} at metadata block {b}, which the metadata space map counts as free"
            )));
        }
    }
    Ok(())
}

/// Gives every changed bitmap a block of this transaction. Returns whether any moved.
pub fn place_bitmaps(tm: &mut Tm, which: Which) -> Result<bool> {
    let mut moved = false;
    let mut i = 0;
    while i < sm(tm, which).bitmaps.len() {
        let (dirty, loc) = {
            let bm = &sm(tm, which).bitmaps[i];
            (bm.dirty, bm.location)
        };
        // Any block not allocated in this transaction moves (not only one in use at the
        // last commit): writing in place is for this transaction's blocks alone.
        if dirty && (loc == 0 || !tm.meta_sm.is_new(loc)) {
            let n = tm.new_block(BlockKind::Bitmap)?;
            if loc != 0 {
                tm.dec_meta(loc)?;
            }
            sm(tm, which).bitmaps[i].location = n;
            moved = true;
        }
        i += 1;
    }
    Ok(moved)
}

/// Copies the in-core counts of changed bitmaps into their blocks.
pub fn write_bitmaps(tm: &mut Tm, which: Which) -> Result<()> {
    for i in 0..sm(tm, which).bitmaps.len() {
        if !sm(tm, which).bitmaps[i].dirty {
            continue;
        }
        let words = sm(tm, which).bitmaps[i].words.clone();
        let loc = sm(tm, which).bitmaps[i].location;
        bitmap::pack(&words, tm.get_mut(loc, BlockKind::Bitmap)?);
    }
    Ok(())
}

/// Commits the data space map: overflow tree, bitmap blocks, index tree.
pub fn commit(tm: &mut Tm) -> Result<()> {
    sync_overflow(tm, Which::Data)?;
    place_bitmaps(tm, Which::Data)?;
    for i in 0..tm.data_sm.bitmaps.len() {
        if !tm.data_sm.bitmaps[i].dirty {
            continue;
        }
        let e = tm.data_sm.bitmaps[i].index_entry();
        let root = tm.data_sm.index_root;
        tm.data_sm.index_root = btree::insert(tm, root, i as u64, &e.pack(), INDEX_VALUE)?.0;
    }
    write_bitmaps(tm, Which::Data)
}

pub fn root_of(sm: &SpaceMap) -> SmRoot {
    SmRoot {
        nr_blocks: sm.nr_blocks(),
        nr_allocated: sm.nr_allocated(),
        bitmap_root: sm.index_root,
        ref_count_root: sm.overflow_root,
    }
}
