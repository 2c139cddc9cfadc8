//! The command table: every QMP command the daemon answers, in one place. Each entry has
//! its name (QMP's kebab style, `query-*` for reads), what docs/MANAGEMENT.md says of its
//! arguments and result, and one small function that reads its arguments and returns the
//! call to make. `query-commands`, the dispatcher ([`parse`]) and the documentation's
//! table ([`table_markdown`]) all come from [`COMMANDS`], so they cannot drift apart.
//!
//! Reading the arguments needs no daemon (the fuzz target and the tests below run it
//! without one); the returned [`Call`] is what touches the [`Manager`].

use super::args::Args;
use super::QmpError;
use crate::manager::results::Done;
use crate::manager::{Manager, NewDisk};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

/// A command whose arguments have been read and checked: run it to get the reply's
/// `return` value.
pub type Call = Box<dyn FnOnce(&Arc<Manager>) -> Result<Value, QmpError> + Send>;

/// One command of the table.
pub struct Spec {
    pub name: &'static str,
    /// docs/MANAGEMENT.md's "arguments" column.
    pub arguments: &'static str,
    /// docs/MANAGEMENT.md's "returns" column.
    pub returns: &'static str,
    /// Reads the arguments, each checked as it is read, in a fixed order (so the first
    /// error is the one reported, as QEMU's visitors do).
    read: fn(&mut Args) -> Result<Call, QmpError>,
}

