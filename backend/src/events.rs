//! The daemon's events (a disk connected, a job changed status, a pool ran out of space…)
//! and the bus that hands each to every subscriber. Neutral of any protocol: `mgmt` formats
//! them as QMP events for its clients.
//!
//! Emitting never blocks: a subscriber takes an event or refuses it (its queue is full, or
//! it is gone); a full subscriber loses that event (a warning is logged once), a gone one is
//! dropped.

use serde::Serialize;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Everything the daemon announces. The name of each is its variant's in upper snake case
/// (`DiskAdded` is `DISK_ADDED`), its data the fields in kebab-case; docs/MANAGEMENT.md
/// lists them (a test keeps the two in agreement).
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", content = "data", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Event {
    /// A disk was created and is served (empty, or a clone of `origin`).
    #[serde(rename_all = "kebab-case")]
    DiskAdded {
        disk: String,
        pool: String,
        thin_id: u32,
        size: u64,
        origin: Option<String>,
        socket: PathBuf,
    },
    /// A disk was deleted (its thin device with it).
    #[serde(rename_all = "kebab-case")]
    DiskRemoved {
        disk: String,
        pool: String,
        thin_id: u32,
    },
    #[serde(rename_all = "kebab-case")]
    DiskResized {
        disk: String,
        size: u64,
        guest_notified: bool,
    },
    #[serde(rename_all = "kebab-case")]
    DiskReadOnlyChanged { disk: String, read_only: bool },
    /// The disk's contents became the snapshot's.
    #[serde(rename_all = "kebab-case")]
    DiskReverted { disk: String, snapshot: String },
    #[serde(rename_all = "kebab-case")]
    DiskConnected { disk: String },
    /// With `committed`, every write the guest made is durable.
    #[serde(rename_all = "kebab-case")]
    DiskDisconnected { disk: String, committed: bool },
    /// A migration switched the disk to another pool: the migration's result.
    DiskMigrated(Value),
    #[serde(rename_all = "kebab-case")]
    SnapshotCreated {
        disk: String,
        snapshot: String,
        pool: String,
        thin_id: u32,
        pause_us: u64,
    },
    #[serde(rename_all = "kebab-case")]
    SnapshotDeleted {
        snapshot: String,
        pool: String,
        thin_id: u32,
    },
    #[serde(rename_all = "kebab-case")]
    PoolGrown {
        pool: String,
        data_blocks: u64,
        metadata_blocks: u64,
    },
    #[serde(rename_all = "kebab-case")]
    PoolLowWatermark {
        pool: String,
        kind: &'static str,
        used_percent: u64,
        threshold: u8,
    },
    #[serde(rename_all = "kebab-case")]
    PoolOutOfSpace {
        pool: String,
        data_blocks: u64,
        queued_writes: u64,
    },
    #[serde(rename_all = "kebab-case")]
    PoolModeChanged {
        pool: String,
        mode: String,
        needs_check: bool,
        rolled_back: bool,
        reason: Option<String>,
    },
    /// A job's transition: id, status, type, progress, and its result or error once
    /// concluded.
    JobStatusChange(Value),
    #[serde(rename_all = "kebab-case")]
    JobProgress {
        id: String,
        current_progress: u64,
        total_progress: u64,
    },
    #[serde(rename_all = "kebab-case")]
    ReplicationCompleted {
        disk: String,
        snapshot: String,
        bytes: u64,
        full: bool,
        duration_ms: u64,
    },
    #[serde(rename_all = "kebab-case")]
    ReplicationFailed {
        disk: String,
        error: String,
        retry_in_seconds: u64,
    },
}

/// An event as emitted: its name, its data, and when it happened.
#[derive(Clone, Debug)]
pub struct Emitted {
    pub name: String,
    pub data: Value,
    pub at: SystemTime,
}

impl Emitted {
    fn new(event: &Event) -> Emitted {
        // Serializing an enum of plain fields cannot fail; the fallback keeps a bug visible
        // in the log rather than a panic in whichever thread emitted.
        let (name, data) = match serde_json::to_value(event) {
            Ok(Value::Object(mut o)) => (
                o.remove("event")
                    .and_then(|n| n.as_str().map(str::to_string))
                    .unwrap_or_default(),
                o.remove("data").unwrap_or(Value::Null),
            ),
            other => (format!("UNSERIALIZABLE_EVENT {other:?}"), Value::Null),
        };
        Emitted {
            name,
            data,
            at: SystemTime::now(),
        }
    }
}

/// What a subscriber did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    Taken,
    /// Its queue is full: this event is lost to it.
    Full,
    /// It is gone: it is dropped from the bus.
    Gone,
}

type Deliver = Box<dyn FnMut(&Emitted) -> Delivery + Send>;

struct Subscriber {
    id: u64,
    deliver: Deliver,
    warned: bool,
}

#[derive(Clone, Default)]
pub struct EventBus {
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
}

impl EventBus {
    /// Adds a subscriber; `id` names it in logs and in [`EventBus::unsubscribe`].
    pub fn subscribe(&self, id: u64, deliver: impl FnMut(&Emitted) -> Delivery + Send + 'static) {
        crate::sync::lock(&self.subscribers).push(Subscriber {
            id,
            deliver: Box::new(deliver),
            warned: false,
        });
    }

    pub fn unsubscribe(&self, id: u64) {
        crate::sync::lock(&self.subscribers).retain(|s| s.id != id);
    }

