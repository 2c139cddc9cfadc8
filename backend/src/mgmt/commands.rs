//! The command table: names in QMP's kebab style, `query-*` for reads.

use super::args::Command;
use super::QmpError;
use crate::manager::Manager;
use serde_json::{json, Value};
use std::sync::Arc;

pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-pools",
    "query-disks",
    "query-snapshots",
    "query-delta",
    "disk-add",
    "disk-remove",
    "disk-resize",
    "disk-set-read-only",
    "snapshot-create",
    "snapshot-delete",
    "snapshot-revert",
    "pool-set-policy",
    "pool-reserve-metadata-snap",
    "pool-release-metadata-snap",
    "pool-commit",
    "pool-grow",
    "pool-set-transaction-id",
    "query-jobs",
    "job-cancel",
    "job-dismiss",
    "snapshot-send",
    "snapshot-receive",
    "disk-migrate",
    "origin-merge",
    "replication-start",
    "replication-stop",
    "replication-run",
    "query-replication",
];

pub fn version() -> Value {
    let mut v = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|x| x.parse::<u64>().unwrap_or(0));
    let (major, minor, micro) = (
        v.next().unwrap_or(0),
        v.next().unwrap_or(0),
        v.next().unwrap_or(0),
    );
    json!({
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": format!("vhost-thin {}", env!("CARGO_PKG_VERSION")),
    })
}

/// Runs one command of a negotiated client, its arguments parsed and checked
/// ([`Command::parse`]).
pub fn execute(m: &Arc<Manager>, c: Command) -> Result<Value, QmpError> {
    use Command as C;
    /// A typed result as the reply's `return` value.
    fn reply<T: serde::Serialize>(t: T) -> Result<Value, QmpError> {
        serde_json::to_value(t).map_err(|e| QmpError {
            class: "GenericError",
            desc: format!("internal error: the result cannot be written: {e}"),
        })
    }
    Ok(match c {
        // The server negotiates; once negotiated, asking again is refused as QEMU does.
        C::QmpCapabilities => {
            return Err(QmpError {
                class: "CommandNotFound",
                desc: "Capabilities negotiation is already complete, command ignored".into(),
            })
        }
        C::QueryVersion => version(),
        C::QueryCommands => Value::Array(COMMANDS.iter().map(|c| json!({"name": c})).collect()),
        C::QueryPools => reply(m.query_pools()?)?,
        C::QueryDisks => reply(m.query_disks()?)?,
        C::QuerySnapshots => reply(m.query_snapshots()?)?,
        C::QueryDelta {
            left,
            right,
            start,
            max_runs,
            changed_only,
        } => m.query_delta(&left, &right, start, max_runs, changed_only)?,
        C::DiskAdd {
            name,
            pool,
            size,
            clone_from,
            socket,
            num_queues,
            read_only,
            serial,
            external_origin,
        } => reply(m.disk_add(
            &crate::manager::NewDisk {
                name: &name,
                pool: pool.as_deref(),
                size,
                clone_from: clone_from.as_deref(),
                read_only,
                serial,
                external_origin: external_origin.as_deref(),
            },
            socket,
            num_queues,
            None,
        )?)?,
        C::DiskRemove { name, force } => m.disk_remove(&name, force)?,
        C::DiskResize { name, size } => m.disk_resize(&name, size)?,
        C::DiskSetReadOnly { name, read_only } => reply(m.disk_set_read_only(&name, read_only)?)?,
        C::SnapshotCreate { disk, name } => reply(m.snapshot_create(&disk, &name)?)?,
        C::SnapshotDelete { name, force } => reply(m.snapshot_delete(&name, force)?)?,
        C::SnapshotRevert { disk, snapshot } => reply(m.snapshot_revert(&disk, &snapshot)?)?,
        C::PoolSetPolicy {
            pool,
            out_of_space,
            timeout,
            low_water_data,
            low_water_metadata,
        } => m.pool_set_policy(
            pool.as_deref(),
            out_of_space.as_deref(),
            timeout,
            low_water_data,
            low_water_metadata,
        )?,
        C::PoolReserveMetadataSnap { pool } => m.pool_reserve_metadata_snap(pool.as_deref())?,
        C::PoolReleaseMetadataSnap { pool } => m.pool_release_metadata_snap(pool.as_deref())?,
        C::PoolCommit { pool } => m.pool_commit(pool.as_deref())?,
        C::PoolGrow { pool } => m.pool_grow(pool.as_deref())?,
        C::PoolSetTransactionId { pool, old, new } => {
            m.pool_set_transaction_id(pool.as_deref(), old, new)?
        }
        C::QueryJobs => m.jobs.query(),
        C::JobCancel { id } => {
            m.jobs.cancel(&id)?;
            json!({})
        }
        C::JobDismiss { id } => {
            m.jobs.dismiss(&id)?;
            json!({})
        }
        C::SnapshotSend {
            job_id,
            snapshot,
            base,
            resume_token,
            dest,
        } => m.snapshot_send(
            job_id,
            &snapshot,
            base.as_deref(),
            resume_token.as_deref(),
            dest,
        )?,
        C::SnapshotReceive {
            job_id,
            pool,
            file,
            name,
            resumable,
        } => m.snapshot_receive(job_id, pool.as_deref(), file, name, resumable)?,
        C::DiskMigrate { job_id, disk, pool } => m.disk_migrate(job_id, &disk, &pool)?,
        C::OriginMerge {
            job_id,
            snapshot,
            force,
        } => m.origin_merge(job_id, &snapshot, force)?,
        C::ReplicationStart {
            disk,
            interval,
            keep,
            target,
        } => m.replication_start(&disk, interval, keep, target)?,
        C::ReplicationStop { disk } => m.replication_stop(&disk)?,
        C::ReplicationRun { disk } => m.replication_run(&disk)?,
        C::QueryReplication => m.query_replication()?,
    })
}

#[cfg(test)]
mod tests {
    use super::COMMANDS;
    use crate::mgmt::args::{Args, Command};

    /// The command list `query-commands` answers with, the commands the parser knows and
    /// the table in docs/MANAGEMENT.md name the same commands.
    #[test]
    fn the_command_list_the_parser_and_the_docs_agree() {
        for name in COMMANDS {
            if let Err(e) = Command::parse(name, Args::new(Default::default())) {
                assert_ne!(
                    e.class, "CommandNotFound",
                    "{name} is listed but not parsed"
                );
            }
        }
        let doc = include_str!("../../../docs/MANAGEMENT.md");
        let table = &doc[doc
            .find("| command | arguments | returns |")
            .expect("the table")..];
        let mut documented = Vec::new();
        for row in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
            let first = row.split('|').nth(1).unwrap_or_default();
            for part in first.split('/') {
                documented.push(part.trim().trim_matches('`').to_string());
            }
        }
        let mut listed: Vec<String> = COMMANDS
            .iter()
            .filter(|c| **c != "qmp_capabilities")
            .map(|c| c.to_string())
            .collect();
        listed.sort();
        documented.sort();
        assert_eq!(listed, documented, "docs/MANAGEMENT.md's command table");
    }
}
