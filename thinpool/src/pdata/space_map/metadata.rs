//! The metadata space map on disk: it counts references to every metadata block,
//! including its own bitmaps, index block and overflow-tree nodes.
//!
//! Index block layout (4096 bytes): checksum (salt 160478) at 0, padding at 4, own block
//! number at 8, then 255 index entries of 16 bytes from offset 16 — which is why a
//! metadata device can hold at most 255 × 16320 = 4,161,600 blocks (≈ 15.9 GiB).
//!
//! Committing this space map changes it (new locations for bitmaps, the index block and
//! overflow nodes need counts of their own), so [`commit`] repeats until a pass allocates
//! nothing new; every such block is shadowed at most once per transaction, so it ends.

use super::bitmap::{IndexEntry, ENTRIES_PER_BITMAP, INDEX_ENTRY_SIZE};
use super::disk::{self, Which};
use super::root::SmRoot;
use super::SpaceMap;
use crate::pdata::block::{BlockKind, BLOCK_SIZE};
use crate::pdata::tm::Tm;
use crate::{Error, Result};

pub const MAX_BITMAPS: u64 = 255;
pub const MAX_METADATA_BLOCKS: u64 = MAX_BITMAPS * ENTRIES_PER_BITMAP;
const INDEX_HEADER: usize = 16;

pub fn load(tm: &mut Tm, root: &SmRoot) -> Result<SpaceMap> {
    if root.nr_blocks > MAX_METADATA_BLOCKS {
        return Err(Error::corrupt(format!(
            "metadata space map claims {} blocks, the format allows {MAX_METADATA_BLOCKS}",
            root.nr_blocks
        )));
    }
    let device_blocks = tm.bm.device_blocks();
    if root.nr_blocks > device_blocks {
        return Err(Error::corrupt(format!(
            "metadata space map covers {} blocks but the device has only {device_blocks}",
            root.nr_blocks
        )));
    }
    let idx = tm.read(root.bitmap_root, BlockKind::Index)?;
    // At most MAX_BITMAPS (checked above), so every entry lies inside the block.
    let nr_bitmaps = root.nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
    let index: Vec<IndexEntry> = idx[INDEX_HEADER..]
        .chunks_exact(INDEX_ENTRY_SIZE)
        .take(nr_bitmaps)
        .map(IndexEntry::unpack)
        .collect();
    let bitmaps = disk::load_bitmaps(tm, "metadata", &index, root.nr_blocks)?;
    let overflow = disk::load_overflow(tm, root.ref_count_root)?;
    let sm = SpaceMap::loaded(
        "metadata",
        root.nr_blocks,
        bitmaps,
        overflow,
        (root.bitmap_root, root.ref_count_root),
    )?;
    disk::check_in_use(&sm, "metadata space map index", [root.bitmap_root])?;
    disk::check_in_use(
        &sm,
        "metadata space map bitmap",
        index.iter().map(|e| e.blocknr),
    )?;
    Ok(sm)
}

/// Commits the metadata space map; must run after every other change of the transaction.
pub fn commit(tm: &mut Tm) -> Result<()> {
    loop {
        let mut progress = disk::sync_overflow(tm, Which::Metadata)?;
        progress |= disk::place_bitmaps(tm, Which::Metadata)?;
        let idx = tm.meta_sm.index_root;
        if idx == 0 || !tm.meta_sm.is_new(idx) {
            let n = tm.new_block(BlockKind::Index)?;
            if idx != 0 {
                tm.dec_meta(idx)?;
            }
            tm.meta_sm.index_root = n;
            progress = true;
        }
        if !progress {
            break;
        }
    }
    disk::write_bitmaps(tm, Which::Metadata)?;
    let entries: Vec<IndexEntry> = tm.meta_sm.bitmaps.iter().map(|b| b.index_entry()).collect();
    let blk = tm.get_mut(tm.meta_sm.index_root, BlockKind::Index)?;
    blk[INDEX_HEADER..BLOCK_SIZE].fill(0);
    for (i, e) in entries.iter().enumerate() {
        let o = INDEX_HEADER + i * INDEX_ENTRY_SIZE;
        blk[o..o + INDEX_ENTRY_SIZE].copy_from_slice(&e.pack());
    }
    Ok(())
}
