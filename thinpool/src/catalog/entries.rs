//! What a new device's registry entry holds: what it inherits, and what is its own. Every
//! path that makes a device (the daemon, the offline commands, a receive, a migration)
//! takes its entry from here, so that a snapshot made one way reads the same as one made
//! another way after the pool is reopened.

use super::{now_secs, Catalog};
use crate::registry::{make_serial, DeviceEntry, Registry};

/// What a snapshot is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    /// Kept: read-only, never served; what send and receive carry.
    Kept,
    /// A clone: a writable disk of its own.
    Clone,
}

impl Catalog {
    /// A new empty thin device `id` of `size` bytes, made now, with a serial of its own.
    pub fn new_thin_entry(&self, id: u32, size: u64) -> DeviceEntry {
        let created = now_secs();
        DeviceEntry {
            size,
            serial: make_serial(id, created, self.salt),
            created,
            ..Default::default()
        }
    }

    /// A new snapshot `id` of device `origin`, made now. It reads what its origin reads,
    /// so it has the origin's size and external origin: the pool's snapshot shares the
    /// external origin in memory ([`crate::pool::Pool::create_snap`]), and only the
    /// registry brings it back when the pool is reopened. It is a device of its own: its
    /// own serial and creation time, no name, and no send/receive identity (a guid names
    /// one snapshot's contents). A kept snapshot is read-only; a clone is writable.
    pub fn new_snapshot_entry(
        &self,
        reg: &Registry,
        origin: u32,
        id: u32,
        kind: SnapshotKind,
    ) -> DeviceEntry {
        let from = reg.devices.get(&origin);
        let kept = kind == SnapshotKind::Kept;
        DeviceEntry {
            size: from.map_or(0, |e| e.size),
            external_origin: from.and_then(|e| e.external_origin.clone()),
            origin: Some(origin),
            snapshot: kept,
            read_only: kept,
            ..self.new_thin_entry(id, 0)
        }
    }

    /// A kept snapshot `id` received from another pool, as a snapshot of `base` here
    /// (an incremental stream) or standalone (a full one). It keeps its sender's identity:
    /// guid and creation time, and a serial made from them. On a base it reads the base's
    /// external origin where the stream left it unmapped; a full stream carries every
    /// block, so a standalone copy has none.
    pub fn new_received_entry(
        &self,
        reg: &Registry,
        id: u32,
        base: Option<u32>,
        size: u64,
        created: u64,
        guid: &str,
    ) -> DeviceEntry {
        let salt = u64::from_str_radix(&guid[..16.min(guid.len())], 16).unwrap_or(0);
        DeviceEntry {
            size,
            read_only: true,
            serial: make_serial(id, created, salt),
            snapshot: true,
            origin: base,
            created,
            guid: Some(guid.to_string()),
            external_origin: base
                .and_then(|b| reg.devices.get(&b))
                .and_then(|e| e.external_origin.clone()),
            ..Default::default()
        }
    }
}
