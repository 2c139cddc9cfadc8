//! `origin-merge`: writes a snapshot's provisioned blocks into its external origin, as a
//! job: the tested clone becomes the new golden image.
//!
//! Only a snapshot is merged (it does not change while it is written out). The origin is
//! rewritten in place, so every device that reads it where it is unprovisioned sees new
//! bytes there: the merge is refused while any of them is connected to a guest, and, unless
//! `force`, while devices other than the snapshot's own ancestry (the disk it was taken of,
//! that disk's origin, …) read the same image.
//!
//! Crash safety (see `thinpool::merge`): the origin is synced at each checkpoint and the
//! checkpoint recorded in the snapshot's registry entry (`merge_offset`). After a crash or a
//! cancel the origin holds the snapshot's bytes below that offset and old or new bytes
//! above it; `origin-merge` of the same snapshot goes on from there, and
//! query-snapshots shows `merge-interrupted-at` meanwhile.

use super::error::Error;
use super::results::JobStarted;
use super::{lock, Manager, R};
use serde_json::json;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use thinpool::merge::{merge_into_origin, MergeOptions};

/// While a merge rewrites an image: the served disks reading it refuse new guests, and no
/// new disk may read it. Undone when dropped (the job ends, or the command fails).
struct Closed {
    disks: Vec<Arc<crate::blk::disk::Disk>>,
    path: String,
    merging: Arc<Manager>,
}

impl Closed {
    fn new(m: &Arc<Manager>, readers: &BTreeSet<String>, path: &str) -> Closed {
        lock(&m.merging).insert(path.to_string());
        let disks: Vec<_> = lock(&m.disks)
            .iter()
            .filter(|(n, _)| readers.contains(*n))
            .map(|(_, s)| s.disk.clone())
            .collect();
        for d in &disks {
            d.refuse_connections.store(true, Ordering::SeqCst);
        }
        Closed {
            disks,
            path: path.to_string(),
            merging: m.clone(),
        }
    }
}

impl Drop for Closed {
    fn drop(&mut self) {
        for d in &self.disks {
            d.refuse_connections.store(false, Ordering::SeqCst);
        }
        lock(&self.merging.merging).remove(&self.path);
    }
}

impl Manager {
    pub fn origin_merge(
        self: &Arc<Self>,
        job_id: Option<String>,
        snapshot: &str,
        force: bool,
    ) -> R<JobStarted> {
        let _op = lock(&self.op);
        let f = self.find(snapshot)?;
        if !f.entry.snapshot {
            return Err(Error::failed(format!(
                "'{snapshot}' is a disk: merge a snapshot of it (it must not change while it is written out); take one with snapshot-create"
            )));
        }
        let path = f.entry.external_origin.clone().ok_or_else(|| {
            Error::failed(format!("'{snapshot}' has no external origin to merge into"))
        })?;
        // Written in place: only where clients may write (an origin recorded before the
        // operator narrowed the directories, or by the offline CLI, may lie elsewhere).
        self.confinement
            .existing("external origin", std::path::Path::new(&path))?;
        // The snapshot's ancestry: what it was taken of, and so on up.
        let ancestry: BTreeSet<u32> = {
            let reg = f.pool.registry();
            let mut set = BTreeSet::new();
            let mut o = f.entry.origin;
            while let Some(id) = o {
                if !set.insert(id) {
                    break;
                }
                o = reg.devices.get(&id).and_then(|e| e.origin);
            }
            set
        };
        // Who reads the image: the snapshot's ancestry, and the others.
        let mut readers = BTreeSet::new();
        let mut others = Vec::new();
        for p in self.pools.values() {
            let reg = p.registry();
            for (id, e) in &reg.devices {
                if e.external_origin.as_deref() != Some(path.as_str()) {
                    continue;
                }
                let name = e.name.clone().unwrap_or_else(|| format!("#{id}"));
                let own = p.name == f.pool.name && (*id == f.id || ancestry.contains(id));
                if !own {
                    others.push(name.clone());
                }
                readers.insert(name);
            }
        }
        // Closed to new guests first, then checked for connected ones: a guest connecting
        // in between is either refused or seen.
        let closed = Closed::new(self, &readers, &path);
        let in_use: Vec<String> = lock(&self.disks)
            .iter()
            .filter(|(n, s)| readers.contains(*n) && s.disk.connected.load(Ordering::SeqCst))
            .map(|(n, _)| n.clone())
            .collect();
        if !in_use.is_empty() {
            return Err(Error::failed(format!(
                "{path} is read by disks connected to guests ({}): their unprovisioned blocks would change under them; disconnect them first",
                in_use.join(", ")
            )));
        }
        if !others.is_empty() && !force {
            return Err(Error::failed(format!(
                "{path} is also the external origin of {}: what they read where unprovisioned would change; delete them, or pass force",
                others.join(", ")
            )));
        }
        let pins = self.pin(&f.pool, &[f.id], "merge")?;
        let start = f.entry.merge_offset.unwrap_or(0);
        let description = format!(
            "merge {snapshot} into {path}{}",
            if start > 0 {
                format!(" (from byte {start})")
            } else {
                String::new()
            }
        );
        let me = self.clone();
        let (ph, id, size) = (f.pool.clone(), f.id, f.entry.size);
        let job = self.jobs.start(job_id, "merge", description, move |ctx| {
            let _pins = pins;
            let _closed = closed;
            let record = |offset: Option<u64>| {
                ph.change(|_, reg| {
                    if let Some(e) = reg.devices.get_mut(&id) {
                        e.merge_offset = offset;
                    }
                    Ok(())
                })
            };
            // Recorded first: from here the origin may hold a mix.
            record(Some(start))?;
            let opts = MergeOptions {
                start_offset: start,
                ..Default::default()
            };
            let outcome = merge_into_origin(ph.pool(), id, size, Path::new(&path), &opts, &mut |next, total| {
                ctx.progress(next, total);
                if let Err(e) = record(Some(next)) {
                    tracing::warn!("merge of {id}: cannot record the checkpoint at {next}: {}", e.to_string());
                }
                !ctx.cancelled()
            })
            .map_err(|e| Error::failed(format!("merging into {path}: {e}")))?;
            if !outcome.complete {
                return Err(Error::failed(format!(
                    "stopped at byte {}: {path} holds the snapshot's bytes below it; origin-merge again goes on from there",
                    outcome.next_offset
                )));
            }
            record(None)?;
            // The image may have grown (extended to the snapshot's size): attach it anew.
            for p in me.pools.values() {
                for fail in p.catalog.attach_origins() {
                    tracing::warn!("after the merge: external origin {}: {fail}", fail.path);
                }
            }
            Ok(json!({
                "origin": path,
                "bytes-written": outcome.bytes_written,
                "affected": others,
            }))
        })?;
        Ok(JobStarted {
            job_id: job.id.clone(),
        })
    }
}
