//! Send and receive on the management socket, as jobs: a snapshot written as a stream to a
//! file, piped into a command (`ssh host vhost-thin receive …`), or received straight into
//! another pool of this daemon; a stream file received into a pool. The format and its
//! guarantees are the offline commands' (docs/STREAMS.md).

use super::device_state::{DeviceState, Migration};
use super::error::Error;
use super::jobs::{Cancellable, JobCtx};
use super::results::JobStarted;
use super::{lock, Manager, PoolHandle, R};
use serde_json::{json, Value};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use thinpool::stream::{
    self, format::StreamReader, ReceiveError, ReceiveOptions, Received, SendOptions, SendStats,
};

/// Where a sent stream goes.
#[derive(Clone, Debug)]
pub enum Destination {
    /// A new file (an existing one is never overwritten).
    File(PathBuf),
    /// A command's standard input: argv, run without a shell.
    Command(Vec<String>),
    /// Another pool of this daemon, received as a snapshot named `name`.
    Pool { pool: String, name: String },
}

/// A destination once checked: a pool named by the command, resolved.
enum To {
    File(PathBuf),
    Command(Vec<String>),
    Pool(Arc<PoolHandle>, String),
}

/// What a command's output keeps for the job's result and errors.
const OUTPUT_TAIL: usize = 4096;

/// A snapshot copied into another pool.
pub(super) struct Copied {
    pub received: Received,
    pub sent: SendStats,
}

impl PoolHandle {
    /// Gives `ids` their send/receive identities, durably, if they have none yet.
    pub(super) fn ensure_guids(&self, ids: &[u32]) -> R<()> {
        stream::ensure_guids(&self.catalog, ids).map_err(stream_err)
    }
}

pub(super) fn stream_err(e: stream::StreamError) -> Error {
    Error::failed(e.to_string())
}

fn receive_err(e: ReceiveError) -> Error {
    Error::failed(e.to_string())
}

/// Sends snapshot `snap` (incremental on `base`) of `src` to `out`.
fn send_to(
    src: &PoolHandle,
    snap: u32,
    opts: &SendOptions,
    out: impl Write,
    ctx: &JobCtx,
) -> R<SendStats> {
    // A copy of the registry: the send reads names and identities from it, and the real
    // one stays free for other commands while the data is read.
    let reg = src.registry().clone();
    let mut out = BufWriter::with_capacity(1 << 20, Cancellable::new(out, ctx.flag()));
    let stats = stream::send(src.pool(), &reg, snap, opts, &mut out, &mut |d, t| {
        ctx.progress(d, t)
    })
    .map_err(stream_err)?;
    out.flush()
        .map_err(|e| Error::failed(format!("writing the stream: {e}")))?;
    Ok(stats)
}

/// Receives the stream `input` into `dst`. A cancelled or failed receive leaves nothing.
fn receive_from(
    dst: &PoolHandle,
    input: impl Read,
    name: Option<String>,
    resumable: bool,
    ctx: &JobCtx,
    report_progress: bool,
    migration: Option<Migration>,
) -> R<Received> {
    let input = BufReader::with_capacity(1 << 20, Cancellable::new(input, ctx.flag()));
    let opts = ReceiveOptions {
        name,
        resumable,
        daemon_state: migration.and_then(|m| {
            let mut e = thinpool::registry::DeviceEntry::default();
            DeviceState {
                migration: Some(m),
                ..Default::default()
            }
            .store(&mut e);
            e.daemon_state
        }),
        ..Default::default()
    };
    // Called between records, with nothing held: guests of `dst` writing into its data file
    // must not wait for a receive preempted in the middle of its own write there.
    let mut pacer = super::pace::Pacer::for_this_thread();
    let r = stream::receive(&dst.catalog, input, &opts, &mut |d, t| {
        pacer.step();
        if report_progress {
            ctx.progress(d, t)
        }
    });
    match r {
        Ok(got) => Ok(got),
        // Cancelling means nothing is kept, resumable or not.
        Err(ReceiveError::Interrupted(i)) if ctx.cancelled() => {
            if let Err(e) = stream::abort(&dst.catalog, &i.token.guid) {
                tracing::error!("cannot drop a cancelled receive: {e}");
            }
            Err(Error::failed(super::jobs::CANCELLED))
        }
        Err(e) => Err(receive_err(e)),
    }
}

