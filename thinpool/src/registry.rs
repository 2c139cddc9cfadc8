//! The pool registry: what dm-thin metadata does not hold — device names, virtual sizes,
//! read-only flags, serial numbers, lineage — kept in a small JSON file beside the pool.
//!
//! The registry and the metadata are tied by the pool's transaction id, the way LVM ties
//! its metadata to a thin pool with `set_transaction_id`: a change writes the registry
//! with `transaction_id = n + 1` first (atomically: temporary file, fsync, rename, fsync
//! of the directory), then commits the pool with transaction id `n + 1`. After a crash
//! between the two, the registry is one ahead. The file also keeps the state before that
//! last change, so [`Registry::recover`] goes back to it: the change that the pool did not
//! commit is undone in the registry too, and the two agree again (the old state, never
//! half of the new one). [`Registry::reconcile`] reports any other disagreement: a device
//! that is in the pool but not in the registry is still reachable by its thin id, and a
//! registry entry without a pool device is reported. The change itself is made by
//! [`crate::catalog::Catalog::change`], which owns a pool and its registry.

use crate::names::{check_name, NameError, NAME_RULE};
use crate::thin::device::MAX_THIN_ID;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "vhost-thin-registry";
/// Version 2 added `previous`; version 3 moved the daemon's fields of an entry into
/// `daemon_state`. Older files are read (see [`upgrade`]) and written as version 3.
pub const VERSION: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registry {path} is not valid: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("a device named {0:?} already exists")]
    NameTaken(String),
    #[error("{name:?} is not a valid name: {why}; a name is {rule}", rule = crate::names::NAME_RULE)]
    BadName { name: String, why: NameError },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Virtual size in bytes.
    pub size: u64,
    #[serde(default)]
    pub read_only: bool,
    /// The serial the guest sees (virtio-blk GET_ID, at most 20 bytes).
    pub serial: String,
    /// A snapshot (kept, not served) rather than a disk.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snapshot: bool,
    /// The thin id this device was snapshotted or cloned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<u32>,
    /// The name of the device this one was snapshotted or cloned from, once that one was
    /// deleted (then `origin` is cleared): the lineage stays readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_origin: Option<String>,
    /// Creation time, seconds since the epoch.
    #[serde(default)]
    pub created: u64,
    /// Identity across pools for send and receive: made at a device's first send; a
    /// received snapshot keeps its sender's, which is how an incremental stream finds its
    /// base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guid: Option<String>,
    /// The external origin (a read-only golden image, by path) that the device's
    /// unmapped blocks read from; not in the dm-thin metadata, which knows nothing of it.
    /// Snapshots of the device name the same one. See [`crate::origin`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_origin: Option<String>,
    /// A merge of this snapshot into its external origin stopped (cancelled, or a crash)
    /// with the origin holding the snapshot's bytes below this device offset and its own
    /// old bytes, or a mix, above: merging again goes on from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_offset: Option<u64>,
    /// Set while a stream is being received into this device: not a snapshot yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiving: Option<PartialReceive>,
    /// What the program serving the pool keeps with this device (the daemon: a move
    /// between pools under way, a replication schedule): written in the same durable
    /// change as the entry, carried by a receive from its first commit, and never looked
    /// into here. Version 2 files had the daemon's `migration` and `replication` at the
    /// top of the entry; they are read into this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon_state: Option<serde_json::Value>,
}

/// A receive in progress (or interrupted) into a device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialReceive {
    /// The name the snapshot gets when the stream is complete.
    pub name: String,
    /// The base snapshot's guid (incremental streams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_guid: Option<String>,
    /// Device bytes before this one are durable.
    pub next_offset: u64,
    /// Kept after an interruption (else deleted when the receive fails).
    pub resumable: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    format: String,
    version: u32,
    transaction_id: u64,
    devices: BTreeMap<u32, DeviceEntry>,
    /// The state before the last change: what the registry goes back to when the pool
    /// did not commit that change (a crash between the two writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<State>,
}

/// The registry at one transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    transaction_id: u64,
    devices: BTreeMap<u32, DeviceEntry>,
}

#[derive(Clone, Debug)]
pub struct Registry {
    path: PathBuf,
    pub transaction_id: u64,
    pub devices: BTreeMap<u32, DeviceEntry>,
    /// What the file holds as the current state (None before the first load or save).
    saved: Option<State>,
    /// What the file holds as the previous state.
    previous: Option<State>,
    /// Devices that a receive of this process is writing into now (not saved): a second
    /// receive of the same stream must not take such a device for an interrupted one and
    /// write into it too.
    pub receiving_now: BTreeSet<u32>,
}

