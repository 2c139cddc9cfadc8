//! `vhost-thin ctl`: a small client of the management socket, human tables by default,
//! `--json` for scripts.

use crate::size::{human, parse_size};
use crate::usage::UsageError;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// Management socket (default: $VHOST_THIN_QMP, else ./vhost-thin-state/qmp.sock).
    #[arg(long, short = 's', value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the raw JSON result.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand, Debug)]
enum CtlCmd {
    /// List disks.
    #[command(after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock disks")]
    Disks,
    /// List snapshots: name, the disk each was taken of, creation time (UTC), size and the
    /// space only it holds.
    #[command(
        after_help = "Examples:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock snapshots\n  vhost-thin ctl -s vhost-thin-state/qmp.sock snapshots vm1 --json"
    )]
    Snapshots {
        /// Only the snapshots of this disk (`vm1@…` and flat-named ones taken of vm1).
        disk: Option<String>,
    },
    /// Show pools.
    #[command(after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock pools")]
    Pools,
    /// Snapshot a disk (running or not). As in ZFS, `vm1@nightly` names a snapshot in vm1's
    /// namespace (another disk may have its own `@nightly`).
    #[command(
        after_help = "Examples:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock snapshot vm1@before-upgrade\n  vhost-thin ctl -s vhost-thin-state/qmp.sock snapshot vm1 golden   (a flat name, also reached as vm1@golden)"
    )]
    Snapshot {
        /// The disk to snapshot (running or not), or DISK@NAME to name the snapshot too.
        #[arg(value_name = "DISK[@NAME]")]
        disk: String,
        /// The snapshot's name: `@x` or `DISK@x` in the disk's namespace, or a flat name
        /// (unique among disks and snapshots). Not needed after DISK@NAME.
        name: Option<String>,
    },
    /// A new disk as a clone of a snapshot or disk.
    #[command(
        after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock clone golden@base ci-7 --disk-socket /run/ci-7.sock"
    )]
    Clone {
        /// The snapshot (or disk) to clone.
        from: String,
        /// The new disk's name.
        name: String,
        /// The new disk's vhost-user socket (default: <name>.sock in the daemon's socket
        /// directory). Not `--socket`: that is the management socket, before the command.
        #[arg(long, value_name = "PATH")]
        disk_socket: Option<PathBuf>,
        /// Virtqueues offered to the guest.
        #[arg(long)]
        num_queues: Option<u64>,
    },
    /// A new empty disk, or one over a golden image (--external-origin).
    #[command(
        after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock add scratch --size 20G\n  vhost-thin ctl -s vhost-thin-state/qmp.sock add golden --external-origin debian.raw"
    )]
    Add {
        /// The new disk's name.
        name: String,
        /// Virtual size; default with --external-origin: the image's size. Units: K, M, G, T, P (or KiB … PiB), powers of 1024; e.g. 10G, 1.5T.
        #[arg(long, value_parser = parse_size, allow_negative_numbers = true, value_name = "SIZE")]
        size: Option<u64>,
        /// A read-only image the disk's unprovisioned blocks read from.
        #[arg(long, value_name = "IMAGE")]
        external_origin: Option<PathBuf>,
        /// The new disk's vhost-user socket (default: <name>.sock in the daemon's socket
        /// directory). Not `--socket`: that is the management socket, before the command.
        #[arg(long, value_name = "PATH")]
        disk_socket: Option<PathBuf>,
        /// Virtqueues offered to the guest.
        #[arg(long)]
        num_queues: Option<u64>,
    },
    /// Remove a disk (and its data).
    #[command(after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock remove ci-7")]
    Remove {
        /// The disk to remove.
        name: String,
        /// Even though a guest is connected (it loses the disk).
        #[arg(long)]
        force: bool,
    },
    /// Grow a disk.
    #[command(
        after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock resize vm1 40G"
    )]
    Resize {
        /// The disk to grow.
        name: String,
        /// The new virtual size (only grows). Units: K, M, G, T, P (or KiB … PiB), powers of 1024; e.g. 10G, 1.5T.
        #[arg(value_parser = parse_size, allow_negative_numbers = true, value_name = "SIZE")]
        size: u64,
    },
    /// Delete a snapshot.
    #[command(
        after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock delete-snapshot vm1-before-upgrade"
    )]
    DeleteSnapshot {
        /// The snapshot to delete.
        name: String,
    },
    /// Make a disconnected disk's contents those of a snapshot.
    #[command(
        after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock revert vm1 vm1-before-upgrade"
    )]
    Revert {
        /// The disk (no guest connected) whose contents are replaced.
        disk: String,
        /// The snapshot of it whose contents it takes.
        snapshot: String,
    },
    /// Print events as they come.
    #[command(after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock watch")]
    Watch,
    /// Send a snapshot as a stream (a job): to a new file, into a command's standard input,
    /// or into another pool of the daemon. Follows the job with a progress bar.
    #[command(
        after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock send s2 --base s1 --file s2.stream\n  vhost-thin ctl -s vhost-thin-state/qmp.sock send s2 -- ssh dr vhost-thin ctl receive - --pool dr"
    )]
    Send {
        /// The snapshot to send.
        snapshot: String,
        /// Only what changed since this snapshot (the receiver has it).
        #[arg(long, short = 'i')]
        base: Option<String>,
        /// The rest of an interrupted resumable receive (the token it gave).
        #[arg(long, value_name = "TOKEN")]
        resume: Option<String>,
        /// A new file the stream is written to (on the daemon's host).
        #[arg(long, short = 'o', conflicts_with_all = ["to_pool", "command"])]
        file: Option<PathBuf>,
        /// Another pool of the daemon (with --name).
        #[arg(long, requires = "name", conflicts_with = "command")]
        to_pool: Option<String>,
        /// The copy's name in that pool.
        #[arg(long)]
        name: Option<String>,
        /// Start the job and print its id without waiting.
        #[arg(long)]
        no_wait: bool,
        /// A command to pipe the stream into, after `--`: `-- ssh host vhost-thin receive …`.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Receive a stream into a pool, as a job: a file on the daemon's host, or "-" for this
    /// command's standard input (`… | ssh host vhost-thin ctl receive - --pool p`), passed
    /// to the daemon through a private FIFO.
    #[command(
        after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock receive s2.stream --name s2"
    )]
    Receive {
        /// The stream: a file (relative to where ctl runs), or "-" for standard input.
        file: PathBuf,
        /// The pool to receive into (default: the daemon's first).
        #[arg(long)]
        pool: Option<String>,
        /// The received snapshot's name (default: the sender's).
        #[arg(long)]
        name: Option<String>,
        /// Keep what arrived if the stream is cut short, to resume.
        #[arg(long)]
        resumable: bool,
        /// Print the job's id and return at once instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Move a disk and its snapshots to another pool of the daemon, while its guest runs
    /// (a job; the pause with writes held is reported).
    #[command(
        after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock migrate vm1 fast-pool"
    )]
    Migrate {
        /// The disk to move (with its snapshots).
        disk: String,
        /// The pool of this daemon to move it to.
        pool: String,
        /// Print the job's id and return at once instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Write a snapshot's provisioned blocks into its external origin (a job): the tested
    /// clone becomes the golden image.
    #[command(
        after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock merge golden-tested"
    )]
    Merge {
        /// The snapshot (a clone over an external origin) to write into its image.
        snapshot: String,
        /// Even though other devices read the same image.
        #[arg(long)]
        force: bool,
        /// Print the job's id and return at once instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// List jobs.
    #[command(after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock jobs")]
    Jobs,
    /// Cancel a job: it undoes what it made.
    #[command(after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock cancel job-3")]
    Cancel {
        /// The job's id (see `ctl jobs`).
        id: String,
    },
    /// Follow a job until it ends (its result, or its error and exit status 1).
    #[command(after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock wait job-3")]
    Wait {
        /// The job's id (see `ctl jobs`).
        id: String,
    },
    /// Any command: `ctl exec pool-set-policy '{"out-of-space": "queue", "timeout": 30}'`.
    #[command(
        after_help = "Example:\n  vhost-thin ctl -s vhost-thin-state/qmp.sock exec pool-set-policy '{\"out-of-space\": \"queue\", \"timeout\": 60}'"
    )]
    Exec {
        /// The QMP command's name (see `ctl exec query-commands`).
        command: String,
        /// Its arguments as a JSON object.
        arguments: Option<String>,
    },
}

