//! A pool and its registry, owned together: what every user of a pool (the daemon, the
//! offline commands, a stream receive, a migration) changes them through.
//!
//! [`Catalog::change`] is the one durable-change protocol. Commits are held; the change is
//! applied (the pool's part through [`Devices`], the registry's in memory); the registry is
//! written with the next transaction id; then the pool commits carrying that id (see
//! [`crate::registry`] for what a crash in between leaves). A change that fails at any step
//! leaves nothing behind: the devices it created are deleted again and the registry goes
//! back to what it was, and the devices it deletes are deleted only after the registry no
//! longer names them, so a registry that cannot be written never leaves a pool without a
//! device that the registry still lists, nor a device without its name.
//!
//! The rules a new device's registry entry follows (what a snapshot inherits from its
//! origin, what a received snapshot keeps from its sender) are in [`entries`].

mod devices;
mod entries;
mod origins;

pub use devices::Devices;
pub use entries::SnapshotKind;
pub use origins::AttachFailure;

use crate::pool::{CommitHold, Pool};
use crate::registry::{Registry, RegistryError};
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("commit failed: {0}")]
    Commit(#[from] crate::Error),
    /// The change was refused before anything was done.
    #[error("{0}")]
    Refused(String),
}

pub struct Catalog {
    pool: Arc<Pool>,
    /// Locked for a whole change, and only briefly to read: a daemon's receive or merge
    /// writes data without it, so other commands go on meanwhile.
    registry: Mutex<Registry>,
    /// False for a pool without a registry file (a bare pool, perhaps another tool's): its
    /// registry here is in memory only, and a change commits the pool alone, leaving its
    /// transaction id to whoever owns it.
    registry_file: bool,
    /// Makes the serials this catalog generates differ from other pools'.
    salt: u64,
}

/// The registry, read under its lock. Changes go through [`Catalog::change`].
pub struct RegistryRef<'a>(MutexGuard<'a, Registry>);

impl Deref for RegistryRef<'_> {
    type Target = Registry;
    fn deref(&self) -> &Registry {
        &self.0
    }
}

impl Catalog {
    /// A pool with its registry file (loaded, or new and not written yet).
    pub fn new(pool: Arc<Pool>, registry: Registry, salt: u64) -> Self {
        Catalog {
            pool,
            registry: Mutex::new(registry),
            registry_file: true,
            salt,
        }
    }

    /// A pool without a registry file: names, sizes and the like are not kept.
    pub fn without_registry(pool: Arc<Pool>, salt: u64) -> Self {
        let tid = pool.status().transaction_id;
        Catalog {
            pool,
            registry: Mutex::new(Registry::new("", tid)),
            registry_file: false,
            salt,
        }
    }

    pub fn has_registry_file(&self) -> bool {
        self.registry_file
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn registry(&self) -> RegistryRef<'_> {
        RegistryRef(self.lock_registry())
    }