/// Every command, in the order `query-commands` lists them.
pub static COMMANDS: &[Spec] = &[
    Spec {
        name: "qmp_capabilities",
        arguments: "optional `enable` (no capability is offered)",
        returns: "`{}`; the first command of every connection",
        read: qmp_capabilities,
    },
    Spec {
        name: "query-version",
        arguments: "",
        returns: "QEMU-shaped version and `package`",
        read: query_version,
    },
    Spec {
        name: "query-commands",
        arguments: "",
        returns: "`[{\"name\": …}]`",
        read: query_commands,
    },
    Spec {
        name: "query-pools",
        arguments: "",
        returns: "per pool: `name`, `block-size`, `data-blocks/used/free`, `metadata-blocks/used/free` (used as dm-thin's status counts it: `metadata-allocated` blocks plus the `metadata-reserve` kept back for the commit that frees space, a tenth of the device and at most 4096 blocks), `transaction-id`, `mode` (`write`/`out-of-data-space`/`read-only`/`fail`), `mode-reason`, `needs-check`, `rolled-back` (writes acknowledged since the last commit were lost to a failed commit: every FLUSH fails; see OPERATIONS.md), `held-metadata-snap`, `policy`, `low-water`, `queued-writes`, `devices`",
        read: query_pools,
    },
    Spec {
        name: "query-disks",
        arguments: "",
        returns: "per disk: `name`, `pool`, `thin-id`, `size`, `socket`, `connected`, `num-queues`, `read-only`, `serial`, `origin`, `lineage`, `mapped-bytes`, `exclusive-bytes`, `shared-bytes`, `created` (seconds since the epoch); `deleted-origin` when the device it came from was deleted (then `origin` is null and `lineage` ends with `\"<name> (deleted)\"`)",
        read: query_disks,
    },
    Spec {
        name: "query-snapshots",
        arguments: "",
        returns: "the same fields for snapshots (kept, not served)",
        read: query_snapshots,
    },
    Spec {
        name: "query-delta",
        arguments: "`left`, `right` (disks or snapshots of one pool), optional `start` (virtual block), `max-runs` (default 1000), `changed-only` (default false: leave out `same` runs; mapping-tree nodes the two share are then not read, the cheap query for incremental copies)",
        returns: "`block-size`, `runs` (`kind`: `same`/`different`/`left_only`/`right_only`, `begin`, `length` in pool blocks, as `thin_delta`), `next` (where the next page starts, or null)",
        read: query_delta,
    },
    Spec {
        name: "disk-add",
        arguments: "`name`, `size`, or `clone-from` (a snapshot or disk; `size` may grow it), or `external-origin` (a raw image or block device whose bytes the disk's unprovisioned blocks read; `size` defaults to the image's), optional `pool`, `socket` (default `<socket-dir>/<name>.sock`), `num-queues`, `read-only`, `serial`",
        returns: "`thin-id`, `socket`; the disk is served at once",
        read: disk_add,
    },
    Spec {
        name: "disk-remove",
        arguments: "`name`, optional `force` (a connected guest is refused without it)",
        returns: "`{}`; the disk's blocks not shared are freed",
        read: disk_remove,
    },
    Spec {
        name: "disk-resize",
        arguments: "`name`, `size` (grow only)",
        returns: "`{\"guest-notified\": bool}`: whether a connected guest was told at once (vhost-user config change); event `DISK_RESIZED`",
        read: disk_resize,
    },
    Spec {
        name: "disk-set-read-only",
        arguments: "`name`, `read-only`",
        returns: "`{}`; writes fail with IOERR from now on; the RO feature bit takes effect at the next connection",
        read: disk_set_read_only,
    },
    Spec {
        name: "snapshot-create",
        arguments: "`disk`, `name` (`@x` means `<disk>@x`)",
        returns: "`name` (the full name), `thin-id`, `pause-us`: how long the snapshot took to make in memory, the most any request of the pool waited for it (writes are not held: the snapshot is crash-consistent, a request in flight may be in it or not); the reply comes once the requests in flight then have landed and the snapshot is durable (registry written, pool committed); a FLUSH the guest sends while the change commits waits for that commit (commits are held so that none makes half the change durable)",
        read: snapshot_create,
    },
    Spec {
        name: "snapshot-delete",
        arguments: "`name`",
        returns: "`dependents`: the disks and snapshots made from it, which dm-thin keeps whole without it (no force needed); they show it as `deleted-origin`",
        read: snapshot_delete,
    },
    Spec {
        name: "snapshot-revert",
        arguments: "`disk`, `snapshot`",
        returns: "`{}`; the disk must not be connected (\"in use by a guest …\"); newer snapshots are kept",
        read: snapshot_revert,
    },
    Spec {
        name: "pool-set-policy",
        arguments: "optional `pool`, `out-of-space` (`error` or `queue`), `timeout` (seconds, with `queue`; 0 = forever, at most 31536000 = one year), `low-water-data`, `low-water-metadata` (percent)",
        returns: "`{}`; kept for the next start in `METADATA.settings.json` (the daemon's file beside a metadata file; not for a metadata block device), which wins over the configuration until removed",
        read: pool_set_policy,
    },
    Spec {
        name: "pool-reserve-metadata-snap",
        arguments: "optional `pool`",
        returns: "`block` (for `thin_dump -m`, `thin_delta -m`)",
        read: pool_reserve_metadata_snap,
    },
    Spec {
        name: "pool-release-metadata-snap",
        arguments: "optional `pool`",
        returns: "`{}`",
        read: pool_release_metadata_snap,
    },
    Spec {
        name: "pool-commit",
        arguments: "optional `pool`",
        returns: "`{}`",
        read: pool_commit,
    },
    Spec {
        name: "pool-grow",
        arguments: "optional `pool`",
        returns: "`data-blocks`, `metadata-blocks` after putting grown devices to use; held writes resume",
        read: pool_grow,
    },
    Spec {
        name: "pool-set-transaction-id",
        arguments: "optional `pool`, `old`, `new`",
        returns: "`transaction-id`; dm-thin's `set_transaction_id`: refused unless the pool's id is `old` (a volume manager keeps its own metadata in step this way); the registry follows",
        read: pool_set_transaction_id,
    },
    Spec {
        name: "query-jobs",
        arguments: "",
        returns: "per job: `id`, `type` (`send`, `receive`, `migrate`, `merge`, `replicate`), `status`, `current-progress`, `total-progress` (bytes), `description`, and once concluded `result` or `error`",
        read: query_jobs,
    },
    Spec {
        name: "job-cancel",
        arguments: "`id`",
        returns: "`{}`; the job goes `aborting`, undoes what it made, and concludes with error `cancelled`",
        read: job_cancel,
    },
    Spec {
        name: "job-dismiss",
        arguments: "`id`",
        returns: "`{}`; forgets a concluded job",
        read: job_dismiss,
    },
    Spec {
        name: "snapshot-send",
        arguments: "`snapshot`, optional `base` (a snapshot the receiver has: incremental), optional `resume-token` (from an interrupted resumable receive: only the rest is sent), and exactly one of `file` (a new file on the daemon's host), `command` (argv, no shell: the stream on its standard input, e.g. `[\"ssh\", \"dr\", \"vhost-thin\", \"ctl\", \"receive\", \"-\", \"--pool\", \"dr\"]`), `pool` + `name` (receive it into another pool of this daemon); optional `job-id`",
        returns: "`{\"job-id\": …}`; the job's result: `sent` (`stream-bytes`, `data-bytes`, `zero-bytes`, …), and `output` (the command's standard output) or `name`/`thin-id` in the pool",
        read: snapshot_send,
    },
    Spec {
        name: "snapshot-receive",
        arguments: "`file` (a stream file or FIFO on the daemon's host), optional `pool`, `name` (default the sender's; a snapshot the pool already holds is refused unless given another `name`, which receives a second copy beside it; the rest of an interrupted receive goes on under the name it was started with, and no other copy of that snapshot is begun meanwhile), `resumable`, `job-id`",
        returns: "`{\"job-id\": …}`; result `name`, `thin-id`, `stream-bytes`, `resumed-from`",
        read: snapshot_receive,
    },
    Spec {
        name: "disk-migrate",
        arguments: "`disk`, `pool` (another pool of this daemon), optional `job-id`",
        returns: "`{\"job-id\": …}`; result `snapshots`, `live-passes`, `pass-bytes`, `data-bytes`, `pause-us` (writes held in all: mirror start, switch and the backward mirror's end, or the final pass), `holds-us` (each hold; a switch that found the new pool's commits taken holds twice or three times), `mirrored`, `mirrored-bytes`",
        read: disk_migrate,
    },
    Spec {
        name: "origin-merge",
        arguments: "`snapshot` (of a disk over an external origin), optional `force`, `job-id`",
        returns: "`{\"job-id\": …}`; result `origin`, `bytes-written`, `affected` (other devices reading that image)",
        read: origin_merge,
    },
    Spec {
        name: "replication-start",
        arguments: "`disk`, exactly one of `pool` (optional `prefix`, default `<disk>-replica`) or `command` (argv), optional `interval` (seconds, default 300), `keep` (default 3)",
        returns: "`{}`; replaces an earlier schedule; the first round runs at once",
        read: replication_start,
    },
    Spec {
        name: "replication-stop",
        arguments: "`disk`",
        returns: "`{}`: ends the schedule (snapshots stay)",
        read: replication_stop,
    },
    Spec {
        name: "replication-run",
        arguments: "`disk`",
        returns: "`{}`: runs a round now",
        read: replication_run,
    },
    Spec {
        name: "query-replication",
        arguments: "",
        returns: "per replicated disk: `interval`, `keep`, `target`, `last-snapshot`, `lag-seconds` (age of the last replicated snapshot), `last-bytes`, `total-bytes`, `rounds`, `failures`, `failures-in-a-row`, `last-error`, `running`, `next-round-in-ms`",
        read: query_replication,
    },
];