/// An error reply of the daemon. Shown to a person as its description; its QMP class
/// (`GenericError`, `DeviceNotFound`, …) is there for scripts (`--json` prints both).
#[derive(Debug, thiserror::Error)]
#[error("{desc}")]
pub struct QmpReplyError {
    pub class: String,
    pub desc: String,
}

/// How long a management socket may take to greet.
const GREETING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &PathBuf) -> Result<Client> {
        let s = UnixStream::connect(path).with_context(|| {
            format!("cannot connect to the management socket {}", path.display())
        })?;
        // A QMP server greets at once; a disk's socket (or anything else) says nothing and
        // would be waited on forever.
        s.set_read_timeout(Some(GREETING_TIMEOUT))?;
        let mut c = Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            next_id: 1,
        };
        let not_qmp = |what: String| {
            anyhow::anyhow!(
                "{} is not a vhost-thin management socket ({what}); give the one `serve --qmp` \
                 made with -s/--socket or $VHOST_THIN_QMP",
                path.display()
            )
        };
        let greeting = match c.read() {
            Ok(g) => g,
            Err(e) => match e.downcast_ref::<std::io::Error>().map(std::io::Error::kind) {
                Some(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(not_qmp(format!(
                        "no QMP greeting within {} s",
                        GREETING_TIMEOUT.as_secs()
                    )))
                }
                _ => return Err(not_qmp(format!("{e}"))),
            },
        };
        if greeting.get("QMP").is_none() {
            return Err(not_qmp(format!("it greeted with {greeting}")));
        }
        c.execute("qmp_capabilities", json!({}))?;
        // Commands may take long (a snapshot of a busy disk commits): no limit from here.
        c.writer.set_read_timeout(None)?;
        Ok(c)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("the daemon closed the connection");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a command; events that arrive meanwhile are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"execute": command, "arguments": arguments, "id": id});
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        loop {
            let m = self.read()?;
            if m.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(e) = m.get("error") {
                return Err(QmpReplyError {
                    class: e["class"].as_str().unwrap_or("GenericError").to_string(),
                    desc: e["desc"].as_str().unwrap_or("").to_string(),
                }
                .into());
            }
            return Ok(m["return"].clone());
        }
    }
}

