//! What the manager's operations return, as types. Field names are those a management
//! client sees (kebab-case through serde); `mgmt` turns a result into a QMP reply, and an
//! in-process caller (a test, the quickstart banner) reads the fields directly.

use serde::Serialize;
use std::path::PathBuf;

/// An operation that returns nothing but its success: `{}` on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Done {}

/// A disk or a snapshot, as `query-disks` and `query-snapshots` describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceInfo {
    pub name: String,
    pub pool: String,
    pub thin_id: u32,
    /// Virtual size in bytes.
    pub size: u64,
    pub read_only: bool,
    pub serial: String,
    /// The disk or snapshot it was made from, while that one exists.
    pub origin: Option<String>,
    /// Origin, its origin, … as far as the registry knows; a deleted one ends it as
    /// `"<name> (deleted)"`.
    pub lineage: Vec<String>,
    pub mapped_bytes: u64,
    pub exclusive_bytes: u64,
    pub shared_bytes: u64,
    /// Seconds since the epoch.
    pub created: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guid: Option<String>,
    /// The name of the device it came from, deleted since.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_origin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_origin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge_interrupted_at: Option<u64>,
    /// Disks only.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingInfo>,
}

/// How a disk is served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ServingInfo {
    /// Its vhost-user socket; None when it is not served.
    pub socket: Option<PathBuf>,
    /// Whether a frontend is connected.
    pub connected: bool,
    pub num_queues: usize,
}

/// A pool, as `query-pools` describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PoolInfo {
    pub name: String,
    pub block_size: u64,
    pub data_blocks: u64,
    pub data_used: u64,
    pub data_free: u64,
    pub metadata_blocks: u64,
    /// Counted as the kernel's status counts it: allocated plus its reserve.
    pub metadata_used: u64,
    pub metadata_free: u64,
    pub metadata_allocated: u64,
    pub metadata_reserve: u64,
    pub transaction_id: u64,
    pub mode: String,
    pub mode_reason: Option<String>,
    pub needs_check: bool,
    pub rolled_back: bool,
    pub held_metadata_snap: Option<u64>,
    pub policy: Policy,
    pub low_water: LowWater,
    pub queued_writes: u64,
    pub devices: usize,
}

/// The out-of-space policy: `error`, or `queue` with a timeout in seconds (0: none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "out-of-space", rename_all = "kebab-case")]
pub enum Policy {
    Error,
    Queue { timeout: u64 },
}

/// Low-water marks in percent of the space used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LowWater {
    pub data: u8,
    pub metadata: u8,
}

/// `disk-add`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskAdded {
    pub thin_id: u32,
    pub socket: PathBuf,
}

/// `snapshot-create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotCreated {
    /// The full name (`@x` asked of disk d is `d@x`).
    pub name: String,
    pub thin_id: u32,
    /// How long the disk's writes were held, in microseconds.
    pub pause_us: u64,
}

/// `snapshot-delete`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotDeleted {
    /// The disks and snapshots made from it, which keep it as their deleted origin.
    pub dependents: Vec<String>,
}

/// `disk-resize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskResized {
    /// Whether a connected guest was told at once (vhost-user config change).
    pub guest_notified: bool,
}

/// One page of `query-delta`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeltaPage {
    pub block_size: u64,
    /// In pool blocks, as `thin_delta` gives them.
    pub runs: Vec<thinpool::delta::DeltaRun>,
    /// Where the next page starts; None after the last.
    pub next: Option<u64>,
}

/// `pool-reserve-metadata-snap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MetadataSnap {
    /// The metadata snapshot's block, for `thin_dump -m`.
    pub block: u64,
}

/// `pool-set-transaction-id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TransactionId {
    pub transaction_id: u64,
}

/// `pool-grow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PoolGrown {
    pub data_blocks: u64,
    pub metadata_blocks: u64,
}

/// A command that started a job (`snapshot-send`, `snapshot-receive`, `disk-migrate`,
/// `origin-merge`): its result comes with the job's conclusion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobStarted {
    pub job_id: String,
}

/// One replicated disk, as `query-replication` describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReplicationInfo {
    pub disk: String,
    /// Seconds between rounds.
    pub interval: u64,
    /// Replicated snapshots kept.
    pub keep: u32,
    pub target: ReplicaTarget,
    /// Age of the last replicated snapshot, in seconds.
    pub lag_seconds: Option<u64>,
    pub next_round_in_ms: Option<u64>,
    /// Rounds, bytes, failures, the last snapshot and error, whether one runs now.
    #[serde(flatten)]
    pub status: super::replication::Status,
}

/// Where a disk's replicas go: `{"pool": …, "prefix": …}` or `{"command": [argv]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ReplicaTarget {
    Pool { pool: String, prefix: String },
    Command { command: Vec<String> },
}

/// One job, as `query-jobs` describes it (QEMU's JobInfo, plus what it does and how it
/// ended).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    pub id: String,
    /// `send`, `receive`, `migrate`, `merge`, `replicate`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `created`, `running`, `aborting`, `concluded`.
    pub status: &'static str,
    pub current_progress: u64,
    pub total_progress: u64,
    pub description: String,
    /// Once concluded: what the job made (its own fields per type) …
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// … or why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn results_read_on_the_wire_as_the_protocol_documents_them() {
        assert_eq!(serde_json::to_value(Done {}).unwrap(), json!({}));
        assert_eq!(
            serde_json::to_value(Policy::Queue { timeout: 5 }).unwrap(),
            json!({"out-of-space": "queue", "timeout": 5})
        );
        assert_eq!(
            serde_json::to_value(Policy::Error).unwrap(),
            json!({"out-of-space": "error"})
        );
        assert_eq!(
            serde_json::to_value(SnapshotCreated {
                name: "vm1@a".into(),
                thin_id: 3,
                pause_us: 40
            })
            .unwrap(),
            json!({"name": "vm1@a", "thin-id": 3, "pause-us": 40})
        );
        assert_eq!(
            serde_json::to_value(JobStarted {
                job_id: "j1".into()
            })
            .unwrap(),
            json!({"job-id": "j1"})
        );
        assert_eq!(
            serde_json::to_value(PoolGrown {
                data_blocks: 2,
                metadata_blocks: 3
            })
            .unwrap(),
            json!({"data-blocks": 2, "metadata-blocks": 3})
        );
        assert_eq!(
            serde_json::to_value(DeltaPage {
                block_size: 65536,
                runs: vec![thinpool::delta::DeltaRun {
                    kind: thinpool::delta::DeltaKind::LeftOnly,
                    begin: 1,
                    length: 2
                }],
                next: None
            })
            .unwrap(),
            json!({"block-size": 65536, "runs": [{"kind": "left_only", "begin": 1, "length": 2}], "next": null})
        );
    }
}