/// Reads command `name`'s arguments; then any argument left over is refused, as QEMU
/// refuses it. An unknown command is CommandNotFound.
pub fn parse(name: &str, mut args: Args) -> Result<Call, QmpError> {
    let Some(spec) = COMMANDS.iter().find(|c| c.name == name) else {
        return Err(QmpError {
            class: "CommandNotFound",
            desc: format!("The command {name} has not been found"),
        });
    };
    let call = (spec.read)(&mut args)?;
    args.finish()?;
    Ok(call)
}

/// docs/MANAGEMENT.md's command table (`qmp_capabilities` is described in its own
/// section there).
pub fn table_markdown() -> String {
    let mut out = String::from("| command | arguments | returns |\n|---|---|---|\n");
    for c in COMMANDS.iter().filter(|c| c.name != "qmp_capabilities") {
        let arguments = if c.arguments.is_empty() {
            " ".to_string()
        } else {
            format!(" {} ", c.arguments)
        };
        out += &format!("| `{}` |{arguments}| {} |\n", c.name, c.returns);
    }
    out
}

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

/// The call for a manager operation: its typed result (or error) becomes the reply.
fn call<T, F>(f: F) -> Result<Call, QmpError>
where
    T: serde::Serialize,
    F: FnOnce(&Arc<Manager>) -> Result<T, crate::manager::Error> + Send + 'static,
{
    Ok(Box::new(move |m| {
        let result = f(m)?;
        serde_json::to_value(result).map_err(|e| QmpError {
            class: "GenericError",
            desc: format!("internal error: the result cannot be written: {e}"),
        })
    }))
}

