//! `disk-migrate`: moves a disk and its snapshots to another pool of the daemon, while the
//! guest runs.
//!
//! The snapshots go first, as a chain of incremental streams (each on the one before), so
//! that they share blocks in the new pool as they did in the old.
//!
//! A disk with a guest connected then moves with *active mirroring*
//! ([`crate::blk::mirror`]), as QEMU's `blockdev-mirror` in its write-blocking mode, with no
//! snapshot of the running disk (a helper snapshot would make every guest write to a block
//! copy the whole block until the move ends):
//!
//! 1. The disk's device-to-be `D` is made in the new pool, writable, as a snapshot of the
//!    copy of the disk's last snapshot, or empty if it has none (marked `incoming`).
//! 2. With the guest's writes held only while the requests in flight end, a forward mirror
//!    is installed on the disk's target. From then on every guest write, write-zeroes and
//!    discard goes to the old device and then to `D` before the guest's request completes
//!    (or, for a block the copy has still to settle, is left to the copy: step 3).
//! 3. The background copy: each block of the disk that may read otherwise than on `D` as
//!    it was made (the delta from the last snapshot, from the trees; without one, every
//!    mapped block) is copied to `D` from the disk as it is now, reading it under the
//!    mirror's lock of that block (a block of the old pool). A guest request holds the
//!    same locks for its blocks across both of its writes. Until the copy of a block has
//!    been written back to `D`, the guest's writes to that block go to the old device alone
//!    and the copy moves the block again afterwards (the mirror's "Deferred regions"): a
//!    guest write does not meet the write-back of the copy's new blocks. Those second
//!    copies hold the lock across their read and their write, with every guest write
//!    mirrored. So no copy of a block is stale when the copy ends (a write after its read
//!    made the copy move it again), and a partial-block write the mirror made on `D`
//!    before the copy reached the block is carried again, with the bytes around it, when
//!    the copy does. Every change after the mirror's start is mirrored or left to the
//!    copy, and a block that differed then differs still when the delta is read. When the
//!    copy ends, `D` reads as the disk does.
//! 4. The new pool is committed (nothing held), then the switch: one change of the new
//!    pool's registry that names `D` as the disk and the copies as its snapshots (marked
//!    `switched`). Within it the guest's writes are held only while the entries change in
//!    memory and the disk's target moves to `D`; they are released at once, mirrored
//!    *backwards* to the old device until the change is durable (registry written, pool
//!    committed), since until then a restart finds the disk in the old pool. A backward
//!    write that fails fails the guest's request (it is not done where a restart would
//!    look); a forward one that fails only gives the mirror up, and the migration fails
//!    and is undone at the switch, with the disk, whole, in its old pool. After the switch
//!    is durable the backward mirror goes (one more short hold) and the old pool's copies
//!    are deleted.
//!
//! A FLUSH while mirrored commits both pools (the target's first): whichever of the two a
//! restart finds the disk in holds every write the FLUSH vouches for. During the switch
//! the new pool's commits are held, so a FLUSH then waits for the switch to be durable.
//!
//! A disk no guest writes (not served, or no guest connected) ends with the final pass
//! instead, as before: with the guest's writes held, one more helper snapshot, its copy,
//! the disk made in the new pool as a snapshot of that copy, the switch. The guest sees a
//! pause, never an error. The pauses (each hold of the guest's writes) are reported.
//!
//! Crash safety: every entry a migration makes carries a mark in its registry
//! ([`Migration`]). Helper snapshots in the old pool are `outgoing`, copies (and `D`) in the
//! new pool `incoming`, until the switch, which is one commit of the new pool's registry
//! that names the disk and its snapshots there and marks them `switched`. After that the
//! old pool's copies are deleted and the marks cleared. [`Manager::recover_migrations`], run
//! at start, finishes or undoes whatever a crash interrupted: before the switch the disk
//! stays in its old pool (which has every write: the forward mirror writes it first, the
//! backward one as well), after it the disk is in the new one.

