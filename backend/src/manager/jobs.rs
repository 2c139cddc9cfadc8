//! Long operations as QMP-style jobs: send, receive, migrate, merge run in the background,
//! are listed by `query-jobs`, cancelled by `job-cancel` and forgotten by `job-dismiss`.
//!
//! A job goes `created` → `running` → (`aborting` →) `concluded`, and `null` once
//! dismissed, as QEMU's jobs do; each change is a `JOB_STATUS_CHANGE` event, which here also
//! carries the progress (`current-progress`, `total-progress`) and, on `concluded`, the
//! `error` or the `result`. While it runs, a `JOB_PROGRESS` event at most once a second
//! says how far it got. A concluded job stays listed (with its outcome) until dismissed;
//! the oldest concluded ones are forgotten beyond [`KEEP_CONCLUDED`].
//!
//! Cancelling only asks: each job checks at its own safe points and undoes what it made
//! (a half-received snapshot is dropped, a half-written stream file removed), so a
//! cancelled job leaves nothing half-made.

use super::error::Error;
use super::results::JobInfo;
use crate::events::EventBus;
use crate::sync::lock;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type R<T> = Result<T, Error>;

/// Concluded jobs kept for `query-jobs` before the oldest are forgotten.
pub const KEEP_CONCLUDED: usize = 64;

/// The longest job id (the rule is `thinpool::names`').
pub const MAX_ID: usize = vmm_config::limits::MAX_JOB_ID_LEN;

/// How often a running job reports its progress as an event.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    Created,
    Running,
    Aborting,
    Concluded,
    Null,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job {} ({})", self.id, self.kind)
    }
}

pub struct Job {
    pub id: String,
    /// What it does: "send", "receive", "migrate", "merge", …
    pub kind: &'static str,
    /// One line for people: what, from where, to where.
    pub description: String,
    status: Mutex<JobStatus>,
    current: AtomicU64,
    total: AtomicU64,
    cancel: AtomicBool,
    outcome: Mutex<Option<Result<Value, String>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Order of creation, to forget the oldest concluded jobs first.
    seq: u64,
}

impl Job {
    /// A job just listed: created, no progress, no thread yet.
    fn new(id: String, kind: &'static str, description: String, seq: u64) -> Self {
        Job {
            id,
            kind,
            description,
            status: Mutex::new(JobStatus::Created),
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            outcome: Mutex::new(None),
            thread: Mutex::new(None),
            seq,
        }
    }

    pub fn status(&self) -> JobStatus {
        *lock(&self.status)
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// The job's entry in `query-jobs` (QEMU's JobInfo, plus what it does and its result).
    pub fn info(&self) -> JobInfo {
        let (result, error) = match &*lock(&self.outcome) {
            Some(Ok(r)) => (Some(r.clone()), None),
            Some(Err(e)) => (None, Some(e.clone())),
            None => (None, None),
        };
        JobInfo {
            id: self.id.clone(),
            kind: self.kind,
            status: self.status().as_str(),
            current_progress: self.current.load(Ordering::SeqCst),
            total_progress: self.total.load(Ordering::SeqCst),
            description: self.description.clone(),
            result,
            error,
        }
    }
}

/// What a running job sees: its progress and whether it was asked to stop.
pub struct JobCtx {
    job: Arc<Job>,
    events: EventBus,
    last_event: Mutex<Instant>,
    past_return: AtomicBool,
}

impl JobCtx {
    pub fn id(&self) -> &str {
        &self.job.id
    }

    /// Records progress (in the job's own unit, bytes for all of ours), reported as a
    /// `JOB_PROGRESS` event at most once a second.
    pub fn progress(&self, done: u64, total: u64) {
        self.job.current.store(done, Ordering::SeqCst);
        self.job.total.store(total, Ordering::SeqCst);
        let mut last = lock(&self.last_event);
        if last.elapsed() >= PROGRESS_EVERY {
            *last = Instant::now();
            drop(last);
            self.events.emit(crate::events::Event::JobProgress {
                id: self.job.id.clone(),
                current_progress: done,
                total_progress: total,
            });
        }
    }

    pub fn cancelled(&self) -> bool {
        self.job.cancelled()
    }

    /// The job has made a change it will finish rather than undo (a migration that
    /// switched pools): a cancel no longer stops it, and its errors are reported as they are.
    pub fn point_of_no_return(&self) {
        self.past_return.store(true, Ordering::SeqCst);
    }

    fn past_return(&self) -> bool {
        self.past_return.load(Ordering::SeqCst)
    }