fn qmp_capabilities(a: &mut Args) -> Result<Call, QmpError> {
    // We offer no capabilities; asking for one (QEMU's `enable` is a list) is an error,
    // as in QEMU.
    if a.opt_str("enable").is_err() {
        return Err(QmpError::generic("Capability 'oob' not available"));
    }
    // The connection negotiates (mgmt/server.rs) and refuses a second negotiation before
    // reading arguments, as QEMU does; this call is never made.
    Ok(Box::new(|_| {
        Err(QmpError {
            class: "CommandNotFound",
            desc: "Capabilities negotiation is already complete, command ignored".into(),
        })
    }))
}

// The commands without arguments refuse any given (the dispatcher's `finish`), as QEMU
// refuses them.

fn query_version(_: &mut Args) -> Result<Call, QmpError> {
    Ok(Box::new(|_| Ok(version())))
}

fn query_commands(_: &mut Args) -> Result<Call, QmpError> {
    let names = COMMANDS.iter().map(|c| json!({"name": c.name})).collect();
    Ok(Box::new(|_| Ok(Value::Array(names))))
}

fn query_pools(_: &mut Args) -> Result<Call, QmpError> {
    call(|m| m.query_pools())
}

fn query_disks(_: &mut Args) -> Result<Call, QmpError> {
    call(|m| m.query_disks())
}

fn query_snapshots(_: &mut Args) -> Result<Call, QmpError> {
    call(|m| m.query_snapshots())
}

fn query_delta(a: &mut Args) -> Result<Call, QmpError> {
    let left = a.name("left")?;
    let right = a.name("right")?;
    let start = a.opt_u64("start")?.unwrap_or(0);
    let max_runs = a.opt_u64("max-runs")?.unwrap_or(1000);
    let changed_only = a.opt_bool("changed-only")?.unwrap_or(false);
    call(move |m| m.query_delta(&left, &right, start, max_runs, changed_only))
}

fn disk_add(a: &mut Args) -> Result<Call, QmpError> {
    let name = a.name("name")?;
    let pool = a.opt_name("pool")?;
    let size = a.opt_disk_size("size")?;
    let clone_from = a.opt_name("clone-from")?;
    let socket = a.opt_path("socket")?.map(PathBuf::from);
    let num_queues = a.opt_usize("num-queues")?;
    let read_only = a.opt_bool("read-only")?.unwrap_or(false);
    let serial = a.opt_str("serial")?;
    let external_origin = a.opt_path("external-origin")?;
    call(move |m| {
        let new = NewDisk {
            name: &name,
            pool: pool.as_deref(),
            size,
            clone_from: clone_from.as_deref(),
            read_only,
            serial,
            external_origin: external_origin.as_deref(),
        };
        m.disk_add(&new, socket, num_queues, None)
    })
}

fn disk_remove(a: &mut Args) -> Result<Call, QmpError> {
    let name = a.name("name")?;
    let force = a.opt_bool("force")?.unwrap_or(false);
    call(move |m| m.disk_remove(&name, force))
}

fn disk_resize(a: &mut Args) -> Result<Call, QmpError> {
    let name = a.name("name")?;
    let size = a.disk_size("size")?;
    call(move |m| m.disk_resize(&name, size))
}

fn disk_set_read_only(a: &mut Args) -> Result<Call, QmpError> {
    let name = a.name("name")?;
    let read_only = a.bool("read-only")?;
    call(move |m| m.disk_set_read_only(&name, read_only))
}

fn snapshot_create(a: &mut Args) -> Result<Call, QmpError> {
    let disk = a.name("disk")?;
    let name = a.name("name")?;
    call(move |m| m.snapshot_create(&disk, &name))
}

fn snapshot_delete(a: &mut Args) -> Result<Call, QmpError> {
    let name = a.name("name")?;
    let force = a.opt_bool("force")?.unwrap_or(false);
    call(move |m| m.snapshot_delete(&name, force))
}

fn snapshot_revert(a: &mut Args) -> Result<Call, QmpError> {
    let disk = a.name("disk")?;
    let snapshot = a.name("snapshot")?;
    call(move |m| m.snapshot_revert(&disk, &snapshot))
}

