//! Transaction manager: shadowing (copy-on-write) of metadata blocks within a transaction.
//!
//! A block allocated in the current transaction and referenced once is modified in place.
//! Any other block is *shadowed* before a change: a new block gets a copy, the old one
//! loses a reference. If the old block was shared (count > 1) the caller must take a
//! reference on everything the copy points to ("inc children"), which is how sharing is
//! pushed down one level at a time (the B-tree layer does that, since only it knows what
//! a node's values mean). Nothing reachable from the last committed superblock is ever
//! written, so the previous state survives a crash at any moment before the superblock
//! of the next commit is durable.

use super::block::{self, Block, BlockKind};
use super::block_manager::BlockManager;
use super::space_map::SpaceMap;
use crate::{Error, Result};
use std::sync::Arc;

pub struct Tm {
    pub bm: BlockManager,
    pub meta_sm: SpaceMap,
    pub data_sm: SpaceMap,
}

/// Result of shadowing a block.
pub struct Shadow {
    pub location: u64,
    /// The original was shared: the caller must increment the children of the copy.
    pub was_shared: bool,
}

impl Tm {
    pub fn read(&mut self, b: u64, kind: BlockKind) -> Result<Arc<Block>> {
        self.bm.read(b, kind)
    }

    pub fn get_mut(&mut self, b: u64, kind: BlockKind) -> Result<&mut Block> {
        debug_assert!(
            self.meta_sm.is_new(b),
            "in-place write to block {b} of an older transaction"
        );
        self.bm.get_mut(b, kind)
    }

    fn alloc_meta(&mut self) -> Result<u64> {
        self.meta_sm.alloc().ok_or(Error::MetadataExhausted {
            free: self.meta_sm.nr_free(),
        })
    }

    /// A new zeroed block with count 1, writable in place for the rest of the transaction.
    pub fn new_block(&mut self, kind: BlockKind) -> Result<u64> {
        let b = self.alloc_meta()?;
        self.bm.write_new(b, kind, block::zeroed())?;
        Ok(b)
    }

    /// A new block holding `data`.
    pub fn new_block_with(&mut self, kind: BlockKind, data: Box<Block>) -> Result<u64> {
        let b = self.alloc_meta()?;
        self.bm.write_new(b, kind, data)?;
        Ok(b)
    }

    /// Makes `b` writable: returns `b` itself if this transaction owns it exclusively,
    /// otherwise a copy (and releases one reference on `b`).
    pub fn shadow(&mut self, b: u64, kind: BlockKind) -> Result<Shadow> {
        let count = self.meta_sm.get(b)?;
        if count == 0 {
            return Err(Error::corrupt(format!(
                "metadata block {b} is referenced but its count is 0"
            )));
        }
        if count == 1 && !self.meta_sm.committed_in_use(b) {
            return Ok(Shadow {
                location: b,
                was_shared: false,
            });
        }
        let src = self.read(b, kind)?;
        let copy: Box<Block> = Box::new(*src);
        let n = self.new_block_with(kind, copy)?;
        self.dec_meta(b)?;
        Ok(Shadow {
            location: n,
            was_shared: count > 1,
        })
    }

    pub fn inc_meta(&mut self, b: u64) -> Result<()> {
        self.meta_sm.inc(b)
    }

    pub fn dec_meta(&mut self, b: u64) -> Result<u32> {
        let c = self.meta_sm.dec(b)?;
        if c == 0 {
            self.bm.forget(b);
        }
        Ok(c)
    }

    pub fn meta_count(&self, b: u64) -> Result<u32> {
        self.meta_sm.get(b)
    }

    pub fn inc_data(&mut self, b: u64) -> Result<()> {
        self.data_sm.inc(b)
    }

    pub fn dec_data(&mut self, b: u64) -> Result<u32> {
        self.data_sm.dec(b)
    }
}