    /// Err("cancelled") once the job was asked to stop: for its safe points.
    pub fn check(&self) -> R<()> {
        if self.cancelled() {
            Err(Error::failed(CANCELLED))
        } else {
            Ok(())
        }
    }

    /// A flag that turns true when the job is cancelled, for readers and writers handed to
    /// code that knows nothing of jobs (see [`Cancellable`]).
    pub fn flag(&self) -> Arc<Job> {
        self.job.clone()
    }
}

/// The error of a cancelled job.
pub const CANCELLED: &str = "cancelled";

/// A reader or writer that fails once its job is cancelled, so that code knowing nothing of
/// jobs (a stream being written or applied) stops at its next read or write and takes its
/// own error path, which undoes what it made.
pub struct Cancellable<T> {
    inner: T,
    job: Arc<Job>,
}

impl<T> Cancellable<T> {
    pub fn new(inner: T, job: Arc<Job>) -> Self {
        Cancellable { inner, job }
    }

    fn check(&self) -> io::Result<()> {
        if self.job.cancelled() {
            // Not ErrorKind::Interrupted: read_exact and write_all retry those.
            Err(io::Error::other(CANCELLED))
        } else {
            Ok(())
        }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: Read> Read for Cancellable<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.check()?;
        self.inner.read(buf)
    }
}

impl<T: Write> Write for Cancellable<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check()?;
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        self.inner.flush()
    }
}

#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    events: EventBus,
    seq: AtomicU64,
}

impl Jobs {
    pub fn new(events: EventBus) -> Self {
        Jobs {
            events,
            ..Default::default()
        }
    }

