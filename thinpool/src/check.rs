//! An offline checker that verifies a pool the way `thin_check` does, and more.
//!
//! It walks every tree reachable from the superblock (and from a held metadata snapshot),
//! checks each node's format and the B-tree invariants (ordering, parent keys, the
//! one-third fill rule, uniform leaf depth), recomputes the reference count of every
//! metadata and data block from scratch (§7 of the format: each physical node counted
//! once, shared subtrees pushed down lazily) and compares them with both on-disk space
//! maps, and checks that device details agree with the mapping trees.

use crate::pdata::block::BlockKind;
use crate::pdata::block_manager::BlockManager;
use crate::pdata::btree::{self, node, KeyRange, ValueKind};
use crate::pdata::space_map::{self, disk, SpaceMap};
use crate::pdata::tm::Tm;
use crate::storage::Storage;
use crate::thin::device::DeviceDetails;
use crate::thin::metadata::DETAILS_VALUE;
use crate::thin::superblock::Superblock;
use crate::Result;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CheckReport {
    /// Damage: the pool must not be written until repaired.
    pub errors: Vec<String>,
    /// Harmless inconsistencies (e.g. hints the kernel would recompute).
    pub warnings: Vec<String>,
    pub devices: u64,
    pub mappings: u64,
    pub metadata_blocks_used: u64,
    pub data_blocks_used: u64,
    pub needs_check: bool,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

const MAX_REPORTED: usize = 50;

struct Checker {
    tm: Tm,
    report: CheckReport,
    meta_refs: Vec<u32>,
    data_refs: Vec<u32>,
    visited: HashSet<u64>,
    /// Entry count of each visited subtree, to check mapped_blocks of shared devices.
    subtree_entries: HashMap<u64, u64>,
}

impl Checker {
    fn error(&mut self, msg: String) {
        if self.report.errors.len() < MAX_REPORTED {
            self.report.errors.push(msg);
        } else if self.report.errors.len() == MAX_REPORTED {
            self.report.errors.push("… further errors not shown".into());
        }
    }

    fn meta_ref(&mut self, b: u64, what: &str) -> bool {
        match self.meta_refs.get_mut(b as usize) {
            Some(c) => {
                *c += 1;
                true
            }
            None => {
                self.error(format!(
                    "{what} points at metadata block {b}, beyond the space map"
                ));
                false
            }
        }
    }

    /// Walks a tree; returns its number of leaf entries. `top` tells whether leaf values
    /// are bottom-level roots (then each subtree is walked too).
    fn walk(&mut self, root: u64, vk: ValueKind, what: &str) -> u64 {
        let mut leaf_depth = None;
        let mut last_key = None;
        self.walk_node(
            root,
            vk,
            what,
            true,
            0,
            KeyRange::ALL,
            &mut leaf_depth,
            &mut last_key,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn walk_node(
        &mut self,
        b: u64,
        vk: ValueKind,
        what: &str,
        is_root: bool,
        depth: usize,
        range: KeyRange,
        leaf_depth: &mut Option<usize>,
        last_key: &mut Option<u64>,
    ) -> u64 {
        if depth > 32 {
            self.error(format!(
                "{what}: tree deeper than 32 levels at block {b} (a cycle?)"
            ));
            return 0;
        }
        if !self.visited.insert(b) {
            // Shared node: counted once, children already walked.
            return self.subtree_entries.get(&b).copied().unwrap_or(0);
        }
        let n = match btree::read_node(&mut self.tm, b, vk) {
            Ok(n) => n,
            Err(e) => {
                self.error(format!("{what}: {e}"));
                return 0;
            }
        };
        let count = node::nr_entries(&n);
        if !is_root && count < node::max(&n) / 3 {
            self.error(format!(
                "{what}: node {b} has {count} entries, fewer than the minimum {}",
                node::max(&n) / 3
            ));
        }
        if let Err(e) = node::check_range(&n, b, range) {
            self.error(format!("{what}: {e}"));
        }
        let mut entries = 0u64;
        if node::is_leaf(&n) {
            match leaf_depth {
                Some(d) if *d != depth => {
                    self.error(format!("{what}: leaf {b} at depth {depth}, others at {d}"))
                }
                _ => *leaf_depth = Some(depth),
            }
            if let (Some(prev), true) = (*last_key, count > 0) {
                if node::key(&n, 0) <= prev {
                    self.error(format!(
                        "{what}: leaf {b} starts at key {} after key {prev}",
                        node::key(&n, 0)
                    ));
                }
            }
            if count > 0 {
                *last_key = Some(node::key(&n, count - 1));
            }
            entries = count as u64;
            for i in 0..count {
                let v = node::value_u64(&n, i);
                match vk {
                    ValueKind::Data => {
                        let d = v >> 24;
                        match self.data_refs.get_mut(d as usize) {
                            Some(c) => *c += 1,
                            None => self.error(format!(
                                "{what}: block {} maps to data block {d}, beyond the data device",
                                node::key(&n, i)
                            )),
                        }
                    }
                    ValueKind::Subtree => {
                        let dev = node::key(&n, i);
                        if self.meta_ref(v, "mapping tree") {
                            let sub = self.walk(
                                v,
                                ValueKind::Data,
                                &format!("mapping tree of device {dev}"),
                            );
                            self.subtree_entries.insert(v, sub);
                        }
                    }
                    ValueKind::Plain(_) => {}
                }
            }
        } else {
            for i in 0..count {
                let c = node::value_u64(&n, i);
                if self.meta_ref(c, what) {
                    entries += self.walk_node(
                        c,
                        vk,
                        what,
                        false,
                        depth + 1,
                        range.child(&n, i),
                        leaf_depth,
                        last_key,
                    );
                }
            }
        }
        self.subtree_entries.insert(b, entries);
        entries
    }
}

/// Checks a pool's metadata. `Err` only for I/O that prevents any check (the report
/// carries everything else).
pub fn check(storage: Arc<dyn Storage>) -> Result<CheckReport> {
    let mut bm = BlockManager::new(storage, 1024);
    bm.set_read_only(true);
    let mut report = CheckReport::default();
    let raw = bm.read_raw(0)?;
    let sb = match Superblock::unpack(&raw, 0) {
        Ok(sb) => sb,
        Err(e) => {
            report.errors.push(format!("superblock: {e}"));
            return Ok(report);
        }
    };
    report.needs_check = sb.needs_check();
    let mut tm = Tm {
        bm,
        meta_sm: SpaceMap::new("metadata", 0),
        data_sm: SpaceMap::new("data", 0),
    };
    let meta_sm = space_map::metadata::load(&mut tm, &sb.metadata_sm_root);
    let metadata_blocks = match &meta_sm {
        Ok(m) => m.nr_blocks(),
        Err(_) => tm.bm.device_blocks(),
    };
    let data_sm = disk::load(&mut tm, &sb.data_sm_root, metadata_blocks);
    let (meta_sm, data_sm) = match (meta_sm, data_sm) {
        (Ok(m), Ok(d)) => (m, d),
        (m, d) => {
            if let Err(e) = m {
                report.errors.push(format!("metadata space map: {e}"));
            }
            if let Err(e) = d {
                report.errors.push(format!("data space map: {e}"));
            }
            return Ok(report);
        }
    };
    let mut c = Checker {
        meta_refs: vec![0; meta_sm.nr_blocks() as usize],
        data_refs: vec![0; data_sm.nr_blocks() as usize],
        tm,
        report,
        visited: HashSet::new(),
        subtree_entries: HashMap::new(),
    };
    c.meta_ref(0, "superblock");
    c.count_space_maps(&meta_sm, &data_sm);
    // Live trees, then the metadata snapshot's.
    let mut roots = vec![(sb.mapping_root, sb.details_root, "")];
    if sb.held_root != 0 && c.meta_ref(sb.held_root, "held metadata snapshot") {
        match c
            .tm
            .read(sb.held_root, BlockKind::Superblock)
            .and_then(|b| Superblock::unpack(&b, sb.held_root))
        {
            Ok(h) => roots.push((h.mapping_root, h.details_root, "metadata snapshot: ")),
            Err(e) => c.error(format!("held metadata snapshot: {e}")),
        }
    }
    for (i, (mapping_root, details_root, prefix)) in roots.into_iter().enumerate() {
        c.check_devices(mapping_root, details_root, prefix, i == 0, sb.time);
    }
    // The data-space-map index leaves name the bitmaps; those were counted above from
    // the loaded index (same blocks).

    // Compare recomputed counts with the space maps.
    let meta_refs = std::mem::take(&mut c.meta_refs);
    let data_refs = std::mem::take(&mut c.data_refs);
    c.compare_counts(
        "metadata",
        &meta_sm,
        &meta_refs,
        sb.metadata_sm_root.nr_allocated,
    );
    c.compare_counts("data", &data_sm, &data_refs, sb.data_sm_root.nr_allocated);
    Ok(c.report)
}

impl Checker {
    /// The space maps' own blocks: their indexes, bitmaps and overflow trees.
    fn count_space_maps(&mut self, meta_sm: &SpaceMap, data_sm: &SpaceMap) {
        self.meta_ref(meta_sm.index_root, "metadata space map index");
        for (i, bm) in meta_sm.bitmaps.iter().enumerate() {
            self.meta_ref(bm.location, &format!("metadata space map bitmap {i}"));
        }
        self.meta_ref(meta_sm.overflow_root, "metadata space map");
        self.walk(
            meta_sm.overflow_root,
            disk::OVERFLOW_VALUE,
            "metadata ref-count tree",
        );
        self.meta_ref(data_sm.index_root, "data space map");
        self.walk(
            data_sm.index_root,
            disk::INDEX_VALUE,
            "data space map index",
        );
        for (i, bm) in data_sm.bitmaps.iter().enumerate() {
            self.meta_ref(bm.location, &format!("data space map bitmap {i}"));
        }
        self.meta_ref(data_sm.overflow_root, "data space map");
        self.walk(
            data_sm.overflow_root,
            disk::OVERFLOW_VALUE,
            "data ref-count tree",
        );
    }

    /// One set of trees (the live ones, or a held metadata snapshot's): every device's
    /// mapping tree walked and counted, and its details compared with what it holds.
    fn check_devices(
        &mut self,
        mapping_root: u64,
        details_root: u64,
        prefix: &str,
        live: bool,
        pool_time: u32,
    ) {
        self.meta_ref(mapping_root, "superblock");
        self.meta_ref(details_root, "superblock");
        self.walk(
            mapping_root,
            ValueKind::Subtree,
            &format!("{prefix}top-level mapping tree"),
        );
        self.walk(
            details_root,
            DETAILS_VALUE,
            &format!("{prefix}device details tree"),
        );
        let tops = match btree::entries(&mut self.tm, mapping_root, ValueKind::Subtree) {
            Ok(t) => t,
            Err(_) => return,
        };
        let details: BTreeMap<u64, DeviceDetails> =
            match btree::entries(&mut self.tm, details_root, DETAILS_VALUE) {
                Ok(d) => d
                    .into_iter()
                    .map(|(k, v)| (k, DeviceDetails::unpack(&v)))
                    .collect(),
                Err(_) => return,
            };
        let top_ids: Vec<u64> = tops.iter().map(|(k, _)| *k).collect();
        let detail_ids: Vec<u64> = details.keys().copied().collect();
        if top_ids != detail_ids {
            self.error(format!(
                "{prefix}devices in the details tree {detail_ids:?} differ from those in the mapping tree {top_ids:?}"
            ));
        }
        for (id, v) in &tops {
            let root = u64::from_le_bytes(v[..8].try_into().unwrap());
            let n = self.subtree_entries.get(&root).copied().unwrap_or(0);
            if let Some(d) = details.get(id) {
                if d.mapped_blocks != n {
                    self.error(format!(
                        "{prefix}device {id}: details say {} mapped blocks, its mapping tree holds {n}",
                        d.mapped_blocks
                    ));
                }
                if d.creation_time > pool_time || d.snapshotted_time > pool_time {
                    self.error(format!(
                        "{prefix}device {id}: times are ahead of the pool's time {}",
                        pool_time
                    ));
                }
            }
            if live {
                self.report.mappings += n;
            }
        }
        if live {
            self.report.devices = tops.len() as u64;
        }
    }

    /// The recomputed reference counts of one space map against the counts it holds;
    /// `root_alloc` is what its root says is allocated.
    fn compare_counts(&mut self, name: &str, sm: &SpaceMap, refs: &[u32], root_alloc: u64) {
        let mut diffs = Vec::new();
        let mut used = 0u64;
        for (b, &want) in refs.iter().enumerate() {
            let have = sm.get(b as u64).unwrap_or(u32::MAX);
            if have != 0 {
                used += 1;
            }
            if have != want {
                diffs.push(format!(
                    "{name} block {b}: space map count {have}, but {want} references found"
                ));
            }
        }
        if name == "metadata" {
            self.report.metadata_blocks_used = used;
        } else {
            self.report.data_blocks_used = used;
        }
        if root_alloc != used {
            self.report.warnings.push(format!(
                "{name} space map root says {root_alloc} blocks allocated, bitmaps hold {used}"
            ));
        }
        for bm in &sm.bitmaps {
            let free = bm
                .words
                .iter()
                .map(|w| 32 - space_map::bitmap::used_mask(*w).count_ones())
                .sum::<u32>();
            if bm.nr_free != free {
                self.report.warnings.push(format!(
                    "{name} space map bitmap at block {}: index says {} free, bitmap has {free}",
                    bm.location, bm.nr_free
                ));
            }
        }
        for d in diffs {
            self.error(d);
        }
    }
}
