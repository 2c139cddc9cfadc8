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
use crate::hash::IntHashBuilder;
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
    /// Sealed for a commit under way that writes it without this manager (see
    /// [`BlockManager::seal_dirty_for_later`]): kept in memory, where the next transaction
    /// reads it, until [`BlockManager::unpin`] says it is on the device.
    pinned: bool,
    last_use: u64,
}

pub struct BlockManager {
    storage: Arc<dyn Storage>,
    nr_blocks: u64,
    entries: HashMap<u64, Entry, IntHashBuilder>,
    capacity: usize,
    dirty_limit: usize,
    nr_dirty: usize,
    nr_pinned: usize,
    tick: u64,
    read_only: bool,
}

impl BlockManager {
    pub fn new(storage: Arc<dyn Storage>, capacity: usize) -> Self {
        let nr_blocks = storage.len() / BLOCK_SIZE as u64;
        BlockManager {
            storage,
            nr_blocks,
            entries: HashMap::default(),
            capacity: capacity.max(64),
            dirty_limit: capacity.max(64) * 2,
            nr_dirty: 0,
            nr_pinned: 0,
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
                pinned: false,
                last_use: self.tick,
            },
        ) {
            if old.dirty {
                self.nr_dirty -= 1;
            }
            if old.pinned {
                self.nr_pinned -= 1;
            }
        }
        self.evict_if_needed();
    }

    fn evict_if_needed(&mut self) {
        let clean = self.entries.len() - self.nr_dirty - self.nr_pinned;
        if clean <= self.capacity {
            return;
        }
        // Evict the oldest quarter of the clean blocks at once to amortise the sort.
        let mut ages: Vec<(u64, u64)> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.dirty && !e.pinned)
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
        if e.pinned {
            // The transaction manager shadows every block of an earlier transaction: one
            // changed in place here would change what the commit under way writes.
            return Err(Error::corrupt(format!(
                "metadata block {b} belongs to a commit under way and cannot change in place"
            )));
        }
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

    /// The dirty blocks, in order of location.
    fn dirty_blocks(&self) -> Vec<u64> {
        let mut dirty: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(&b, _)| b)
            .collect();
        dirty.sort_unstable();
        dirty
    }

    /// Writes every dirty block (sealed with location and checksum); does not sync.
    pub fn write_dirty(&mut self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly("metadata opened read-only"));
        }
        let dirty = self.dirty_blocks();
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

    /// Seals every dirty block (location and checksum) for a commit that writes them itself
    /// without this manager, later and without its lock ([`crate::thin::metadata::FrozenCommit`]):
    /// returns them, and keeps them in memory, clean and not evictable, until
    /// [`unpin`](Self::unpin): the next transaction reads them from here meanwhile, since
    /// the device may not hold them yet.
    pub fn seal_dirty_for_later(&mut self) -> Result<Vec<(u64, Arc<Block>)>> {
        if self.read_only {
            return Err(Error::ReadOnly("metadata opened read-only"));
        }
        let dirty = self.dirty_blocks();
        let mut out = Vec::with_capacity(dirty.len());
        for b in dirty {
            let e = self.entries.get_mut(&b).expect("present");
            let kind = e.kind;
            block::seal(Arc::make_mut(&mut e.data), b, kind);
            e.dirty = false;
            self.nr_dirty -= 1;
            if !e.pinned {
                e.pinned = true;
                self.nr_pinned += 1;
            }
            out.push((b, e.data.clone()));
        }
        Ok(out)
    }

    /// The blocks [`seal_dirty_for_later`](Self::seal_dirty_for_later) returned are on the
    /// device: they may be evicted again.
    pub fn unpin(&mut self, blocks: impl IntoIterator<Item = u64>) {
        for b in blocks {
            if let Some(e) = self.entries.get_mut(&b) {
                if e.pinned {
                    e.pinned = false;
                    self.nr_pinned -= 1;
                }
            }
        }
        self.evict_if_needed();
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
            if e.pinned {
                self.nr_pinned -= 1;
            }
        }
    }

    /// Forgets every cached and dirty block.
    #[cfg(test)]
    pub fn discard_all(&mut self) {
        self.entries.clear();
        self.nr_dirty = 0;
        self.nr_pinned = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    /// Blocks sealed for a commit that writes them later stay readable from memory, however
    /// full the cache gets, until they are unpinned; none can change in place meanwhile.
    #[test]
    fn blocks_sealed_for_a_later_write_stay_in_memory_until_unpinned() {
        let storage = Arc::new(MemStorage::new(512 * BLOCK_SIZE as u64));
        let mut bm = BlockManager::new(storage.clone(), 64);
        for b in 1..=8u64 {
            let mut data = block::zeroed();
            data[100] = b as u8;
            bm.write_new(b, BlockKind::Node, data).unwrap();
        }
        let sealed = bm.seal_dirty_for_later().unwrap();
        assert_eq!(sealed.len(), 8);
        // Not on the device yet.
        assert!(bm.read_raw(3).unwrap().iter().all(|&x| x == 0));
        // Many other blocks read through the cache: the sealed ones are not evicted.
        for (i, b) in (100..400u64).enumerate() {
            let mut data = block::zeroed();
            data[0] = i as u8;
            block::seal(&mut data, b, BlockKind::Node);
            storage.write_at(&data[..], b * BLOCK_SIZE as u64).unwrap();
            bm.read(b, BlockKind::Node).unwrap();
        }
        assert_eq!(bm.read(3, BlockKind::Node).unwrap()[100], 3);
        assert!(bm.get_mut(3, BlockKind::Node).is_err());
        for (b, data) in &sealed {
            storage.write_at(&data[..], b * BLOCK_SIZE as u64).unwrap();
        }
        bm.unpin(sealed.iter().map(|(b, _)| *b));
        assert!(bm.entries.len() - bm.nr_dirty <= bm.capacity + 8);
        assert_eq!(bm.read(3, BlockKind::Node).unwrap()[100], 3);
    }
}