use super::device_state::{DaemonFields, DeviceState, Migration, ReplicationTarget};
use super::error::Error;
use super::jobs::JobCtx;
use super::transfer::copy_snapshot;
use super::{lock, Manager, PoolHandle, R};
use crate::blk::mirror::{Mirror, OnError};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use thinpool::catalog::{Catalog, SnapshotKind};
use thinpool::registry::{DeviceEntry, Registry};

/// What a migration made so far, to undo on failure.
#[derive(Default)]
struct Made {
    /// Helper snapshots in the old pool.
    src: Vec<u32>,
    /// Copies in the new pool.
    dst: Vec<u32>,
}

/// Where a migration is, for tests that act at each step (see `Manager::migrate_hook`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MigrateStep {
    /// The snapshots are copied and the disk's device-to-be made in the new pool; the
    /// mirror comes next.
    BeforeMirror,
    /// The disk is mirrored to thin device `dest` of the new pool; the background copy
    /// comes next.
    Mirroring { dest: u32 },
    /// The background copy is about to copy block `block` (no lock held).
    Copying { block: u64 },
    /// The background copy is done; the switch comes next.
    Copied,
}

/// The entries the switch writes into the new pool: the disk's and its snapshots' as they
/// are now, in the old pool. The migration read them before its background copy, which
/// it runs without the manager's operation lock; meanwhile a replication round may have
/// advanced the disk's schedule, or the deletion of the snapshot it was cloned from
/// rewritten its origin, and those changes move with it. What would make the copy wrong
/// (a resize) or lose a device (a deletion) is refused while the devices are pinned; if
/// either happened anyway, the migration fails here, before the switch.
fn entries_for_switch(sw: &Switch<'_>) -> R<(DeviceEntry, BTreeMap<u32, DeviceEntry>)> {
    let reg = sw.src.registry();
    let changed = || {
        Error::failed(format!(
            "disk '{}' or one of its snapshots was resized or removed in pool {} during the migration; nothing was moved",
            sw.name, sw.src.name
        ))
    };
    let entry = reg
        .devices
        .get(&sw.disk)
        .filter(|e| e.size == sw.entry.size)
        .cloned()
        .ok_or_else(changed)?;
    let snapshots = sw
        .src_names
        .keys()
        .map(|id| reg.devices.get(id).map(|e| (*id, e.clone())))
        .collect::<Option<BTreeMap<_, _>>>()
        .ok_or_else(changed)?;
    Ok((entry, snapshots))
}

/// What the end of a migration did.
struct Switched {
    /// The disk's thin device in the new pool.
    new_id: u32,
    /// Bytes the final pass (or the background copy) sent.
    final_bytes: u64,
    /// Each time the guest's writes were held, in order.
    holds: Vec<std::time::Duration>,
    /// With active mirroring: the bytes the guest's requests wrote to both pools.
    mirrored: Option<u64>,
}

/// What the switch needs to know of the migration.
struct Switch<'a> {
    src: &'a Arc<PoolHandle>,
    dst: &'a Arc<PoolHandle>,
    name: &'a str,
    disk: u32,
    job: &'a str,
    /// The disk's entry in the old pool.
    entry: &'a DeviceEntry,
    /// (snapshot in the old pool, its copy in the new), oldest first.
    copies: &'a [(u32, u32)],
    /// The snapshots' entries in the old pool.
    src_names: &'a BTreeMap<u32, DeviceEntry>,
}

impl Switch<'_> {
    /// The switch's registry change in the new pool: the copies of the snapshots take
    /// their names, device `id` becomes the disk, all marked switched.
    fn name_switched(&self, reg: &mut thinpool::registry::Registry, id: u32) -> R<()> {
        let switched = Migration::Switched {
            job: self.job.to_string(),
            from_pool: self.src.name.clone(),
        };
        let entry = self.entry;
        let ids: BTreeMap<u32, u32> = self.copies.iter().copied().collect();
        for (s, d) in self.copies {
            let old = &self.src_names[s];
            if let Some(e) = reg.devices.get_mut(d) {
                e.name = old.name.clone();
                e.serial = old.serial.clone();
                e.created = old.created;
                // Snapshots of the disk are snapshots of its new self; snapshots of
                // snapshots keep their origin among the copies.
                e.deleted_origin = old.deleted_origin.clone();
                e.origin = match old.origin {
                    Some(o) if o == self.disk => Some(id),
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
            migration: Some(switched),
            replication: entry.replication(),
            ..DeviceState::of(entry)
        }
        .store(&mut moved);
        reg.insert(id, moved)
            .map_err(|e| Error::failed(e.to_string()))
    }
}

/// Until the switch: puts the disk back on its own device in its old pool, unmirrored,
/// when the migration fails (dropped armed).
struct Restore<'a> {
    disk: &'a Arc<crate::blk::disk::Disk>,
    src: &'a PoolHandle,
    id: u32,
    armed: bool,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut gate = self.disk.drain();
            self.disk.retarget(
                &mut gate,
                self.src.pool().clone(),
                self.id,
                self.src.space.clone(),
                None,
            );
        }
    }
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