/// Copies snapshot `snap` of `src` (incremental on `base`, which `dst` must have received)
/// into `dst` as `name`: the stream runs through a socket pair between a sending thread and
/// this one, so the copy is exactly what send and receive do between daemons. The copy's
/// entry carries `migration` from its creation on.
pub(super) fn copy_snapshot(
    src: &PoolHandle,
    snap: u32,
    base: Option<u32>,
    dst: &PoolHandle,
    name: String,
    ctx: &JobCtx,
    migration: Option<Migration>,
) -> R<Copied> {
    let ids: Vec<u32> = std::iter::once(snap).chain(base).collect();
    src.ensure_guids(&ids)?;
    let (tx, rx) = UnixStream::pair().map_err(|e| Error::failed(e.to_string()))?;
    std::thread::scope(|s| {
        let sender = s.spawn(move || {
            let opts = SendOptions {
                base,
                resume_offset: 0,
            };
            let r = send_to(src, snap, &opts, &tx, ctx);
            // The receiver sees the end (or, after a failure, a truncated stream).
            let _ = tx.shutdown(std::net::Shutdown::Write);
            r
        });
        let received = receive_from(dst, &rx, Some(name), false, ctx, false, migration);
        // A receiver that stopped early leaves the sender writing into a closed socket
        // (EPIPE), which ends it.
        drop(rx);
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(Error::failed("internal error: the sender panicked")));
        match (sent, received) {
            (Ok(sent), Ok(received)) => Ok(Copied { received, sent }),
            // The receiver's error says why a stream was refused; the sender's, why one
            // was cut short.
            (_, Err(e)) => Err(e),
            (Err(e), Ok(got)) => {
                // Cannot happen (a complete stream was received), but never keep a copy of
                // a send that failed.
                if let Err(d) = dst.delete_devices(&[got.id]) {
                    tracing::error!("cannot delete the copy of a failed send: {}", d.to_string());
                }
                Err(e)
            }
        }
    })
}

/// A stream file opened without blocking, read by waiting for data a little at a time so
/// that a cancel is seen: a FIFO whose writer has not come yet, or came and stopped
/// writing, would otherwise keep the job blocked in a read that no cancel ends.
struct Polled {
    file: std::fs::File,
    job: Arc<super::jobs::Job>,
}

impl Read for Polled {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        loop {
            if self.job.cancelled() {
                return Err(std::io::Error::other(super::jobs::CANCELLED));
            }
            let mut pfd = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for a descriptor `self.file` keeps open.
            let n = unsafe { libc::poll(&mut pfd, 1, 200) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // Nothing yet (a FIFO reports nothing, not even a hang-up, until a writer
            // has come): look at the cancel again.
            if n == 0 {
                continue;
            }
            match self.file.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
}

/// Keeps the last [`OUTPUT_TAIL`] bytes of a child's output, as it comes.
struct Tail {
    text: Arc<std::sync::Mutex<Vec<u8>>>,
    /// Closed once the command has exited (see [`Tail::take`]).
    exited: UnixStream,
    reader: std::thread::JoinHandle<()>,
}

/// What the reader takes from the pipe once the command has exited, at most: a process the
/// command left behind may go on writing there.
const LEFT_IN_PIPE: usize = 1 << 20;

impl Tail {
    fn read<T: Read + std::os::fd::AsRawFd + Send + 'static>(mut r: T) -> std::io::Result<Tail> {
        use std::os::fd::AsRawFd;
        let (exited, told) = UnixStream::pair()?;
        // Our end only (the command's is another open file): read until it is empty, once
        // told, without blocking.
        // SAFETY: F_GETFL/F_SETFL on a descriptor `r` keeps open.
        unsafe {
            let fd = r.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let text = Arc::new(std::sync::Mutex::new(Vec::new()));
        let t = text.clone();
        let keep = move |bytes: &[u8]| {
            let mut tail = lock(&t);
            tail.extend_from_slice(bytes);
            if tail.len() > OUTPUT_TAIL {
                let cut = tail.len() - OUTPUT_TAIL;
                tail.drain(..cut);
            }
        };
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let mut fds = [
                    libc::pollfd {
                        fd: r.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: told.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: two valid pollfds, for descriptors `r` and `told` keep open.
                if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
                    if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return;
                }
                if fds[1].revents != 0 {
                    // Everything the command wrote before it exited is in the pipe now.
                    let mut left = LEFT_IN_PIPE;
                    while left > 0 {
                        match r.read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => {
                                keep(&buf[..n]);
                                left = left.saturating_sub(n);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            // Empty (WouldBlock), or unreadable.
                            Err(_) => return,
                        }
                    }
                    return;
                }
                match r.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => keep(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) => return,
                }
            }
        });
        Ok(Tail {
            text,
            exited,
            reader,
        })
    }

    /// What the command wrote, once it has exited: what reached the pipe by then, without
    /// waiting for the pipe's end, which a process the command left behind may hold off
    /// for as long as it lives (that must not hold up the job, nor its cancel).
    fn take(self) -> String {
        drop(self.exited);
        let _ = self.reader.join();
        String::from_utf8_lossy(&lock(&self.text))
            .trim()
            .to_string()
    }
}

