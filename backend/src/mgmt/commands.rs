//! The command table: names in QMP's kebab style, `query-*` for reads.

use super::args::Args;
use super::QmpError;
use crate::manager::transfer::Destination;
use crate::manager::Manager;
use serde_json::{json, Value};
use std::path::PathBuf;
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
    let v: Vec<u64> = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    json!({
        "qemu": {"major": v[0], "minor": v[1], "micro": v[2]},
        "package": format!("vhost-thin {}", env!("CARGO_PKG_VERSION")),
    })
}

/// Runs one (negotiated) command.
pub fn execute(m: &Arc<Manager>, name: &str, mut a: Args) -> Result<Value, QmpError> {
    let v = match name {
        // No arguments: any given is refused, as QEMU refuses them.
        "query-version" | "query-commands" | "query-pools" | "query-disks" | "query-snapshots" => {
            a.finish()?;
            match name {
                "query-version" => version(),
                "query-commands" => {
                    Value::Array(COMMANDS.iter().map(|c| json!({"name": c})).collect())
                }
                "query-pools" => m.query_pools()?,
                "query-disks" => m.query_disks()?,
                _ => m.query_snapshots()?,
            }
        }
        "query-delta" => {
            let left = a.str("left")?;
            let right = a.str("right")?;
            let start = a.opt_u64("start")?.unwrap_or(0);
            let max = a.opt_u64("max-runs")?.unwrap_or(1000);
            let changed_only = a.opt_bool("changed-only")?.unwrap_or(false);
            a.finish()?;
            m.query_delta(&left, &right, start, max, changed_only)?
        }
        "disk-add" => {
            let name = a.str("name")?;
            let pool = a.opt_str("pool")?;
            let size = a.opt_size("size")?;
            let clone = a.opt_str("clone-from")?;
            let socket = a.opt_str("socket")?.map(PathBuf::from);
            let nq = a.opt_u64("num-queues")?.map(|n| n as usize);
            let ro = a.opt_bool("read-only")?.unwrap_or(false);
            let serial = a.opt_str("serial")?;
            let external = a.opt_str("external-origin")?;
            a.finish()?;
            m.disk_add(
                &crate::manager::NewDisk {
                    name: &name,
                    pool: pool.as_deref(),
                    size,
                    clone_from: clone.as_deref(),
                    read_only: ro,
                    serial,
                    external_origin: external.as_deref(),
                },
                socket,
                nq,
                None,
            )?
        }
        "disk-remove" => {
            let name = a.str("name")?;
            let force = a.opt_bool("force")?.unwrap_or(false);
            a.finish()?;
            m.disk_remove(&name, force)?
        }
        "disk-resize" => {
            let name = a.str("name")?;
            let size = a.size("size")?;
            a.finish()?;
            m.disk_resize(&name, size)?
        }
        "disk-set-read-only" => {
            let name = a.str("name")?;
            let ro = a.bool("read-only")?;
            a.finish()?;
            m.disk_set_read_only(&name, ro)?
        }
        "snapshot-create" => {
            let disk = a.str("disk")?;
            let name = a.str("name")?;
            a.finish()?;
            m.snapshot_create(&disk, &name)?
        }
        "snapshot-delete" => {
            let name = a.str("name")?;
            let force = a.opt_bool("force")?.unwrap_or(false);
            a.finish()?;
            m.snapshot_delete(&name, force)?
        }
        "snapshot-revert" => {
            let disk = a.str("disk")?;
            let snap = a.str("snapshot")?;
            a.finish()?;
            m.snapshot_revert(&disk, &snap)?
        }
        "pool-set-policy" => {
            let pool = a.opt_str("pool")?;
            let oos = a.opt_str("out-of-space")?;
            let timeout = a.opt_u64("timeout")?;
            let lwd = a.opt_u64("low-water-data")?;
            let lwm = a.opt_u64("low-water-metadata")?;
            a.finish()?;
            m.pool_set_policy(pool.as_deref(), oos.as_deref(), timeout, lwd, lwm)?
        }
        "pool-reserve-metadata-snap"
        | "pool-release-metadata-snap"
        | "pool-commit"
        | "pool-grow" => {
            let pool = a.opt_str("pool")?;
            a.finish()?;
            let p = pool.as_deref();
            match name {
                "pool-reserve-metadata-snap" => m.pool_reserve_metadata_snap(p)?,
                "pool-release-metadata-snap" => m.pool_release_metadata_snap(p)?,
                "pool-commit" => m.pool_commit(p)?,
                _ => m.pool_grow(p)?,
            }
        }
        "query-jobs" => {
            a.finish()?;
            m.jobs.query()
        }
        "job-cancel" | "job-dismiss" => {
            let id = a.str("id")?;
            a.finish()?;
            if name == "job-cancel" {
                m.jobs.cancel(&id)?;
            } else {
                m.jobs.dismiss(&id)?;
            }
            json!({})
        }
        "snapshot-send" => {
            let job_id = a.opt_str("job-id")?;
            let snapshot = a.str("snapshot")?;
            let base = a.opt_str("base")?;
            let resume = a.opt_str("resume-token")?;
            let file = a.opt_str("file")?;
            let command = a.opt_str_list("command")?;
            let pool = a.opt_str("pool")?;
            let target_name = a.opt_str("name")?;
            a.finish()?;
            let dest = match (file, command, pool) {
                (Some(f), None, None) => Destination::File(PathBuf::from(f)),
                (None, Some(c), None) => Destination::Command(c),
                (None, None, Some(p)) => Destination::Pool {
                    pool: p,
                    name: target_name.clone().ok_or_else(|| {
                        QmpError::generic(
                            "a copy into another pool needs 'name': names are unique across the daemon",
                        )
                    })?,
                },
                _ => {
                    return Err(QmpError::generic(
                        "say where the stream goes: exactly one of 'file', 'command' or 'pool'",
                    ))
                }
            };
            if target_name.is_some() && !matches!(dest, Destination::Pool { .. }) {
                return Err(QmpError::generic(
                    "'name' goes with 'pool' (a receiver names what it receives)",
                ));
            }
            m.snapshot_send(job_id, &snapshot, base.as_deref(), resume.as_deref(), dest)?
        }
        "replication-start" => {
            let disk = a.str("disk")?;
            let interval = a.opt_u64("interval")?.unwrap_or(300);
            let keep = a.opt_u64("keep")?.unwrap_or(3);
            let pool = a.opt_str("pool")?;
            let prefix = a.opt_str("prefix")?;
            let command = a.opt_str_list("command")?;
            a.finish()?;
            let target =
                match (pool, command) {
                    (Some(pool), None) => thinpool::registry::ReplicationTarget::Pool {
                        prefix: prefix.unwrap_or_else(|| format!("{disk}-replica")),
                        pool,
                    },
                    (None, Some(argv)) if prefix.is_none() => {
                        thinpool::registry::ReplicationTarget::Command { argv }
                    }
                    (None, Some(_)) => return Err(QmpError::generic(
                        "'prefix' goes with 'pool' (a command's receiver names what it receives)",
                    )),
                    _ => {
                        return Err(QmpError::generic(
                            "say where replicas go: exactly one of 'pool' or 'command'",
                        ))
                    }
                };
            let keep =
                u32::try_from(keep).map_err(|_| QmpError::generic("'keep' must be 1 to 1000"))?;
            m.replication_start(&disk, interval, keep, target)?
        }
        "replication-stop" | "replication-run" => {
            let disk = a.str("disk")?;
            a.finish()?;
            if name == "replication-stop" {
                m.replication_stop(&disk)?
            } else {
                m.replication_run(&disk)?
            }
        }
        "query-replication" => {
            a.finish()?;
            m.query_replication()?
        }
        "origin-merge" => {
            let job_id = a.opt_str("job-id")?;
            let snapshot = a.str("snapshot")?;
            let force = a.opt_bool("force")?.unwrap_or(false);
            a.finish()?;
            m.origin_merge(job_id, &snapshot, force)?
        }
        "disk-migrate" => {
            let job_id = a.opt_str("job-id")?;
            let disk = a.str("disk")?;
            let pool = a.str("pool")?;
            a.finish()?;
            m.disk_migrate(job_id, &disk, &pool)?
        }
        "snapshot-receive" => {
            let job_id = a.opt_str("job-id")?;
            let pool = a.opt_str("pool")?;
            let file = a.str("file")?;
            let rname = a.opt_str("name")?;
            let resumable = a.opt_bool("resumable")?.unwrap_or(false);
            a.finish()?;
            m.snapshot_receive(
                job_id,
                pool.as_deref(),
                PathBuf::from(file),
                rname,
                resumable,
            )?
        }
        other => {
            return Err(QmpError {
                class: "CommandNotFound",
                desc: format!("The command {other} has not been found"),
            })
        }
    };
    Ok(v)
}
