//! Thin metadata: one transaction over the superblock, the mapping trees, the details
//! tree and both space maps.
//!
//! Everything here is single-threaded; [`crate::pool::Pool`] puts it behind a lock and
//! keeps data I/O outside. A commit writes every new block, flushes, then writes the
//! superblock and flushes again (the caller flushes the data device first, so committed
//! mappings never point at data that is not durable).

use super::device::{DeviceDetails, Mapping, DETAILS_SIZE, MAX_DATA_BLOCKS, MAX_THIN_ID, MAX_TIME};
use super::superblock::{self, Superblock, METADATA_BLOCK_SECTORS, NEEDS_CHECK, VERSION};
use crate::journal::{Change, Journal};
use crate::pdata::block::{Block, BlockKind, BLOCK_SIZE};
use crate::pdata::block_manager::{BlockManager, DEFAULT_CACHE_BLOCKS};
use crate::pdata::btree::{self, node, ValueKind};
use crate::pdata::space_map::metadata::MAX_METADATA_BLOCKS;
use crate::pdata::space_map::{self, disk, SpaceMap};
use crate::pdata::tm::Tm;
use crate::storage::Storage;
use crate::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub const DETAILS_VALUE: ValueKind = ValueKind::Plain(DETAILS_SIZE);
/// Smallest metadata device we format: 512 blocks (2 MiB, LVM's minimum too).
pub const MIN_METADATA_BLOCKS: u64 = 512;

#[derive(Clone, Debug)]
pub struct MetadataOptions {
    /// Clean metadata blocks kept in memory.
    pub cache_blocks: usize,
    /// Open without ever writing (inspection, checking, export).
    pub read_only: bool,
}

impl Default for MetadataOptions {
    fn default() -> Self {
        MetadataOptions {
            cache_blocks: DEFAULT_CACHE_BLOCKS,
            read_only: false,
        }
    }
}

/// A transaction ended by [`ThinMetadata::freeze_commit`], its superblock not yet written.
pub struct FrozenCommit {
    storage: Arc<dyn Storage>,
    /// The transaction's metadata blocks, sealed, written by [`FrozenCommit::write`].
    blocks: Vec<(u64, Arc<Block>)>,
    superblock: Box<Block>,
    ident: u64,
}

impl FrozenCommit {
    /// Makes the frozen transaction durable: its blocks, then its superblock. Needs no
    /// access to the metadata, which goes on changing meanwhile (the caller flushes the
    /// data device first: the mappings committed point at data that must be durable).
    pub fn write(&self) -> Result<()> {
        let io = |op: &'static str| {
            move |source| Error::MetadataIo {
                op,
                block: 0,
                source,
            }
        };
        for (b, data) in &self.blocks {
            self.storage
                .write_at(&data[..], b * BLOCK_SIZE as u64)
                .map_err(|source| Error::MetadataIo {
                    op: "write",
                    block: *b,
                    source,
                })?;
        }
        self.storage.sync().map_err(io("sync"))?;
        self.storage
            .write_at(&self.superblock[..], 0)
            .map_err(io("write"))?;
        self.storage.sync().map_err(io("sync"))
    }
}

pub struct ThinMetadata {
    pub(crate) tm: Tm,
    sb: Superblock,
    devices: BTreeMap<u32, DeviceDetails>,
    dirty_devices: BTreeSet<u32>,
    changed: bool,
    /// Data blocks allocated by [`alloc_data_block`](Self::alloc_data_block) and neither
    /// mapped nor released yet (writes in flight). A commit records them as free.
    in_flight: BTreeSet<u64>,
    opts: MetadataOptions,
    /// Warnings found at format or open (e.g. unusable metadata space).
    pub warnings: Vec<String>,
    /// [`Superblock::ident`] of the superblock last committed (or read at open).
    committed_ident: u64,
    /// Where the data path's mapping changes go until they are committed (see
    /// [`crate::journal`]); None for inspection and offline use.
    journal: Option<Journal>,
    /// A journal whose records were replayed at open: attached once they are committed
    /// (until then its halves stay as they are, for a crash during that commit).
    journal_after_commit: Option<Journal>,
    /// A transaction was frozen and its superblock is not durable yet: no other may be.
    frozen_pending: bool,
    /// A read-only open is applying journaled changes in memory (see
    /// [`replay_in_memory`](Self::replay_in_memory)): changes are let through, commits not.
    replaying_in_memory: bool,
}

/// Snapshot of the pool's space, for status reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpaceUsage {
    pub data_blocks: u64,
    pub data_used: u64,
    pub metadata_blocks: u64,
    /// Metadata blocks used as dm-thin's status counts them: allocated plus the reserve.
    pub metadata_used: u64,
    /// Metadata blocks allocated (the metadata space map's count).
    pub metadata_allocated: u64,
    /// Metadata blocks held back for the commit that frees space (see
    /// [`ThinMetadata::check_metadata_space`]).
    pub metadata_reserve: u64,
}

/// A mapping value as read from a tree: it must name one of the pool's `nr_blocks` data
/// blocks, or I/O through it would go past the data device's end (or past 2^64 bytes).
#[inline]
fn mapping_in_pool(id: u32, vblock: u64, v: u64, nr_blocks: u64) -> Result<Mapping> {
    let m = Mapping::unpack(v);
    if m.data_block >= nr_blocks {
        return Err(Error::corrupt(format!(
            "thin device {id} maps block {vblock} to data block {}, beyond the pool's {nr_blocks}",
            m.data_block
        )));
    }
    Ok(m)
}

