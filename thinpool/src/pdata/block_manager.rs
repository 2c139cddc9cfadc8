//! Block manager: validated reads of metadata blocks through a bounded cache, and the
//! set of blocks written in the current transaction.
//!
//! Clean blocks are cached up to `capacity` blocks and evicted least-recently-used first.
//! Dirty blocks (new or shadowed in this transaction) stay in memory until [`flush`]
//! writes them; if a transaction dirties more than `dirty_limit` blocks they are written
//! early. That is safe because a block is only ever dirty at a location that the last
//! committed superblock does not reach (the transaction manager guarantees it), so a
//! crash before the commit simply leaves garbage in free blocks.
//!
//! [`flush`]: BlockManager::flush

use super::block::{self, Block, BlockKind, BLOCK_SIZE};
use crate::storage::Storage;
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;

/// Default cache size: 4096 blocks = 16 MiB.
pub const DEFAULT_CACHE_BLOCKS: usize = 4096;

struct Entry {
    data: Arc<Block>,
    kind: BlockKind,
    /// Passed the check of a [`BlockManager::read_checked`], or written by this process:
    /// a cached block is checked once, not on every read.
    checked: bool,
    dirty: bool,
    last_use: u64,
}

pub struct BlockManager {
    storage: Arc<dyn Storage>,
    nr_blocks: u64,
    entries: HashMap<u64, Entry>,
    capacity: usize,
    dirty_limit: usize,
    nr_dirty: usize,
    tick: u64,
    read_only: bool,
}

impl BlockManager {
    pub fn new(storage: Arc<dyn Storage>, capacity: usize) -> Self {
        let nr_blocks = storage.len() / BLOCK_SIZE as u64;
        BlockManager {
            storage,
            nr_blocks,
            entries: HashMap::new(),
            capacity: capacity.max(64),
            dirty_limit: capacity.max(64) * 2,
            nr_dirty: 0,
            tick: 0,
            read_only: false,
        }
    }

    pub fn set_read_only(&mut self, ro: bool) {
        self.read_only = ro;
    }

    /// Keeps every dirty block in memory however many there are: for changes made to a
    /// read-only open that are never to be written (a journal replayed for inspection).
    pub fn keep_dirty_in_memory(&mut self) {
        self.dirty_limit = usize::MAX;
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Reads the device's length again (it may have been grown).
    pub fn refresh_device_blocks(&mut self) -> Result<u64> {
        let len = self
            .storage
            .refresh_len()
            .map_err(|source| Error::MetadataIo {
                op: "stat",
                block: 0,
                source,
            })?;
        self.nr_blocks = len / BLOCK_SIZE as u64;
        Ok(self.nr_blocks)
    }

    /// Number of 4 KiB blocks the device holds.
    pub fn device_blocks(&self) -> u64 {
        self.nr_blocks
    }

    fn check_location(&self, b: u64) -> Result<()> {
        if b >= self.nr_blocks {
            return Err(Error::corrupt(format!(
                "reference to metadata block {b}, beyond the end of the device ({} blocks)",
                self.nr_blocks
            )));
        }
        Ok(())
    }

    /// Reads raw bytes of a block without validation or caching.
    pub fn read_raw(&self, b: u64) -> Result<Box<Block>> {
        self.check_location(b)?;
        let mut buf = block::zeroed();
        self.storage
            .read_at(&mut buf[..], b * BLOCK_SIZE as u64)
            .map_err(|source| Error::MetadataIo {
                op: "read",
                block: b,
                source,
            })?;
        Ok(buf)
    }

    /// Reads and validates (checksum, location) a block of the given kind.
    pub fn read(&mut self, b: u64, kind: BlockKind) -> Result<Arc<Block>> {
        self.fetch(b, kind, None::<fn(&Block) -> Result<()>>)
    }

    /// Reads a block; `check` runs once, when the block comes from the device (or on the
    /// first checked read of a block that a plain [`read`](Self::read) brought in).
    pub fn read_checked(
        &mut self,
        b: u64,
        kind: BlockKind,
        check: impl FnOnce(&Block) -> Result<()>,
    ) -> Result<Arc<Block>> {
        self.fetch(b, kind, Some(check))
    }

    fn fetch(
        &mut self,
        b: u64,
        kind: BlockKind,
        check: Option<impl FnOnce(&Block) -> Result<()>>,
    ) -> Result<Arc<Block>> {
        self.tick += 1;
        if let Some(e) = self.entries.get_mut(&b) {
            if e.kind != kind {
                return Err(Error::corrupt_block(
                    b,
                    kind,
                    format!("the block is already in use as a {}", e.kind),
                ));
            }
            if let (Some(check), false) = (check, e.checked) {
                check(&e.data)?;
                e.checked = true;
            }
            e.last_use = self.tick;
            return Ok(e.data.clone());
        }
        let buf = self.read_raw(b)?;
        block::validate(&buf, b, kind)?;
        let checked = match check {
            Some(check) => {
                check(&buf)?;
                true
            }
            None => false,
        };
        let data: Arc<Block> = Arc::from(buf);
        self.insert(b, data.clone(), kind, false, checked);
        Ok(data)
    }

    fn insert(&mut self, b: u64, data: Arc<Block>, kind: BlockKind, dirty: bool, checked: bool) {
        if dirty {
            self.nr_dirty += 1;
        }
        if let Some(old) = self.entries.insert(
            b,
            Entry {
                data,
                kind,
                checked,
                dirty,
                last_use: self.tick,
            },
        ) {
            if old.dirty {
                self.nr_dirty -= 1;
            }
        }
        self.evict_if_needed();
    }

    fn evict_if_needed(&mut self) {
        let clean = self.entries.len() - self.nr_dirty;
        if clean <= self.capacity {
            return;
        }
        // Evict the oldest quarter of the clean blocks at once to amortise the sort.
        let mut ages: Vec<(u64, u64)> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.dirty)
            .map(|(&b, e)| (e.last_use, b))
            .collect();
        ages.sort_unstable();
        let n = (clean - self.capacity) + self.capacity / 4;
        for &(_, b) in ages.iter().take(n) {
            self.entries.remove(&b);
        }
    }

