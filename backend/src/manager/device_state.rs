//! The daemon's own part of a registry entry: what a disk's move between pools and its
//! replication schedule need to survive a restart or a crash. The engine keeps it in the
//! entry (`DeviceEntry::daemon_state`, written in the same durable change as the rest of
//! the entry) and never looks into it; this module is the only one that reads or writes it.

use serde::{Deserialize, Serialize};
use thinpool::names::{check_name, NAME_RULE};
use thinpool::registry::{DeviceEntry, Registry};

/// A disk replicated every `interval_secs`: a snapshot `<disk>@r<seq>`, sent incrementally
/// on the last one that arrived, the last `keep` kept on both sides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReplicationSpec {
    pub interval_secs: u64,
    pub keep: u32,
    pub target: ReplicationTarget,
    /// The sequence number of the next round's snapshot.
    pub next_seq: u64,
    /// The last snapshot that arrived at the target: the next round's base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ReplicationTarget {
    /// Another pool of the same daemon; copies are named `<prefix>@r<seq>`.
    Pool { pool: String, prefix: String },
    /// A command reading the stream on its standard input (argv, no shell).
    Command { argv: Vec<String> },
}

/// An entry's part in a move between pools.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Migration {
    /// A helper snapshot of the moving disk in its old pool: always deleted.
    Outgoing { job: String },
    /// A copy in the new pool not yet switched to: deleted if the move did not finish.
    Incoming { job: String },
    /// Switched to: the copies in the old pool `from_pool` are deleted (if a crash left
    /// them), then the mark is cleared.
    Switched { job: String, from_pool: String },
}

impl Migration {
    /// The migration job the entry belongs to.
    pub fn job(&self) -> &str {
        match self {
            Migration::Outgoing { job }
            | Migration::Incoming { job }
            | Migration::Switched { job, .. } => job,
        }
    }
}

/// What the daemon keeps with one device. Fields a newer version added are kept as they
/// are (`other`) and written back, so that a daemon going back a version neither refuses
/// the registry nor drops what it does not know.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Set while a disk moves between pools (`disk-migrate`): what this entry is to the
    /// move, so that a start after a crash finishes or undoes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
    /// The disk's scheduled replication (`replication-start`), kept with the disk so
    /// that it survives restarts and moves with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationSpec>,
    /// The queues a disk added at run time was asked for (`disk-add`'s `num-queues`,
    /// `queue-size`): a restart serves it the same way, or the frontend, which asks for
    /// as many queues as before, is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<usize>,
    /// What a newer version keeps here, untouched.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl DeviceState {
    /// Reads an entry's state; a malformed one is an error naming what is wrong.
    pub fn parse(e: &DeviceEntry) -> Result<Self, String> {
        let Some(v) = &e.daemon_state else {
            return Ok(DeviceState::default());
        };
        let s: DeviceState = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        // Names go into snapshot names, log lines and pool lookups: the one rule.
        let mut names: Vec<(&str, &String)> = Vec::new();
        if let Some(r) = &s.replication {
            if let ReplicationTarget::Pool { pool, prefix } = &r.target {
                names.push(("replication target pool", pool));
                names.push(("replication prefix", prefix));
            }
            names.extend(r.last.iter().map(|l| ("last replicated snapshot", l)));
        }
        for (what, n) in names {
            check_name(n).map_err(|why| {
                format!("the {what} {n:?} is not a valid name: {why}; a name is {NAME_RULE}")
            })?;
        }
        Ok(s)
    }

    /// An entry's state. Every registry the daemon serves was checked when it was opened
    /// ([`check_registry`]) and the daemon writes only well-formed states, so a state that
    /// does not parse cannot be met here; if it were, it reads as none.
    pub fn of(e: &DeviceEntry) -> Self {
        Self::parse(e).unwrap_or_default()
    }

    /// Puts this state in the entry (nothing when it is empty).
    pub fn store(&self, e: &mut DeviceEntry) {
        e.daemon_state = (*self != DeviceState::default())
            .then(|| serde_json::to_value(self).expect("plain data serializes"));
    }
}