/// How the registry and the pool relate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Reconciliation {
    pub consistent: bool,
    pub messages: Vec<String>,
    /// In the pool but not in the registry (addressable by thin id only).
    pub unregistered: Vec<u32>,
    /// In the registry but not in the pool.
    pub missing: Vec<u32>,
}

impl Registry {
    /// The default registry path for a pool whose metadata lives at `metadata`.
    pub fn default_path(metadata: &Path) -> PathBuf {
        let mut p = metadata.as_os_str().to_owned();
        p.push(".registry.json");
        PathBuf::from(p)
    }

    pub fn new(path: impl Into<PathBuf>, transaction_id: u64) -> Self {
        Registry {
            path: path.into(),
            transaction_id,
            devices: BTreeMap::new(),
            saved: None,
            previous: None,
            receiving_now: BTreeSet::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the registry; `Ok(None)` when the file does not exist.
    pub fn load(path: impl Into<PathBuf>) -> Result<Option<Self>, RegistryError> {
        let path = path.into();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RegistryError::Io { path, source }),
        };
        let invalid = |e: serde_json::Error| RegistryError::Invalid {
            path: path.clone(),
            msg: e.to_string(),
        };
        let mut raw: serde_json::Value = serde_json::from_str(&text).map_err(invalid)?;
        upgrade(&mut raw);
        let d: OnDisk = serde_json::from_value(raw).map_err(invalid)?;
        if d.format != FORMAT || !(1..=VERSION).contains(&d.version) {
            return Err(RegistryError::Invalid {
                path,
                msg: format!(
                    "format {:?} version {}, expected {FORMAT:?} version 1 to {VERSION}",
                    d.format, d.version
                ),
            });
        }
        // Names go into socket paths, thread names and command lines: a file edited by hand
        // (or written by an older version that did not check) must not smuggle in one that
        // is a path or holds a NUL. Refused whole, naming the entry, for a person to correct.
        let previous = d
            .previous
            .iter()
            .map(|p| (&p.devices, " (in the state before the last change)"));
        for (devices, when) in std::iter::once((&d.devices, "")).chain(previous) {
            if let Err(msg) = check_names(devices) {
                return Err(RegistryError::Invalid {
                    path,
                    msg: format!("{msg}{when}; correct it in the file"),
                });
            }
        }
        Ok(Some(Registry {
            path,
            transaction_id: d.transaction_id,
            saved: Some(State {
                transaction_id: d.transaction_id,
                devices: d.devices.clone(),
            }),
            devices: d.devices,
            previous: d.previous,
            receiving_now: BTreeSet::new(),
        }))
    }

    /// Writes the registry atomically: a crash leaves the old or the new file. The state
    /// the file held, if it was an earlier transaction, is kept in it as the previous one.
    pub fn save(&mut self) -> Result<(), RegistryError> {
        let err = |source| RegistryError::Io {
            path: self.path.clone(),
            source,
        };
        let previous = match &self.saved {
            Some(s) if s.transaction_id != self.transaction_id => Some(s.clone()),
            _ => self.previous.clone(),
        };
        let current = State {
            transaction_id: self.transaction_id,
            devices: self.devices.clone(),
        };
        let d = OnDisk {
            format: FORMAT.into(),
            version: VERSION,
            transaction_id: self.transaction_id,
            devices: self.devices.clone(),
            previous: previous.clone(),
        };
        let text = serde_json::to_string_pretty(&d).expect("serialisable");
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Names, sizes and origins of VM disks: the owner's alone.
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(err)?;
            f.write_all(text.as_bytes()).map_err(err)?;
            f.write_all(b"\n").map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        fs::rename(&tmp, &self.path).map_err(err)?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(&dir).and_then(|d| d.sync_all()).map_err(err)?;
        self.saved = Some(current);
        self.previous = previous;
        Ok(())
    }