/// `ctl receive -`: standard input to the daemon through a FIFO in a private directory
/// (the daemon opens it by path, as it opens a stream file), then follows the job.
fn receive_stdin(
    c: &mut Client,
    management: &std::path::Path,
    pool: Option<&str>,
    name: Option<&str>,
    resumable: bool,
    json_out: bool,
) -> Result<ExitCode> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Beside the management socket: a directory the daemon lets its clients' files come
    // from by default (see docs/SECURITY.md), which the system's temporary one is not.
    let near = match management.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = near.join(format!(".vhost-thin-recv-{}-{nanos}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let fifo = dir.join("stream");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())?;
    // SAFETY: c_path is a valid NUL-terminated path; mkfifo only creates a file there.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        bail!(
            "cannot make a FIFO at {}: {}",
            fifo.display(),
            std::io::Error::last_os_error()
        );
    }
    let r = c.execute(
        "snapshot-receive",
        json!({"file": fifo, "pool": pool, "name": name, "resumable": resumable})
            .as_object()
            .map(|m| {
                Value::Object(
                    m.iter()
                        .filter(|(_, v)| !v.is_null())
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                )
            })
            .unwrap_or_default(),
    )?;
    let id = r["job-id"].as_str().unwrap_or_default().to_string();
    // Opened without blocking, retried until the job has opened its end, so that a job
    // that failed before reading does not leave this waiting forever.
    let mut out = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
        {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                let jobs = c.execute("query-jobs", json!({}))?;
                let done = jobs
                    .as_array()
                    .and_then(|a| a.iter().find(|j| j["id"] == json!(id)))
                    .is_none_or(|j| j["status"] == json!("concluded"));
                if done {
                    return follow(c, &id, json_out);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => bail!("cannot open {}: {e}", fifo.display()),
        }
    };
    // Blocking writes from here on.
    {
        use std::os::fd::AsRawFd;
        let fd = out.as_raw_fd();
        // SAFETY: fd is open for the lifetime of `out`; F_GETFL/F_SETFL only change flags.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    let copied = std::io::copy(&mut std::io::stdin().lock(), &mut out);
    drop(out);
    // A job that stopped reading says why; that is the error to show.
    let followed = follow(c, &id, json_out);
    match (copied, followed) {
        (Ok(_), f) => f,
        (Err(_), Err(e)) => Err(e),
        (Err(e), Ok(_)) => Err(e).context("copying standard input to the daemon"),
    }
}