/// The daemon's fields of a registry entry, read and written through [`DeviceState`].
pub trait DaemonFields {
    fn migration(&self) -> Option<Migration>;
    fn replication(&self) -> Option<ReplicationSpec>;
    fn set_migration(&mut self, m: Option<Migration>);
    fn set_replication(&mut self, r: Option<ReplicationSpec>);
    /// Changes the replication schedule, if there is one.
    fn update_replication(&mut self, f: impl FnOnce(&mut ReplicationSpec)) {
        if let Some(mut r) = self.replication() {
            f(&mut r);
            self.set_replication(Some(r));
        }
    }
}

impl DaemonFields for DeviceEntry {
    fn migration(&self) -> Option<Migration> {
        DeviceState::of(self).migration
    }
    fn replication(&self) -> Option<ReplicationSpec> {
        DeviceState::of(self).replication
    }
    fn set_migration(&mut self, m: Option<Migration>) {
        let mut s = DeviceState::of(self);
        s.migration = m;
        s.store(self);
    }
    fn set_replication(&mut self, r: Option<ReplicationSpec>) {
        let mut s = DeviceState::of(self);
        s.replication = r;
        s.store(self);
    }
}

/// Checks the daemon's state of every entry when a pool is opened to be served: a file
/// edited by hand, or damaged, is refused naming the entry rather than half understood.
pub fn check_registry(reg: &Registry) -> Result<(), String> {
    for (id, e) in &reg.devices {
        DeviceState::parse(e).map_err(|why| {
            format!(
                "registry {}: thin device {id}: the daemon's state is not valid: {why}; correct it in the file",
                reg.path().display()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_state_round_trips_through_an_entry_and_bad_state_is_refused() {
        let mut e = DeviceEntry::default();
        assert_eq!(e.migration(), None);
        e.set_migration(Some(Migration::Incoming { job: "m".into() }));
        let spec = ReplicationSpec {
            interval_secs: 60,
            keep: 2,
            target: ReplicationTarget::Pool {
                pool: "dr".into(),
                prefix: "vm1".into(),
            },
            next_seq: 1,
            last: None,
        };
        e.set_replication(Some(spec.clone()));
        assert_eq!(
            e.daemon_state,
            Some(serde_json::json!({
                "migration": {"role": "incoming", "job": "m"},
                "replication": {"interval-secs": 60, "keep": 2, "next-seq": 1,
                                "target": {"kind": "pool", "pool": "dr", "prefix": "vm1"}}
            }))
        );
        assert_eq!(e.replication(), Some(spec));
        e.set_migration(None);
        e.set_replication(None);
        assert_eq!(e.daemon_state, None);

        // What a newer version wrote is kept through this one's changes.
        e.daemon_state = Some(serde_json::json!({"tier": "fast"}));
        e.set_migration(Some(Migration::Incoming { job: "m".into() }));
        assert_eq!(
            e.daemon_state,
            Some(
                serde_json::json!({"tier": "fast", "migration": {"role": "incoming", "job": "m"}})
            )
        );
        e.set_migration(None);
        assert_eq!(e.daemon_state, Some(serde_json::json!({"tier": "fast"})));

        let dir = tempfile::tempdir().unwrap();
        let mut reg = Registry::new(dir.path().join("r.json"), 0);
        for (state, why) in [
            (
                serde_json::json!({"migration": {"role": "flying", "job": "m"}}),
                "unknown variant",
            ),
            (
                serde_json::json!({"replication": {"interval-secs": 1, "keep": 1, "next-seq": 0,
                    "target": {"kind": "pool", "pool": "../x", "prefix": "p"}}}),
                "replication target pool \"../x\"",
            ),
        ] {
            reg.devices.insert(
                4,
                DeviceEntry {
                    daemon_state: Some(state),
                    ..Default::default()
                },
            );
            let msg = check_registry(&reg).unwrap_err();
            assert!(msg.contains("thin device 4") && msg.contains(why), "{msg}");
        }
    }
}