    /// After a crash between the registry write and the pool commit (the registry one
    /// transaction ahead of the pool), goes back to the state before that change, in
    /// memory: the change was never acknowledged, and the pool does not hold it. Returns
    /// what was done, for the operator; None when there was nothing to do or the file
    /// does not say what came before (written by version 1).
    pub fn recover(&mut self, pool_transaction_id: u64) -> Option<String> {
        // Ahead by one after a change of ours; by more after a set transaction id (dm-thin's
        // `set_transaction_id`, which may jump). Either way the state before is kept.
        if self.transaction_id == pool_transaction_id {
            return None;
        }
        let prev = self
            .previous
            .as_ref()
            .filter(|p| p.transaction_id == pool_transaction_id)?
            .clone();
        let msg = format!(
            "the registry ({}) was ahead of the pool ({pool_transaction_id}): the last change was written to the registry but not committed to the pool, so it is undone",
            self.transaction_id
        );
        self.transaction_id = prev.transaction_id;
        self.devices = prev.devices.clone();
        // The next save writes a new transaction over the state gone back to.
        self.saved = Some(prev);
        self.previous = None;
        Some(msg)
    }

    /// The device with this send/receive identity. A snapshot may be in the pool more than
    /// once (received again under another name), a copy perhaps still being received: a
    /// complete snapshot is preferred, so that an incremental stream finds a usable base.
    pub fn find_guid(&self, guid: &str) -> Option<u32> {
        self.devices
            .iter()
            .filter(|(_, e)| e.guid.as_deref() == Some(guid))
            .min_by_key(|(&id, e)| (e.receiving.is_some(), !e.snapshot, id))
            .map(|(&id, _)| id)
    }

    /// The device a receive of the snapshot with this identity is going into or was
    /// interrupted in (at most one: a second copy is not begun while one is pending).
    pub fn find_receiving(&self, guid: &str) -> Option<u32> {
        self.devices
            .iter()
            .find(|(_, e)| e.guid.as_deref() == Some(guid) && e.receiving.is_some())
            .map(|(&id, _)| id)
    }

    /// A thin id not used in the registry nor in `pool_ids`.
    /// The id for a new device: one above the highest in use (ids then follow creation
    /// order, as LVM's do), or, once that would pass dm-thin's largest id, the lowest free
    /// one. Past the largest when all are taken: the create fails with the pool's error.
    pub fn next_id(&self, pool_ids: &[u32]) -> u32 {
        let used: BTreeSet<u32> = self.devices.keys().chain(pool_ids).copied().collect();
        match used.last() {
            None => 0,
            Some(&m) if m < MAX_THIN_ID => m + 1,
            Some(_) => (0..=MAX_THIN_ID)
                .zip(used.iter())
                .find(|(i, u)| i != *u)
                .map_or_else(|| used.len() as u32, |(i, _)| i),
        }
    }

    pub fn find(&self, name: &str) -> Option<u32> {
        self.devices
            .iter()
            .find(|(_, e)| e.name.as_deref() == Some(name))
            .map(|(&id, _)| id)
    }

    /// The device a person means by `name`: the one named so, or, for `disk@snap` when no
    /// device has that name, the snapshot named `snap` (a flat name) taken of `disk`.
    pub fn resolve(&self, name: &str) -> Option<u32> {
        self.find(name).or_else(|| {
            let (disk, snap) = crate::names::split_snapshot_name(name)?;
            let disk = self.find(disk).filter(|id| !self.devices[id].snapshot)?;
            self.devices
                .iter()
                .find(|(_, e)| {
                    e.snapshot && e.origin == Some(disk) && e.name.as_deref() == Some(snap)
                })
                .map(|(&id, _)| id)
        })
    }

    /// Removes a device's entry. The devices made from it (its snapshots and clones, which
    /// dm-thin keeps whole without it) keep its name as their deleted origin; their names
    /// are returned.
    pub fn remove(&mut self, id: u32) -> Option<(DeviceEntry, Vec<String>)> {
        let gone = self.devices.remove(&id)?;
        let mut dependents = Vec::new();
        for e in self.devices.values_mut().filter(|e| e.origin == Some(id)) {
            e.origin = None;
            e.deleted_origin = gone.name.clone();
            dependents.extend(e.name.clone());
        }
        Some((gone, dependents))
    }

    /// The device that has this name, or will have it when its receive completes: a name
    /// is taken from the moment a receive for it starts.
    pub fn holder_of(&self, name: &str) -> Option<u32> {
        self.devices
            .iter()
            .find(|(_, e)| {
                e.name.as_deref() == Some(name)
                    || e.receiving.as_ref().is_some_and(|p| p.name == name)
            })
            .map(|(&id, _)| id)
    }

