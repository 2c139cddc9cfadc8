//! `disk-migrate`: moves a disk and its snapshots to another pool of the daemon, while the
//! guest runs.
//!
//! The snapshots go first, as a chain of incremental streams (each on the one before), so
//! that they share blocks in the new pool as they did in the old. Then live passes: a
//! helper snapshot of the running disk, sent incrementally on the last copy, until a pass
//! sends little. Then the final pass, with the guest's writes held: one more helper
//! snapshot and its (small) incremental copy, the disk made in the new pool as a snapshot
//! of that copy, and the disk's requests switched to it; the writes held are released into
//! the new pool. The guest sees a pause, never an error. The pause is reported.
//!
//! Crash safety: every entry a migration makes carries a mark in its registry
//! ([`Migration`]). Helper snapshots in the old pool are `outgoing`, copies in the new
//! pool `incoming`, until the switch, which is one commit of the new pool's registry that
//! names the disk and its snapshots there and marks them `switched`. After that the old
//! pool's copies are deleted and the marks cleared. [`Manager::recover_migrations`], run
//! at start, finishes or undoes whatever a crash interrupted: before the switch the disk
//! stays in its old pool, after it the disk is in the new one.

use super::device_state::{DaemonFields, DeviceState, Migration, ReplicationTarget};
use super::error::Error;
use super::jobs::JobCtx;
use super::transfer::copy_snapshot;
use super::{lock, Manager, PoolHandle, R};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use thinpool::catalog::SnapshotKind;
use thinpool::registry::DeviceEntry;

/// Live passes before the final one, at most.
const MAX_LIVE_PASSES: usize = 8;
/// A live pass that sent less than this is followed by the final pass: what the guest
/// writes meanwhile is about as much, and that is what the final pass sends with writes
/// held.
const FINAL_PASS_BELOW: u64 = 2 << 20;

/// Auto-converge: a guest that writes faster than the passes copy never lets them shrink,
/// and the final pass (the pause) would be as long as a whole pass. So, after a pass that
/// did not halve, the guest's writes are held for a growing share of each 50 ms period
/// (25 %, 50 %, 75 %, at most 90 %): short, spread-out holds instead of one long one, as
/// QEMU throttles the vCPUs of a guest whose memory migration does not converge.
struct Throttle {
    duty: Arc<std::sync::atomic::AtomicU32>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const THROTTLE_PERIOD: std::time::Duration = std::time::Duration::from_millis(50);

impl Throttle {
    fn start(disk: Arc<crate::blk::disk::Disk>) -> Throttle {
        use std::sync::atomic::Ordering::SeqCst;
        let duty = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, st) = (duty.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("throttle-{}", disk.name))
            .spawn(move || {
                while !st.load(SeqCst) {
                    let pct = d.load(SeqCst).min(90);
                    let held = THROTTLE_PERIOD * pct / 100;
                    if !held.is_zero() {
                        let _gate = disk.drain();
                        std::thread::sleep(held);
                    }
                    std::thread::sleep(THROTTLE_PERIOD - held);
                }
            })
            .ok();
        Throttle { duty, stop, thread }
    }