fn pool_set_policy(a: &mut Args) -> Result<Call, QmpError> {
    let pool = a.opt_name("pool")?;
    let out_of_space = a.opt_str("out-of-space")?;
    let timeout = a.opt_u64("timeout")?;
    let low_water_data = a.opt_u64("low-water-data")?;
    let low_water_metadata = a.opt_u64("low-water-metadata")?;
    call(move |m| {
        m.pool_set_policy(
            pool.as_deref(),
            out_of_space.as_deref(),
            timeout,
            low_water_data,
            low_water_metadata,
        )
    })
}

fn pool_reserve_metadata_snap(a: &mut Args) -> Result<Call, QmpError> {
    let pool = a.opt_name("pool")?;
    call(move |m| m.pool_reserve_metadata_snap(pool.as_deref()))
}

fn pool_release_metadata_snap(a: &mut Args) -> Result<Call, QmpError> {
    let pool = a.opt_name("pool")?;
    call(move |m| m.pool_release_metadata_snap(pool.as_deref()))
}

fn pool_commit(a: &mut Args) -> Result<Call, QmpError> {
    let pool = a.opt_name("pool")?;
    call(move |m| m.pool_commit(pool.as_deref()))
}

fn pool_grow(a: &mut Args) -> Result<Call, QmpError> {
    let pool = a.opt_name("pool")?;
    call(move |m| m.pool_grow(pool.as_deref()))
}

fn pool_set_transaction_id(a: &mut Args) -> Result<Call, QmpError> {
    let pool = a.opt_name("pool")?;
    let old = a.u64("old")?;
    let new = a.u64("new")?;
    call(move |m| m.pool_set_transaction_id(pool.as_deref(), old, new))
}

fn query_jobs(_: &mut Args) -> Result<Call, QmpError> {
    call(|m| Ok(m.jobs.query()))
}

fn job_cancel(a: &mut Args) -> Result<Call, QmpError> {
    let id = a.job_id("id")?;
    call(move |m| m.jobs.cancel(&id).map(|()| Done {}))
}

fn job_dismiss(a: &mut Args) -> Result<Call, QmpError> {
    let id = a.job_id("id")?;
    call(move |m| m.jobs.dismiss(&id).map(|()| Done {}))
}

fn snapshot_send(a: &mut Args) -> Result<Call, QmpError> {
    let job_id = a.opt_job_id("job-id")?;
    let snapshot = a.name("snapshot")?;
    let base = a.opt_name("base")?;
    let resume_token = a.opt_str("resume-token")?;
    let dest = super::args::destination(a)?;
    call(move |m| {
        m.snapshot_send(
            job_id,
            &snapshot,
            base.as_deref(),
            resume_token.as_deref(),
            dest,
        )
    })
}

fn snapshot_receive(a: &mut Args) -> Result<Call, QmpError> {
    let job_id = a.opt_job_id("job-id")?;
    let pool = a.opt_name("pool")?;
    let file = PathBuf::from(a.path("file")?);
    let name = a.opt_name("name")?;
    let resumable = a.opt_bool("resumable")?.unwrap_or(false);
    call(move |m| m.snapshot_receive(job_id, pool.as_deref(), file, name, resumable))
}

fn disk_migrate(a: &mut Args) -> Result<Call, QmpError> {
    let job_id = a.opt_job_id("job-id")?;
    let disk = a.name("disk")?;
    let pool = a.name("pool")?;
    call(move |m| m.disk_migrate(job_id, &disk, &pool))
}

fn origin_merge(a: &mut Args) -> Result<Call, QmpError> {
    let job_id = a.opt_job_id("job-id")?;
    let snapshot = a.name("snapshot")?;
    let force = a.opt_bool("force")?.unwrap_or(false);
    call(move |m| m.origin_merge(job_id, &snapshot, force))
}

fn replication_start(a: &mut Args) -> Result<Call, QmpError> {
    let disk = a.name("disk")?;
    let interval = a.opt_u64("interval")?.unwrap_or(300);
    let keep = a.opt_u64("keep")?.unwrap_or(3);
    let target = super::args::replication_target(a, &disk)?;
    let keep = u32::try_from(keep).map_err(|_| QmpError::generic("'keep' must be 1 to 1000"))?;
    call(move |m| m.replication_start(&disk, interval, keep, target))
}