    /// Adds or replaces an entry; names are unique (pending receives' names included) and
    /// follow the rule of [`crate::names`]: what [`Registry::load`] would refuse is never
    /// written.
    pub fn insert(&mut self, id: u32, entry: DeviceEntry) -> Result<(), RegistryError> {
        let pending = entry.receiving.as_ref().map(|p| &p.name);
        for n in entry.name.iter().chain(pending) {
            check_name(n).map_err(|why| RegistryError::BadName {
                name: n.clone(),
                why,
            })?;
            if self.holder_of(n).is_some_and(|other| other != id) {
                return Err(RegistryError::NameTaken(n.clone()));
            }
        }
        self.devices.insert(id, entry);
        Ok(())
    }

    /// Compares with the pool's transaction id and device ids.
    pub fn reconcile(&self, pool_transaction_id: u64, pool_devices: &[u32]) -> Reconciliation {
        let mut r = Reconciliation::default();
        if Some(self.transaction_id) == pool_transaction_id.checked_add(1) {
            r.messages.push(format!(
                "the registry ({}) is one transaction ahead of the pool ({pool_transaction_id}): the last change was written to the registry but not committed to the pool",
                self.transaction_id
            ));
        } else if self.transaction_id != pool_transaction_id {
            r.messages.push(format!(
                "the registry's transaction id {} does not match the pool's {pool_transaction_id}: the registry belongs to another pool or another state of it",
                self.transaction_id
            ));
        }
        for &id in pool_devices {
            if !self.devices.contains_key(&id) {
                r.unregistered.push(id);
            }
        }
        for &id in self.devices.keys() {
            if !pool_devices.contains(&id) {
                r.missing.push(id);
            }
        }
        if !r.unregistered.is_empty() {
            r.messages.push(format!(
                "thin devices {:?} are in the pool but not in the registry; they are kept and addressable by thin id",
                r.unregistered
            ));
        }
        if !r.missing.is_empty() {
            r.messages.push(format!(
                "registry entries {:?} have no thin device in the pool",
                r.missing
            ));
        }
        r.consistent = r.messages.is_empty();
        r
    }
}

/// Reads a registry file of version 1 or 2 as version 3: the daemon's `migration` and
/// `replication` fields of an entry go into its `daemon_state`, as they were.
fn upgrade(file: &mut serde_json::Value) {
    use serde_json::Value;
    if file
        .get("version")
        .and_then(Value::as_u64)
        .unwrap_or(VERSION as u64)
        >= 3
    {
        return;
    }
    for table in ["/devices", "/previous/devices"] {
        let Some(Value::Object(entries)) = file.pointer_mut(table) else {
            continue;
        };
        for entry in entries.values_mut() {
            let Value::Object(e) = entry else { continue };
            let mut state = serde_json::Map::new();
            for key in ["migration", "replication"] {
                if let Some(v) = e.remove(key) {
                    state.insert(key.to_string(), v);
                }
            }
            if !state.is_empty() {
                e.insert("daemon_state".into(), Value::Object(state));
            }
        }
    }
}

/// Checks every name an entry holds (its own, its pending receive's);
/// the message names the entry and says what is wrong.
fn check_names(devices: &BTreeMap<u32, DeviceEntry>) -> Result<(), String> {
    for (id, e) in devices {
        let mut names: Vec<(&str, &String)> = Vec::new();
        names.extend(e.name.iter().map(|n| ("name", n)));
        names.extend(e.deleted_origin.iter().map(|n| ("deleted origin", n)));
        if let Some(r) = &e.receiving {
            names.push(("name of its receive", &r.name));
        }
        for (what, n) in names {
            check_name(n).map_err(|why| {
                format!("thin device {id}: the {what} {n:?} is not a valid name: {why}; a name is {NAME_RULE}")
            })?;
        }
    }
    Ok(())
}