    /// Starts `work` as job `id` (default: `<kind>-<n>`). The job's outcome is what `work`
    /// returns; an Err after a cancel reads "cancelled".
    pub fn start<F>(
        &self,
        id: Option<String>,
        kind: &'static str,
        description: String,
        work: F,
    ) -> R<Arc<Job>>
    where
        F: FnOnce(&JobCtx) -> R<Value> + Send + 'static,
    {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let id = id.unwrap_or_else(|| format!("{kind}-{seq}"));
        // The management socket checks a client's id already; this is for every caller,
        // before the id is listed and names a thread (a NUL in it made the spawn panic).
        vmm_config::limits::check_job_id(&id).map_err(|why| {
            Error::failed(format!(
                "Parameter 'job-id' expects a job ID ({}): {why}",
                vmm_config::limits::JOB_ID_RULE
            ))
        })?;
        let job = Arc::new(Job::new(id.clone(), kind, description, seq));
        {
            let mut jobs = lock(&self.jobs);
            if jobs.contains_key(&id) {
                return Err(Error::failed(format!("Job ID '{id}' already in use")));
            }
            jobs.insert(id.clone(), job.clone());
        }
        // Listed from here on. Should the thread not start (an error, or a panic), the job is
        // taken off the list again: a listed job that no thread will conclude could never
        // be dismissed, and shutdown would wait for it for ever.
        let mut unlist = Unlist {
            jobs: self,
            job: Some(job.clone()),
        };
        transition(&self.events, &job, |_| Some(JobStatus::Created));
        let ctx = JobCtx {
            job: job.clone(),
            events: self.events.clone(),
            last_event: Mutex::new(Instant::now()),
            past_return: AtomicBool::new(false),
        };
        let events = self.events.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || {
                // Not over a cancel that came first: the job then starts as aborting.
                transition(&events, &ctx.job, |st| {
                    (st == JobStatus::Created).then_some(JobStatus::Running)
                });
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&ctx)))
                    .unwrap_or_else(|p| {
                        let what = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        Err(Error::failed(format!("internal error: {what}")))
                    });
                let outcome = match r {
                    Ok(v) => Ok(v),
                    // The errors a cancel provokes (a stream cut, a read refused) say less than
                    // "cancelled"; past its point of no return a job's errors are its own.
                    Err(_) if ctx.cancelled() && !ctx.past_return() => Err(CANCELLED.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match &outcome {
                    Ok(_) => tracing::info!("job {}: done", ctx.job.id),
                    Err(e) => tracing::warn!("job {}: {e}", ctx.job.id),
                }
                *lock(&ctx.job.outcome) = Some(outcome);
                transition(&events, &ctx.job, |_| Some(JobStatus::Concluded));
            });
        match spawned {
            Ok(h) => {
                *lock(&job.thread) = Some(h);
                unlist.job = None;
            }
            Err(e) => return Err(Error::failed(format!("cannot start a job: {e}"))),
        }
        self.forget_old();
        Ok(job)
    }

    pub fn get(&self, id: &str) -> R<Arc<Job>> {
        lock(&self.jobs)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("Job '{id}' not found")))
    }

    pub fn query(&self) -> Vec<JobInfo> {
        let mut all: Vec<Arc<Job>> = lock(&self.jobs).values().cloned().collect();
        all.sort_by_key(|j| j.seq);
        all.iter().map(|j| j.info()).collect()
    }

    /// Asks a job to stop (QEMU's job-cancel): it goes to `aborting`, then `concluded` with
    /// the error "cancelled" once it has undone its work.
    pub fn cancel(&self, id: &str) -> R<()> {
        let job = self.get(id)?;
        let mut refused = None;
        transition(&self.events, &job, |st| match st {
            JobStatus::Created | JobStatus::Running => {
                job.cancel.store(true, Ordering::SeqCst);
                Some(JobStatus::Aborting)
            }
            other => {
                refused = Some(other);
                None
            }
        });
        match refused {
            None => Ok(()),
            Some(other) => Err(Error::failed(format!(
                "Job '{id}' in state '{}' cannot accept command verb 'cancel'",
                other.as_str()
            ))),
        }
    }

    /// Forgets a concluded job (QEMU's job-dismiss).
    pub fn dismiss(&self, id: &str) -> R<()> {
        let job = self.get(id)?;
        let st = job.status();
        if st != JobStatus::Concluded {
            return Err(Error::failed(format!(
                "Job '{id}' in state '{}' cannot accept command verb 'dismiss'",
                st.as_str()
            )));
        }
        self.remove(&job);
        Ok(())
    }

    fn remove(&self, job: &Job) {
        lock(&self.jobs).remove(&job.id);
        if let Some(h) = lock(&job.thread).take() {
            let _ = h.join();
        }
        transition(&self.events, job, |_| Some(JobStatus::Null));
    }

    fn forget_old(&self) {
        let mut done: Vec<Arc<Job>> = lock(&self.jobs)
            .values()
            .filter(|j| j.status() == JobStatus::Concluded)
            .cloned()
            .collect();
        if done.len() <= KEEP_CONCLUDED {
            return;
        }
        done.sort_by_key(|j| j.seq);
        for j in &done[..done.len() - KEEP_CONCLUDED] {
            self.remove(j);
        }
    }

    /// Waits until job `id` concludes; its outcome.
    pub fn wait(&self, id: &str) -> R<Result<Value, String>> {
        let job = self.get(id)?;
        let h = lock(&job.thread).take();
        if let Some(h) = h {
            let _ = h.join();
        }
        // Another waiter may have taken the handle: wait for the status instead.
        while job.status() != JobStatus::Concluded && job.status() != JobStatus::Null {
            std::thread::sleep(Duration::from_millis(10));
        }
        let outcome = lock(&job.outcome).clone();
        Ok(outcome.unwrap_or_else(|| Err("the job ended without an outcome".into())))
    }

    /// Cancels every job still running and waits for them (daemon shutdown): each undoes
    /// its work before the pools are committed for the last time.
    pub fn cancel_all_and_wait(&self) {
        let all: Vec<Arc<Job>> = lock(&self.jobs).values().cloned().collect();
        for j in &all {
            if matches!(j.status(), JobStatus::Created | JobStatus::Running) {
                let _ = self.cancel(&j.id);
            }
        }
        for j in &all {
            let _ = self.wait(&j.id);
        }
    }
}

/// Takes a job that never got its thread off the list when dropped (see [`Jobs::start`]).
struct Unlist<'a> {
    jobs: &'a Jobs,
    /// None once the thread is running (nothing to undo).
    job: Option<Arc<Job>>,
}

impl Drop for Unlist<'_> {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            lock(&self.jobs.jobs).remove(&job.id);
            transition(&self.jobs.events, &job, |_| Some(JobStatus::Null));
        }
    }
}

/// Moves `job` to the status `next` returns for its current one (None: no change), and
/// emits the change while the status is still locked: two threads moving one job (a
/// cancel, the job concluding) then emit in the order of their transitions, each with
/// the status it set, never a later one read back.
fn transition(events: &EventBus, job: &Job, next: impl FnOnce(JobStatus) -> Option<JobStatus>) {
    let mut st = lock(&job.status);
    if let Some(n) = next(*st) {
        *st = n;
        emit_status(events, job, n);
    }
}