fn replication_stop(a: &mut Args) -> Result<Call, QmpError> {
    let disk = a.name("disk")?;
    call(move |m| m.replication_stop(&disk))
}

fn replication_run(a: &mut Args) -> Result<Call, QmpError> {
    let disk = a.name("disk")?;
    call(move |m| m.replication_run(&disk))
}

fn query_replication(_: &mut Args) -> Result<Call, QmpError> {
    call(|m| m.query_replication())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: Value) -> Args {
        let Value::Object(m) = v else { unreachable!() };
        Args::new(m)
    }

    fn error(name: &str, v: Value) -> QmpError {
        match parse(name, args(v)) {
            Ok(_) => panic!("{name} accepted its arguments"),
            Err(e) => e,
        }
    }

    /// docs/MANAGEMENT.md's command table is the one this table makes. After changing a
    /// command's text here, `VHOST_THIN_WRITE_DOCS=1 cargo test -p vhost-thin
    /// the_documented_command_table` writes it there.
    #[test]
    fn the_documented_command_table_is_made_from_the_command_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/MANAGEMENT.md");
        let doc = std::fs::read_to_string(path).expect("docs/MANAGEMENT.md");
        let begin = doc
            .find("| command | arguments | returns |")
            .expect("the table");
        let len = doc[begin..]
            .find("\n\n")
            .map_or(doc.len() - begin, |n| n + 1);
        let made = table_markdown();
        if doc[begin..begin + len] != made && std::env::var_os("VHOST_THIN_WRITE_DOCS").is_some() {
            let new = format!("{}{}{}", &doc[..begin], made, &doc[begin + len..]);
            std::fs::write(path, new).expect("write docs/MANAGEMENT.md");
            return;
        }
        assert_eq!(
            doc[begin..begin + len],
            made,
            "docs/MANAGEMENT.md's command table (VHOST_THIN_WRITE_DOCS=1 rewrites it)"
        );
    }

    #[test]
    fn every_command_has_one_entry() {
        let mut names: Vec<&str> = COMMANDS.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), COMMANDS.len(), "a command is listed twice");
    }

    #[test]
    fn commands_read_in_argument_order_and_refuse_what_is_left() {
        // The first bad argument in reading order is the one reported: 'name' before
        // 'size' (tests/qmp/test_qmp.py sends {"size": 1} and expects "missing").
        assert_eq!(
            error("disk-add", json!({"size": 1})).desc,
            "Parameter 'name' is missing"
        );
        assert!(parse(
            "disk-add",
            args(json!({"name": "d", "size": "1MiB", "num-queues": 2}))
        )
        .is_ok());
        assert_eq!(
            error(
                "disk-add",
                json!({"name": "d", "size": "1MiB", "colour": 2})
            )
            .desc,
            "Parameter 'colour' is unexpected"
        );
        assert_eq!(
            error("query-version", json!({"verbose": true})).desc,
            "Parameter 'verbose' is unexpected"
        );
        assert_eq!(error("nope", json!({})).class, "CommandNotFound");
        assert_eq!(
            error("qmp_capabilities", json!({"enable": ["oob"]})).desc,
            "Capability 'oob' not available"
        );
        assert!(parse(
            "snapshot-send",
            args(json!({"snapshot": "s", "pool": "b", "name": "c"}))
        )
        .is_ok());
        assert_eq!(
            error(
                "snapshot-send",
                json!({"snapshot": "s", "file": "/f", "command": ["x"]})
            )
            .desc,
            "say where the stream goes: exactly one of 'file', 'command' or 'pool'"
        );
        // Leftovers are refused before the combination is looked at.
        assert_eq!(
            error(
                "snapshot-send",
                json!({"snapshot": "s", "file": "/f", "command": ["x"], "x": 1})
            )
            .desc,
            "Parameter 'x' is unexpected"
        );
        assert!(parse(
            "replication-start",
            args(json!({"disk": "vm", "pool": "b"}))
        )
        .is_ok());
        assert_eq!(
            error(
                "replication-start",
                json!({"disk": "vm", "pool": "b", "keep": 1u64 << 40})
            )
            .desc,
            "'keep' must be 1 to 1000"
        );
    }
}