    pub fn emit(&self, event: Event) {
        let ev = Emitted::new(&event);
        tracing::info!("event {} {}", ev.name, ev.data);
        crate::sync::lock(&self.subscribers).retain_mut(|s| match (s.deliver)(&ev) {
            Delivery::Taken => true,
            Delivery::Full => {
                if !s.warned {
                    tracing::warn!(
                        "management client {} does not read its events; dropping some",
                        s.id
                    );
                    s.warned = true;
                }
                true
            }
            Delivery::Gone => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn connected(disk: &str) -> Event {
        Event::DiskConnected { disk: disk.into() }
    }

    #[test]
    fn a_full_subscriber_loses_events_and_a_gone_one_is_dropped() {
        let bus = EventBus::default();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Value>(1);
        bus.subscribe(1, move |ev| match tx.try_send(ev.data["disk"].clone()) {
            Ok(()) => Delivery::Taken,
            Err(std::sync::mpsc::TrySendError::Full(_)) => Delivery::Full,
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Delivery::Gone,
        });
        bus.emit(connected("a"));
        bus.emit(connected("b"));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [json!("a")]);
        drop(rx);
        bus.emit(connected("c"));
        assert!(crate::sync::lock(&bus.subscribers).is_empty());
    }

    /// One event of every kind. The match has no wildcard arm: a new kind of event does
    /// not compile until it is added here, and so to the documentation check below.
    fn one_of_each() -> Vec<Event> {
        let s = String::new;
        let all = vec![
            Event::DiskAdded {
                disk: s(),
                pool: s(),
                thin_id: 0,
                size: 0,
                origin: None,
                socket: PathBuf::new(),
            },
            Event::DiskRemoved {
                disk: s(),
                pool: s(),
                thin_id: 0,
            },
            Event::DiskResized {
                disk: s(),
                size: 0,
                guest_notified: false,
            },
            Event::DiskReadOnlyChanged {
                disk: s(),
                read_only: false,
            },
            Event::DiskReverted {
                disk: s(),
                snapshot: s(),
            },
            connected(""),
            Event::DiskDisconnected {
                disk: s(),
                committed: false,
            },
            Event::DiskMigrated(json!({})),
            Event::SnapshotCreated {
                disk: s(),
                snapshot: s(),
                pool: s(),
                thin_id: 0,
                pause_us: 0,
            },
            Event::SnapshotDeleted {
                snapshot: s(),
                pool: s(),
                thin_id: 0,
            },
            Event::PoolGrown {
                pool: s(),
                data_blocks: 0,
                metadata_blocks: 0,
            },
            Event::PoolLowWatermark {
                pool: s(),
                kind: "data",
                used_percent: 0,
                threshold: 0,
            },
            Event::PoolOutOfSpace {
                pool: s(),
                data_blocks: 0,
                queued_writes: 0,
            },
            Event::PoolModeChanged {
                pool: s(),
                mode: s(),
                needs_check: false,
                rolled_back: false,
                reason: None,
            },
            Event::JobStatusChange(json!({})),
            Event::JobProgress {
                id: s(),
                current_progress: 0,
                total_progress: 0,
            },
            Event::ReplicationCompleted {
                disk: s(),
                snapshot: s(),
                bytes: 0,
                full: false,
                duration_ms: 0,
            },
            Event::ReplicationFailed {
                disk: s(),
                error: s(),
                retry_in_seconds: 0,
            },
        ];
        for e in &all {
            match e {
                Event::DiskAdded { .. }
                | Event::DiskRemoved { .. }
                | Event::DiskResized { .. }
                | Event::DiskReadOnlyChanged { .. }
                | Event::DiskReverted { .. }
                | Event::DiskConnected { .. }
                | Event::DiskDisconnected { .. }
                | Event::DiskMigrated(_)
                | Event::SnapshotCreated { .. }
                | Event::SnapshotDeleted { .. }
                | Event::PoolGrown { .. }
                | Event::PoolLowWatermark { .. }
                | Event::PoolOutOfSpace { .. }
                | Event::PoolModeChanged { .. }
                | Event::JobStatusChange(_)
                | Event::JobProgress { .. }
                | Event::ReplicationCompleted { .. }
                | Event::ReplicationFailed { .. } => {}
            }
        }
        all
    }

    /// docs/MANAGEMENT.md's table of events lists every event with every field of its
    /// data, and nothing the daemon does not send.
    #[test]
    fn the_documented_events_are_the_ones_emitted() {
        let doc = include_str!("../../docs/MANAGEMENT.md");
        let documented: Vec<(String, String)> = doc
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                (name.len() > 3 && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
                    .then(|| (name.to_string(), cells.get(2).unwrap_or(&"").to_string()))
            })
            .collect();
        let mut emitted = Vec::new();
        for e in one_of_each() {
            let em = Emitted::new(&e);
            let Some((_, fields)) = documented.iter().find(|(n, _)| *n == em.name) else {
                panic!("{} is not in docs/MANAGEMENT.md's table of events", em.name);
            };
            // Events with typed data: each field is named in the table.
            if let Value::Object(o) = &em.data {
                for k in o.keys() {
                    assert!(
                        fields.contains(&format!("`{k}`")),
                        "{}: field `{k}` is not documented ({fields})",
                        em.name
                    );
                }
            }
            emitted.push(em.name);
        }
        for (n, _) in &documented {
            assert!(
                emitted.contains(n),
                "docs/MANAGEMENT.md lists {n}, which the daemon never sends"
            );
        }
    }
}