    /// The registry, for a caller that has done with the pool.
    pub fn into_registry(self) -> Registry {
        self.registry
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Poison-tolerant: a panic in one change (whose registry went back, see `change`) must
    /// not make every later one panic too.
    pub(crate) fn lock_registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change to the pool's devices and the registry, then makes both durable
    /// (see the module doc). `f` may fail at any point: what it did is undone.
    pub fn change<T, E>(
        &self,
        f: impl FnOnce(&mut Devices<'_>, &mut Registry) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<CatalogError>,
    {
        self.change_locked(&mut self.lock_registry(), f)
    }

    /// [`Catalog::change`] with the registry locked by the caller, who decided under the same
    /// lock that a change is needed.
    pub(crate) fn change_locked<T, E>(
        &self,
        reg: &mut Registry,
        f: impl FnOnce(&mut Devices<'_>, &mut Registry) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<CatalogError>,
    {
        // Held from before the pool changes until it commits: a periodic commit or a
        // guest's FLUSH in between would make part of the change durable under the old
        // transaction id, disagreeing with the registry after a crash.
        let hold = self.pool.hold_commits();
        self.change_held(reg, hold, f)
    }

    /// [`Catalog::change`], unless another thread holds the registry (a change, which may
    /// be waiting for a commit) or the pool's commits (a commit under way): then nothing is
    /// done, `f` is dropped uncalled, and None returned. For a caller holding guests' writes
    /// during the change (a migration's switch), which would rather let them go while the
    /// other ends ([`Catalog::wait_for_changes`]), then try again.
    pub fn try_change<T, E>(
        &self,
        f: impl FnOnce(&mut Devices<'_>, &mut Registry) -> Result<T, E>,
    ) -> Option<Result<T, E>>
    where
        E: From<CatalogError>,
    {
        let mut reg = match self.registry.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let hold = self.pool.try_hold_commits()?;
        Some(self.change_held(&mut reg, hold, f))
    }

    /// Waits until the changes and commits under way when called have ended (taking, in
    /// turn, what [`Catalog::try_change`] found taken).
    pub fn wait_for_changes(&self) {
        drop(self.lock_registry());
        drop(self.pool.hold_commits());
    }

    fn change_held<T, E>(
        &self,
        reg: &mut Registry,
        hold: CommitHold<'_>,
        f: impl FnOnce(&mut Devices<'_>, &mut Registry) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<CatalogError>,
    {
        let before = reg.clone();
        let mut devices = Devices::new(&self.pool);
        let r = f(&mut devices, reg).and_then(|v| {
            self.commit(&hold, &mut devices, reg)?;
            Ok(v)
        });
        if r.is_err() {
            devices.undo();
            // After a failed pool commit too: the pool rolled back (or failed), so the
            // registry file is one transaction ahead and the next open goes back to this.
            *reg = before;
            return r;
        }
        // A snapshot the change made may still change where writes in flight when it was
        // made land. They are waited for with commits no longer held: the origin's later
        // writes go on meanwhile and may need a commit (a journal half full), which must
        // not wait for this. What they wrote is then made durable, so that the snapshot
        // the caller is told of does not change, a host crash included.
        drop(hold);
        if devices.settle() {
            self.pool.flush().map_err(CatalogError::from)?;
        }
        r
    }

    /// dm-thin's `set_transaction_id OLD NEW`: the compare-and-swap a volume manager uses
    /// to keep its own metadata in step with the pool's. Refused unless the pool's id is
    /// `old`. The registry carries the id as well, written first (a crash between the two
    /// is undone at the next open, as for any change).
    pub fn set_transaction_id(&self, old: u64, new: u64) -> Result<(), CatalogError> {
        let mut reg = self.lock_registry();
        let hold = self.pool.hold_commits();
        let current = self.pool.status().transaction_id;
        if current != old {
            return Err(CatalogError::Refused(format!(
                "the pool's transaction id is {current}, not {old}"
            )));
        }
        if self.registry_file {
            let before = reg.clone();
            reg.transaction_id = new;
            if let Err(e) = reg.save() {
                *reg = before;
                return Err(e.into());
            }
        }
        self.pool.set_transaction_id(old, new)?;
        hold.commit()?;
        Ok(())
    }

    fn commit(
        &self,
        hold: &CommitHold<'_>,
        devices: &mut Devices<'_>,
        reg: &mut Registry,
    ) -> Result<(), CatalogError> {
        if !self.registry_file {
            devices.apply_deferred()?;
            hold.commit()?;
            return Ok(());
        }
        let old = self.pool.status().transaction_id;
        let next = old.checked_add(1).ok_or_else(|| {
            crate::Error::InvalidArgument("the pool's transaction id is at its maximum".into())
        })?;
        reg.transaction_id = next;
        reg.save()?;
        devices.apply_deferred()?;
        self.pool.set_transaction_id(old, next)?;
        hold.commit()?;
        Ok(())
    }
}

/// Seconds since the epoch: a new device's creation time.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
