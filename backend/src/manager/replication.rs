//! Scheduled asynchronous replication: every `interval` seconds a disk is snapshotted
//! (`<disk>@r<seq>`) and the snapshot sent, incrementally on the last one that arrived, to
//! another pool of the daemon (as `<prefix>@r<seq>`) or into a command (`ssh host
//! vhost-thin receive …`). The last `keep` replicated snapshots are kept on this side and,
//! for a pool target, on that side; a command's receiver prunes its own (`receive
//! --keep-last`).
//!
//! Each round is a job (`replicate`), so it shows in query-jobs with its progress and can be
//! cancelled. A round that fails deletes its own snapshot and is retried after
//! [`RETRY_AFTER`] (or the interval, if shorter); the target is never left unusable,
//! because a receive that does not complete keeps nothing. After [`FULL_AFTER_FAILURES`]
//! failures in a row the next round sends a full stream, in case the target lost the base.
//! Each round ends with a `REPLICATION_COMPLETED` or `REPLICATION_FAILED` event.
//!
//! The schedule lives in the disk's registry entry: it survives restarts and follows the
//! disk when it is migrated.

use super::device_state::{DaemonFields, ReplicationSpec, ReplicationTarget};
use super::error::Error;
use super::jobs::JobCtx;
use super::results::{Done, ReplicaTarget, ReplicationInfo};
use super::transfer::{copy_snapshot, send_to_command};
use super::{lock, Manager, R};
use crate::events::Event;
use crate::replica_names::series;
use serde_json::{json, Value};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// A failed round is tried again after this long at most.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// Failures in a row after which the next round sends a full stream.
pub const FULL_AFTER_FAILURES: u32 = 3;

/// What query-replication shows of a disk's replication (with the schedule and the times,
/// which it gives relative to now: [`super::results::ReplicationInfo`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    pub last_snapshot: Option<String>,
    /// When the last replicated snapshot was taken (seconds since the epoch).
    #[serde(skip)]
    pub last_snapshot_time: Option<u64>,
    pub last_bytes: u64,
    pub total_bytes: u64,
    pub rounds: u64,
    pub failures: u64,
    pub failures_in_a_row: u32,
    pub last_error: Option<String>,
    pub running: bool,
    #[serde(skip)]
    pub next_round: Option<Instant>,
}