    /// Puts a new block (zeroed or copied) at `b` as dirty; the caller has allocated `b`.
    pub fn write_new(&mut self, b: u64, kind: BlockKind, data: Box<Block>) -> Result<()> {
        self.check_location(b)?;
        self.tick += 1;
        // Our own contents (a new node, or a copy of one that passed its check).
        self.insert(b, Arc::from(data), kind, true, true);
        self.maybe_write_back()
    }

    /// Mutable access to a block of this transaction (already written with `write_new`).
    pub fn get_mut(&mut self, b: u64, kind: BlockKind) -> Result<&mut Block> {
        if !self.entries.contains_key(&b) {
            // Written back early and evicted: read it again.
            self.read(b, kind)?;
        }
        self.tick += 1;
        let e = self.entries.get_mut(&b).expect("present");
        if !e.dirty {
            e.dirty = true;
            self.nr_dirty += 1;
        }
        e.last_use = self.tick;
        e.kind = kind;
        Ok(Arc::make_mut(&mut e.data))
    }

    fn maybe_write_back(&mut self) -> Result<()> {
        if self.nr_dirty > self.dirty_limit {
            self.write_dirty()?;
        }
        Ok(())
    }

    /// Writes every dirty block (sealed with location and checksum); does not sync.
    pub fn write_dirty(&mut self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly("metadata opened read-only"));
        }
        let mut dirty: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(&b, _)| b)
            .collect();
        dirty.sort_unstable();
        for b in dirty {
            let e = self.entries.get_mut(&b).expect("present");
            let kind = e.kind;
            let data = Arc::make_mut(&mut e.data);
            block::seal(data, b, kind);
            self.storage
                .write_at(&data[..], b * BLOCK_SIZE as u64)
                .map_err(|source| Error::MetadataIo {
                    op: "write",
                    block: b,
                    source,
                })?;
            e.dirty = false;
            self.nr_dirty -= 1;
        }
        self.evict_if_needed();
        Ok(())
    }

    /// Writes a block straight to the device (the superblock), bypassing the cache.
    pub fn write_direct(&mut self, b: u64, kind: BlockKind, mut data: Box<Block>) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly("metadata opened read-only"));
        }
        block::seal(&mut data, b, kind);
        self.entries.remove(&b);
        self.storage
            .write_at(&data[..], b * BLOCK_SIZE as u64)
            .map_err(|source| Error::MetadataIo {
                op: "write",
                block: b,
                source,
            })
    }

    /// Seals a block to be written straight to the device later (a superblock written
    /// without this manager, see `FrozenCommit`), and drops any cached copy of it.
    pub fn seal_direct(
        &mut self,
        b: u64,
        kind: BlockKind,
        mut data: Box<Block>,
    ) -> Result<Box<Block>> {
        if self.read_only {
            return Err(Error::ReadOnly("metadata opened read-only"));
        }
        block::seal(&mut data, b, kind);
        self.forget(b);
        Ok(data)
    }

    pub fn sync(&self) -> Result<()> {
        self.storage.sync().map_err(|source| Error::MetadataIo {
            op: "sync",
            block: 0,
            source,
        })
    }

    /// Drops a block that was freed (its count reached zero) from the cache.
    pub fn forget(&mut self, b: u64) {
        if let Some(e) = self.entries.remove(&b) {
            if e.dirty {
                self.nr_dirty -= 1;
            }
        }
    }

    /// Forgets every cached and dirty block.
    #[cfg(test)]
    pub fn discard_all(&mut self) {
        self.entries.clear();
        self.nr_dirty = 0;
    }
}