fn emit_status(events: &EventBus, job: &Job, status: JobStatus) {
    let mut data = json!({
        "id": job.id,
        "status": status.as_str(),
        "type": job.kind,
        "current-progress": job.current.load(Ordering::SeqCst),
        "total-progress": job.total.load(Ordering::SeqCst),
    });
    if status == JobStatus::Concluded {
        match &*lock(&job.outcome) {
            Some(Ok(r)) => data["result"] = r.clone(),
            Some(Err(e)) => data["error"] = json!(e),
            None => {}
        }
    }
    events.emit(crate::events::Event::JobStatusChange(data));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;

    fn events() -> (EventBus, std::sync::mpsc::Receiver<crate::events::Emitted>) {
        let bus = EventBus::default();
        let (tx, rx) = sync_channel(1024);
        bus.subscribe(1, move |ev| match tx.try_send(ev.clone()) {
            Ok(()) => crate::events::Delivery::Taken,
            Err(_) => crate::events::Delivery::Full,
        });
        (bus, rx)
    }

    fn statuses(rx: &std::sync::mpsc::Receiver<crate::events::Emitted>, id: &str) -> Vec<String> {
        rx.try_iter()
            .filter(|ev| ev.name == "JOB_STATUS_CHANGE" && ev.data["id"] == id)
            .map(|ev| ev.data["status"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    #[test]
    fn a_job_runs_concludes_and_is_dismissed() {
        let (bus, rx) = events();
        let jobs = Jobs::new(bus);
        let j = jobs
            .start(Some("a".into()), "test", "adds".into(), |ctx| {
                ctx.progress(5, 10);
                ctx.progress(10, 10);
                Ok(json!({"sum": 3}))
            })
            .unwrap();
        assert_eq!(jobs.wait("a").unwrap(), Ok(json!({"sum": 3})));
        let info = serde_json::to_value(&jobs.query()[0]).unwrap();
        assert_eq!(info["status"], "concluded");
        assert_eq!(info["current-progress"], 10);
        assert_eq!(info["result"]["sum"], 3);
        assert!(jobs
            .cancel("a")
            .unwrap_err()
            .to_string()
            .contains("cannot accept"));
        jobs.dismiss("a").unwrap();
        assert!(jobs.query().is_empty());
        assert_eq!(j.status(), JobStatus::Null);
        assert_eq!(
            statuses(&rx, "a"),
            ["created", "running", "concluded", "null"]
        );
    }

    #[test]
    fn ids_are_unique_while_listed() {
        let jobs = Jobs::new(EventBus::default());
        jobs.start(Some("x".into()), "test", String::new(), |_| Ok(json!({})))
            .unwrap();
        jobs.wait("x").unwrap().unwrap();
        let e = jobs
            .start(Some("x".into()), "test", String::new(), |_| Ok(json!({})))
            .unwrap_err();
        assert_eq!(e.to_string(), "Job ID 'x' already in use");
        jobs.dismiss("x").unwrap();
        jobs.start(Some("x".into()), "test", String::new(), |_| Ok(json!({})))
            .unwrap();
        assert!(jobs
            .start(Some(String::new()), "t", String::new(), |_| Ok(json!({})))
            .is_err());
        // A replication round's id for a disk with the longest name fits.
        let round = format!("replicate-{}-{}", "d".repeat(64), u64::MAX);
        jobs.start(Some(round.clone()), "t", String::new(), |_| Ok(json!({})))
            .unwrap();
        jobs.wait(&round).unwrap().unwrap();
        assert!(jobs
            .start(Some("j".repeat(MAX_ID + 1)), "t", String::new(), |_| Ok(
                json!({})
            ))
            .is_err());
        assert!(matches!(jobs.get("nope").unwrap_err(), Error::NotFound(_)));
    }

    /// An id is a name (and names the job's thread): one with a NUL once made the thread
    /// spawn panic with the job already listed, where it stayed, never concluding, never
    /// dismissable, and holding up shutdown for ever.
    #[test]
    fn an_id_that_is_not_a_name_is_refused_and_leaves_no_job() {
        let jobs = Jobs::new(EventBus::default());
        for bad in ["a\0b", "a/b", "..", "-j", "", "line\nbreak"] {
            let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                jobs.start(Some(bad.into()), "test", String::new(), |_| Ok(json!({})))
            }))
            .unwrap_or_else(|_| panic!("starting job {bad:?} panicked"))
            .unwrap_err();
            assert!(matches!(e, Error::Failed(_)), "{bad:?}");
            assert!(e.to_string().contains("job ID"), "{bad:?}: {}", e);
        }
        assert!(jobs.query().is_empty());
        // Nothing is left for shutdown to wait for.
        jobs.cancel_all_and_wait();
    }

    /// Should a job's thread not start after the job was listed (the spawn failing or
    /// panicking), the job goes again: nothing is left that no thread will conclude.
    #[test]
    fn a_job_whose_thread_never_started_is_unlisted_even_by_a_panic() {
        let (bus, rx) = events();
        let jobs = Jobs::new(bus);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // What start does before the spawn, then a panic where the spawn would be.
            let job = Arc::new(Job::new("p".into(), "test", String::new(), 0));
            lock(&jobs.jobs).insert("p".into(), job.clone());
            let _unlist = Unlist {
                jobs: &jobs,
                job: Some(job),
            };
            panic!("the spawn failed");
        }));
        assert!(r.is_err());
        assert!(jobs.query().is_empty());
        assert_eq!(statuses(&rx, "p"), ["null"]);
        jobs.cancel_all_and_wait();
    }

    #[test]
    fn cancel_stops_a_reader_and_the_job_concludes_cancelled() {
        let (bus, rx) = events();
        let jobs = Jobs::new(bus);
        let (started_tx, started_rx) = sync_channel(1);
        jobs.start(Some("c".into()), "test", String::new(), move |ctx| {
            let mut r = Cancellable::new(io::repeat(7), ctx.flag());
            let mut buf = [0u8; 4096];
            let _ = started_tx.send(());
            loop {
                // Ends only by cancellation.
                r.read_exact(&mut buf)
                    .map_err(|e| Error::failed(e.to_string()))?;
            }
        })
        .unwrap();
        started_rx.recv().unwrap();
        jobs.cancel("c").unwrap();
        assert_eq!(jobs.wait("c").unwrap(), Err(CANCELLED.to_string()));
        assert_eq!(
            statuses(&rx, "c"),
            ["created", "running", "aborting", "concluded"]
        );
    }

    #[test]
    fn status_events_follow_the_transitions_when_a_job_ends_as_it_is_cancelled() {
        // The job ends the moment it sees the cancel, racing the cancel's own event: each
        // event must still carry the status its transition set, in transition order.
        for round in 0..300 {
            let (bus, rx) = events();
            let jobs = Jobs::new(bus);
            let id = format!("r{round}");
            let (started_tx, started_rx) = sync_channel(1);
            jobs.start(Some(id.clone()), "test", String::new(), move |ctx| {
                let _ = started_tx.send(());
                while !ctx.cancelled() {
                    std::hint::spin_loop();
                }
                Err(Error::failed("stopped"))
            })
            .unwrap();
            started_rx.recv().unwrap();
            jobs.cancel(&id).unwrap();
            assert_eq!(jobs.wait(&id).unwrap(), Err(CANCELLED.to_string()));
            assert_eq!(
                statuses(&rx, &id),
                ["created", "running", "aborting", "concluded"],
                "round {round}"
            );
        }
    }

    #[test]
    fn past_its_point_of_no_return_a_job_s_errors_are_its_own_even_after_a_cancel() {
        let jobs = Jobs::new(EventBus::default());
        let (go_tx, go_rx) = sync_channel::<()>(1);
        let (past_tx, past_rx) = sync_channel::<()>(1);
        jobs.start(Some("m".into()), "test", String::new(), move |ctx| {
            ctx.point_of_no_return();
            let _ = past_tx.send(());
            let _ = go_rx.recv();
            Err(Error::failed(
                "moved, but the old copy could not be deleted",
            ))
        })
        .unwrap();
        past_rx.recv().unwrap();
        jobs.cancel("m").unwrap();
        go_tx.send(()).unwrap();
        assert_eq!(
            jobs.wait("m").unwrap(),
            Err("moved, but the old copy could not be deleted".to_string())
        );
    }

    #[test]
    fn a_panicking_job_concludes_with_an_error() {
        let jobs = Jobs::new(EventBus::default());
        jobs.start(Some("p".into()), "test", String::new(), |_| -> R<Value> {
            panic!("boom")
        })
        .unwrap();
        let e = jobs.wait("p").unwrap().unwrap_err();
        assert!(e.contains("internal error: boom"), "{e}");
    }

    #[test]
    fn old_concluded_jobs_are_forgotten() {
        let jobs = Jobs::new(EventBus::default());
        for i in 0..KEEP_CONCLUDED + 5 {
            jobs.start(Some(format!("j{i}")), "test", String::new(), |_| {
                Ok(json!({}))
            })
            .unwrap();
            jobs.wait(&format!("j{i}")).unwrap().unwrap();
        }
        jobs.start(Some("last".into()), "test", String::new(), |_| {
            Ok(json!({}))
        })
        .unwrap();
        jobs.wait("last").unwrap().unwrap();
        let n = jobs.query().len();
        assert!(n <= KEEP_CONCLUDED + 1, "{n} kept");
        assert!(jobs.get("j0").is_err());
    }
}