/// A stable serial for a new device: `vt-` and 16 hex digits from the pool's identity,
/// the thin id and the creation time (the virtio-blk ID field holds 20 bytes).
pub fn make_serial(thin_id: u32, created: u64, salt: u64) -> String {
    let mut x =
        salt ^ (thin_id as u64).rotate_left(40) ^ created.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    format!("vt-{x:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_made_from_a_removed_one_keep_its_name_as_their_deleted_origin() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::new(dir.path().join("r.json"), 0);
        let entry = |name: &str, snapshot, origin| DeviceEntry {
            name: Some(name.into()),
            snapshot,
            origin,
            ..Default::default()
        };
        r.insert(0, entry("vm1", false, None)).unwrap();
        r.insert(1, entry("vm1@gold", true, Some(0))).unwrap();
        r.insert(2, entry("c1", false, Some(1))).unwrap();
        r.insert(3, entry("c2", false, Some(1))).unwrap();
        r.insert(4, entry("flat", true, Some(0))).unwrap();
        assert_eq!(r.resolve("vm1@flat"), Some(4));
        assert_eq!(r.resolve("c1@flat"), None);
        assert_eq!(r.resolve("vm1@gold"), Some(1));
        let (gone, dependents) = r.remove(1).unwrap();
        assert_eq!(gone.name.as_deref(), Some("vm1@gold"));
        assert_eq!(dependents, ["c1", "c2"]);
        assert_eq!(r.devices[&2].origin, None);
        assert_eq!(r.devices[&2].deleted_origin.as_deref(), Some("vm1@gold"));
        r.save().unwrap();
        let back = Registry::load(dir.path().join("r.json")).unwrap().unwrap();
        assert_eq!(back.devices, r.devices);
    }

    #[test]
    fn next_id_reuses_a_free_id_once_the_highest_is_the_largest_dm_thin_allows() {
        let mut r = Registry::new("/nonexistent/r.json", 0);
        r.devices.insert(MAX_THIN_ID, DeviceEntry::default());
        assert_eq!(r.next_id(&[MAX_THIN_ID]), 0);
        r.devices.insert(0, DeviceEntry::default());
        assert_eq!(r.next_id(&[0, 1, 2, MAX_THIN_ID]), 3);
        assert_eq!(r.next_id(&[5]), 1);
        let mut r = Registry::new("/nonexistent/r.json", 0);
        r.devices.insert(7, DeviceEntry::default());
        assert_eq!(
            r.next_id(&[3]),
            8,
            "ids follow creation order while they can"
        );
    }

    #[test]
    fn next_id_does_not_overflow_at_the_largest_id() {
        let mut r = Registry::new("/nonexistent/r.json", 0);
        r.devices.insert(u32::MAX, DeviceEntry::default());
        r.devices.insert(0, DeviceEntry::default());
        assert_eq!(r.next_id(&[1]), 2);
        let rec = r.reconcile(u64::MAX, &[0, u32::MAX]);
        assert!(
            rec.messages[0].contains("does not match"),
            "{:?}",
            rec.messages
        );
    }

    #[test]
    fn save_load_round_trip_and_reconcile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.registry.json");
        assert!(Registry::load(&path).unwrap().is_none());
        let mut r = Registry::new(&path, 3);
        r.insert(
            0,
            DeviceEntry {
                name: Some("vm1".into()),
                size: 1 << 30,
                serial: make_serial(0, 1, 2),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(matches!(
            r.insert(
                1,
                DeviceEntry {
                    name: Some("vm1".into()),
                    ..Default::default()
                }
            ),
            Err(RegistryError::NameTaken(_))
        ));
        r.save().unwrap();
        let l = Registry::load(&path).unwrap().unwrap();
        assert_eq!(l.devices, r.devices);
        assert_eq!(l.find("vm1"), Some(0));
        assert!(l.reconcile(3, &[0]).consistent);
        let ahead = l.reconcile(2, &[0, 5]);
        assert!(!ahead.consistent);
        assert_eq!(ahead.unregistered, vec![5]);
        assert!(ahead.messages[0].contains("one transaction ahead"));
        assert_eq!(l.reconcile(3, &[]).missing, vec![0]);
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            Registry::load(&path),
            Err(RegistryError::Invalid { .. })
        ));
        assert_eq!(make_serial(1, 2, 3).len(), 19);
        assert_ne!(make_serial(1, 2, 3), make_serial(2, 2, 3));
    }

    #[test]
    fn recover_goes_back_to_the_state_the_pool_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.registry.json");
        let entry = |n: &str| DeviceEntry {
            name: Some(n.into()),
            size: 1 << 20,
            ..Default::default()
        };
        let mut r = Registry::new(&path, 3);
        r.insert(0, entry("vm1")).unwrap();
        r.save().unwrap();
        // A change written to the registry (transaction 4), then a crash before the pool
        // committed it: the pool is still at 3.
        let mut r = Registry::load(&path).unwrap().unwrap();
        r.devices.remove(&0);
        r.insert(1, entry("vm2")).unwrap();
        r.transaction_id = 4;
        r.save().unwrap();
        let mut l = Registry::load(&path).unwrap().unwrap();
        assert_eq!(
            l.recover(4),
            None,
            "nothing to do when the pool committed it"
        );
        let msg = l.recover(3).expect("one transaction ahead");
        assert!(msg.contains("undone"), "{msg}");
        assert_eq!(l.transaction_id, 3);
        assert_eq!(l.devices.keys().collect::<Vec<_>>(), [&0]);
        assert!(l.reconcile(3, &[0]).consistent);
        // The next change is written over the state gone back to, which it keeps as its
        // previous one.
        l.insert(2, entry("vm3")).unwrap();
        l.transaction_id = 4;
        l.save().unwrap();
        let mut again = Registry::load(&path).unwrap().unwrap();
        assert_eq!(again.find("vm3"), Some(2));
        assert_eq!(again.find("vm2"), None);
        again.recover(3).unwrap();
        assert_eq!(again.devices.keys().collect::<Vec<_>>(), [&0]);
        // Saving the same transaction again keeps the previous state it had.
        let mut same = Registry::load(&path).unwrap().unwrap();
        same.save().unwrap();
        let mut same = Registry::load(&path).unwrap().unwrap();
        assert!(same.recover(3).is_some());
    }

    #[test]
    fn version_1_files_load_and_cannot_be_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.registry.json");
        std::fs::write(
            &path,
            r#"{"format": "vhost-thin-registry", "version": 1, "transaction_id": 5,
                "devices": {"0": {"name": "vm1", "size": 512, "serial": "x"}}}"#,
        )
        .unwrap();
        let mut r = Registry::load(&path).unwrap().unwrap();
        assert_eq!(r.find("vm1"), Some(0));
        // It does not say what came before: reported by reconcile, not undone.
        assert_eq!(r.recover(4), None);
        assert!(!r.reconcile(4, &[0]).consistent);
    }

    /// The registry is a file people and tools may edit: a name in it that is not a name
    /// (a path, a NUL, too long) is refused when the file is opened, with the entry named,
    /// rather than served (a disk's socket is `<dir>/<name>.sock`).
    #[test]
    fn a_file_with_a_bad_name_is_refused_at_load_naming_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.registry.json");
        let write = |devices: &str, previous: &str| {
            std::fs::write(
                &path,
                format!(
                    r#"{{"format": "vhost-thin-registry", "version": 2, "transaction_id": 5,
                        "devices": {devices}{previous}}}"#
                ),
            )
            .unwrap()
        };
        let cases = [
            (
                r#"{"7": {"name": "../../x", "size": 512, "serial": "x"}}"#,
                "",
                "thin device 7",
                "\"../../x\"",
            ),
            (
                r#"{"0": {"name": "a\u0000b", "size": 512, "serial": "x"}}"#,
                "",
                "thin device 0",
                "control character",
            ),
            (
                r#"{"0": {"name": "..", "size": 512, "serial": "x"}}"#,
                "",
                "thin device 0",
                "'.' or '..'",
            ),
            (
                r#"{"3": {"size": 512, "serial": "x", "receiving": {"name": "-r", "next_offset": 0, "resumable": true}}}"#,
                "",
                "thin device 3",
                "'-'",
            ),
            (
                r#"{"1": {"name": "ok", "size": 512, "serial": "x"}}"#,
                r#", "previous": {"transaction_id": 4, "devices": {"2": {"name": "a/b", "size": 512, "serial": "x"}}}"#,
                "thin device 2",
                "'/'",
            ),
        ];
        for (devices, previous, entry, why) in cases {
            write(devices, previous);
            let e = Registry::load(&path).unwrap_err();
            assert!(matches!(e, RegistryError::Invalid { .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string())
                    && msg.contains(entry)
                    && msg.contains(why),
                "{msg}"
            );
        }
        // A good name loads; and a bad one cannot be put in to begin with.
        write(
            r#"{"1": {"name": "vm 1@r2", "size": 512, "serial": "x"}}"#,
            "",
        );
        let mut r = Registry::load(&path).unwrap().unwrap();
        let bad = DeviceEntry {
            name: Some("../x".into()),
            ..Default::default()
        };
        let e = r.insert(2, bad).unwrap_err().to_string();
        assert!(e.contains("\"../x\"") && e.contains("'/'"), "{e}");
        assert_eq!(r.devices.len(), 1);
    }

    /// Version 2 kept the daemon's migration mark and replication schedule at the top of
    /// an entry; version 3 keeps them, untouched, in `daemon_state`, which the engine
    /// does not look into. An old file reads; it is written in the new form and reads
    /// back the same.
    #[test]
    fn a_version_2_file_reads_with_the_daemons_fields_in_daemon_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.registry.json");
        let migration = r#"{"role": "switched", "job": "m1", "from_pool": "old"}"#;
        let replication = r#"{"interval-secs": 60, "keep": 3, "target": {"kind": "pool", "pool": "dr", "prefix": "vm1"}, "next-seq": 4}"#;
        std::fs::write(
            &path,
            format!(
                r#"{{"format": "vhost-thin-registry", "version": 2, "transaction_id": 5,
                    "devices": {{"0": {{"name": "vm1", "size": 512, "serial": "x",
                                        "migration": {migration}, "replication": {replication}}},
                                 "1": {{"name": "vm2", "size": 512, "serial": "y"}}}},
                    "previous": {{"transaction_id": 4, "devices": {{"0": {{"name": "vm1",
                                  "size": 512, "serial": "x", "replication": {replication}}}}}}}}}"#
            ),
        )
        .unwrap();
        let mut r = Registry::load(&path).unwrap().unwrap();
        let parse = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap();
        assert_eq!(
            r.devices[&0].daemon_state,
            Some(
                serde_json::json!({"migration": parse(migration), "replication": parse(replication)})
            )
        );
        assert_eq!(r.devices[&1].daemon_state, None);
        // The state before the last change is read the same way: going back to it keeps
        // the schedule.
        assert!(r.recover(4).is_some());
        assert_eq!(
            r.devices[&0].daemon_state,
            Some(serde_json::json!({"replication": parse(replication)}))
        );
        let read = r.devices.clone();
        r.save().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"version\": 3") || text.contains("\"version\":3"),
            "{text}"
        );
        assert!(
            text.contains("daemon_state") && !text.contains("\"migration\""),
            "{text}"
        );
        assert_eq!(Registry::load(&path).unwrap().unwrap().devices, read);
    }

    /// A snapshot may be in a pool twice (received again under another name), one copy
    /// perhaps still being received: looked up by guid (an incremental stream's base), the
    /// complete snapshot is found, whichever thin id it has.
    #[test]
    fn find_guid_prefers_a_complete_snapshot_to_a_copy_being_received() {
        let mut r = Registry::new("/nonexistent/r.json", 0);
        let guid = "0123456789abcdef0123456789abcdef";
        let snap = |name: &str| DeviceEntry {
            name: Some(name.into()),
            snapshot: true,
            read_only: true,
            guid: Some(guid.into()),
            ..Default::default()
        };
        let receiving = DeviceEntry {
            name: None,
            receiving: Some(PartialReceive {
                name: "copy".into(),
                ..Default::default()
            }),
            ..snap("x")
        };
        r.insert(1, receiving).unwrap();
        assert_eq!(r.find_guid(guid), Some(1), "only the one being received");
        r.insert(4, snap("s1")).unwrap();
        assert_eq!(r.find_guid(guid), Some(4));
        r.insert(2, snap("s1-again")).unwrap();
        assert!([Some(2), Some(4)].contains(&r.find_guid(guid)));
        assert_eq!(r.find_guid("ffffffffffffffffffffffffffffffff"), None);
    }

    #[test]
    fn external_origin_is_written_only_when_set_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.registry.json");
        let mut r = Registry::new(&path, 1);
        let plain = DeviceEntry {
            size: 512,
            serial: "a".into(),
            ..Default::default()
        };
        let backed = DeviceEntry {
            external_origin: Some("/images/golden.img".into()),
            ..plain.clone()
        };
        r.insert(0, plain).unwrap();
        r.insert(1, backed.clone()).unwrap();
        r.save().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("external_origin").count(), 1, "{text}");
        let back = Registry::load(&path).unwrap().unwrap();
        assert_eq!(back.devices[&1], backed);
        assert_eq!(back.devices[&0].external_origin, None);
    }
}