/// Registers `id`, a helper snapshot of `disk` named `name`, marked as the migration
/// `job`'s outgoing copy.
fn insert_outgoing(
    reg: &mut Registry,
    id: u32,
    catalog: &Catalog,
    disk: u32,
    name: String,
    job: &str,
) -> R<()> {
    let entry = DeviceEntry {
        name: Some(name),
        ..catalog.new_snapshot_entry(reg, disk, id, SnapshotKind::Kept)
    };
    let outgoing = Migration::Outgoing {
        job: job.to_string(),
    };
    insert_marked(reg, id, entry, outgoing)
}

/// Registers `id` with the migration mark that says what a crash leaves it as.
fn insert_marked(reg: &mut Registry, id: u32, mut entry: DeviceEntry, mark: Migration) -> R<()> {
    entry.set_migration(Some(mark));
    reg.insert(id, entry)
        .map_err(|e| Error::failed(e.to_string()))
}

/// A helper snapshot of `disk` in `p`, marked outgoing.
fn helper_snapshot(p: &PoolHandle, disk: u32, job: &str, n: usize) -> R<u32> {
    // Its change commits, and a commit holds new mappings while it flushes: a commit first,
    // with nothing held, leaves that one little to flush (the guest goes on writing).
    p.pool().flush()?;
    p.change(|devices, reg| {
        let id = devices.next_id(reg);
        devices.create_snap(id, disk)?;
        let name = format!(".{job}.{n}");
        insert_outgoing(reg, id, &p.catalog, disk, name, job)?;
        Ok(id)
    })
}