fn metadata_reserve(nr_blocks: u64) -> u64 {
    (nr_blocks / 10).min(4096)
}

impl ThinMetadata {
    /// Formats a new pool on `storage`: `data_blocks` data blocks of `data_block_sectors`.
    pub fn format(
        storage: Arc<dyn Storage>,
        data_block_sectors: u32,
        data_blocks: u64,
        opts: MetadataOptions,
    ) -> Result<Self> {
        superblock::check_data_block_size(data_block_sectors)?;
        if data_blocks > MAX_DATA_BLOCKS {
            return Err(Error::InvalidArgument(format!(
                "{data_blocks} data blocks: the format addresses at most 2^40"
            )));
        }
        let device_blocks = storage.len() / BLOCK_SIZE as u64;
        let mut warnings = Vec::new();
        if device_blocks > MAX_METADATA_BLOCKS {
            let w = format!(
                "metadata device has {device_blocks} blocks ({} bytes); the format can use only {MAX_METADATA_BLOCKS} ({} bytes), the rest is ignored",
                device_blocks * BLOCK_SIZE as u64,
                MAX_METADATA_BLOCKS * BLOCK_SIZE as u64
            );
            tracing::warn!("{w}");
            warnings.push(w);
        }
        let nr_blocks = device_blocks.min(MAX_METADATA_BLOCKS);
        if nr_blocks < MIN_METADATA_BLOCKS {
            return Err(Error::InvalidArgument(format!(
                "metadata device of {} bytes is too small (at least {} bytes)",
                storage.len(),
                MIN_METADATA_BLOCKS * BLOCK_SIZE as u64
            )));
        }
        let mut tm = Tm {
            bm: BlockManager::new(storage, opts.cache_blocks),
            meta_sm: SpaceMap::new("metadata", nr_blocks),
            data_sm: SpaceMap::new("data", data_blocks),
        };
        // Same order as the kernel's format: superblock, index, overflow root, bitmaps,
        // data-sm index root, data-sm overflow root, mapping root, details root.
        let sb_block = tm.meta_sm.alloc().expect("fresh space map");
        debug_assert_eq!(sb_block, 0);
        tm.meta_sm.index_root = tm.new_block(BlockKind::Index)?;
        tm.meta_sm.overflow_root = btree::empty(&mut tm, disk::OVERFLOW_VALUE)?;
        for i in 0..tm.meta_sm.bitmaps.len() {
            tm.meta_sm.bitmaps[i].location = tm.new_block(BlockKind::Bitmap)?;
        }
        tm.data_sm.index_root = btree::empty(&mut tm, disk::INDEX_VALUE)?;
        tm.data_sm.overflow_root = btree::empty(&mut tm, disk::OVERFLOW_VALUE)?;
        let mapping_root = btree::empty(&mut tm, ValueKind::Subtree)?;
        let details_root = btree::empty(&mut tm, DETAILS_VALUE)?;
        let sb = Superblock {
            version: VERSION,
            mapping_root,
            details_root,
            data_block_size: data_block_sectors,
            metadata_block_size: METADATA_BLOCK_SECTORS,
            metadata_nr_blocks: nr_blocks,
            ..Default::default()
        };
        let mut md = ThinMetadata {
            tm,
            sb,
            devices: BTreeMap::new(),
            dirty_devices: BTreeSet::new(),
            changed: true,
            in_flight: BTreeSet::new(),
            opts,
            warnings,
            committed_ident: 0,
            journal: None,
            journal_after_commit: None,
            frozen_pending: false,
            replaying_in_memory: false,
        };
        match md.commit() {
            Err(Error::MetadataExhausted { .. }) => Err(Error::InvalidArgument(format!(
                "a metadata device of {nr_blocks} blocks is too small for {data_blocks} data blocks \
                 (their space map alone needs {} blocks)",
                data_blocks.div_ceil(crate::pdata::space_map::bitmap::ENTRIES_PER_BITMAP)
            ))),
            Err(e) => Err(e),
            Ok(()) => Ok(md),
        }
    }