    /// One step harder; the share now held, in percent.
    fn harder(&self) -> u32 {
        use std::sync::atomic::Ordering::SeqCst;
        let now = (self.duty.load(SeqCst) + 25).min(90);
        self.duty.store(now, SeqCst);
        now
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a migration made so far, to undo on failure.
#[derive(Default)]
struct Made {
    /// Helper snapshots in the old pool.
    src: Vec<u32>,
    /// Copies in the new pool.
    dst: Vec<u32>,
}

/// The snapshots of disk `disk` (and snapshots of those), oldest first: what moves with it.
fn lineage(reg: &thinpool::registry::Registry, disk: u32) -> Vec<u32> {
    let of_disk = |mut id: u32| {
        for _ in 0..=reg.devices.len() {
            match reg.devices.get(&id) {
                Some(e) if e.snapshot => match e.origin {
                    Some(o) if o == disk => return true,
                    Some(o) => id = o,
                    None => return false,
                },
                _ => return false,
            }
        }
        false
    };
    let mut v: Vec<(u64, u32)> = reg
        .devices
        .iter()
        .filter(|(&id, e)| {
            e.snapshot && e.receiving.is_none() && e.migration().is_none() && of_disk(id)
        })
        .map(|(&id, e)| (e.created, id))
        .collect();
    v.sort();
    v.into_iter().map(|(_, id)| id).collect()
}

/// A helper snapshot of `disk` in `p`, marked outgoing.
fn helper_snapshot(p: &PoolHandle, disk: u32, job: &str, n: usize) -> R<u32> {
    // Its change commits, and a commit holds new mappings while it flushes: a commit first,
    // with nothing held, leaves that one little to flush (the guest goes on writing).
    p.pool().commit()?;
    p.change(|devices, reg| {
        let id = devices.next_id(reg);
        devices.create_snap(id, disk)?;
        let mut entry = DeviceEntry {
            name: Some(format!(".{job}.{n}")),
            ..p.catalog
                .new_snapshot_entry(reg, disk, id, SnapshotKind::Kept)
        };
        entry.set_migration(Some(Migration::Outgoing {
            job: job.to_string(),
        }));
        reg.insert(id, entry)
            .map_err(|e| Error::failed(e.to_string()))?;
        Ok(id)
    })
}

/// Deletes helper snapshots (or copies) while the guest writes: each is emptied first a
/// block at a time, so that no step holds the pool's metadata (and so the guest's I/O) for
/// long, then deleted.
fn delete_helpers(p: &PoolHandle, ids: &[u32]) -> R<()> {
    for id in ids {
        let size = p.registry().devices.get(id).map(|e| e.size);
        if let Some(size) = size {
            let bs = p.pool().block_bytes();
            p.pool().discard(*id, 0, size.div_ceil(bs) * bs)?;
        }
    }
    p.delete_devices(ids).map(drop)
}

impl Manager {
    /// `disk-migrate`: starts a job moving disk `disk` (with its snapshots) to pool `to`.
    pub fn disk_migrate(
        self: &Arc<Self>,
        job_id: Option<String>,
        disk: &str,
        to: &str,
    ) -> R<Value> {
        let _op = lock(&self.op);
        let f = self.find(disk)?;
        if f.entry.snapshot {
            return Err(Error::failed(format!(
                "'{disk}' is a snapshot: migrate the disk it belongs to"
            )));
        }
        let dst = self.pool(Some(to))?;
        if dst.name == f.pool.name {
            return Err(Error::failed(format!("'{disk}' is in pool {to} already")));
        }
        if let Some(ReplicationTarget::Pool { pool, .. }) = f.entry.replication().map(|r| r.target)
        {
            if pool == to {
                return Err(Error::failed(format!(
                    "'{disk}' is replicated into pool {to}: its replicas there would clash with the moved snapshots; stop or retarget the replication first"
                )));
            }
        }
        let snaps = lineage(&f.pool.registry(), f.id);
        let ids: Vec<u32> = snaps.iter().copied().chain([f.id]).collect();
        let pins = self.pin(&f.pool, &ids, "migrate")?;
        let description = format!(
            "migrate {disk} ({} snapshots) from pool {} to pool {to}",
            snaps.len(),
            f.pool.name
        );
        let me = self.clone();
        let (src, name, id) = (f.pool.clone(), disk.to_string(), f.id);
        let job = self.jobs.start(job_id, "migrate", description, move |ctx| {
            let _pins = pins;
            let mut made = Made::default();
            let r = me.migrate(ctx, &src, &dst, &name, id, &snaps, &mut made);
            if r.is_err() {
                // Nothing switched: the disk stays where it was; the copies and helpers go.
                for (p, ids) in [(&dst, &made.dst), (&src, &made.src)] {
                    if let Err(e) = p.delete_devices(ids) {
                        tracing::error!(
                            "migrate {name}: cannot delete what the failed migration made in pool {} ({ids:?}): {}; it is deleted at the next start",
                            p.name,
                            e.to_string()
                        );
                    }
                }
            }
            r
        })?;
        Ok(json!({"job-id": job.id}))
    }

    #[allow(clippy::too_many_arguments)]
    fn migrate(
        &self,
        ctx: &JobCtx,
        src: &Arc<PoolHandle>,
        dst: &Arc<PoolHandle>,
        name: &str,
        disk: u32,
        snaps: &[u32],
        made: &mut Made,
    ) -> R<Value> {
        let job = ctx.id().to_string();
        let incoming = || Migration::Incoming { job: job.clone() };
        let mut n = 0usize;
        let mut copy = |made: &mut Made, snap: u32, base: Option<u32>| -> R<(u32, u64)> {
            ctx.check()?;
            // Marked from its creation: a crash before the switch never leaves a copy
            // that the next start does not know for the migration's.
            let c = copy_snapshot(
                src,
                snap,
                base,
                dst,
                format!(".{job}.in{n}"),
                ctx,
                Some(incoming()),
            )?;
            n += 1;
            made.dst.push(c.received.id);
            Ok((c.received.id, c.sent.data_bytes))
        };
        // The snapshots, as an incremental chain.
        let mut copies: Vec<(u32, u32)> = Vec::new();
        let mut prev: Option<u32> = None;
        let mut bytes = 0u64;
        for &s in snaps {
            let (d, b) = copy(made, s, prev)?;
            copies.push((s, d));
            prev = Some(s);
            bytes += b;
        }
        // Live passes while the guest writes.
        let served = lock(&self.disks).get(name).map(|s| s.disk.clone());
        let live = served
            .as_ref()
            .is_some_and(|d| d.connected.load(std::sync::atomic::Ordering::SeqCst));
        let mut passes: Vec<u64> = Vec::new();
        let mut helpers = 0usize;
        let mut last_helper: Option<(u32, u32)> = None;
        let throttle = served.clone().filter(|_| live).map(Throttle::start);
        let mut throttled = 0u32;
        while live && passes.len() < MAX_LIVE_PASSES {
            if passes.last().is_some_and(|&b| b < FINAL_PASS_BELOW) {
                break;
            }
            // A pass (after the first, which copies everything) that did not halve the
            // one before: the guest writes about as fast as we copy.
            if let (Some(t), [.., a, b]) = (&throttle, passes.as_slice()) {
                if passes.len() >= 2 && *b > *a / 2 {
                    throttled = t.harder();
                    tracing::info!(
                        "migrate {name}: a pass of {} after one of {}: writes held {throttled}% of the time",
                        crate::size::human(*b),
                        crate::size::human(*a)
                    );
                }
            }
            let t = helper_snapshot(src, disk, &job, helpers)?;
            helpers += 1;
            made.src.push(t);
            let (d, b) = copy(made, t, prev)?;
            // Only the newest helper is a base from now on. The older one goes at once, in
            // both pools: each helper shares the disk's blocks, so while it lives every
            // block the guest rewrites is copied (as after any snapshot), and keeping them
            // all would take up to a disk's worth of space per pass.
            if let Some((ts, td)) = last_helper.replace((t, d)) {
                delete_helpers(src, &[ts])?;
                delete_helpers(dst, &[td])?;
                made.src.retain(|&x| x != ts);
                made.dst.retain(|&x| x != td);
            }
            prev = Some(t);
            passes.push(b);
            bytes += b;
        }
        drop(throttle);
        // The final pass, with the guest's writes held, and the switch.
        ctx.check()?;
        let _op = lock(&self.op);
        let entry =
            src.registry().devices.get(&disk).cloned().ok_or_else(|| {
                Error::failed(format!("disk '{name}' vanished during the migration"))
            })?;
        // As for a snapshot: committed first, so the commits with writes held are short.
        src.pool().commit()?;
        let mut gate = served.as_ref().map(|d| d.drain());
        let t0 = Instant::now();
        let tf = helper_snapshot(src, disk, &job, helpers)?;
        made.src.push(tf);
        let (last_copy, b) = copy(made, tf, prev)?;
        passes.push(b);
        bytes += b;
        ctx.check()?;
        let switched = Migration::Switched {
            job: job.clone(),
            from_pool: src.name.clone(),
        };
        let src_names: BTreeMap<u32, DeviceEntry> = {
            let reg = src.registry();
            copies
                .iter()
                .filter_map(|(s, _)| reg.devices.get(s).map(|e| (*s, e.clone())))
                .collect()
        };
        // The point of no return: one commit of the new pool's registry.
        let new_id = dst.change(|devices, reg| {
            let id = devices.next_id(reg);
            devices.create_snap(id, last_copy)?;
            let ids: BTreeMap<u32, u32> = copies.iter().copied().collect();
            for (s, d) in &copies {
                let old = &src_names[s];
                if let Some(e) = reg.devices.get_mut(d) {
                    e.name = old.name.clone();
                    e.serial = old.serial.clone();
                    e.created = old.created;
                    // Snapshots of the disk are snapshots of its new self; snapshots of
                    // snapshots keep their origin among the copies.
                    e.deleted_origin = old.deleted_origin.clone();
                    e.origin = match old.origin {
                        Some(o) if o == disk => Some(id),
                        Some(o) => ids.get(&o).copied(),
                        None => None,
                    };
                    e.set_migration(Some(switched.clone()));
                }
            }
            let mut moved = DeviceEntry {
                name: entry.name.clone(),
                size: entry.size,
                read_only: entry.read_only,
                serial: entry.serial.clone(),
                snapshot: false,
                origin: entry.origin.and_then(|o| ids.get(&o).copied()),
                deleted_origin: entry.deleted_origin.clone(),
                created: entry.created,
                ..Default::default()
            };
            DeviceState {
                migration: Some(switched.clone()),
                replication: entry.replication(),
                ..DeviceState::of(&entry)
            }
            .store(&mut moved);
            reg.insert(id, moved)
                .map_err(|e| Error::failed(e.to_string()))?;
            Ok(id)
        })?;
        // Switched: from here on nothing is undone, only finished.
        ctx.point_of_no_return();
        made.dst.clear();
        made.src.clear();
        if let (Some(d), Some(g)) = (served.as_ref(), gate.as_mut()) {
            d.retarget(g, dst.pool().clone(), new_id, dst.space.clone(), None);
        }
        if let Some(s) = lock(&self.disks).get_mut(name) {
            s.pool = dst.clone();
        }
        drop(gate);
        let pause = t0.elapsed();
        tracing::info!(
            "migrate {name}: switched to pool {} (thin device {new_id}), writes held {pause:?}",
            dst.name
        );
        self.finish_switch(src, dst, &job).map_err(|e| {
            Error::failed(format!(
                "the disk was moved, but {}; this is finished at the next start",
                e
            ))
        })?;
        let result = json!({
            "disk": name,
            "from": src.name,
            "to": dst.name,
            "thin-id": new_id,
            "snapshots": copies.len(),
            "live-passes": passes.len() - 1,
            "pass-bytes": passes,
            "data-bytes": bytes,
            "pause-us": pause.as_micros() as u64,
            "throttled-percent": throttled,
        });
        self.events
            .emit(crate::events::Event::DiskMigrated(result.clone()));
        Ok(result)
    }

    /// After the switch of job `job` from `src` to `dst`: deletes the disk, its snapshots
    /// and the helpers from `src`, the helper copies from `dst`, and clears the marks.
    fn finish_switch(&self, src: &PoolHandle, dst: &PoolHandle, job: &str) -> R<()> {
        let switched_names: Vec<String> = dst
            .registry()
            .devices
            .values()
            .filter(
                |e| matches!(e.migration(), Some(Migration::Switched { job: j, .. }) if j == job),
            )
            .filter_map(|e| e.name.clone())
            .collect();
        let old: Vec<u32> = src
            .registry()
            .devices
            .iter()
            .filter(|(_, e)| {
                let moved = e.migration().is_none()
                    && e.name.as_ref().is_some_and(|n| switched_names.contains(n));
                let helper =
                    matches!(e.migration(), Some(Migration::Outgoing { job: j }) if j == job);
                moved || helper
            })
            .map(|(&id, _)| id)
            .collect();
        src.delete_devices(&old)?;
        dst.change(|devices, reg| {
            let helpers: Vec<u32> = reg
                .devices
                .iter()
                .filter(|(_, e)| matches!(e.migration(), Some(Migration::Incoming { job: j }) if j == job))
                .map(|(&id, _)| id)
                .collect();
            for id in helpers {
                devices.delete(id)?;
                reg.remove(id);
            }
            for e in reg.devices.values_mut() {
                if matches!(e.migration(), Some(Migration::Switched { job: j, .. }) if j == job) {
                    e.set_migration(None);
                }
            }
            Ok(())
        })?;
        dst.space.space_changed();
        Ok(())
    }

    /// At start, before any disk is served: finishes migrations that had switched and
    /// undoes the others (see the module's comment). Returns what it did, for the log.
    pub fn recover_migrations(&self) -> R<Vec<String>> {
        let mut done = Vec::new();
        // Switched first: they decide which old copies go.
        for dst in self.pools.values() {
            let jobs: BTreeMap<String, String> = dst
                .registry()
                .devices
                .values()
                .filter_map(|e| match e.migration() {
                    Some(Migration::Switched { job, from_pool }) => Some((job, from_pool)),
                    _ => None,
                })
                .collect();
            for (job, from) in jobs {
                match self.pools.get(&from) {
                    Some(src) => {
                        self.finish_switch(src, dst, &job)?;
                        done.push(format!(
                            "migration {job} from pool {from} to pool {}: finished (it had switched)",
                            dst.name
                        ));
                    }
                    None => done.push(format!(
                        "migration {job} to pool {}: its old pool {from} is not served, so its copies there could not be deleted",
                        dst.name
                    )),
                }
            }
        }
        // Whatever else carries a mark was never switched to.
        for p in self.pools.values() {
            let left: Vec<u32> = p
                .registry()
                .devices
                .iter()
                .filter(|(_, e)| {
                    matches!(
                        e.migration(),
                        Some(Migration::Incoming { .. } | Migration::Outgoing { .. })
                    )
                })
                .map(|(&id, _)| id)
                .collect();
            if !left.is_empty() {
                p.delete_devices(&left)?;
                done.push(format!(
                    "pool {}: deleted {} copies and helper snapshots of unfinished migrations",
                    p.name,
                    left.len()
                ));
            }
        }
        Ok(done)
    }
}