/// Unmaps every block of devices `ids` while the guest writes, a block at a time, so that
/// no step holds the pool's metadata (and so the guest's I/O) for long: a device deleted
/// afterwards frees nothing, so its deletion holds the pool's metadata only briefly.
fn empty(p: &PoolHandle, ids: &[u32]) -> R<()> {
    for id in ids {
        let size = p.registry().devices.get(id).map(|e| e.size);
        if let Some(size) = size {
            let bs = p.pool().block_bytes();
            p.pool().discard(*id, 0, size.div_ceil(bs) * bs)?;
        }
    }
    Ok(())
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
        // A disk the guest writes moves by active mirroring, from its last snapshot's copy
        // (see the module's comment); one nobody writes, by a final pass.
        let served = lock(&self.disks).get(name).map(|s| s.disk.clone());
        let live = served
            .as_ref()
            .is_some_and(|d| d.connected.load(std::sync::atomic::Ordering::SeqCst));
        ctx.check()?;
        // Held while the migration reads the disk's entry and installs the mirror, and
        // again for the switch and what follows; not while the background copy runs (as
        // long as the disk is big): meanwhile the rest of the daemon is managed as usual,
        // and the changes that concern this disk are refused (its devices are pinned).
        let mut op = Some(lock(&self.op));
        let entry =
            src.registry().devices.get(&disk).cloned().ok_or_else(|| {
                Error::failed(format!("disk '{name}' vanished during the migration"))
            })?;
        let src_names: BTreeMap<u32, DeviceEntry> = {
            let reg = src.registry();
            copies
                .iter()
                .filter_map(|(s, _)| reg.devices.get(s).map(|e| (*s, e.clone())))
                .collect()
        };
        let sw = Switch {
            src,
            dst,
            name,
            disk,
            job: &job,
            entry: &entry,
            copies: &copies,
            src_names: &src_names,
        };
        let last = copies.last().copied();
        let done = match served.as_ref().filter(|_| live) {
            Some(d) => self.mirror_and_switch(ctx, &sw, d, last, made, &mut op)?,
            None => {
                let tf_base = prev;
                self.final_pass_and_switch(ctx, &sw, served.as_ref(), made, |made, tf| {
                    copy(made, tf, tf_base)
                })?
            }
        };
        let passes = [done.final_bytes];
        bytes += done.final_bytes;
        let pause = done.holds.iter().sum::<std::time::Duration>();
        tracing::info!(
            "migrate {name}: switched to pool {} (thin device {}), writes held {pause:?} ({:?})",
            dst.name,
            done.new_id,
            done.holds
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
            "thin-id": done.new_id,
            "snapshots": copies.len(),
            "live-passes": passes.len() - 1,
            "pass-bytes": passes,
            "data-bytes": bytes,
            "pause-us": pause.as_micros() as u64,
            "holds-us": done.holds.iter().map(|h| h.as_micros() as u64).collect::<Vec<_>>(),
            "mirrored": done.mirrored.is_some(),
            "mirrored-bytes": done.mirrored.unwrap_or(0),
        });
        self.events
            .emit(crate::events::Event::DiskMigrated(result.clone()));
        Ok(result)
    }

    /// The pass-based end (a disk not being written: not served, or no guest connected):
    /// with the guest's writes held, one more helper snapshot, its copy (`copy`), the disk
    /// made in the new pool as a snapshot of that copy, the switch.
    fn final_pass_and_switch(
        &self,
        ctx: &JobCtx,
        sw: &Switch<'_>,
        served: Option<&Arc<crate::blk::disk::Disk>>,
        made: &mut Made,
        mut copy: impl FnMut(&mut Made, u32) -> R<(u32, u64)>,
    ) -> R<Switched> {
        let (src, dst) = (sw.src, sw.dst);
        // As for a snapshot: committed first, so the commits with writes held are short.
        src.pool().flush()?;
        let mut gate = served.map(|d| d.drain());
        let t0 = Instant::now();
        let tf = helper_snapshot(src, sw.disk, sw.job, 0)?;
        made.src.push(tf);
        let (last_copy, b) = copy(made, tf)?;
        ctx.check()?;
        // The point of no return: one commit of the new pool's registry.
        let new_id = dst.change(|devices, reg| {
            let id = devices.next_id(reg);
            devices.create_snap(id, last_copy)?;
            sw.name_switched(reg, id)?;
            Ok(id)
        })?;
        // Switched: from here on nothing is undone, only finished.
        ctx.point_of_no_return();
        made.dst.clear();
        made.src.clear();
        if let (Some(d), Some(g)) = (served, gate.as_mut()) {
            d.retarget(g, dst.pool().clone(), new_id, dst.space.clone(), None);
        }
        if let Some(s) = lock(&self.disks).get_mut(sw.name) {
            s.pool = dst.clone();
        }
        drop(gate);
        Ok(Switched {
            new_id,
            final_bytes: b,
            holds: vec![t0.elapsed()],
            mirrored: None,
        })
    }

    /// The end for a disk being written: active mirroring, then a switch that copies
    /// nothing (see the module's comment). `last` is the disk's last snapshot and its copy
    /// in the new pool, if it has snapshots.
    /// `op` (the manager's operation lock, held on entry) is let go during the background
    /// copy and taken again before the switch; it is held on return.
    #[allow(clippy::too_many_arguments)]
    fn mirror_and_switch<'m>(
        &'m self,
        ctx: &JobCtx,
        sw: &Switch<'_>,
        d: &Arc<crate::blk::disk::Disk>,
        last: Option<(u32, u32)>,
        made: &mut Made,
        op: &mut Option<std::sync::MutexGuard<'m, ()>>,
    ) -> R<Switched> {
        let (src, dst, disk) = (sw.src, sw.dst, sw.disk);
        // The disk's device-to-be in the new pool: writable, made of the last snapshot's
        // copy (or empty), marked incoming until the switch names it.
        let dest = self.mirror_destination(sw, last.map(|(_, copy)| copy))?;
        made.dst.push(dest);
        self.hook(MigrateStep::BeforeMirror);
        // From here until the switch, whatever fails leaves the disk on its own device in
        // its old pool, unmirrored.
        let mut restore = Restore {
            disk: d,
            src,
            id: disk,
            armed: true,
        };
        let mirror = Arc::new(Mirror::new(
            dst.pool().clone(),
            dest,
            src.pool().block_bytes(),
            OnError::GiveUp,
        ));
        let mut holds = Vec::new();
        // The guest's writes held only while the requests in flight end and the mirror is
        // installed: from then on every change of the disk is mirrored, and every change
        // before it is in what the copy moves.
        let t0 = Instant::now();
        let mut gate = d.drain();
        gate.mirror = Some(Arc::clone(&mirror));
        drop(gate);
        holds.push(t0.elapsed());
        tracing::info!(
            "migrate {}: mirroring to thin device {dest} of pool {}",
            sw.name,
            dst.name
        );
        self.hook(MigrateStep::Mirroring { dest });
        *op = None;
        let copied = self.copy_changed(ctx, sw, &mirror, last.map(|(snap, _)| snap));
        *op = Some(lock(&self.op));
        let copied = copied?;
        let (entry, src_names) = entries_for_switch(sw)?;
        let sw = &Switch {
            entry: &entry,
            src_names: &src_names,
            ..*sw
        };
        self.hook(MigrateStep::Copied);
        tracing::info!(
            "migrate {}: copied {} while mirroring",
            sw.name,
            crate::size::human(copied)
        );
        // The new pool made durable with nothing held, so that the switch's commit has
        // only what the guest wrote meanwhile to flush.
        dst.pool().flush()?;
        tracing::info!("migrate {}: pool {} committed", sw.name, dst.name);
        ctx.check()?;
        // The switch: one commit of the new pool's registry. The guest's writes are held
        // only while the entries change in memory and the disk is retargeted; they then go
        // to the new device, and back to the old one as well until the change is durable
        // (FailRequest: until then the old pool is where a restart finds the disk, so a
        // write is done only once it is there). Commits of the new pool are held all along,
        // so a FLUSH waits for the switch to be durable.
        switch_mirrored(sw, d, dest, &mirror, &mut holds)?;
        // Switched: from here on nothing is undone, only finished.
        ctx.point_of_no_return();
        restore.armed = false;
        made.dst.clear();
        made.src.clear();
        self.end_backward_mirror(sw, d, &mut holds);
        Ok(Switched {
            new_id: dest,
            final_bytes: copied,
            holds,
            mirrored: Some(
                mirror
                    .mirrored_bytes
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
        })
    }

    /// The disk's device-to-be in the new pool, marked incoming until the switch names it:
    /// writable, of the disk's size, a snapshot of `base_copy` (the copy of the disk's last
    /// snapshot), or empty when the disk has no snapshot.
    fn mirror_destination(&self, sw: &Switch<'_>, base_copy: Option<u32>) -> R<u32> {
        let (dst, job) = (sw.dst, sw.job);
        dst.change(|devices, reg| {
            let id = devices.next_id(reg);
            let made = match base_copy {
                Some(base) => {
                    devices.create_snap(id, base)?;
                    dst.catalog
                        .new_snapshot_entry(reg, base, id, SnapshotKind::Clone)
                }
                None => {
                    devices.create_thin(id)?;
                    dst.catalog.new_thin_entry(id, 0)
                }
            };
            let e = DeviceEntry {
                name: Some(format!(".{job}.disk")),
                size: sw.entry.size,
                snapshot: false,
                read_only: false,
                ..made
            };
            let incoming = Migration::Incoming {
                job: job.to_string(),
            };
            insert_marked(reg, id, e, incoming)?;
            Ok(id)
        })
    }

    /// The background copy: each block of the disk that may read otherwise than on its
    /// device-to-be (see [`blocks_to_copy`]), moved from the disk as it is now (see
    /// `crate::blk::mirror` for why that is never stale). Returns the bytes copied.
    fn copy_changed(
        &self,
        ctx: &JobCtx,
        sw: &Switch<'_>,
        mirror: &Mirror,
        base: Option<u32>,
    ) -> R<u64> {
        let (src, dst, disk) = (sw.src, sw.dst, sw.disk);
        let base = base.map(|b| (b, sw.src_names.get(&b).map_or(0, |e| e.size)));
        let runs = blocks_to_copy(src.pool(), disk, base, sw.entry.size)?;
        let bs = src.pool().block_bytes();
        let mut total: u64 = runs.iter().map(|r| r.end - r.start).sum::<u64>() * bs;
        // Until the copy has settled a block on the new pool, the guest's writes to it go
        // to the old pool alone (see `crate::blk::mirror`, "Deferred regions").
        mirror.defer_to_copy(sw.entry.size.div_ceil(bs), &runs);
        let failed = |e: crate::blk::mirror::CopyError| {
            Error::failed(format!("copying to pool {}: {e}", dst.name))
        };
        let mut buf = Vec::new();
        let mut copied = 0u64;
        // The guest's writes into the new pool's file must not wait for a copy preempted
        // in the middle of its own write there (see `pace`).
        let mut pacer = super::pace::Pacer::for_this_thread();
        let mut copy = |k: u64, total: u64| -> R<()> {
            ctx.check()?;
            pacer.step();
            self.hook(MigrateStep::Copying { block: k });
            mirror
                .copy_region(src.pool(), disk, k, &mut buf)
                .map_err(failed)?;
            copied += bs;
            ctx.progress(copied, total);
            Ok(())
        };
        for k in runs.into_iter().flatten() {
            copy(k, total)?;
        }
        // The blocks the guest wrote since their copy began, copied again, now with every
        // guest write mirrored.
        let again = mirror.end_deferral().map_err(failed)?;
        tracing::info!(
            "migrate {}: copying again {} blocks the guest wrote during their copy",
            sw.name,
            again.len()
        );
        total += again.len() as u64 * bs;
        for k in again {
            copy(k, total)?;
        }
        Ok(copied)
    }

    /// After the switch: the backward mirror ended, the disk's bookkeeping moved to the
    /// new pool, and its old device, which finish_switch deletes, emptied first.
    fn end_backward_mirror(
        &self,
        sw: &Switch<'_>,
        d: &Arc<crate::blk::disk::Disk>,
        holds: &mut Vec<std::time::Duration>,
    ) {
        let (src, dst, disk) = (sw.src, sw.dst, sw.disk);
        let t0 = Instant::now();
        let mut gate = d.drain();
        gate.mirror = None;
        drop(gate);
        holds.push(t0.elapsed());
        if let Some(s) = lock(&self.disks).get_mut(sw.name) {
            s.pool = dst.clone();
        }
        // Emptied a block at a time (its deletion in one go held the old pool's metadata,
        // and so the I/O of its other disks, for hundreds of milliseconds). Not needed for
        // correctness: finish_switch (or the next start) deletes it either way.
        if let Err(e) = empty(src, &[disk]) {
            tracing::warn!(
                "migrate {}: emptying thin device {disk} in pool {} before its deletion: {}",
                sw.name,
                src.name,
                e.to_string()
            );
        }
    }

    /// Tells a test where the migration is (see [`MigrateStep`]).
    fn hook(&self, _step: MigrateStep) {
        #[cfg(test)]
        if let Some(h) = lock(&self.migrate_hook).clone() {
            h(_step);
        }
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

/// The blocks (runs of block numbers) of thin device `disk` of `p`, `size` bytes, that
/// may read otherwise than on a copy of `base` (its last snapshot: id and size), or than
/// on an empty device without one: what the migration's background copy moves, once the
/// mirror carries every later change. Taken after the mirror is installed: a block that
/// differed then differs still (a write never maps it back to the snapshot's block; a
/// discard of it was mirrored), so copying what differs now misses nothing.
///
/// With a base of the same external origin (or none on both): the runs of the changed-only
/// delta, and, with an origin, the blocks it reaches past the base's end (a copy stands
/// alone: it holds the origin's bytes only as far as the snapshot went). A base of another
/// origin: every block. Without a base: the blocks the origin reaches, and the mapped ones.
fn blocks_to_copy(
    p: &thinpool::pool::Pool,
    disk: u32,
    base: Option<(u32, u64)>,
    size: u64,
) -> R<Vec<std::ops::Range<u64>>> {
    let bs = p.block_bytes();
    let blocks = size.div_ceil(bs);
    let origin = p.external_origin(disk);
    let origin_blocks = origin.as_ref().map_or(0, |o| o.len().div_ceil(bs));
    let mut found: Vec<std::ops::Range<u64>> = Vec::new();
    match base {
        Some((base, base_size)) => {
            let same_origin = match (&origin, &p.external_origin(base)) {
                (None, None) => true,
                (Some(a), Some(b)) => a.same_as(b),
                _ => false,
            };
            if !same_origin {
                found.push(0..blocks);
            } else {
                let changed = p.with_metadata(|md| {
                    thinpool::delta::runs(
                        md,
                        base,
                        disk,
                        false,
                        thinpool::delta::DeltaMode::ChangedOnly,
                    )
                })?;
                found.extend(changed.iter().map(|r| r.begin..r.begin + r.length));
                found.push(base_size / bs..origin_blocks);
            }
        }
        None => {
            found.push(0..origin_blocks);
            // In windows, so that the guest's I/O gets the pool's metadata in between.
            const WINDOW: u64 = 1 << 16;
            let mut begin = origin_blocks.min(blocks);
            while begin < blocks {
                let end = (begin + WINDOW).min(blocks);
                p.with_metadata(|md| {
                    md.for_each_mapping(disk, begin, end, &mut |vb, _| {
                        found.push(vb..vb + 1);
                        Ok(())
                    })
                })?;
                begin = end;
            }
        }
    }
    // Sorted, within the disk, merged.
    found.sort_by_key(|r| r.start);
    let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
    for r in found {
        let r = r.start..r.end.min(blocks);
        if r.is_empty() {
            continue;
        }
        match runs.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => runs.push(r),
        }
    }
    Ok(runs)
}

/// The switch itself (see its caller): the guest's writes held while the new pool's
/// registry names the disk and the disk is retargeted, mirrored back to the old pool.
fn switch_mirrored(
    sw: &Switch<'_>,
    d: &Arc<crate::blk::disk::Disk>,
    dest: u32,
    mirror: &Mirror,
    holds: &mut Vec<std::time::Duration>,
) -> R<()> {
    let (src, dst, disk) = (sw.src, sw.dst, sw.disk);
    let back = Arc::new(Mirror::new(
        src.pool().clone(),
        disk,
        dst.pool().block_bytes(),
        OnError::FailRequest,
    ));
    let mut tries = 0;
    loop {
        tries += 1;
        // Drained before the new pool's commits are held, not after: a mirrored write in
        // flight that finds that pool's journal full waits for them to be let go. And
        // they are only taken if free: the writes are not held while a commit of that
        // pool under way (the periodic one, a FLUSH) ends; they go on meanwhile, and the
        // switch starts over. Not for ever: a guest that flushes without a pause could
        // keep them taken, and the third try waits for them with the writes held.
        let t0 = Instant::now();
        let mut gate = d.drain();
        let (held, back) = (&mut *holds, &back);
        let switch = move |_: &mut thinpool::catalog::Devices<'_>, reg: &mut Registry| {
            if let Some(why) = mirror.failure() {
                return Err(Error::failed(format!(
                    "mirroring to pool {} failed: {why}",
                    dst.name
                )));
            }
            sw.name_switched(reg, dest)?;
            d.retarget(
                &mut gate,
                dst.pool().clone(),
                dest,
                dst.space.clone(),
                Some(back.clone()),
            );
            drop(gate);
            held.push(t0.elapsed());
            Ok(())
        };
        let switched = if tries < 3 {
            dst.catalog.try_change(switch)
        } else {
            Some(dst.catalog.change(switch))
        };
        match switched {
            Some(r) => return r,
            None => {
                // The gate went with the closure.
                holds.push(t0.elapsed());
                dst.catalog.wait_for_changes();
            }
        }
    }
}

#[cfg(test)]
mod tests;