    /// Opens an existing pool.
    pub fn open(storage: Arc<dyn Storage>, opts: MetadataOptions) -> Result<Self> {
        let mut bm = BlockManager::new(storage, opts.cache_blocks);
        bm.set_read_only(opts.read_only);
        let raw = bm.read_raw(0)?;
        if raw.iter().all(|&b| b == 0) {
            return Err(Error::NotThinMetadata(
                "block 0 is all zeroes (an unformatted metadata device)".into(),
            ));
        }
        let sb = Superblock::unpack(&raw, 0)?;
        if sb.compat_ro_flags != 0 && !opts.read_only {
            return Err(Error::Unsupported(format!(
                "feature flags {:#x} allow only read-only use; open the pool read-only",
                sb.compat_ro_flags
            )));
        }
        let mut warnings = Vec::new();
        let mut tm = Tm {
            bm,
            meta_sm: SpaceMap::new("metadata", 0),
            data_sm: SpaceMap::new("data", 0),
        };
        let device_blocks = tm.bm.device_blocks();
        tm.meta_sm = space_map::metadata::load(&mut tm, &sb.metadata_sm_root)?;
        let metadata_blocks = tm.meta_sm.nr_blocks();
        tm.data_sm = disk::load(&mut tm, &sb.data_sm_root, metadata_blocks)?;
        // The checker loads space maps without this (it recounts every block itself).
        disk::check_in_use(
            &tm.meta_sm,
            "data space map bitmap",
            tm.data_sm.bitmaps.iter().map(|b| b.location),
        )?;
        let mut devices = BTreeMap::new();
        for (k, v) in btree::entries(&mut tm, sb.details_root, DETAILS_VALUE)? {
            let id = u32::try_from(k)
                .map_err(|_| Error::corrupt(format!("device details for thin id {k} > 2^32")))?;
            devices.insert(id, DeviceDetails::unpack(&v));
        }
        if device_blocks > sb.metadata_sm_root.nr_blocks
            && sb.metadata_sm_root.nr_blocks < MAX_METADATA_BLOCKS
        {
            warnings.push(format!(
                "metadata device has {device_blocks} blocks, the pool uses {}; `pool grow` puts the rest to use",
                sb.metadata_sm_root.nr_blocks
            ));
        }
        Ok(ThinMetadata {
            tm,
            committed_ident: sb.ident(),
            sb,
            devices,
            dirty_devices: BTreeSet::new(),
            changed: false,
            in_flight: BTreeSet::new(),
            opts,
            warnings,
            journal: None,
            journal_after_commit: None,
            frozen_pending: false,
            replaying_in_memory: false,
        })
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn storage(&self) -> Arc<dyn Storage> {
        self.tm.bm.storage().clone()
    }

    pub fn options(&self) -> &MetadataOptions {
        &self.opts
    }

    pub fn data_block_bytes(&self) -> u64 {
        self.sb.data_block_size as u64 * 512
    }

    pub fn transaction_id(&self) -> u64 {
        self.sb.trans_id
    }

    pub fn time(&self) -> u32 {
        self.sb.time
    }

    pub fn held_root(&self) -> Option<u64> {
        (self.sb.held_root != 0).then_some(self.sb.held_root)
    }

    pub fn needs_check(&self) -> bool {
        self.sb.needs_check()
    }

    /// Uncommitted changes exist.
    pub fn is_dirty(&self) -> bool {
        self.changed
    }

    pub fn devices(&self) -> &BTreeMap<u32, DeviceDetails> {
        &self.devices
    }

    pub fn device(&self, id: u32) -> Result<DeviceDetails> {
        self.devices
            .get(&id)
            .copied()
            .ok_or(Error::NoSuchDevice(id))
    }

    pub fn usage(&self) -> SpaceUsage {
        let metadata_blocks = self.tm.meta_sm.nr_blocks();
        let metadata_allocated = self.tm.meta_sm.nr_allocated();
        let metadata_reserve = metadata_reserve(metadata_blocks);
        SpaceUsage {
            data_blocks: self.tm.data_sm.nr_blocks(),
            data_used: self.tm.data_sm.nr_allocated(),
            metadata_blocks,
            // As dm-thin's status: the reserve counts as used (never more than the device).
            metadata_used: (metadata_allocated + metadata_reserve).min(metadata_blocks),
            metadata_allocated,
            metadata_reserve,
        }
    }

    /// Metadata blocks freed since the last commit (usable after the next one).
    pub fn pending_metadata_frees(&self) -> u64 {
        self.tm.meta_sm.pending_frees()
    }

    /// Data blocks freed since the last commit (usable after the next one).
    pub fn pending_data_frees(&self) -> u64 {
        self.tm.data_sm.pending_frees()
    }

    pub fn data_block_count(&self, b: u64) -> Result<u32> {
        self.tm.data_sm.get(b)
    }

    /// Discard passdown: from now on the data blocks each durable commit frees are kept
    /// from allocation until [`release_withheld_data`](Self::release_withheld_data), and
    /// [`take_freed_data`](Self::take_freed_data) lists them (see
    /// [`SpaceMap::set_withhold_freed`](crate::pdata::space_map::SpaceMap::set_withhold_freed)).
    pub fn set_withhold_freed_data(&mut self, on: bool) {
        self.tm.data_sm.set_withhold_freed(on);
    }

    /// The runs of data blocks durable commits freed since the last call, withheld.
    pub fn take_freed_data(&mut self) -> Vec<(u64, u64)> {
        self.tm.data_sm.take_freed()
    }

    /// Whether durable commits freed data blocks that
    /// [`take_freed_data`](Self::take_freed_data) has not listed yet.
    pub fn has_freed_data(&self) -> bool {
        self.tm.data_sm.has_freed()
    }

    /// Withholds, and lists for [`take_freed_data`](Self::take_freed_data), free data
    /// blocks for which `pick` holds (see [`SpaceMap::withhold_free`]).
    ///
    /// [`SpaceMap::withhold_free`]: crate::pdata::space_map::SpaceMap::withhold_free
    pub fn withhold_free_data(
        &mut self,
        from: u64,
        max_runs: usize,
        max_scan: u64,
        pick: impl Fn(u64) -> bool,
    ) -> (u64, Option<u64>) {
        self.tm
            .data_sm
            .withhold_free(from, max_runs, max_scan, pick)
    }

    /// Whether a withheld run of data blocks starts at `b`.
    pub fn withheld_data_run_at(&self, b: u64) -> bool {
        self.tm.data_sm.withheld_run_at(b)
    }

    /// Makes one of the data blocks [`take_freed_data`](Self::take_freed_data) would list
    /// allocatable again, unpunched.
    pub fn take_back_a_freed_data_block(&mut self) {
        self.tm.data_sm.take_back_a_freed_block()
    }

    /// Makes allocatable again the runs (or the first part of runs) that
    /// [`take_freed_data`](Self::take_freed_data) listed.
    pub fn release_withheld_data(&mut self, runs: &[(u64, u64)]) {
        self.tm.data_sm.release_withheld(runs)
    }

    /// Data blocks withheld from allocation now.
    pub fn withheld_data_blocks(&self) -> u64 {
        self.tm.data_sm.nr_withheld()
    }

    fn check_writable(&self) -> Result<()> {
        if self.opts.read_only && !self.replaying_in_memory {
            return Err(Error::ReadOnly("metadata opened read-only"));
        }
        Ok(())
    }

    /// Refuses work that allocates metadata once only the reserve is left: the reserve
    /// is kept for the commit that may free space.
    fn check_metadata_space(&self) -> Result<()> {
        self.check_writable()?;
        let free = self.tm.meta_sm.nr_allocatable();
        let reserve = metadata_reserve(self.tm.meta_sm.nr_blocks());
        if free <= reserve {
            return Err(Error::OutOfMetadataSpace { free, reserve });
        }
        Ok(())
    }

    fn check_id(id: u32) -> Result<()> {
        if id > MAX_THIN_ID {
            return Err(Error::InvalidArgument(format!(
                "thin id {id} is above the maximum {MAX_THIN_ID}"
            )));
        }
        Ok(())
    }

    fn touch(&mut self, id: u32) {
        self.dirty_devices.insert(id);
        self.changed = true;
    }

    pub fn create_thin(&mut self, id: u32) -> Result<()> {
        Self::check_id(id)?;
        if self.devices.contains_key(&id) {
            return Err(Error::DeviceExists(id));
        }
        self.check_metadata_space()?;
        let leaf = btree::empty(&mut self.tm, ValueKind::Data)?;
        self.sb.mapping_root = btree::insert(
            &mut self.tm,
            self.sb.mapping_root,
            id as u64,
            &leaf.to_le_bytes(),
            ValueKind::Subtree,
        )?
        .0;
        self.devices.insert(
            id,
            DeviceDetails {
                mapped_blocks: 0,
                transaction_id: self.sb.trans_id,
                creation_time: self.sb.time,
                snapshotted_time: self.sb.time,
            },
        );
        self.touch(id);
        Ok(())
    }

    /// Snapshot in O(1): the new device shares the origin's mapping tree root.
    pub fn create_snap(&mut self, id: u32, origin: u32) -> Result<()> {
        Self::check_id(id)?;
        if self.devices.contains_key(&id) {
            return Err(Error::DeviceExists(id));
        }
        let origin_details = self.device(origin)?;
        if self.sb.time >= MAX_TIME {
            return Err(Error::TimeExhausted);
        }
        self.check_metadata_space()?;
        let root = btree::lookup_u64(
            &mut self.tm,
            self.sb.mapping_root,
            origin as u64,
            ValueKind::Subtree,
        )?
        .ok_or_else(|| {
            Error::corrupt(format!(
                "thin device {origin} has details but no mapping tree"
            ))
        })?;
        self.tm.inc_meta(root)?;
        self.sb.mapping_root = btree::insert(
            &mut self.tm,
            self.sb.mapping_root,
            id as u64,
            &root.to_le_bytes(),
            ValueKind::Subtree,
        )?
        .0;
        self.sb.time += 1;
        let t = self.sb.time;
        self.devices.insert(
            id,
            DeviceDetails {
                mapped_blocks: origin_details.mapped_blocks,
                transaction_id: self.sb.trans_id,
                creation_time: t,
                snapshotted_time: t,
            },
        );
        self.devices
            .get_mut(&origin)
            .expect("checked")
            .snapshotted_time = t;
        self.touch(id);
        self.touch(origin);
        Ok(())
    }

    /// Deletes a device; blocks it shared with others stay, the rest are released.
    pub fn delete(&mut self, id: u32) -> Result<()> {
        self.device(id)?;
        self.check_writable()?;
        self.sb.mapping_root = btree::remove(
            &mut self.tm,
            self.sb.mapping_root,
            id as u64,
            ValueKind::Subtree,
        )?
        .0;
        self.sb.details_root =
            btree::remove(&mut self.tm, self.sb.details_root, id as u64, DETAILS_VALUE)?.0;
        self.devices.remove(&id);
        self.dirty_devices.remove(&id);
        self.changed = true;
        Ok(())
    }

    fn bottom_root(&mut self, id: u32) -> Result<u64> {
        let has_details = self.devices.contains_key(&id);
        btree::lookup_u64(
            &mut self.tm,
            self.sb.mapping_root,
            id as u64,
            ValueKind::Subtree,
        )?
        .ok_or_else(|| {
            if has_details {
                // The two trees disagree: damage, not a missing device.
                Error::corrupt(format!("thin device {id} has details but no mapping tree"))
            } else {
                Error::NoSuchDevice(id)
            }
        })
    }

    pub fn lookup(&mut self, id: u32, vblock: u64) -> Result<Option<Mapping>> {
        let root = self.bottom_root(id)?;
        let nr_blocks = self.tm.data_sm.nr_blocks();
        btree::lookup_u64(&mut self.tm, root, vblock, ValueKind::Data)?
            .map(|v| mapping_in_pool(id, vblock, v, nr_blocks))
            .transpose()
    }

    /// Allocates a data block (count 1, owned by the caller until mapped or released).
    pub fn alloc_data_block(&mut self) -> Result<u64> {
        self.check_writable()?;
        let b = self.tm.data_sm.alloc().ok_or(Error::OutOfDataSpace {
            nr_blocks: self.tm.data_sm.nr_blocks(),
        })?;
        self.in_flight.insert(b);
        self.changed = true;
        Ok(b)
    }

    /// Drops a reference on a data block (e.g. one allocated for a write that failed).
    pub fn release_data_block(&mut self, b: u64) -> Result<()> {
        self.tm.dec_data(b)?;
        self.in_flight.remove(&b);
        self.changed = true;
        Ok(())
    }

    /// Maps `vblock` of device `id` to `data_block` (whose reference the caller hands
    /// over) stamped with the current time. A previous mapping is released.
    /// This is the data path's insertion: with a journal attached, the change is recorded
    /// there before this returns (a full journal refuses it before anything changes).
    pub fn insert_mapping(&mut self, id: u32, vblock: u64, data_block: u64) -> Result<()> {
        if let Some(j) = &self.journal {
            j.check_room()?;
        }
        let time = self.sb.time;
        self.insert_mapping_at(id, vblock, Mapping { data_block, time })?;
        self.journal_append(Change::Map {
            dev: id,
            vblock,
            data_block,
        })
    }

    fn journal_append(&mut self, c: Change) -> Result<()> {
        match &mut self.journal {
            Some(j) => j.append(c),
            None => Ok(()),
        }
    }

    pub fn insert_mapping_at(&mut self, id: u32, vblock: u64, m: Mapping) -> Result<()> {
        self.check_mapping(id, &m)?;
        self.insert_checked(id, vblock, m)
    }

    /// What every insertion checks first: the device exists, metadata space is left, and
    /// the mapping names a block of the pool and a valid time.
    fn check_mapping(&mut self, id: u32, m: &Mapping) -> Result<()> {
        self.device(id)?;
        self.check_metadata_space()?;
        if m.data_block >= self.tm.data_sm.nr_blocks() || m.time > MAX_TIME {
            return Err(Error::InvalidArgument(format!(
                "mapping to data block {} (time {}) is outside the pool",
                m.data_block, m.time
            )));
        }
        Ok(())
    }

    fn insert_checked(&mut self, id: u32, vblock: u64, m: Mapping) -> Result<()> {
        let mut inserted = false;
        let value = m.pack().to_le_bytes();
        self.sb.mapping_root = btree::update_in_place(
            &mut self.tm,
            self.sb.mapping_root,
            id as u64,
            ValueKind::Subtree,
            |tm, root| {
                let (r, new) = btree::insert(tm, root, vblock, &value, ValueKind::Data)?;
                inserted = new;
                Ok(r)
            },
        )?;
        if inserted {
            // Saturating: the count comes from disk.
            let d = self.devices.get_mut(&id).expect("checked");
            d.mapped_blocks = d.mapped_blocks.saturating_add(1);
        }
        self.in_flight.remove(&m.data_block);
        self.touch(id);
        Ok(())
    }

    /// Maps `vblock` of device `id` to `m.data_block`, taking a *new* reference on that
    /// data block (unlike [`insert_mapping_at`](Self::insert_mapping_at), which consumes
    /// one the caller already owns). For rebuilding sharing that exists elsewhere, e.g.
    /// restoring a dump in which several devices map the same data block. The block need
    /// not be allocated yet. A previous mapping of `vblock` is released; re-inserting the
    /// same data block leaves its count unchanged.
    pub fn insert_mapping_ref(&mut self, id: u32, vblock: u64, m: Mapping) -> Result<()> {
        self.check_mapping(id, &m)?;
        if self
            .lookup(id, vblock)?
            .is_some_and(|old| old.data_block == m.data_block)
        {
            // `btree::insert` keeps the reference of an overwritten value that names
            // the same block, so no new one is taken.
            return self.insert_checked(id, vblock, m);
        }
        self.tm.inc_data(m.data_block)?;
        self.changed = true;
        if let Err(e) = self.insert_checked(id, vblock, m) {
            // Best effort: the transaction is aborted after a metadata failure anyway.
            let _ = self.tm.dec_data(m.data_block);
            return Err(e);
        }
        Ok(())
    }

    /// Restore support: sets the pool-wide superblock fields a `thin_dump` records (the
    /// snapshot time counter, the userspace transaction id, the flags and the uuid).
    /// Written at the next commit.
    pub(crate) fn restore_superblock_fields(
        &mut self,
        time: u32,
        trans_id: u64,
        flags: u32,
        uuid: [u8; 16],
    ) -> Result<()> {
        self.check_writable()?;
        if time > MAX_TIME {
            return Err(Error::InvalidArgument(format!(
                "time {time} is above the maximum {MAX_TIME}"
            )));
        }
        self.sb.time = time;
        self.sb.trans_id = trans_id;
        self.sb.flags = flags;
        self.sb.uuid = uuid;
        self.changed = true;
        Ok(())
    }

    /// Restore support: sets a device's transaction id and times. Its mapped-block count
    /// is not settable: the engine keeps it equal to the mapping tree.
    pub(crate) fn restore_device_details(
        &mut self,
        id: u32,
        transaction_id: u64,
        creation_time: u32,
        snapshotted_time: u32,
    ) -> Result<()> {
        self.check_writable()?;
        let d = self.devices.get_mut(&id).ok_or(Error::NoSuchDevice(id))?;
        d.transaction_id = transaction_id;
        d.creation_time = creation_time;
        d.snapshotted_time = snapshotted_time;
        self.touch(id);
        Ok(())
    }

    /// Unmaps every block in `[begin, end)`; returns how many were mapped.
    pub fn remove_range(&mut self, id: u32, begin: u64, end: u64) -> Result<u64> {
        self.device(id)?;
        self.check_writable()?;
        let root = self.bottom_root(id)?;
        if btree::lookup_ge(&mut self.tm, root, begin, ValueKind::Data)?
            .is_none_or(|(k, _)| k >= end)
        {
            return Ok(0);
        }
        let mut removed = 0u64;
        self.sb.mapping_root = btree::update_in_place(
            &mut self.tm,
            self.sb.mapping_root,
            id as u64,
            ValueKind::Subtree,
            |tm, mut root| {
                let mut next = begin;
                while let Some((k, _)) = btree::lookup_ge(tm, root, next, ValueKind::Data)? {
                    if k >= end {
                        break;
                    }
                    root = btree::remove(tm, root, k, ValueKind::Data)?.0;
                    removed += 1;
                    next = k + 1;
                }
                Ok(root)
            },
        )?;
        let d = self.devices.get_mut(&id).expect("checked");
        d.mapped_blocks = d.mapped_blocks.saturating_sub(removed);
        self.touch(id);
        Ok(removed)
    }

    /// Unmaps one virtual block in one descent of each tree; false when it was not mapped.
    /// (A discard takes each block's cell first, so it unmaps them one at a time.)
    /// The data path's unmapping: recorded in the journal as [`insert_mapping`](Self::insert_mapping) is.
    pub fn remove_mapping(&mut self, id: u32, vb: u64) -> Result<bool> {
        self.device(id)?;
        self.check_writable()?;
        if let Some(j) = &self.journal {
            j.check_room()?;
        }
        let mut removed = false;
        self.sb.mapping_root = btree::update_in_place(
            &mut self.tm,
            self.sb.mapping_root,
            id as u64,
            ValueKind::Subtree,
            |tm, root| {
                let (root, was) = btree::remove(tm, root, vb, ValueKind::Data)?;
                removed = was;
                Ok(root)
            },
        )?;
        if removed {
            let d = self.devices.get_mut(&id).expect("checked");
            d.mapped_blocks = d.mapped_blocks.saturating_sub(1);
            self.touch(id);
            self.journal_append(Change::Unmap {
                dev: id,
                vblock: vb,
            })?;
        }
        Ok(removed)
    }

    /// The first mapped virtual block of `id` in `[begin, end)`.
    pub fn next_mapped(&mut self, id: u32, begin: u64, end: u64) -> Result<Option<u64>> {
        let root = self.bottom_root(id)?;
        Ok(
            btree::lookup_ge(&mut self.tm, root, begin, ValueKind::Data)?
                .map(|(k, _)| k)
                .filter(|&k| k < end),
        )
    }

    /// Calls `f(vblock, mapping)` for every mapping of `id` in `[begin, end)` in order.
    pub fn for_each_mapping(
        &mut self,
        id: u32,
        begin: u64,
        end: u64,
        f: &mut dyn FnMut(u64, Mapping) -> Result<()>,
    ) -> Result<()> {
        let root = self.bottom_root(id)?;
        let nr_blocks = self.tm.data_sm.nr_blocks();
        btree::for_each_leaf_in(&mut self.tm, root, ValueKind::Data, begin, end, &mut |n| {
            for i in 0..node::nr_entries(n) {
                let k = node::key(n, i);
                if k >= begin && k < end {
                    f(k, mapping_in_pool(id, k, node::value_u64(n, i), nr_blocks)?)?;
                }
            }
            Ok(())
        })
    }

    /// Compare-and-swap of the userspace transaction id.
    pub fn set_transaction_id(&mut self, old: u64, new: u64) -> Result<()> {
        self.check_writable()?;
        if self.sb.trans_id != old {
            return Err(Error::TransactionIdMismatch {
                expected: old,
                actual: self.sb.trans_id,
            });
        }
        self.sb.trans_id = new;
        self.changed = true;
        Ok(())
    }

    /// Grows the data device's space map (it can never shrink).
    pub fn resize_data(&mut self, new_blocks: u64) -> Result<()> {
        self.check_writable()?;
        let cur = self.tm.data_sm.nr_blocks();
        if new_blocks < cur {
            return Err(Error::InvalidArgument(format!(
                "cannot shrink the data space map from {cur} to {new_blocks} blocks"
            )));
        }
        if new_blocks > MAX_DATA_BLOCKS {
            return Err(Error::InvalidArgument(format!(
                "{new_blocks} data blocks: the format addresses at most 2^40"
            )));
        }
        if new_blocks > cur {
            self.tm.data_sm.extend(new_blocks);
            self.changed = true;
        }
        Ok(())
    }

    /// Puts a grown metadata device to use (up to the format's limit). Returns the new
    /// number of metadata blocks.
    pub fn resize_metadata(&mut self) -> Result<u64> {
        self.check_writable()?;
        let device = self.tm.bm.refresh_device_blocks()?;
        let cur = self.tm.meta_sm.nr_blocks();
        let new = device.min(MAX_METADATA_BLOCKS);
        if new < cur {
            return Err(Error::InvalidArgument(format!(
                "the metadata device shrank to {device} blocks; the pool uses {cur}"
            )));
        }
        if new > cur {
            // New bitmaps are placed (allocated from the grown space itself) at commit.
            self.tm.meta_sm.extend(new);
            self.changed = true;
        }
        Ok(new)
    }

    /// Holds a read-only copy of the committed metadata (for `thin_dump -m`, deltas).
    pub fn reserve_metadata_snap(&mut self) -> Result<u64> {
        self.check_writable()?;
        if self.sb.held_root != 0 {
            return Err(Error::MetadataSnapExists(self.sb.held_root));
        }
        self.check_metadata_space()?;
        self.commit()?;
        let mut copy = self.sb.clone();
        copy.data_sm_root = Default::default();
        copy.metadata_sm_root = Default::default();
        copy.held_root = 0;
        let h = self.tm.new_block_with(BlockKind::Superblock, copy.pack())?;
        self.tm.inc_meta(self.sb.mapping_root)?;
        self.tm.inc_meta(self.sb.details_root)?;
        self.sb.held_root = h;
        self.changed = true;
        self.commit()?;
        Ok(h)
    }

    pub fn release_metadata_snap(&mut self) -> Result<()> {
        self.check_writable()?;
        let h = self.sb.held_root;
        if h == 0 {
            return Err(Error::NoMetadataSnap);
        }
        let blk = self.tm.read(h, BlockKind::Superblock)?;
        let copy = Superblock::unpack(&blk, h)?;
        btree::dec_tree(&mut self.tm, copy.mapping_root, ValueKind::Subtree)?;
        btree::dec_tree(&mut self.tm, copy.details_root, DETAILS_VALUE)?;
        self.tm.dec_meta(h)?;
        self.sb.held_root = 0;
        self.changed = true;
        self.commit()
    }

    /// Reads the held metadata snapshot's superblock copy.
    pub fn metadata_snap(&mut self) -> Result<Superblock> {
        let h = self.sb.held_root;
        if h == 0 {
            return Err(Error::NoMetadataSnap);
        }
        let blk = self.tm.read(h, BlockKind::Superblock)?;
        Superblock::unpack(&blk, h)
    }

    /// Makes the transaction durable. The caller must have flushed the data device.
    pub fn commit(&mut self) -> Result<()> {
        if let Some(frozen) = self.freeze_commit()? {
            frozen.write()?;
            self.commit_durable(frozen);
        }
        Ok(())
    }

    /// The first step of a commit that does not hold up the next transaction: ends this
    /// transaction (its metadata written to the device, not synced; its superblock built)
    /// and starts the next, in which changes may go on at once while the caller makes the
    /// frozen one durable ([`FrozenCommit::write`], without holding this metadata) and
    /// then calls [`commit_durable`](Self::commit_durable). Until then the blocks of both
    /// the frozen transaction and the last durable commit are kept from reuse (see
    /// [`SpaceMap::freeze`](crate::pdata::space_map::SpaceMap::freeze)), and the journal
    /// records the next transaction's changes where a crash on either side of the
    /// superblock write finds them. None when nothing changed.
    ///
    /// Every data block mapped in the frozen transaction had its data written before its
    /// mapping was made: a sync of the data device after this returns covers them.
    pub fn freeze_commit(&mut self) -> Result<Option<FrozenCommit>> {
        if self.frozen_pending {
            return Err(Error::InvalidArgument(
                "a commit is under way: its superblock is not durable yet".into(),
            ));
        }
        if !self.changed {
            return Ok(None);
        }
        if self.opts.read_only {
            return Err(Error::ReadOnly("metadata opened read-only"));
        }
        // Blocks of writes still in flight are not mapped yet: commit them as free, so that
        // a crash cannot leak them, and take them back afterwards.
        let in_flight: Vec<u64> = self.in_flight.iter().copied().collect();
        for &b in &in_flight {
            self.tm.data_sm.dec(b)?;
        }
        let r = self.freeze_transaction();
        for &b in &in_flight {
            self.tm.data_sm.inc(b)?;
        }
        if r.is_ok() && !in_flight.is_empty() {
            self.changed = true;
        }
        r.map(Some)
    }

    fn freeze_transaction(&mut self) -> Result<FrozenCommit> {
        for id in std::mem::take(&mut self.dirty_devices) {
            if let Some(d) = self.devices.get(&id) {
                self.sb.details_root = btree::insert(
                    &mut self.tm,
                    self.sb.details_root,
                    id as u64,
                    &d.pack(),
                    DETAILS_VALUE,
                )?
                .0;
            }
        }
        disk::commit(&mut self.tm)?;
        space_map::metadata::commit(&mut self.tm)?;
        self.sb.data_sm_root = disk::root_of(&self.tm.data_sm);
        self.sb.metadata_sm_root = disk::root_of(&self.tm.meta_sm);
        self.sb.version = VERSION;
        self.sb.blocknr = 0;
        // Sealed here, written by FrozenCommit::write without the metadata's lock.
        let blocks = self.tm.bm.seal_dirty_for_later()?;
        let ident = self.sb.ident();
        let superblock = self
            .tm
            .bm
            .seal_direct(0, BlockKind::Superblock, self.sb.pack())?;
        if let Some(j) = &mut self.journal {
            // The next transaction's changes go where a crash on either side of the
            // superblock write finds them. A journal that cannot switch fails the commit:
            // changes it could not record would be acknowledged and lost.
            j.switch(ident)?;
        }
        self.tm.meta_sm.freeze();
        self.tm.data_sm.freeze();
        self.changed = false;
        self.frozen_pending = true;
        Ok(FrozenCommit {
            storage: self.tm.bm.storage().clone(),
            blocks,
            superblock,
            ident,
        })
    }

    /// The last step of a commit: the superblock [`freeze_commit`](Self::freeze_commit)
    /// built is durable ([`FrozenCommit::write`] succeeded).
    pub fn commit_durable(&mut self, frozen: FrozenCommit) {
        self.frozen_pending = false;
        self.tm.bm.unpin(frozen.blocks.iter().map(|(b, _)| *b));
        self.tm.meta_sm.durable();
        self.tm.data_sm.durable();
        self.committed_ident = frozen.ident;
        if let Some(mut j) = self.journal_after_commit.take() {
            // The changes replayed at open are durable now: the journal starts over.
            match j.reset(self.committed_ident) {
                Ok(()) => self.journal = Some(j),
                Err(e) => tracing::error!("{e}"),
            }
        }
    }

    /// Drops everything since the last commit by reopening from disk. The journal keeps
    /// its records, frozen: they are the acknowledged writes the rollback took from
    /// memory, and the next open replays them (after a check, since an abort comes with
    /// needs_check). [`void_journal`](Self::void_journal) drops them instead.
    pub fn abort(&mut self) -> Result<()> {
        let storage = self.storage();
        let journal = self.journal.take();
        let fresh = ThinMetadata::open(storage, self.opts.clone());
        let journal = journal.map(|mut j| {
            j.freeze("a metadata failure");
            j
        });
        match fresh {
            Ok(fresh) => {
                // Blocks freed by durable commits and not given back yet (or being given
                // back now) stay withheld: free on the disk, they must not be allocated
                // before their punch is over.
                let withheld = self.tm.data_sm.take_withheld();
                *self = fresh;
                self.journal = journal;
                self.tm.data_sm.restore_withheld(withheld);
                Ok(())
            }
            Err(e) => {
                self.journal = journal;
                Err(e)
            }
        }
    }

    /// Drops the journal's records: a deliberate abort, whose changes must not come back.
    pub fn void_journal(&mut self) -> Result<()> {
        match &mut self.journal {
            Some(j) => j.reset(self.committed_ident),
            None => Ok(()),
        }
    }

    /// Identity of the superblock last committed: what the journal's records extend.
    pub fn committed_ident(&self) -> u64 {
        self.committed_ident
    }

    /// Records the data path's mapping changes in `journal` from now on, after applying
    /// `pending`, the changes it held for the committed superblock
    /// ([`Journal::pending`]). Changes to a device the metadata does not hold are skipped
    /// (it was created in the transaction that did not commit, so nothing of it was
    /// acknowledged). Returns how many were applied; the caller commits them (after
    /// flushing the data device, which holds their data).
    pub fn attach_journal(&mut self, mut journal: Journal, pending: &[Change]) -> Result<usize> {
        self.check_writable()?;
        let applied = self.apply_pending(pending)?;
        if pending.is_empty() {
            journal.reset(self.committed_ident)?;
            self.journal = Some(journal);
        } else {
            // Attached once the caller's commit makes them durable; no other change comes
            // in between (the pool is not open yet).
            self.journal_after_commit = Some(journal);
        }
        Ok(applied)
    }

    /// For a read-only open (inspection: `thin ls`, `export`, `dump`, deltas): applies the
    /// journaled changes in memory only, so that what is shown holds every acknowledged
    /// write, and nothing is written. Returns how many were applied (changes to devices
    /// the metadata does not hold are skipped, as at a writable open).
    pub fn replay_in_memory(&mut self, pending: &[Change]) -> Result<usize> {
        if !self.opts.read_only {
            return Err(Error::InvalidArgument(
                "replay_in_memory is for read-only opens; attach the journal instead".into(),
            ));
        }
        self.tm.bm.keep_dirty_in_memory();
        self.replaying_in_memory = true;
        let r = self.apply_pending(pending);
        self.replaying_in_memory = false;
        r
    }

    fn apply_pending(&mut self, pending: &[Change]) -> Result<usize> {
        let mut applied = 0;
        for (i, c) in pending.iter().enumerate() {
            let dev = match *c {
                Change::Map { dev, .. } | Change::Unmap { dev, .. } => dev,
            };
            if !self.devices.contains_key(&dev) {
                continue;
            }
            self.apply_journaled(c).map_err(|e| {
                Error::JournalReplay(format!(
                    "change {} of {} ({c:?}): {e}",
                    i + 1,
                    pending.len()
                ))
            })?;
            applied += 1;
        }
        Ok(applied)
    }

    fn apply_journaled(&mut self, c: &Change) -> Result<()> {
        match *c {
            Change::Map {
                dev,
                vblock,
                data_block,
            } => {
                // A journaled block was free at the last commit and is mapped once: a
                // record that says otherwise is not one this engine wrote.
                if data_block < self.tm.data_sm.nr_blocks()
                    && self.data_block_count(data_block)? != 0
                {
                    return Err(Error::corrupt(format!(
                        "data block {data_block} is already in use"
                    )));
                }
                let time = self.sb.time;
                self.insert_mapping_ref(dev, vblock, Mapping { data_block, time })
            }
            Change::Unmap { dev, vblock } => self.remove_mapping(dev, vblock).map(|_| ()),
        }
    }

    /// Sets or clears NEEDS_CHECK in the committed superblock on disk (and in core).
    /// Only block 0 is rewritten; nothing of the current transaction is committed.
    pub fn write_needs_check(&mut self, set: bool) -> Result<()> {
        self.check_writable()?;
        let raw = self.tm.bm.read_raw(0)?;
        let mut on_disk = Superblock::unpack(&raw, 0)?;
        if set {
            on_disk.flags |= NEEDS_CHECK;
            self.sb.flags |= NEEDS_CHECK;
        } else {
            on_disk.flags &= !NEEDS_CHECK;
            self.sb.flags &= !NEEDS_CHECK;
        }
        self.tm
            .bm
            .write_direct(0, BlockKind::Superblock, on_disk.pack())?;
        self.tm.bm.sync()
    }

    /// Raw access to the transaction manager, for the checker and tests.
    pub fn tm(&mut self) -> &mut Tm {
        &mut self.tm
    }
}

#[cfg(test)]
mod tests;