/// A disk's replication thread: its status and the means to stop or wake it.
pub struct Replicator {
    pub status: Arc<Mutex<Status>>,
    /// (stop, wake now), and the condition the thread sleeps on.
    signal: Arc<(Mutex<(bool, bool)>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Replicator {
    /// Tells the thread to stop after the round under way (if any); does not wait.
    fn signal_stop(&self) {
        let (m, cv) = &*self.signal;
        lock(m).0 = true;
        cv.notify_all();
    }

    /// Stops the thread and waits for it.
    fn stop(mut self) {
        self.signal_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn wake(&self) {
        let (m, cv) = &*self.signal;
        lock(m).1 = true;
        cv.notify_all();
    }
}

fn check_spec(m: &Manager, disk: &str, spec: &ReplicationSpec) -> R<()> {
    if spec.interval_secs == 0 || spec.interval_secs > 366 * 86400 {
        return Err(Error::failed("'interval' must be 1 second to 1 year"));
    }
    if spec.keep == 0 || spec.keep > 1000 {
        return Err(Error::failed("'keep' must be 1 to 1000"));
    }
    match &spec.target {
        ReplicationTarget::Pool { pool, prefix } => {
            let f = m.find(disk)?;
            let p = m.pool(Some(pool))?;
            if p.name == f.pool.name {
                return Err(Error::failed(
                    "the target is the disk's own pool: replicate to another pool (snapshots in the same pool are snapshot-create's job)",
                ));
            }
            if prefix.is_empty() || prefix.len() > 40 || prefix.contains(['/', '@', '\0']) {
                return Err(Error::failed(
                    "'prefix' must be 1 to 40 characters, without '/' or '@'",
                ));
            }
            if prefix == disk {
                return Err(Error::failed(
                    "'prefix' must differ from the disk's name (names are unique across the daemon)",
                ));
            }
        }
        ReplicationTarget::Command { argv } => {
            m.confinement.command("replication to a 'command'")?;
            if argv.first().is_none_or(|p| p.is_empty()) {
                return Err(Error::failed("'command' must name a program"));
            }
        }
    }
    Ok(())
}

impl Manager {
    /// `replication-start`: sets (or replaces) the disk's schedule, durably, and starts it.
    /// The first round runs at once.
    pub fn replication_start(
        self: &Arc<Self>,
        disk: &str,
        interval_secs: u64,
        keep: u32,
        target: ReplicationTarget,
    ) -> R<Done> {
        // Two at once would each start a thread and one would be forgotten, running
        // rounds beside the other for ever.
        let _rop = lock(&self.replication_op);
        // Held until the entry is changed (a migration about to switch has read it), let
        // go before the thread starts (stopping an old one waits for its round).
        let op = lock(&self.op);
        let f = self.find(disk)?;
        if f.entry.snapshot {
            return Err(Error::failed(format!(
                "'{disk}' is a snapshot: replicate the disk"
            )));
        }
        self.check_not_migrating(&f, disk)?;
        let old = f.entry.replication();
        // A new target has none of the old one's snapshots: its first round is full.
        let same_target = old.as_ref().is_some_and(|o| o.target == target);
        // Past every `<disk>@r<n>` there is (a schedule stopped and started again keeps
        // the snapshots of the old one).
        let taken = {
            let reg = f.pool.registry();
            series(
                reg.devices
                    .values()
                    .filter_map(|e| e.name.as_deref())
                    .map(|n| (n, ())),
                disk,
            )
            .last()
            .map(|(n, _)| n + 1)
            .unwrap_or(0)
        };
        let spec = ReplicationSpec {
            interval_secs,
            keep,
            next_seq: old.as_ref().map(|o| o.next_seq).unwrap_or(0).max(taken),
            last: old.and_then(|o| o.last).filter(|_| same_target),
            target,
        };
        check_spec(self, disk, &spec)?;
        f.pool.change(|_, reg| {
            if let Some(e) = reg.devices.get_mut(&f.id) {
                e.set_replication(Some(spec.clone()));
            }
            Ok(())
        })?;
        drop(op);
        self.start_replicator(disk);
        Ok(Done {})
    }

    /// `replication-stop`: ends the schedule; the snapshots made so far stay.
    pub fn replication_stop(&self, disk: &str) -> R<Done> {
        let _rop = lock(&self.replication_op);
        let f = self.find(disk)?;
        if f.entry.replication().is_none() {
            return Err(Error::failed(format!("'{disk}' is not replicated")));
        }
        let r = lock(&self.replicators).remove(disk);
        if let Some(r) = r {
            r.signal_stop();
            self.cancel_rounds(disk);
            r.stop();
        }
        // Found again with the operation lock held (not while the round above was waited
        // for: a round may need it): a migration may have moved the disk meanwhile, and
        // one about to switch has read its entry, so the change waits for its switch.
        let _op = lock(&self.op);
        let f = self.find(disk)?;
        f.pool.change(|_, reg| {
            if let Some(e) = reg.devices.get_mut(&f.id) {
                e.set_replication(None);
            }
            Ok(())
        })?;
        Ok(Done {})
    }

    /// `replication-run`: a round now, without waiting for the schedule.
    pub fn replication_run(&self, disk: &str) -> R<Done> {
        match lock(&self.replicators).get(disk) {
            Some(r) => {
                r.wake();
                Ok(Done {})
            }
            None => Err(Error::failed(format!("'{disk}' is not replicated"))),
        }
    }

    pub fn query_replication(&self) -> R<Vec<ReplicationInfo>> {
        let reps = lock(&self.replicators);
        let now = crate::pools::now_secs();
        let mut out = Vec::new();
        for (disk, r) in reps.iter() {
            let Ok(f) = self.find(disk) else { continue };
            let Some(spec) = f.entry.replication() else {
                continue;
            };
            let mut st = lock(&r.status).clone();
            st.last_snapshot = st.last_snapshot.or(spec.last);
            out.push(ReplicationInfo {
                disk: disk.clone(),
                interval: spec.interval_secs,
                keep: spec.keep,
                target: match spec.target {
                    ReplicationTarget::Pool { pool, prefix } => {
                        ReplicaTarget::Pool { pool, prefix }
                    }
                    ReplicationTarget::Command { argv } => ReplicaTarget::Command { command: argv },
                },
                lag_seconds: st.last_snapshot_time.map(|t| now.saturating_sub(t)),
                next_round_in_ms: st.next_round.map(|t| {
                    u64::try_from(t.saturating_duration_since(Instant::now()).as_millis())
                        .unwrap_or(u64::MAX)
                }),
                status: st,
            });
        }
        Ok(out)
    }

    /// Starts the replication threads of every disk whose entry has a schedule (at start).
    pub fn resume_replication(self: &Arc<Self>) {
        let disks: Vec<String> = self
            .pools
            .values()
            .flat_map(|p| {
                p.registry()
                    .devices
                    .values()
                    .filter(|e| e.replication().is_some() && !e.snapshot)
                    .filter_map(|e| e.name.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        for d in disks {
            self.start_replicator(&d);
        }
    }

    /// Stops `disk`'s replication without waiting (the disk is being removed, with the
    /// management lock held that a round in progress may need): the round under way is
    /// cancelled and the thread ends by itself.
    pub(super) fn drop_replicator(&self, disk: &str) {
        let r = lock(&self.replicators).remove(disk);
        if let Some(r) = r {
            r.signal_stop();
            self.cancel_rounds(disk);
        }
    }

    fn cancel_rounds(&self, disk: &str) {
        for j in self.jobs.query() {
            if is_round_of(&j.id, disk) {
                let _ = self.jobs.cancel(&j.id);
            }
        }
    }

    /// Stops every replication thread (shutdown); the schedules stay in the registries.
    pub fn stop_replication(&self) {
        let _rop = lock(&self.replication_op);
        let all: Vec<Replicator> = std::mem::take(&mut *lock(&self.replicators))
            .into_values()
            .collect();
        for r in &all {
            r.signal_stop();
        }
        for j in self.jobs.query() {
            if j.kind == "replicate" {
                let _ = self.jobs.cancel(&j.id);
            }
        }
        for r in all {
            r.stop();
        }
    }

    fn start_replicator(self: &Arc<Self>, disk: &str) {
        let old = lock(&self.replicators).remove(disk);
        if let Some(r) = old {
            r.signal_stop();
            self.cancel_rounds(disk);
            r.stop();
        }
        let status = Arc::new(Mutex::new(Status::default()));
        let signal = Arc::new((Mutex::new((false, true)), Condvar::new()));
        let me = Arc::downgrade(self);
        let (st, sig, name) = (status.clone(), signal.clone(), disk.to_string());
        let thread = std::thread::Builder::new()
            .name(format!("replicate-{disk}"))
            .spawn(move || schedule(me, &name, &st, &sig));
        match thread {
            Ok(t) => {
                let displaced = lock(&self.replicators).insert(
                    disk.to_string(),
                    Replicator {
                        status,
                        signal,
                        thread: Some(t),
                    },
                );
                // Never two threads for one disk: one no longer in the map could not be
                // stopped any more.
                if let Some(d) = displaced {
                    d.signal_stop();
                }
            }
            Err(e) => tracing::error!("{disk}: cannot start replication: {e}"),
        }
    }

    /// One round for `disk`, as a job; returns (snapshot, bytes sent).
    pub(super) fn replication_round(self: &Arc<Self>, disk: &str, full: bool) -> R<(String, u64)> {
        let f = self.find(disk)?;
        let spec = f
            .entry
            .replication()
            .ok_or_else(|| Error::failed(format!("'{disk}' is not replicated")))?;
        let seq = spec.next_seq;
        let spec_copy = spec.clone();
        let snap = format!("{disk}@r{seq}");
        // The sequence number is used up first, so that a crash never reuses a name.
        f.pool.change(|_, reg| {
            if let Some(e) = reg.devices.get_mut(&f.id) {
                e.update_replication(|r| r.next_seq = seq + 1);
            }
            Ok(())
        })?;
        self.snapshot_create(disk, &snap)?;
        let me = self.clone();
        let (snap2, disk2) = (snap.clone(), disk.to_string());
        let job_id = format!("replicate-{disk}-{seq}");
        let job = self.jobs.start(
            Some(job_id.clone()),
            "replicate",
            format!("replicate {disk} as {snap}"),
            move |ctx| me.replicate_snapshot(ctx, &disk2, &snap2, &spec, full),
        );
        let spec = f.entry.replication().unwrap_or(spec_copy);
        let outcome = match job {
            Ok(_) => {
                let o = self
                    .jobs
                    .wait(&job_id)
                    .unwrap_or_else(|e| Err(e.to_string()));
                let _ = self.jobs.dismiss(&job_id);
                o
            }
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(v) => {
                // With the round's pins released: the old base may go now.
                self.prune(disk, &spec);
                let bytes = v["stream-bytes"].as_u64().unwrap_or(0);
                Ok((snap, bytes))
            }
            Err(e) => {
                // This round's snapshot is no base for anyone: drop it.
                if let Err(d) = self.snapshot_delete(&snap, false) {
                    tracing::warn!(
                        "{disk}: cannot delete {snap} after a failed round: {}",
                        d.to_string()
                    );
                }
                Err(Error::failed(e))
            }
        }
    }

    /// The work of a round's job: sends `snap`, records it as the new base, prunes.
    fn replicate_snapshot(
        &self,
        ctx: &JobCtx,
        disk: &str,
        snap: &str,
        spec: &ReplicationSpec,
        full: bool,
    ) -> R<Value> {
        let s = self.find_exact(snap)?;
        let base = match (&spec.last, full) {
            (Some(b), false) => self
                .find_exact(b)
                .ok()
                .filter(|b| b.pool.name == s.pool.name),
            _ => None,
        };
        let mut ids = vec![s.id];
        ids.extend(base.as_ref().map(|b| b.id));
        let _pins = self.pin(&s.pool, &ids, "replicate")?;
        let base_id = base.as_ref().map(|b| b.id);
        let bytes = match &spec.target {
            ReplicationTarget::Pool { pool, prefix } => {
                let dst = self.pool(Some(pool))?;
                // Incremental only on a base the target still has.
                let base_id = base_id.filter(|_| {
                    base.as_ref()
                        .and_then(|b| b.entry.guid.clone())
                        .is_some_and(|g| dst.registry().find_guid(&g).is_some())
                });
                let seq = snap.rsplit("@r").next().unwrap_or("0");
                let name = format!("{prefix}@r{seq}");
                self.name_free(&name)?;
                let c = copy_snapshot(&s.pool, s.id, base_id, &dst, name, ctx, None)?;
                dst.space.space_changed();
                c.sent.stream_bytes
            }
            ReplicationTarget::Command { argv } => {
                // A schedule kept in the registry outlives a change of the operator's mind.
                self.confinement.command("replication to a 'command'")?;
                s.pool.ensure_guids(&ids)?;
                let opts = thinpool::stream::SendOptions {
                    base: base_id,
                    resume_offset: 0,
                };
                send_to_command(&s.pool, s.id, &opts, argv, ctx)?
                    .0
                    .stream_bytes
            }
        };
        // Arrived: the new base.
        let d = self.find(disk)?;
        d.pool.change(|_, reg| {
            if let Some(e) = reg.devices.get_mut(&d.id) {
                e.update_replication(|r| r.last = Some(snap.to_string()));
            }
            Ok(())
        })?;
        Ok(json!({"snapshot": snap, "stream-bytes": bytes}))
    }

    /// Keeps the last `keep` replicated snapshots here and in a target pool.
    fn prune(&self, disk: &str, spec: &ReplicationSpec) {
        let series_of = |base: &str, pool: Option<&str>| -> Vec<(u64, String)> {
            let names: Vec<String> = self
                .pools
                .values()
                .filter(|p| pool.is_none_or(|n| p.name == n))
                .flat_map(|p| {
                    p.registry()
                        .devices
                        .values()
                        .filter(|e| e.snapshot)
                        .filter_map(|e| e.name.clone())
                        .collect::<Vec<_>>()
                })
                .collect();
            series(names.iter().map(|n| (n.as_str(), n.clone())), base)
        };
        let mut doomed = Vec::new();
        let mine = series_of(disk, None);
        doomed.extend(
            mine.iter()
                .rev()
                .skip(spec.keep as usize)
                .map(|(_, n)| n.clone()),
        );
        if let ReplicationTarget::Pool { pool, prefix } = &spec.target {
            let theirs = series_of(prefix, Some(pool));
            doomed.extend(
                theirs
                    .iter()
                    .rev()
                    .skip(spec.keep as usize)
                    .map(|(_, n)| n.clone()),
            );
        }
        for n in doomed {
            if let Err(e) = self.snapshot_delete(&n, false) {
                tracing::warn!("{disk}: cannot prune {n}: {}", e.to_string());
            }
        }
    }
}

/// Whether job `id` is a round of `disk` (`replicate-<disk>-<seq>`): not of another disk
/// whose name starts with this one's and a dash (`vm` and `vm-2`).
fn is_round_of(id: &str, disk: &str) -> bool {
    id.strip_prefix("replicate-")
        .and_then(|r| r.strip_prefix(disk))
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|seq| !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()))
}

/// The replication thread of `disk`: a round, then sleep until the next (or a wake).
fn schedule(
    me: Weak<Manager>,
    disk: &str,
    status: &Mutex<Status>,
    signal: &(Mutex<(bool, bool)>, Condvar),
) {
    loop {
        // Sleep until the next round is due, a wake, or stop.
        {
            let (m, cv) = signal;
            let mut g = lock(m);
            loop {
                if g.0 {
                    return;
                }
                if g.1 {
                    g.1 = false;
                    break;
                }
                let due = lock(status).next_round;
                let wait = match due {
                    Some(t) => match t.checked_duration_since(Instant::now()) {
                        Some(d) if !d.is_zero() => d,
                        _ => break,
                    },
                    None => Duration::from_secs(3600),
                };
                g = cv
                    .wait_timeout(g, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        let Some(m) = me.upgrade() else { return };
        let Ok(f) = m.find(disk) else { return };
        let Some(spec) = f.entry.replication() else {
            return;
        };
        let interval = Duration::from_secs(spec.interval_secs);
        let full = lock(status).failures_in_a_row >= FULL_AFTER_FAILURES;
        lock(status).running = true;
        let t0 = Instant::now();
        let r = m.replication_round(disk, full);
        let mut st = lock(status);
        st.running = false;
        st.rounds += 1;
        match r {
            Ok((snap, bytes)) => {
                st.last_snapshot = Some(snap.clone());
                st.last_snapshot_time = m.entry(&snap).map(|e| e.created);
                st.last_bytes = bytes;
                st.total_bytes += bytes;
                st.failures_in_a_row = 0;
                st.last_error = None;
                st.next_round = Some(t0 + interval);
                drop(st);
                m.events.emit(Event::ReplicationCompleted {
                    disk: disk.to_string(),
                    snapshot: snap,
                    bytes,
                    full,
                    duration_ms: t0.elapsed().as_millis() as u64,
                });
            }
            Err(e) => {
                st.failures += 1;
                st.failures_in_a_row += 1;
                st.last_error = Some(e.to_string().clone());
                let retry = interval.min(RETRY_AFTER);
                st.next_round = Some(Instant::now() + retry);
                drop(st);
                tracing::warn!("{disk}: replication round failed: {}", e.to_string());
                m.events.emit(Event::ReplicationFailed {
                    disk: disk.to_string(),
                    error: e.to_string(),
                    retry_in_seconds: retry.as_secs(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_of_a_disk_are_not_those_of_a_disk_with_a_longer_name() {
        assert!(is_round_of("replicate-vm-7", "vm"));
        assert!(!is_round_of("replicate-vm-2-7", "vm"));
        assert!(is_round_of("replicate-vm-2-7", "vm-2"));
        assert!(!is_round_of("replicate-vm-", "vm"));
        assert!(!is_round_of("send-vm-7", "vm"));
    }

    #[test]
    fn series_takes_only_the_disk_s_numbered_snapshots_in_order() {
        let names: Vec<String> = [
            "vm@r10", "vm@r9", "vm@rx", "vm2@r1", "vm@r", "other", "vm@r2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s = series(names.iter().map(|n| (n.as_str(), n.clone())), "vm");
        assert_eq!(
            s,
            vec![
                (2, "vm@r2".into()),
                (9, "vm@r9".into()),
                (10, "vm@r10".into())
            ]
        );
    }
}
