//! The pool registry: what dm-thin metadata does not hold — device names, virtual sizes,
//! read-only flags, serial numbers, lineage — kept in a small JSON file beside the pool.
//!
//! The registry and the metadata are tied by the pool's transaction id, the way LVM ties
//! its metadata to a thin pool with `set_transaction_id`: a change writes the registry
//! with `transaction_id = n + 1` first (atomically: temporary file, fsync, rename, fsync
//! of the directory), then commits the pool with transaction id `n + 1`. After a crash
//! between the two, the registry is one ahead; [`Registry::reconcile`] reports that
//! clearly and nothing is lost: a device that is in the pool but not in the registry is
//! still reachable by its thin id, and a registry entry without a pool device is reported.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "vhost-thin-registry";
pub const VERSION: u32 = 1;

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
    #[error("commit failed: {0}")]
    Commit(#[from] crate::Error),
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
    /// Creation time, seconds since the epoch.
    #[serde(default)]
    pub created: u64,
    /// Identity across pools for send and receive: made at a device's first send; a
    /// received snapshot keeps its sender's, which is how an incremental stream finds its
    /// base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guid: Option<String>,
    /// Set while a stream is being received into this device: not a snapshot yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiving: Option<PartialReceive>,
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
}

#[derive(Clone, Debug)]
pub struct Registry {
    path: PathBuf,
    pub transaction_id: u64,
    pub devices: BTreeMap<u32, DeviceEntry>,
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
        let d: OnDisk = serde_json::from_str(&text).map_err(|e| RegistryError::Invalid {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        if d.format != FORMAT || d.version != VERSION {
            return Err(RegistryError::Invalid {
                path,
                msg: format!(
                    "format {:?} version {}, expected {FORMAT:?} version {VERSION}",
                    d.format, d.version
                ),
            });
        }
        Ok(Some(Registry {
            path,
            transaction_id: d.transaction_id,
            devices: d.devices,
        }))
    }

    /// Writes the registry atomically: a crash leaves the old or the new file.
    pub fn save(&self) -> Result<(), RegistryError> {
        let err = |source| RegistryError::Io {
            path: self.path.clone(),
            source,
        };
        let d = OnDisk {
            format: FORMAT.into(),
            version: VERSION,
            transaction_id: self.transaction_id,
            devices: self.devices.clone(),
        };
        let text = serde_json::to_string_pretty(&d).expect("serialisable");
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
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
        Ok(())
    }

    /// Makes a change durable in both places: the registry first, carrying the next
    /// transaction id, then the pool committing with that id, so that after a crash in
    /// between the registry is exactly one transaction ahead (see the module doc).
    pub fn commit(&mut self, pool: &crate::pool::Pool) -> Result<(), RegistryError> {
        let old = pool.status().transaction_id;
        self.transaction_id = old + 1;
        self.save()?;
        pool.set_transaction_id(old, old + 1)?;
        pool.commit()?;
        Ok(())
    }

    /// The device with this send/receive identity.
    pub fn find_guid(&self, guid: &str) -> Option<u32> {
        self.devices
            .iter()
            .find(|(_, e)| e.guid.as_deref() == Some(guid))
            .map(|(&id, _)| id)
    }

    /// A thin id not used in the registry nor in `pool_ids`.
    pub fn next_id(&self, pool_ids: &[u32]) -> u32 {
        let max = self.devices.keys().chain(pool_ids).max().copied();
        max.map(|m| m + 1).unwrap_or(0)
    }

    pub fn find(&self, name: &str) -> Option<u32> {
        self.devices
            .iter()
            .find(|(_, e)| e.name.as_deref() == Some(name))
            .map(|(&id, _)| id)
    }

    /// Adds or replaces an entry; names are unique.
    pub fn insert(&mut self, id: u32, entry: DeviceEntry) -> Result<(), RegistryError> {
        if let Some(n) = &entry.name {
            if self.find(n).is_some_and(|other| other != id) {
                return Err(RegistryError::NameTaken(n.clone()));
            }
        }
        self.devices.insert(id, entry);
        Ok(())
    }

    /// Compares with the pool's transaction id and device ids.
    pub fn reconcile(&self, pool_transaction_id: u64, pool_devices: &[u32]) -> Reconciliation {
        let mut r = Reconciliation::default();
        if self.transaction_id == pool_transaction_id + 1 {
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
}