/// Sends into a command's standard input; its exit status decides success.
pub(super) fn send_to_command(
    src: &PoolHandle,
    snap: u32,
    opts: &SendOptions,
    argv: &[String],
    ctx: &JobCtx,
) -> R<(SendStats, String)> {
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::failed(format!("cannot run {}: {e}", argv[0])))?;
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(Error::failed("the command's pipes could not be made"));
    };
    let tails = Tail::read(stdout).and_then(|out| Ok((out, Tail::read(stderr)?)));
    let (out, err) = match tails {
        Ok(t) => t,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::failed(format!(
                "cannot read the command's output: {e}"
            )));
        }
    };
    let child = std::sync::Mutex::new(child);
    let sending = std::sync::atomic::AtomicBool::new(true);
    let killed_while_sending = std::sync::atomic::AtomicBool::new(false);
    let sent = std::thread::scope(|s| {
        // A command that stops reading would keep the send blocked in a write, where a
        // cancel is not seen: a cancel kills the command, which ends the write (EPIPE).
        s.spawn(|| {
            while sending.load(std::sync::atomic::Ordering::SeqCst) {
                if ctx.cancelled() {
                    let killed = lock(&child).kill().is_ok();
                    killed_while_sending.store(killed, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
        let r = send_to(src, snap, opts, stdin, ctx);
        sending.store(false, std::sync::atomic::Ordering::SeqCst);
        r
    });
    let mut child = child.into_inner().unwrap_or_else(|p| p.into_inner());
    // stdin was moved into the sender and is closed: the command sees the end.
    // Killed only if it was: a cancel that the send saw first (its next write refused)
    // ends the send before the watcher above looks again, and the command, which may go
    // on running after the end of its input, must still be killed.
    let mut killed = killed_while_sending.load(std::sync::atomic::Ordering::SeqCst);
    if ctx.cancelled() && !killed {
        killed = child.kill().is_ok();
    }
    if sent.is_err() && !killed {
        // A command that stopped reading because it failed says why when it exits: give
        // it a moment to exit by itself before it is killed.
        let mut exited = false;
        for _ in 0..40 {
            if matches!(child.try_wait(), Ok(Some(_))) {
                exited = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        if !exited {
            killed = child.kill().is_ok();
        }
    }
    // A command that read the whole stream may still take its time to exit (an ssh whose
    // far end is stuck): a cancel must end that wait too, as it ends the send.
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) => {
                if ctx.cancelled() && !killed {
                    killed = child.kill().is_ok();
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            Err(e) => break Err(e),
        }
    };
    let out = out.take();
    let err = err.take();
    let failed = |s: std::process::ExitStatus| {
        Error::failed(format!(
            "{} failed ({s}){}",
            argv[0],
            if err.is_empty() {
                String::new()
            } else {
                format!(": {err}")
            }
        ))
    };
    match (status, sent) {
        (Err(e), _) => Err(Error::failed(format!("waiting for {}: {e}", argv[0]))),
        (Ok(s), Ok(stats)) if s.success() => Ok((stats, out)),
        // It failed on its own: its words say more than a broken pipe.
        (Ok(s), _) if !killed => Err(failed(s)),
        (Ok(_), Err(e)) => Err(e),
        (Ok(s), Ok(_)) => Err(failed(s)),
    }
}

fn sent_json(s: &SendStats) -> Value {
    json!({
        "stream-bytes": s.stream_bytes,
        "data-bytes": s.data_bytes,
        "zero-bytes": s.zero_bytes,
        "zero-detected-bytes": s.zero_detected_bytes,
        "unchanged-bytes": s.unchanged_bytes,
        "records": s.records,
    })
}

/// Where a resumed send starts: the offset of an interrupted resumable receive's token,
/// which must be for this snapshot; 0 for a whole stream.
fn resume_offset(s: &super::Found, snapshot: &str, resume: Option<&str>, to: &To) -> R<u64> {
    match resume {
        None => Ok(0),
        Some(t) => {
            let token: stream::ResumeToken = t.parse().map_err(stream_err)?;
            let guid = s
                .pool
                .registry()
                .devices
                .get(&s.id)
                .and_then(|e| e.guid.clone())
                .unwrap_or_default();
            if token.guid != guid {
                return Err(Error::failed(format!(
                    "the token resumes snapshot {}, not {snapshot} ({guid})",
                    token.guid
                )));
            }
            if matches!(to, To::Pool(..)) {
                return Err(Error::failed(
                    "a copy into a pool of this daemon is not resumable: send it again",
                ));
            }
            Ok(token.offset)
        }
    }
}

/// The send job's work: the stream to a pool of this daemon, a new file or a command.
fn run_send(src: &PoolHandle, snap: u32, opts: &SendOptions, to: To, ctx: &JobCtx) -> R<Value> {
    match to {
        To::Pool(dst, name) => {
            let c = copy_snapshot(src, snap, opts.base, &dst, name, ctx, None)?;
            dst.space.space_changed();
            Ok(json!({
                "pool": dst.name,
                "name": c.received.name,
                "thin-id": c.received.id,
                "sent": sent_json(&c.sent),
            }))
        }
        To::File(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            // A stream holds a VM's data: the daemon's user's alone; never through a
            // symlink planted at the path.
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| Error::failed(format!("cannot create {}: {e}", path.display())))?;
            let r = send_to(src, snap, opts, &file, ctx).and_then(|st| {
                file.sync_all()
                    .map_err(|e| Error::failed(format!("syncing {}: {e}", path.display())))?;
                Ok(st)
            });
            match r {
                Ok(st) => Ok(json!({"file": path, "sent": sent_json(&st)})),
                Err(e) => {
                    // Never leave a truncated stream behind.
                    let _ = std::fs::remove_file(&path);
                    Err(e)
                }
            }
        }
        To::Command(argv) => {
            let (st, out) = send_to_command(src, snap, opts, &argv, ctx)?;
            Ok(json!({"sent": sent_json(&st), "output": out}))
        }
    }
}

impl Manager {
    /// `snapshot-send`: starts a job writing snapshot `snapshot` (incremental on `base`) to
    /// `dest`. Everything that can be checked is checked before the job starts.
    pub fn snapshot_send(
        self: &Arc<Self>,
        job_id: Option<String>,
        snapshot: &str,
        base: Option<&str>,
        resume: Option<&str>,
        dest: Destination,
    ) -> R<JobStarted> {
        let s = self.find(snapshot)?;
        if !s.entry.snapshot {
            return Err(Error::failed(format!(
                "'{snapshot}' is a disk: only snapshots are sent (they do not change while the stream is written); take one with snapshot-create"
            )));
        }
        let base_id = self.send_base(&s, base)?;
        let description = format!(
            "send {snapshot}{} to {}",
            base.map(|b| format!(" (since {b})")).unwrap_or_default(),
            match &dest {
                Destination::File(p) => p.display().to_string(),
                Destination::Command(a) => a.join(" "),
                Destination::Pool { pool, name } => format!("pool {pool} as {name}"),
            }
        );
        let to = self.send_destination(&s, dest)?;
        let ids: Vec<u32> = std::iter::once(s.id).chain(base_id).collect();
        s.pool.ensure_guids(&ids)?;
        let opts = SendOptions {
            base: base_id,
            resume_offset: resume_offset(&s, snapshot, resume, &to)?,
        };
        let pins = self.pin(&s.pool, &ids, "send")?;
        let src = s.pool.clone();
        let snap = s.id;
        let job = self.jobs.start(job_id, "send", description, move |ctx| {
            let _pins = pins;
            run_send(&src, snap, &opts, to, ctx)
        })?;
        Ok(JobStarted {
            job_id: job.id.clone(),
        })
    }

    /// The base of an incremental send: a snapshot in the same pool.
    fn send_base(&self, s: &super::Found, base: Option<&str>) -> R<Option<u32>> {
        match base {
            None => Ok(None),
            Some(b) => {
                let f = self.find(b)?;
                if f.pool.name != s.pool.name {
                    return Err(Error::failed(format!(
                        "the base '{b}' is in pool {}, the snapshot in {}",
                        f.pool.name, s.pool.name
                    )));
                }
                if !f.entry.snapshot {
                    return Err(Error::failed(format!("the base '{b}' is not a snapshot")));
                }
                Ok(Some(f.id))
            }
        }
    }

    /// Where a send goes, checked; a pool destination resolved to its pool.
    fn send_destination(&self, s: &super::Found, dest: Destination) -> R<To> {
        match dest {
            Destination::File(p) => {
                if p.as_os_str().is_empty() {
                    return Err(Error::failed("'file' is empty"));
                }
                let p = self.confinement.new_file("stream file", &p)?;
                if p.exists() {
                    return Err(Error::failed(format!(
                        "{} exists: streams are written to new files only",
                        p.display()
                    )));
                }
                Ok(To::File(p))
            }
            Destination::Command(argv) => {
                self.confinement.command("snapshot-send with 'command'")?;
                if argv.first().is_none_or(|p| p.is_empty()) {
                    return Err(Error::failed(
                        "'command' must name a program: [\"ssh\", \"host\", \"vhost-thin\", \"receive\", …]",
                    ));
                }
                Ok(To::Command(argv))
            }
            Destination::Pool { pool, name } => {
                let d = self.pool(Some(&pool))?;
                if d.name == s.pool.name {
                    return Err(Error::failed(
                        "the destination is the snapshot's own pool: clone it with disk-add instead",
                    ));
                }
                self.name_free(&name)?;
                Ok(To::Pool(d, name))
            }
        }
    }

    /// `snapshot-receive`: starts a job receiving the stream in `file` into a pool. The
    /// stream's header is checked before the job starts (a missing or different base, a
    /// name in use), so most refusals are the command's own error.
    pub fn snapshot_receive(
        self: &Arc<Self>,
        job_id: Option<String>,
        pool: Option<&str>,
        file: PathBuf,
        name: Option<String>,
        resumable: bool,
    ) -> R<JobStarted> {
        let dst = self.pool(pool)?;
        let file = self.confinement.existing("stream file", &file)?;
        let meta = std::fs::metadata(&file)
            .map_err(|e| Error::failed(format!("cannot open {}: {e}", file.display())))?;
        // A regular file's header is read now, so that most refusals (a base this pool
        // lacks, a name in use) are the command's own error. A pipe can be read only once:
        // its header is checked by the job.
        let final_name = if meta.is_file() {
            let f = std::fs::File::open(&file)
                .map_err(|e| Error::failed(format!("cannot open {}: {e}", file.display())))?;
            let header = StreamReader::new(BufReader::new(f))
                .map_err(|e| Error::failed(format!("{}: {e}", file.display())))?
                .header()
                .clone();
            let n = name
                .clone()
                .or_else(|| header.snapshot.name.clone())
                .ok_or_else(|| {
                    Error::failed("the stream's snapshot has no name: give one with 'name'")
                })?;
            // A resumed stream goes on into the receive that holds the name already.
            if header.resume_offset == 0 {
                self.name_free(&n)?;
            }
            Some(n)
        } else {
            if let Some(n) = &name {
                self.name_free(n)?;
            }
            name.clone()
        };
        let final_name = final_name.unwrap_or_else(|| "(the stream's name)".into());
        let description = format!(
            "receive {} into pool {} as {final_name}",
            file.display(),
            dst.name
        );
        let job = self
            .jobs
            .start(job_id, "receive", description, move |ctx| {
                // Without blocking: opening a FIFO (`ctl receive -`) blocks until a writer
                // comes, which a cancel or the daemon's shutdown would wait for forever.
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&file)
                    .map_err(|e| Error::failed(format!("cannot open {}: {e}", file.display())))?;
                let input = Polled {
                    file: f,
                    job: ctx.flag(),
                };
                let got = receive_from(&dst, input, name, resumable, ctx, true, None)?;
                dst.space.space_changed();
                Ok(json!({
                    "pool": dst.name,
                    "name": got.name,
                    "thin-id": got.id,
                    "stream-bytes": got.stream_bytes,
                    "resumed-from": got.resumed_from,
                }))
            })?;
        Ok(JobStarted {
            job_id: job.id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_command_s_output_is_what_it_wrote_before_it_exited_though_a_process_it_left_holds_it() {
        let mut child = Command::new("sh")
            .args(["-c", "echo one; echo two >&2; sleep 30 & exit 0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Tail::read(child.stdout.take().unwrap()).unwrap();
        let err = Tail::read(child.stderr.take().unwrap()).unwrap();
        assert!(child.wait().unwrap().success());
        let t0 = Instant::now();
        assert_eq!(out.take(), "one");
        assert_eq!(err.take(), "two");
        // A bound on hanging, not a speed figure: the outputs end with `sleep 30`.
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    }

    #[test]
    fn a_command_s_output_keeps_its_last_bytes() {
        let mut child = Command::new("sh")
            .args(["-c", "seq 100000; echo last"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = Tail::read(child.stdout.take().unwrap()).unwrap();
        assert!(child.wait().unwrap().success());
        let text = out.take();
        assert!(text.len() <= OUTPUT_TAIL, "{}", text.len());
        assert!(text.ends_with("99999\n100000\nlast"), "{text}");
    }
}
