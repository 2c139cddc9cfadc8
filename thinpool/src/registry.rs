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
mod tests;