/// Follows job `id` until it concludes, with a progress bar on a terminal; prints its result
/// and dismisses it. A failed job is an error (exit status 1).
fn follow(c: &mut Client, id: &str, json_out: bool) -> Result<ExitCode> {
    let mut progress = crate::progress::Progress::new("job", 0);
    let job = loop {
        let jobs = c.execute("query-jobs", json!({}))?;
        let Some(job) = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == json!(id)))
            .cloned()
        else {
            bail!("no job '{id}' (dismissed already?)");
        };
        if job["status"] == json!("concluded") {
            break job;
        }
        progress.set_total(job["total-progress"].as_u64().unwrap_or(0));
        progress.update(job["current-progress"].as_u64().unwrap_or(0));
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    progress.finish();
    c.execute("job-dismiss", json!({"id": id}))?;
    if let Some(e) = job.get("error").and_then(Value::as_str) {
        bail!("job {id} failed: {e}");
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&job["result"])?);
    } else {
        println!(
            "job {id}: {} done: {}",
            s(&job["description"]),
            for_people(&job["result"])
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A path given to `ctl` names a file from where `ctl` runs, not from the daemon's working
/// directory: relative paths are made absolute here before they are sent.
fn absolute(p: &Option<PathBuf>) -> Result<Option<PathBuf>> {
    match p {
        Some(p) if p.is_relative() => Ok(Some(
            std::env::current_dir()
                .context("cannot resolve a relative path: the current directory is unknown")?
                .join(p),
        )),
        p => Ok(p.clone()),
    }
}

/// `snapshot DISK NAME`, `snapshot DISK@NAME`: the disk and the name to ask for.
fn snapshot_target(disk: &str, name: Option<&str>) -> Result<(String, String)> {
    match (name, disk.rsplit_once('@')) {
        (Some(n), _) => Ok((disk.to_string(), n.to_string())),
        (None, Some((d, n))) if !d.is_empty() && !n.is_empty() => {
            Ok((d.to_string(), disk.to_string()))
        }
        (None, _) => Err(UsageError(format!(
            "say the snapshot's name: `snapshot {disk}@NAME` (in {disk}'s namespace) or `snapshot {disk} NAME`"
        ))
        .into()),
    }
}

/// Where a disk or snapshot came from, for a person: its origin, or the deleted one's name.
fn origin_of(d: &Value) -> String {
    match d.get("deleted-origin").and_then(Value::as_str) {
        Some(gone) => format!("{gone} (deleted)"),
        None => s(&d["origin"]),
    }
}

/// `ctl disks` for a person; the name and origin columns as wide as their longest entry,
/// so that a long one ("vm1@before-upgrade (deleted)") does not push the socket out of line.
fn disks_table(list: &Value) -> String {
    let rows: Vec<&Value> = list.as_array().into_iter().flatten().collect();
    let width = |f: &dyn Fn(&Value) -> String, min: usize| {
        rows.iter()
            .map(|d| f(d).chars().count())
            .fold(min, usize::max)
    };
    let (nw, ow) = (width(&|d| s(&d["name"]), 16), width(&origin_of, 20));
    let mut out = format!(
        "{:<nw$} {:>10} {:>10} {:>10} {:<9} {:<ow$} SOCKET\n",
        "NAME", "SIZE", "MAPPED", "EXCLUSIVE", "GUEST", "ORIGIN"
    );
    for d in rows {
        out += &format!(
            "{:<nw$} {:>10} {:>10} {:>10} {:<9} {:<ow$} {}\n",
            s(&d["name"]),
            human(d["size"].as_u64().unwrap_or(0)),
            human(d["mapped-bytes"].as_u64().unwrap_or(0)),
            human(d["exclusive-bytes"].as_u64().unwrap_or(0)),
            if d["connected"] == json!(true) {
                "connected"
            } else {
                "-"
            },
            origin_of(d),
            s(&d["socket"]),
        );
    }
    out
}

/// `ctl snapshots [DISK]` for a person: the snapshots of `disk` (named `disk@…`, or taken
/// of it) or all, with the disk each was taken of, when (UTC), size and exclusive space.
fn snapshots_table(list: &Value, disk: Option<&str>) -> String {
    let mut out = format!(
        "{:<24} {:<16} {:<20} {:>10} {:>10}\n",
        "NAME", "OF", "CREATED", "SIZE", "EXCLUSIVE"
    );
    for d in list.as_array().into_iter().flatten() {
        let name = s(&d["name"]);
        if let Some(disk) = disk {
            let in_namespace = name.rsplit_once('@').is_some_and(|(o, _)| o == disk);
            if !in_namespace && d["origin"].as_str() != Some(disk) {
                continue;
            }
        }
        let created = d["created"].as_u64().unwrap_or(0);
        out += &format!(
            "{:<24} {:<16} {:<20} {:>10} {:>10}\n",
            name,
            origin_of(d),
            iso8601(created, 0).replace(".000000Z", "Z"),
            human(d["size"].as_u64().unwrap_or(0)),
            human(d["exclusive-bytes"].as_u64().unwrap_or(0)),
        );
    }
    out
}

/// A job's result for a person: `key value` pairs, byte counts (`…-bytes`, `bytes`) in
/// binary units, pauses (`…-us`) in milliseconds; `--json` gives the result as it is.
fn for_people(v: &Value) -> String {
    let Value::Object(m) = v else {
        return s(v);
    };
    m.iter()
        .map(|(k, v)| match v.as_u64() {
            Some(n) if k == "bytes" || k.ends_with("-bytes") => format!("{k} {}", human(n)),
            Some(n) if k.ends_with("-us") => format!("{k} {:.1} ms", n as f64 / 1000.0),
            _ => format!("{k} {}", s(v)),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A UTC time in ISO 8601 (`2026-12-05T07:39:09.123456Z`), from seconds and microseconds
/// since the epoch.
fn iso8601(secs: u64, micros: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn default_socket() -> PathBuf {
    std::env::var_os("VHOST_THIN_QMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("vhost-thin-state/qmp.sock"))
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn run(a: CtlArgs) -> Result<ExitCode> {
    let json_out = a.json;
    match run_command(a) {
        Err(e) if json_out => match e.downcast_ref::<QmpReplyError>() {
            // Scripts get the reply's class too, as the daemon gave it.
            Some(q) => {
                println!("{}", json!({"error": {"class": q.class, "desc": q.desc}}));
                Ok(ExitCode::from(1))
            }
            None => Err(e),
        },
        r => r,
    }
}

fn run_command(a: CtlArgs) -> Result<ExitCode> {
    let path = a.socket.clone().unwrap_or_else(default_socket);
    let mut c = Client::connect(&path)?;
    let (cmd, args) = match &a.cmd {
        CtlCmd::Receive {
            file,
            pool,
            name,
            resumable,
            ..
        } if file.as_os_str() == "-" => {
            return receive_stdin(
                &mut c,
                &path,
                pool.as_deref(),
                name.as_deref(),
                *resumable,
                a.json,
            )
        }
        CtlCmd::Wait { id } => return follow(&mut c, id, a.json),
        CtlCmd::Watch => return watch(&mut c, a.json),
        other => request(other)?,
    };
    // Leave out null arguments (optional ones not given).
    let args = match args {
        Value::Object(m) => Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).collect()),
        v => v,
    };
    let r = c.execute(cmd, args)?;
    // Commands that start a job follow it, unless asked not to.
    if let Some(id) = r.get("job-id").and_then(Value::as_str) {
        let wait = !matches!(
            &a.cmd,
            CtlCmd::Send { no_wait: true, .. }
                | CtlCmd::Receive { no_wait: true, .. }
                | CtlCmd::Migrate { no_wait: true, .. }
                | CtlCmd::Merge { no_wait: true, .. }
        );
        if !wait {
            println!("{id}");
            return Ok(ExitCode::SUCCESS);
        }
        return follow(&mut c, id, a.json);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_for_people(&a.cmd, &r);
    Ok(ExitCode::SUCCESS)
}

/// The QMP command and arguments a `ctl` subcommand sends (`wait`, `watch` and
/// `receive -` talk on their own).
fn request(cmd: &CtlCmd) -> Result<(&str, Value)> {
    Ok(match cmd {
        CtlCmd::Disks => ("query-disks", json!({})),
        CtlCmd::Snapshots { .. } => ("query-snapshots", json!({})),
        CtlCmd::Pools => ("query-pools", json!({})),
        CtlCmd::Snapshot { disk, name } => {
            let (disk, name) = snapshot_target(disk, name.as_deref())?;
            ("snapshot-create", json!({"disk": disk, "name": name}))
        }
        CtlCmd::Clone {
            from,
            name,
            disk_socket,
            num_queues,
        } => (
            "disk-add",
            json!({"name": name, "clone-from": from, "socket": absolute(disk_socket)?, "num-queues": num_queues}),
        ),
        CtlCmd::Add {
            name,
            size,
            external_origin,
            disk_socket,
            num_queues,
        } => (
            "disk-add",
            json!({"name": name, "size": size, "external-origin": absolute(external_origin)?, "socket": absolute(disk_socket)?, "num-queues": num_queues}),
        ),
        CtlCmd::Merge {
            snapshot, force, ..
        } => (
            "origin-merge",
            json!({"snapshot": snapshot, "force": force}),
        ),
        CtlCmd::Remove { name, force } => ("disk-remove", json!({"name": name, "force": force})),
        CtlCmd::Resize { name, size } => ("disk-resize", json!({"name": name, "size": size})),
        CtlCmd::DeleteSnapshot { name } => ("snapshot-delete", json!({"name": name})),
        CtlCmd::Revert { disk, snapshot } => (
            "snapshot-revert",
            json!({"disk": disk, "snapshot": snapshot}),
        ),
        CtlCmd::Exec { command, arguments } => {
            let args: Value = match arguments {
                Some(t) => serde_json::from_str(t).context("arguments must be a JSON object")?,
                None => json!({}),
            };
            (command.as_str(), args)
        }
        CtlCmd::Send { .. } => ("snapshot-send", send_arguments(cmd)?),
        CtlCmd::Receive {
            file,
            pool,
            name,
            resumable,
            ..
        } => (
            "snapshot-receive",
            json!({"file": absolute(&Some(file.clone()))?, "pool": pool, "name": name, "resumable": resumable}),
        ),
        CtlCmd::Migrate { disk, pool, .. } => ("disk-migrate", json!({"disk": disk, "pool": pool})),
        CtlCmd::Jobs => ("query-jobs", json!({})),
        CtlCmd::Cancel { id } => ("job-cancel", json!({"id": id})),
        CtlCmd::Wait { .. } | CtlCmd::Watch => bail!("'wait' and 'watch' send no command"),
    })
}

/// `snapshot-send`'s arguments: the snapshot, and exactly one destination.
fn send_arguments(cmd: &CtlCmd) -> Result<Value> {
    let CtlCmd::Send {
        snapshot,
        base,
        resume,
        file,
        to_pool,
        name,
        command,
        ..
    } = cmd
    else {
        bail!("not a send");
    };
    let mut args = json!({"snapshot": snapshot, "base": base, "resume-token": resume});
    match (file, to_pool, command.is_empty()) {
        (Some(f), None, true) => args["file"] = json!(absolute(&Some(f.clone()))?),
        (None, Some(p), true) => {
            args["pool"] = json!(p);
            args["name"] = json!(name);
        }
        (None, None, false) => args["command"] = json!(command),
        _ => {
            return Err(UsageError(
                "say where the stream goes: --file, --to-pool or -- COMMAND…".into(),
            )
            .into())
        }
    }
    Ok(args)
}

/// `ctl watch`: every event, as it comes, until the daemon closes the connection.
fn watch(c: &mut Client, json: bool) -> Result<ExitCode> {
    loop {
        let m = c.read()?;
        if m.get("event").is_some() {
            if json {
                println!("{m}");
            } else {
                println!(
                    "{} {} {}",
                    iso8601(
                        m["timestamp"]["seconds"].as_u64().unwrap_or(0),
                        m["timestamp"]["microseconds"].as_u64().unwrap_or(0)
                    ),
                    s(&m["event"]),
                    m["data"]
                );
            }
            std::io::stdout().flush()?;
        }
    }
}

/// A command's reply for a person (`--json` prints it as it is).
fn print_for_people(cmd: &CtlCmd, r: &Value) {
    match cmd {
        CtlCmd::Disks => print!("{}", disks_table(r)),
        CtlCmd::Snapshots { disk } => print!("{}", snapshots_table(r, disk.as_deref())),
        CtlCmd::Pools => {
            for p in r.as_array().into_iter().flatten() {
                let bs = p["block-size"].as_u64().unwrap_or(0);
                println!(
                    "{}: data {} of {} used, metadata {} of {} used, mode {}{}, transaction {}",
                    s(&p["name"]),
                    human(p["data-used"].as_u64().unwrap_or(0) * bs),
                    human(p["data-blocks"].as_u64().unwrap_or(0) * bs),
                    human(p["metadata-used"].as_u64().unwrap_or(0) * 4096),
                    human(p["metadata-blocks"].as_u64().unwrap_or(0) * 4096),
                    s(&p["mode"]),
                    if p["needs-check"] == json!(true) {
                        " (needs check)"
                    } else {
                        ""
                    },
                    p["transaction-id"],
                );
            }
        }
        CtlCmd::Snapshot { disk, .. } => println!(
            "snapshot {} of {} taken (writes held {} µs)",
            s(&r["name"]),
            disk.rsplit_once('@').map_or(disk.as_str(), |(d, _)| d),
            r["pause-us"]
        ),
        CtlCmd::Jobs => {
            println!(
                "{:<16} {:<8} {:<10} {:>7} DESCRIPTION",
                "ID", "TYPE", "STATUS", "DONE"
            );
            for j in r.as_array().into_iter().flatten() {
                let (cur, tot) = (
                    j["current-progress"].as_u64().unwrap_or(0),
                    j["total-progress"].as_u64().unwrap_or(0),
                );
                let done = (cur * 100)
                    .checked_div(tot)
                    .map(|p| format!("{p}%"))
                    .unwrap_or_else(|| "-".into());
                let status = match j.get("error").and_then(Value::as_str) {
                    Some(_) => "failed".to_string(),
                    None => s(&j["status"]),
                };
                println!(
                    "{:<16} {:<8} {:<10} {:>7} {}{}",
                    s(&j["id"]),
                    s(&j["type"]),
                    status,
                    done,
                    s(&j["description"]),
                    j.get("error")
                        .and_then(Value::as_str)
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
        }
        CtlCmd::Clone { name, .. } | CtlCmd::Add { name, .. } => {
            println!("disk {name} served on {}", s(&r["socket"]))
        }
        CtlCmd::Resize { name, size } => println!(
            "disk {name} is now {} (a connected guest is told)",
            human(*size)
        ),
        CtlCmd::Remove { name, .. } => println!("disk {name} removed, with its data"),
        CtlCmd::DeleteSnapshot { name } => {
            let dependents: Vec<String> = r["dependents"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            if dependents.is_empty() {
                println!("snapshot {name} deleted")
            } else {
                println!(
                    "snapshot {name} deleted; made from it, and whole without it: {} (their origin now reads \"{name} (deleted)\")",
                    dependents.join(", ")
                )
            }
        }
        CtlCmd::Revert { disk, snapshot } => {
            println!("disk {disk} now holds what snapshot {snapshot} holds")
        }
        CtlCmd::Cancel { id } => println!("job {id} cancelled"),
        _ => println!(
            "{}",
            if *r == json!({}) {
                "ok".to_string()
            } else {
                r.to_string()
            }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{disks_table, for_people, iso8601, snapshot_target, snapshots_table};
    use serde_json::json;

    #[test]
    fn snapshots_list_when_they_were_taken_of_what_and_their_size() {
        let list = json!([
            {"name": "vm1@nightly", "origin": "vm1", "created": 1_796_000_000u64,
             "size": 10u64 << 30, "exclusive-bytes": 3u64 << 20},
            {"name": "golden", "origin": "vm1", "created": 0, "size": 1u64 << 30,
             "exclusive-bytes": 0},
            {"name": "vm2@nightly", "origin": null, "deleted-origin": "vm2",
             "created": 0, "size": 1u64 << 30, "exclusive-bytes": 0},
        ]);
        let all = snapshots_table(&list, None);
        let row = all.lines().nth(1).unwrap();
        for want in [
            "vm1@nightly",
            "vm1",
            "2026-11-30T00:53:20Z",
            "10 GiB",
            "3 MiB",
        ] {
            assert!(row.contains(want), "{want:?} in {row:?}");
        }
        assert!(all.contains("vm2 (deleted)"), "{all}");
        let of_vm1 = snapshots_table(&list, Some("vm1"));
        assert_eq!(of_vm1.lines().count(), 3, "{of_vm1}");
        assert!(
            of_vm1.contains("golden") && !of_vm1.contains("vm2@"),
            "{of_vm1}"
        );
    }

    #[test]
    fn a_long_origin_keeps_the_disks_columns_in_line() {
        let list = json!([
            {"name": "vm2", "origin": null, "deleted-origin": "vm1@before-upgrade-2026",
             "size": 1u64 << 30, "socket": "/s/vm2.sock"},
            {"name": "vm3", "origin": "golden@base", "size": 1u64 << 30, "socket": "/s/vm3.sock"},
        ]);
        let t = disks_table(&list);
        let at: Vec<usize> = t.lines().map(|l| l.rfind(' ').unwrap()).collect();
        assert!(at.windows(2).all(|w| w[0] == w[1]), "{t}");
        assert!(t.contains("vm1@before-upgrade-2026 (deleted)"), "{t}");
    }

    #[test]
    fn a_snapshot_is_named_disk_at_name_or_apart() {
        let t = |d, n| snapshot_target(d, n).map_err(|e| e.to_string());
        assert_eq!(t("vm1@a", None).unwrap(), ("vm1".into(), "vm1@a".into()));
        assert_eq!(t("vm1", Some("a")).unwrap(), ("vm1".into(), "a".into()));
        assert_eq!(t("vm1", Some("@a")).unwrap(), ("vm1".into(), "@a".into()));
        assert!(t("vm1", None).unwrap_err().contains("vm1@NAME"));
    }

    #[test]
    fn job_results_read_as_sizes_and_times() {
        assert_eq!(
            for_people(&json!({"data-bytes": 1_610_612_736u64, "pause-us": 1500, "snapshots": 3})),
            "data-bytes 1.5 GiB, pause-us 1.5 ms, snapshots 3"
        );
        assert_eq!(for_people(&json!("x")), "x");
    }

    #[test]
    fn event_times_are_iso_8601_in_utc() {
        assert_eq!(iso8601(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(iso8601(951_782_400, 5), "2000-02-29T00:00:00.000005Z");
        assert_eq!(
            iso8601(1_796_449_149, 123_456),
            "2026-12-05T05:39:09.123456Z"
        );
    }
}
