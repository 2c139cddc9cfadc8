//! The pool's part of a change ([`super::Catalog::change`]), kept so that a change that
//! fails can be taken back.
//!
//! A device made by the change is made at once (the change names it, and may snapshot it)
//! and deleted again if the change fails. A device the change deletes is deleted only after
//! the registry was written without it: a delete cannot be taken back (its blocks are
//! freed), so until the registry no longer names the device, the device stays.

use crate::origin::ExternalOrigin;
use crate::pool::{EarlierWrites, Pool};
use crate::registry::Registry;
use crate::{Error, Result};
use std::sync::Arc;
use std::time::Duration;

pub struct Devices<'a> {
    pool: &'a Pool,
    /// Made by this change: deleted again if it fails.
    created: Vec<u32>,
    /// External origins as they were before this change replaced them or deleted their
    /// device, to put back if it fails.
    origins_before: Vec<(u32, Option<Arc<ExternalOrigin>>)>,
    /// Done once the registry is written, in order.
    deferred: Vec<Deferred>,
    /// Writes in flight when a snapshot of this change was made, waited for once the
    /// change is durable (see [`super::Catalog::change`]).
    unsettled: Vec<EarlierWrites>,
}

#[derive(Clone, Copy)]
enum Deferred {
    Delete(u32),
    /// The device's contents become a snapshot of another's (same thin id).
    Replace {
        id: u32,
        snapshot_of: u32,
    },
}

impl<'a> Devices<'a> {
    pub(super) fn new(pool: &'a Pool) -> Self {
        Devices {
            pool,
            created: Vec::new(),
            origins_before: Vec::new(),
            deferred: Vec::new(),
            unsettled: Vec::new(),
        }
    }

    /// The thin ids in the pool.
    pub fn ids(&self) -> Vec<u32> {
        self.pool.devices().iter().map(|(id, _)| *id).collect()
    }

    /// A thin id that neither the pool nor the registry uses.
    pub fn next_id(&self, reg: &Registry) -> u32 {
        reg.next_id(&self.ids())
    }

    pub fn create_thin(&mut self, id: u32) -> Result<()> {
        self.pool.create_thin(id)?;
        self.created.push(id);
        Ok(())
    }

    /// A snapshot of `origin`, crash-consistent; it shares the origin's external origin
    /// (see [`Pool::create_snap`]). Returns how long it took in memory, the longest any
    /// block lookup of the pool waited for it. The change settles it before it returns.
    pub fn create_snap(&mut self, id: u32, origin: u32) -> Result<Duration> {
        let made = self.pool.create_snap(id, origin)?;
        self.created.push(id);
        self.unsettled.extend(made.in_flight);
        Ok(made.in_memory)
    }

    pub fn set_external_origin(
        &mut self,
        id: u32,
        origin: Option<Arc<ExternalOrigin>>,
    ) -> Result<()> {
        let before = self.pool.external_origin(id);
        self.pool.set_external_origin(id, origin)?;
        if !self.created.contains(&id) {
            self.origins_before.push((id, before));
        }
        Ok(())
    }

    /// Deletes device `id` once the registry is written (see the module doc). Fails now if
    /// there is no such device.
    pub fn delete(&mut self, id: u32) -> Result<()> {
        self.pool.device(id)?;
        self.deferred.push(Deferred::Delete(id));
        Ok(())
    }

    /// Makes device `id` a snapshot of `snapshot_of`, keeping its thin id, once the
    /// registry is written (its old contents are deleted).
    pub fn replace_with_snapshot(&mut self, id: u32, snapshot_of: u32) -> Result<()> {
        // The device would be deleted, then snapshotted from nothing: gone.
        if id == snapshot_of {
            return Err(Error::InvalidArgument(format!(
                "thin device {id} cannot be replaced with a snapshot of itself"
            )));
        }
        self.pool.device(id)?;
        self.pool.device(snapshot_of)?;
        self.deferred.push(Deferred::Replace { id, snapshot_of });
        Ok(())
    }

    pub(super) fn apply_deferred(&mut self) -> Result<()> {
        for d in std::mem::take(&mut self.deferred) {
            let (Deferred::Delete(id) | Deferred::Replace { id, .. }) = d;
            if !self.created.contains(&id) {
                self.origins_before
                    .push((id, self.pool.external_origin(id)));
            }
            self.pool.delete(id)?;
            self.created.retain(|&c| c != id);
            if let Deferred::Replace { id, snapshot_of } = d {
                let made = self.pool.create_snap(id, snapshot_of)?;
                self.unsettled.extend(made.in_flight);
            }
        }
        Ok(())
    }

    /// Waits for the writes in flight when the change's snapshots were made; true if there
    /// were any (what they wrote is not durable yet).
    pub(super) fn settle(&mut self) -> bool {
        let any = !self.unsettled.is_empty();
        for w in self.unsettled.drain(..) {
            w.wait();
        }
        any
    }

    /// Takes back what was done, as far as it can: after a failed pool commit the pool has
    /// rolled back (or failed) anyway.
    pub(super) fn undo(self) {
        for id in self.created.iter().rev() {
            // Gone already when a rollback took it.
            if self.pool.device(*id).is_err() {
                continue;
            }
            if let Err(e) = self.pool.delete(*id) {
                tracing::warn!("cannot delete thin device {id}, made by a change that failed: {e}");
            }
        }
        for (id, origin) in self.origins_before.into_iter().rev() {
            // A device that a rollback brought back gets its origin again; one that is
            // gone has nothing to restore.
            let _ = self.pool.set_external_origin(id, origin);
        }
    }
}
