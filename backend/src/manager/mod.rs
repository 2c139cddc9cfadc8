//! The running daemon's state: pools, the disks it serves, and every management operation.
//!
//! Each state change (disk added, snapshot, delete, resize, …) is durable when the call
//! returns: the registry is written first with the next transaction id, then the pool is
//! committed carrying the same id (see `thinpool::registry`), so a crash in between leaves
//! the registry one transaction ahead, and the next start goes back to the old state.

pub mod confine;
pub mod device_state;
pub mod error;
pub mod jobs;
pub mod merge;
pub mod migrate;
mod monitor;
mod pace;
pub mod pool_settings;
pub mod replication;
pub mod results;
pub mod transfer;

use crate::blk::disk::{Disk, DiskOptions, OutOfSpace, SpacePolicy};
use crate::blk::serve::{self, ConnectionEvent, Serving};
use crate::events::{Event, EventBus};
use crate::socket::SocketFile;
use crate::sync::lock;
use device_state::{DaemonFields, DeviceState, Migration};
pub use error::Error;
use monitor::effective_mode;
use pool_settings::PoolSettings;
use results::{
    DeltaPage, DeviceInfo, DiskAdded, DiskResized, Done, LowWater, MetadataSnap, Policy, PoolGrown,
    PoolInfo, ServingInfo, SnapshotCreated, SnapshotDeleted, TransactionId,
};
use std::collections::BTreeMap;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thinpool::catalog::{Catalog, Devices, RegistryRef, SnapshotKind};
use thinpool::delta::{DeltaMode, DeltaRun};
use thinpool::origin::ExternalOrigin;
use thinpool::pool::Pool;
use thinpool::registry::{DeviceEntry, Registry};
use vmm_config::limits;

type R<T> = Result<T, Error>;

/// A pool the daemon serves from.
pub struct PoolHandle {
    pub name: String,
    /// The pool and its registry: every change to them goes through it.
    pub catalog: Catalog,
    pub space: Arc<SpacePolicy>,
    /// Low-water marks in percent: data, metadata.
    pub low_water: Mutex<(u8, u8)>,
    /// Whether its disks offer DISCARD to guests (configuration `discard: unmap`).
    pub discard: bool,
    /// Where `pool-set-policy` keeps what it sets, for the next start (see
    /// `pool_settings`); None: not kept (a metadata block device).
    pub settings_path: Option<PathBuf>,
}

impl PoolHandle {
    pub fn new(name: &str, catalog: Catalog) -> Self {
        PoolHandle {
            name: name.to_string(),
            catalog,
            space: Arc::new(SpacePolicy::default()),
            low_water: Mutex::new((80, 80)),
            discard: true,
            settings_path: None,
        }
    }

    /// Applies the settings an operator set at run time before the last stop, if any
    /// (they win over the configured ones, as a disk grown at run time keeps its size).
    /// Returns a line for the log when there were some.
    pub fn restore_settings(&self) -> Result<Option<String>, String> {
        let Some(path) = &self.settings_path else {
            return Ok(None);
        };
        let Some(saved) = pool_settings::load(path)? else {
            return Ok(None);
        };
        let configured = PoolSettings::new(self.space.policy(), *lock(&self.low_water));
        if saved == configured {
            return Ok(None);
        }
        self.space.set_mode(saved.mode());
        *lock(&self.low_water) = saved.low_water();
        Ok(Some(format!(
            "pool {}: out-of-space policy and low-water marks as set at run time ({}), not as configured",
            self.name,
            path.display()
        )))
    }

    pub fn pool(&self) -> &Arc<Pool> {
        self.catalog.pool()
    }

    pub fn registry(&self) -> RegistryRef<'_> {
        self.catalog.registry()
    }

    /// Deletes devices and their registry entries in one durable change (an entry whose
    /// device the pool no longer has goes too), and wakes writes held for space.
    /// Deletes devices and their entries; returns the names of the devices made from them
    /// that stay (which keep the deleted one's name as their origin).
    pub(crate) fn delete_devices(&self, ids: &[u32]) -> R<Vec<String>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let dependents = self.change(|devices, reg| {
            let present = devices.ids();
            let mut dependents = Vec::new();
            for id in ids {
                if present.contains(id) {
                    devices.delete(*id)?;
                }
                if let Some((_, d)) = reg.remove(*id) {
                    dependents.extend(d);
                }
            }
            dependents.retain(|n| reg.find(n).is_some());
            Ok(dependents)
        })?;
        self.space.space_changed();
        Ok(dependents)
    }

    /// Applies a change to the pool and the registry, then makes both durable, or, if
    /// anything fails, leaves both as they were (see `thinpool::catalog`).
    fn change<T>(&self, f: impl FnOnce(&mut Devices<'_>, &mut Registry) -> R<T>) -> R<T> {
        self.catalog.change(f)
    }
}

/// A disk being served, as [`Manager::served_disks`] describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedDisk {
    pub name: String,
    /// Bytes, as the guest sees it now.
    pub size: u64,
    pub socket: PathBuf,
    pub num_queues: usize,
}

/// A disk being served.
pub struct Served {
    pub disk: Arc<Disk>,
    pub pool: Arc<PoolHandle>,
    /// Resolved (see `crate::socket::resolve`).
    pub socket: PathBuf,
    /// The socket file made for it: removed when it stops being served, if still there.
    socket_file: SocketFile,
    serving: Option<Serving>,
}

pub struct Manager {
    pub pools: BTreeMap<String, Arc<PoolHandle>>,
    disks: Mutex<BTreeMap<String, Served>>,
    pub events: EventBus,
    /// One management operation at a time.
    op: Mutex<()>,
    /// Where sockets of disks added without a socket path go. A dead socket found there
    /// (left by a run that crashed) is replaced; elsewhere only at a path the operator
    /// configured at start.
    pub socket_dir: PathBuf,
    /// Who may connect to the disks' sockets (configuration `disk-sockets`).
    pub socket_access: crate::socket::Access,
    /// The management socket's path, resolved: no disk may take it.
    management_socket: Mutex<Option<PathBuf>>,
    /// What management clients may reach beyond the pools (files, programs).
    pub confinement: confine::Confinement,
    pub jobs: jobs::Jobs,
    /// Devices a job reads or writes: (pool, thin id) → the job's kind. They cannot be
    /// deleted or reverted until it ends.
    pins: Arc<Mutex<BTreeMap<(String, u32), &'static str>>>,
    /// Replication threads by disk name.
    replicators: Mutex<BTreeMap<String, replication::Replicator>>,
    /// External origins (paths) an origin-merge is rewriting: no new disk may read them.
    merging: Mutex<std::collections::BTreeSet<String>>,
    /// One replication-start or -stop at a time (they wait for a round under way, which
    /// may need `op`, so they cannot take `op` itself).
    replication_op: Mutex<()>,
    /// Called at each step of a migration's end, for tests to act there (see
    /// `migrate::MigrateStep`).
    #[cfg(test)]
    migrate_hook: Mutex<Option<MigrateHook>>,
}

#[cfg(test)]
type MigrateHook = Arc<dyn Fn(migrate::MigrateStep) + Send + Sync>;

/// Devices pinned for a job; unpinned when dropped.
pub struct Pins {
    keys: Vec<(String, u32)>,
    table: Arc<Mutex<BTreeMap<(String, u32), &'static str>>>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut t = lock(&self.table);
        for k in &self.keys {
            t.remove(k);
        }
    }
}

/// A disk to create, as disk-add or the configuration describes it.
#[derive(Clone, Debug, Default)]
pub struct NewDisk<'a> {
    pub name: &'a str,
    /// None: the only pool (or the origin's, for a clone).
    pub pool: Option<&'a str>,
    /// None: the origin's size (a clone); required otherwise.
    pub size: Option<u64>,
    /// Create the disk as a clone (snapshot) of this disk or snapshot.
    pub clone_from: Option<&'a str>,
    pub read_only: bool,
    /// None: generated.
    pub serial: Option<String>,
    /// A read-only image (raw file or block device) that the disk's unprovisioned blocks
    /// read from, as dm-thin's external origin; None for a clone (which inherits its
    /// origin's).
    pub external_origin: Option<&'a str>,
}

/// A new disk, checked: where it goes and how big it is.
struct DiskPlan {
    pool: Arc<PoolHandle>,
    origin: Option<u32>,
    size: u64,
    /// The external origin: its path as given, opened. (A clone reads its origin's.)
    external: Option<(String, Arc<ExternalOrigin>)>,
}

/// A disk's socket, bound before the disk is served.
struct Bound {
    socket: PathBuf,
    listener: UnixListener,
    file: SocketFile,
}

/// Where a disk's socket path came from, which decides whether a dead socket found there
/// may be replaced (see [`crate::socket::Stale`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketOrigin {
    /// The operator's: the configuration or the command line at start.
    Operator,
    /// A management client's (`disk-add`): a dead socket is replaced only in the socket
    /// directory.
    Client,
}

/// Where a registry name points.
struct Found {
    pool: Arc<PoolHandle>,
    id: u32,
    entry: DeviceEntry,
}

impl Manager {
    /// A manager whose disks' sockets are the daemon's user's alone and whose clients may
    /// use files in the socket directory only, and run no program.
    pub fn new(pools: Vec<Arc<PoolHandle>>, socket_dir: PathBuf) -> Arc<Self> {
        let confinement = confine::Confinement::new([socket_dir.clone()], false);
        Self::with_limits(
            pools,
            socket_dir,
            crate::socket::Access::default(),
            confinement,
        )
    }

    /// [`Manager::new`] with the access the disks' sockets get and what clients may reach.
    pub fn with_limits(
        pools: Vec<Arc<PoolHandle>>,
        socket_dir: PathBuf,
        socket_access: crate::socket::Access,
        confinement: confine::Confinement,
    ) -> Arc<Self> {
        let events = EventBus::default();
        Arc::new(Manager {
            pools: pools.into_iter().map(|p| (p.name.clone(), p)).collect(),
            disks: Mutex::new(BTreeMap::new()),
            jobs: jobs::Jobs::new(events.clone()),
            events,
            op: Mutex::new(()),
            socket_dir,
            socket_access,
            management_socket: Mutex::new(None),
            confinement,
            pins: Arc::default(),
            replicators: Mutex::default(),
            replication_op: Mutex::default(),
            merging: Mutex::default(),
            #[cfg(test)]
            migrate_hook: Mutex::default(),
        })
    }

    /// Pins devices of `pool` for a job of kind `kind`; refused if one is pinned already.
    fn pin(&self, pool: &PoolHandle, ids: &[u32], kind: &'static str) -> R<Pins> {
        let mut t = lock(&self.pins);
        for id in ids {
            if let Some(other) = t.get(&(pool.name.clone(), *id)) {
                return Err(Error::failed(format!(
                    "thin device {id} of pool {} is in use by a {other} job",
                    pool.name
                )));
            }
        }
        let keys: Vec<(String, u32)> = ids.iter().map(|id| (pool.name.clone(), *id)).collect();
        for k in &keys {
            t.insert(k.clone(), kind);
        }
        Ok(Pins {
            keys,
            table: self.pins.clone(),
        })
    }

    /// At start, before anything is served: a crash during a disk-migrate is finished or
    /// undone, half-received snapshots are dropped, and replication schedules resume.
    pub fn recover_at_start(self: &Arc<Self>) -> anyhow::Result<()> {
        let recovered = self
            .recover_migrations()
            .and_then(|mut v| {
                v.extend(self.drop_abandoned_receives()?);
                Ok(v)
            })
            .map_err(|e| {
                anyhow::anyhow!("recovering interrupted migrations and receives: {}", e)
            })?;
        for line in recovered {
            tracing::warn!("{line}");
            eprintln!("{line}");
        }
        self.resume_replication();
        Ok(())
    }

    /// At start: deletes what receives that were not resumable left when the daemon died
    /// in the middle (a device marked `receiving`, never a snapshot); resumable ones stay,
    /// to be resumed or dropped by their token. Returns what it did, for the log.
    pub fn drop_abandoned_receives(&self) -> R<Vec<String>> {
        let mut done = Vec::new();
        for p in self.pools.values() {
            let left: Vec<(u32, String)> = p
                .registry()
                .devices
                .iter()
                .filter_map(|(&id, e)| {
                    let r = e.receiving.as_ref()?;
                    (!r.resumable && e.migration().is_none()).then(|| (id, r.name.clone()))
                })
                .collect();
            if left.is_empty() {
                continue;
            }
            p.delete_devices(&left.iter().map(|(id, _)| *id).collect::<Vec<_>>())?;
            for (id, name) in left {
                done.push(format!(
                    "pool {}: deleted the unfinished receive of {name} (thin device {id}), cut short by the last stop",
                    p.name
                ));
            }
        }
        Ok(done)
    }

    /// Refuses to delete or change a device that a job is using.
    fn check_unpinned(&self, f: &Found, name: &str) -> R<()> {
        self.refuse_pinned(f, name, |_| true)
    }

    /// Refuses `name` (found as `f`) if a job whose kind `refused` names has pinned it.
    fn refuse_pinned(&self, f: &Found, name: &str, refused: impl Fn(&str) -> bool) -> R<()> {
        match lock(&self.pins).get(&(f.pool.name.clone(), f.id)) {
            Some(kind) if refused(kind) => Err(Error::failed(format!(
                "'{name}' is in use by a {kind} job: wait for it or cancel it (job-cancel)"
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses, for a device of a disk being migrated, what other jobs' devices allow:
    /// a clone of it (it would be made in the pool the disk is leaving, and outlive its
    /// origin there) or a change of the disk's replication (its entry is rewritten at the
    /// switch). A snapshot being sent may be cloned.
    fn check_not_migrating(&self, f: &Found, name: &str) -> R<()> {
        self.refuse_pinned(f, name, |kind| kind == "migrate")
    }

    fn pool(&self, name: Option<&str>) -> R<Arc<PoolHandle>> {
        match name {
            Some(n) => self
                .pools
                .get(n)
                .cloned()
                .ok_or_else(|| Error::not_found(format!("no pool named '{n}'"))),
            None => match (self.pools.len(), self.pools.values().next()) {
                (1, Some(p)) => Ok(p.clone()),
                _ => Err(Error::failed("several pools: say which with 'pool'")),
            },
        }
    }

    /// The disk or snapshot a name means: the device of that name in any pool, else
    /// (`disk@snap`) the flat-named snapshot `snap` taken of `disk`.
    fn find(&self, name: &str) -> R<Found> {
        self.find_how(name, true)
    }

    /// The device of exactly this name (names the daemon made itself, such as a replication
    /// round's base, must not be taken for another snapshot that `disk@snap` resolves to).
    fn find_exact(&self, name: &str) -> R<Found> {
        self.find_how(name, false)
    }

    fn find_how(&self, name: &str, or_resolved: bool) -> R<Found> {
        let exact = |reg: &Registry| reg.find(name);
        let resolved = |reg: &Registry| reg.resolve(name).filter(|_| or_resolved);
        for how in [&exact as &dyn Fn(&Registry) -> Option<u32>, &resolved] {
            for p in self.pools.values() {
                let reg = p.registry();
                let found = how(&reg).and_then(|id| Some((id, reg.devices.get(&id)?.clone())));
                drop(reg);
                if let Some((id, entry)) = found {
                    // (The registry let go first: the job table is not locked under it.)
                    // A migration's helper snapshots and its copies not yet switched to
                    // are the job's own while it runs: no management call reaches them by
                    // name. What a failed one could not delete may be removed by hand.
                    if let Some(Migration::Incoming { job } | Migration::Outgoing { job }) =
                        entry.migration().filter(|m| self.job_running(m.job()))
                    {
                        return Err(Error::failed(format!(
                            "'{name}' is part of migration job {job}, not a disk or snapshot of its own"
                        )));
                    }
                    return Ok(Found {
                        pool: p.clone(),
                        id,
                        entry,
                    });
                }
            }
        }
        Err(Error::not_found(format!(
            "no disk or snapshot named '{name}'"
        )))
    }

    fn job_running(&self, id: &str) -> bool {
        self.jobs.get(id).is_ok_and(|j| {
            !matches!(
                j.status(),
                jobs::JobStatus::Concluded | jobs::JobStatus::Null
            )
        })
    }

    /// The registry entry of a disk or snapshot.
    pub fn entry(&self, name: &str) -> Option<DeviceEntry> {
        self.find(name).ok().map(|f| f.entry)
    }

    /// The disks being served, by name: what a person attaching a VM needs of each.
    pub fn served_disks(&self) -> Vec<ServedDisk> {
        lock(&self.disks)
            .iter()
            .map(|(name, s)| ServedDisk {
                name: name.clone(),
                size: s.disk.size(),
                socket: s.socket.clone(),
                num_queues: s.disk.num_queues,
            })
            .collect()
    }

    /// Names of every disk (not snapshot) in the registries.
    pub fn disk_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in self.pools.values() {
            let reg = p.registry();
            out.extend(
                reg.devices
                    .values()
                    .filter(|e| !e.snapshot)
                    .filter_map(|e| e.name.clone()),
            );
        }
        out
    }

    /// Whether a device has the name, or will (a receive under way), or `disk@snap`
    /// already means disk's flat-named snapshot `snap`.
    fn name_taken(&self, name: &str) -> bool {
        self.pools.values().any(|p| {
            let reg = p.registry();
            reg.holder_of(name).is_some() || reg.resolve(name).is_some()
        })
    }

    fn name_free(&self, name: &str) -> R<()> {
        // The management socket checks names as it reads them; names made here (a
        // replica's `<prefix>@r<seq>`) and the configuration's come this way too.
        limits::check_name(name).map_err(|why| {
            Error::failed(format!(
                "{name:?} is not a valid name: {why}; a name is {}",
                limits::NAME_RULE
            ))
        })?;
        if self.name_taken(name) {
            return Err(Error::failed(format!(
                "the name '{name}' is already in use"
            )));
        }
        Ok(())
    }

    // ----- serving -----

    /// Starts serving a registered disk on `socket` (the operator's, at start).
    pub fn serve(
        self: &Arc<Self>,
        name: &str,
        socket: Option<PathBuf>,
        num_queues: Option<usize>,
        queue_size: Option<usize>,
    ) -> R<PathBuf> {
        let _op = lock(&self.op);
        let f = self.find(name)?;
        // Not given (a disk added at run time, served again after a restart): as it was
        // asked for when it was added.
        let kept = DeviceState::of(&f.entry);
        let queues = queue_options(
            num_queues.or(kept.num_queues),
            queue_size.or(kept.queue_size),
        )?;
        let bound = self.bind(name, socket, SocketOrigin::Operator)?;
        self.start_serving(name, &f, bound, queues)
    }

    /// Keeps `path` for the management socket: no disk may be served on it. Returns it
    /// resolved; refused if a disk is served there already.
    pub fn reserve_management_socket(&self, path: &Path) -> anyhow::Result<PathBuf> {
        let resolved = crate::socket::resolve(path)
            .map_err(|e| anyhow::anyhow!("management socket {}: {e}", path.display()))?;
        if let Some(s) = lock(&self.disks).values().find(|s| s.socket == resolved) {
            anyhow::bail!(
                "management socket {}: disk '{}' is served there",
                path.display(),
                s.disk.name
            );
        }
        *lock(&self.management_socket) = Some(resolved.clone());
        Ok(resolved)
    }

    /// Checks that `name` may be served on `socket` (default: in the socket directory)
    /// and binds it: everything about serving that can fail for a reason of the caller's,
    /// done before a disk-add commits anything.
    fn bind(&self, name: &str, socket: Option<PathBuf>, origin: SocketOrigin) -> R<Bound> {
        let given = socket.unwrap_or_else(|| self.socket_dir.join(format!("{name}.sock")));
        let refused =
            |why: String| Error::failed(format!("cannot listen on {}: {why}", given.display()));
        let socket = crate::socket::resolve(&given).map_err(|e| refused(e.to_string()))?;
        {
            let disks = lock(&self.disks);
            if disks.contains_key(name) {
                return Err(Error::failed(format!("disk '{name}' is already served")));
            }
            if let Some(s) = disks.values().find(|s| s.socket == socket) {
                return Err(refused(format!("it is in use by disk '{}'", s.disk.name)));
            }
        }
        if lock(&self.management_socket).as_ref() == Some(&socket) {
            return Err(refused("it is the management socket".into()));
        }
        let in_socket_dir = std::fs::canonicalize(&self.socket_dir)
            .is_ok_and(|d| socket.parent() == Some(d.as_path()));
        let stale = if origin == SocketOrigin::Operator || in_socket_dir {
            crate::socket::Stale::Replace
        } else {
            crate::socket::Stale::Refuse
        };
        let l = crate::socket::listen(&socket, self.socket_access, stale)
            .map_err(|e| refused(e.to_string()))?;
        Ok(Bound {
            file: l.file(),
            socket: l.path,
            listener: l.listener,
        })
    }

    /// Serves the registered disk `f` (named `name`) on a socket bound by [`Self::bind`].
    /// On failure the socket file is removed.
    fn start_serving(
        self: &Arc<Self>,
        name: &str,
        f: &Found,
        bound: Bound,
        queues: (usize, usize),
    ) -> R<PathBuf> {
        let Bound {
            socket,
            listener,
            file,
        } = bound;
        let r = self.spawn_server(name, f, &file, listener, queues);
        if r.is_err() {
            file.remove();
        }
        r.map(|()| socket)
    }

    fn spawn_server(
        self: &Arc<Self>,
        name: &str,
        f: &Found,
        socket: &SocketFile,
        listener: UnixListener,
        (num_queues, queue_size): (usize, usize),
    ) -> R<()> {
        if f.entry.snapshot {
            return Err(Error::failed(format!(
                "'{name}' is a snapshot: clone it with disk-add to serve it"
            )));
        }
        if f.entry.size == 0 {
            return Err(Error::failed(format!(
                "disk '{name}' has no size in the registry"
            )));
        }
        let disk = Arc::new(Disk::with_policy(
            f.pool.pool().clone(),
            DiskOptions {
                name: name.to_string(),
                thin_id: f.id,
                size: f.entry.size,
                read_only: f.entry.read_only,
                serial: f.entry.serial.clone(),
                num_queues,
                queue_size,
                discard: f.pool.discard,
            },
            f.pool.space.clone(),
        ));
        let events = Arc::downgrade(self);
        let serving = serve::start(
            disk.clone(),
            listener,
            socket.path.clone(),
            move |disk, ev| {
                let Some(m) = events.upgrade() else { return };
                match ev {
                    ConnectionEvent::Connected => m.events.emit(Event::DiskConnected {
                        disk: disk.name.clone(),
                    }),
                    ConnectionEvent::Disconnected { committed } => {
                        m.events.emit(Event::DiskDisconnected {
                            disk: disk.name.clone(),
                            committed,
                        })
                    }
                }
            },
        )
        .map_err(|e| Error::failed(format!("cannot serve '{name}': {e}")))?;
        tracing::info!(
            "{name}: serving thin device {} on {}",
            f.id,
            socket.path.display()
        );
        lock(&self.disks).insert(
            name.to_string(),
            Served {
                disk,
                pool: f.pool.clone(),
                socket: socket.path.clone(),
                socket_file: socket.clone(),
                serving: Some(serving),
            },
        );
        Ok(())
    }

    /// Stops serving a disk (the guest is disconnected).
    fn unserve(&self, name: &str) -> R<Served> {
        let mut s = lock(&self.disks)
            .remove(name)
            .ok_or_else(|| Error::not_found(format!("disk '{name}' is not served")))?;
        if let Some(serving) = s.serving.take() {
            serving.stop();
        }
        s.socket_file.remove();
        Ok(s)
    }

    pub fn served(&self) -> Vec<(Arc<Disk>, PathBuf)> {
        lock(&self.disks)
            .values()
            .map(|s| (s.disk.clone(), s.socket.clone()))
            .collect()
    }

    fn served_socket_files(&self) -> Vec<SocketFile> {
        lock(&self.disks)
            .values()
            .map(|s| s.socket_file.clone())
            .collect()
    }

    /// Drains every disk's requests, commits every pool (SIGTERM). The disks stay drained:
    /// the process is to exit next, and no request may run after the final commit.
    pub fn shutdown(&self) -> anyhow::Result<()> {
        // Replication and jobs first: each job undoes its unfinished work, which the final
        // commit then keeps.
        self.stop_replication();
        self.jobs.cancel_all_and_wait();
        // No management operation from here on: one under way (a snapshot holds a pool's
        // commits, then drains its disk) ends first, so the drains and the commits below
        // cannot wait on it the other way round.
        let _op = lock(&self.op);
        let disks: Vec<Arc<Disk>> = lock(&self.disks).values().map(|s| s.disk.clone()).collect();
        // Held writes fail rather than wait for space through the final commit (they were
        // never acknowledged; the guest sees an error if it is still there).
        for d in &disks {
            d.stop_held_writes();
        }
        let drained: Vec<_> = disks
            .iter()
            .map(|d| d.io_gate.write().unwrap_or_else(|p| p.into_inner()))
            .collect();
        // Without the passdown of what it frees, which may take minutes: the next start
        // gives that space back (`Pool::reclaim_free_space`).
        for p in self.pools.values() {
            p.pool().leave_passdown_to_next_start();
            p.pool()
                .flush()
                .map_err(|e| anyhow::anyhow!("final commit of pool {}: {e}", p.name))?;
        }
        // Never released. Released, the I/O gates would let the requests waiting at them
        // run between this commit and the process's exit: writes acknowledged to the guest
        // that only the journal records, so a clean stop would leave changes to replay.
        // Held, those requests stay in the guest's rings, and QEMU hands them to the next
        // daemon (it resumes from the used index).
        std::mem::forget(drained);
        for f in self.served_socket_files() {
            f.remove();
        }
        for (d, _) in self.served() {
            tracing::info!(
                "{}: served {} requests",
                d.name,
                d.stats.requests.load(Ordering::Relaxed)
            );
        }
        Ok(())
    }

    // ----- queries -----

    pub fn query_pools(&self) -> R<Vec<PoolInfo>> {
        let mut out = Vec::new();
        for p in self.pools.values() {
            let st = p.pool().status();
            let (lw_data, lw_meta) = *lock(&p.low_water);
            let (mode, reason) = effective_mode(p, &st);
            let policy = match p.space.policy() {
                OutOfSpace::Error => Policy::Error,
                OutOfSpace::Queue { timeout } => Policy::Queue {
                    timeout: timeout.map(|t| t.as_secs()).unwrap_or(0),
                },
            };
            out.push(PoolInfo {
                name: p.name.clone(),
                block_size: st.data_block_bytes,
                data_blocks: st.usage.data_blocks,
                data_used: st.usage.data_used,
                data_free: st.usage.data_blocks - st.usage.data_used,
                metadata_blocks: st.usage.metadata_blocks,
                metadata_used: st.usage.metadata_used,
                metadata_free: st.usage.metadata_blocks - st.usage.metadata_used,
                metadata_allocated: st.usage.metadata_allocated,
                metadata_reserve: st.usage.metadata_reserve,
                transaction_id: st.transaction_id,
                mode,
                mode_reason: reason,
                needs_check: st.needs_check,
                rolled_back: st.rolled_back,
                held_metadata_snap: st.held_metadata_root,
                policy,
                low_water: LowWater {
                    data: lw_data,
                    metadata: lw_meta,
                },
                queued_writes: p.space.waiting.load(Ordering::SeqCst),
                devices: st.devices,
            });
        }
        Ok(out)
    }

    fn entries(&self, snapshots: bool) -> R<Vec<DeviceInfo>> {
        let served: BTreeMap<String, (PathBuf, bool, usize)> = lock(&self.disks)
            .iter()
            .map(|(n, s)| {
                (
                    n.clone(),
                    (
                        s.socket.clone(),
                        s.disk.connected.load(Ordering::SeqCst),
                        s.disk.num_queues,
                    ),
                )
            })
            .collect();
        let mut out = Vec::new();
        for p in self.pools.values() {
            let usage = p
                .pool()
                .with_metadata(thinpool::thin::usage::device_usage)?;
            let usage: BTreeMap<u32, _> = usage.into_iter().map(|u| (u.id, u)).collect();
            let bs = p.pool().block_bytes();
            let reg = p.registry();
            let name_of = |id: u32| reg.devices.get(&id).and_then(|e| e.name.clone());
            for (&id, e) in &reg.devices {
                if e.snapshot != snapshots {
                    continue;
                }
                // Copies and helpers of a migration under way are not disks or snapshots
                // of anyone's yet.
                if matches!(
                    e.migration(),
                    Some(Migration::Incoming { .. } | Migration::Outgoing { .. })
                ) {
                    continue;
                }
                let Some(name) = &e.name else { continue };
                let u = usage.get(&id).copied().unwrap_or_default();
                // Lineage: origin, its origin, … as far as the registry knows.
                let mut lineage = Vec::new();
                let mut at = e;
                while lineage.len() <= 64 {
                    if let Some(gone) = &at.deleted_origin {
                        lineage.push(format!("{gone} (deleted)"));
                        break;
                    }
                    let Some(oid) = at.origin else { break };
                    lineage.push(name_of(oid).unwrap_or_else(|| format!("#{oid}")));
                    let Some(next) = reg.devices.get(&oid) else {
                        break;
                    };
                    at = next;
                }
                let serving = (!snapshots).then(|| {
                    let (socket, connected, num_queues) = served
                        .get(name)
                        .cloned()
                        .map(|(s, c, q)| (Some(s), c, q))
                        .unwrap_or((None, false, 0));
                    ServingInfo {
                        socket,
                        connected,
                        num_queues,
                    }
                });
                out.push(DeviceInfo {
                    name: name.clone(),
                    pool: p.name.clone(),
                    thin_id: id,
                    size: e.size,
                    read_only: e.read_only,
                    serial: e.serial.clone(),
                    origin: e.origin.and_then(name_of),
                    lineage,
                    mapped_bytes: u.mapped_blocks * bs,
                    exclusive_bytes: u.exclusive_blocks * bs,
                    shared_bytes: u.shared_blocks * bs,
                    created: e.created,
                    guid: e.guid.clone(),
                    deleted_origin: e.deleted_origin.clone(),
                    external_origin: e.external_origin.clone(),
                    merge_interrupted_at: e.merge_offset,
                    serving,
                });
            }
        }
        Ok(out)
    }

    pub fn query_disks(&self) -> R<Vec<DeviceInfo>> {
        self.entries(false)
    }

    pub fn query_snapshots(&self) -> R<Vec<DeviceInfo>> {
        self.entries(true)
    }

    // ----- changes -----

    /// Creates a disk and serves it. The socket is bound before the disk is created, and
    /// a disk that cannot be served is deleted again: a failed disk-add leaves nothing.
    pub fn disk_add(
        self: &Arc<Self>,
        new: &NewDisk<'_>,
        socket: Option<PathBuf>,
        num_queues: Option<usize>,
        queue_size: Option<usize>,
    ) -> R<DiskAdded> {
        let queues = queue_options(num_queues, queue_size)?;
        if let Some(o) = new.external_origin {
            self.confinement.existing("external origin", Path::new(o))?;
        }
        let _op = lock(&self.op);
        let plan = self.plan_disk(new)?;
        let bound = self.bind(new.name, socket, SocketOrigin::Client)?;
        let asked = DeviceState {
            num_queues,
            queue_size,
            ..Default::default()
        };
        let id = match self.create_disk(new, &plan, &asked) {
            Ok(id) => id,
            Err(e) => {
                bound.file.remove();
                return Err(e);
            }
        };
        let f = self.find(new.name)?;
        let socket = match self.start_serving(new.name, &f, bound, queues) {
            Ok(s) => s,
            Err(e) => {
                if let Err(d) = Self::delete_device(&f) {
                    tracing::error!(
                        "disk-add {}: cannot delete the disk that could not be served: {}",
                        new.name,
                        d.to_string()
                    );
                }
                return Err(e);
            }
        };
        tracing::info!(
            "disk-add {}: thin device {id}, {}, socket {}",
            new.name,
            crate::size::human(plan.size),
            socket.display()
        );
        self.events.emit(Event::DiskAdded {
            disk: new.name.to_string(),
            pool: plan.pool.name.clone(),
            thin_id: id,
            size: plan.size,
            origin: new.clone_from.map(str::to_string),
            socket: socket.clone(),
        });
        Ok(DiskAdded {
            thin_id: id,
            socket,
        })
    }

    /// Creates a disk without serving it (the configuration's disks, served afterwards
    /// with their queue settings). Returns its thin id.
    pub fn disk_create(&self, new: &NewDisk<'_>) -> R<u32> {
        let _op = lock(&self.op);
        let plan = self.plan_disk(new)?;
        self.create_disk(new, &plan, &DeviceState::default())
    }

    /// The checks of a new disk, before anything changes.
    fn plan_disk(&self, new: &NewDisk<'_>) -> R<DiskPlan> {
        // As in ZFS, '@' separates a disk from its snapshots: a new disk named `vm2@x`
        // would sit in vm2's namespace. (Older registries holding such names still load.)
        if new.name.contains('@') {
            return Err(Error::failed(format!(
                "'{}' is not a disk name: '@' separates a disk's name from its snapshots'",
                new.name
            )));
        }
        self.name_free(new.name)?;
        if let Some(s) = &new.serial {
            if s.len() > 20 || !s.is_ascii() {
                return Err(Error::failed(
                    "'serial' must be at most 20 ASCII characters",
                ));
            }
        }
        let mut inherited_external = None;
        let (pool, origin) = match new.clone_from {
            Some(src) => {
                let f = self.find(src)?;
                self.check_not_migrating(&f, src)?;
                if new.pool.is_some_and(|p| p != f.pool.name) {
                    return Err(Error::failed("a clone lives in the pool of its origin"));
                }
                if new.external_origin.is_some() {
                    return Err(Error::failed(
                        "a clone reads its origin's external origin: give 'external-origin' or 'clone-from', not both",
                    ));
                }
                inherited_external = f.entry.external_origin.clone();
                (f.pool.clone(), Some((f.id, f.entry.size)))
            }
            None => (self.pool(new.pool)?, None),
        };
        let external = match new.external_origin {
            None => None,
            Some(path) => {
                let o = ExternalOrigin::open(Path::new(path))
                    .map_err(|e| Error::failed(format!("external origin {path}: {e}")))?;
                // Kept by absolute path: the daemon may start from another directory.
                let abs = std::fs::canonicalize(path)
                    .map_err(|e| Error::failed(format!("external origin {path}: {e}")))?;
                let abs = abs.to_str().map(str::to_string).ok_or_else(|| {
                    Error::failed(format!("external origin {path}: not a UTF-8 path"))
                })?;
                Some((abs, Arc::new(o)))
            }
        };
        let reads = external
            .as_ref()
            .map(|(p, _)| p)
            .or(inherited_external.as_ref());
        if let Some(p) = reads.filter(|p| lock(&self.merging).contains(*p)) {
            return Err(Error::failed(format!(
                "{p} is being rewritten by an origin-merge: wait for it to end"
            )));
        }
        // A disk over an external origin is as big as the image unless told otherwise.
        let new_size = new
            .size
            .or(external.as_ref().map(|(_, o)| o.len().div_ceil(512) * 512));
        let size = match (new_size, origin) {
            (Some(s), Some((_, osize))) if s < osize => {
                return Err(Error::failed(format!(
                    "a clone cannot be smaller than its origin ({osize} bytes)"
                )))
            }
            (Some(s), _) => s,
            (None, Some((_, osize))) => osize,
            (None, None) => return Err(Error::failed("Parameter 'size' is missing")),
        };
        // Checked again here: a clone's or an external origin's size is not an argument.
        if let Some(why) = limits::disk_size_problem(size) {
            return Err(Error::failed(format!(
                "'size' must be {}: {why}",
                limits::DISK_SIZE_RULE
            )));
        }
        Ok(DiskPlan {
            pool,
            origin: origin.map(|(o, _)| o),
            size,
            external,
        })
    }

    /// Creates the thin device and its registry entry, durably.
    fn create_disk(&self, new: &NewDisk<'_>, plan: &DiskPlan, state: &DeviceState) -> R<u32> {
        let cat = &plan.pool.catalog;
        plan.pool.change(|devices, reg| {
            let id = devices.next_id(reg);
            // A clone reads what its origin reads; a new disk, its external origin if any.
            let mut entry = match plan.origin {
                Some(oid) => {
                    devices.create_snap(id, oid)?;
                    cat.new_snapshot_entry(reg, oid, id, SnapshotKind::Clone)
                }
                None => {
                    devices.create_thin(id)?;
                    cat.new_thin_entry(id, 0)
                }
            };
            if let Some((path, o)) = &plan.external {
                devices.set_external_origin(id, Some(o.clone()))?;
                entry.external_origin = Some(path.clone());
            }
            entry.name = Some(new.name.to_string());
            // A clone may be bigger than its origin.
            entry.size = plan.size;
            entry.read_only = new.read_only;
            if let Some(s) = &new.serial {
                entry.serial = s.clone();
            }
            state.store(&mut entry);
            reg.insert(id, entry)
                .map_err(|e| Error::failed(e.to_string()))?;
            Ok(id)
        })
    }

    pub fn disk_remove(&self, name: &str, force: bool) -> R<Done> {
        let _op = lock(&self.op);
        let f = self.find(name)?;
        self.check_unpinned(&f, name)?;
        if f.entry.snapshot {
            return Err(Error::failed(format!(
                "'{name}' is a snapshot: use snapshot-delete"
            )));
        }
        if let Some(s) = lock(&self.disks).get(name) {
            if s.disk.connected.load(Ordering::SeqCst) && !force {
                return Err(Error::failed(format!(
                    "disk '{name}' is in use by a guest; disconnect it first or pass force"
                )));
            }
        }
        let _ = self.unserve(name);
        self.drop_replicator(name);
        Self::delete_device(&f)?;
        self.events.emit(Event::DiskRemoved {
            disk: name.to_string(),
            pool: f.pool.name.clone(),
            thin_id: f.id,
        });
        Ok(Done {})
    }

    /// Deletes a thin device and its registry entry, durably; wakes held writes.
    fn delete_device(f: &Found) -> R<()> {
        f.pool.delete_devices(&[f.id]).map(drop)
    }

    pub fn disk_resize(&self, name: &str, size: u64) -> R<DiskResized> {
        let _op = lock(&self.op);
        let f = self.find(name)?;
        self.check_unpinned(&f, name)?;
        if size < f.entry.size {
            return Err(Error::failed(format!(
                "disks only grow: '{name}' has {} bytes (shrinking would lose data the guest may use)",
                f.entry.size
            )));
        }
        if let Some(why) = limits::disk_size_problem(size) {
            return Err(Error::failed(format!(
                "'size' must be {}: {why}",
                limits::DISK_SIZE_RULE
            )));
        }
        f.pool.change(|_, reg| {
            if let Some(e) = reg.devices.get_mut(&f.id) {
                e.size = size;
            }
            Ok(())
        })?;
        // The connected guest, if any, is told at once (vhost-user config change); one that
        // cannot be told sees the new size when it next reads the configuration.
        let disk = lock(&self.disks).get(name).map(|s| s.disk.clone());
        let notified = match disk {
            Some(d) => {
                d.set_size(size);
                match d.backend_channel.notify_config_change() {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!("{name}: cannot tell the guest about the new size: {e}");
                        false
                    }
                }
            }
            None => false,
        };
        self.events.emit(Event::DiskResized {
            disk: name.to_string(),
            size,
            guest_notified: notified,
        });
        Ok(DiskResized {
            guest_notified: notified,
        })
    }

    pub fn disk_set_read_only(&self, name: &str, read_only: bool) -> R<Done> {
        let _op = lock(&self.op);
        let f = self.find(name)?;
        self.check_unpinned(&f, name)?;
        f.pool.change(|_, reg| {
            if let Some(e) = reg.devices.get_mut(&f.id) {
                e.read_only = read_only;
            }
            Ok(())
        })?;
        if let Some(s) = lock(&self.disks).get(name) {
            s.disk.set_read_only(read_only);
        }
        if f.entry.read_only != read_only {
            self.events.emit(Event::DiskReadOnlyChanged {
                disk: name.to_string(),
                read_only,
            });
        }
        Ok(Done {})
    }

    /// Snapshots a disk, running or not, crash-consistent (see [`Pool::create_snap`]):
    /// the guest's writes are not held; the snapshot is made in memory, and the reply
    /// comes once the writes in flight then have landed and the snapshot is durable. The
    /// pause returned, in microseconds, is the time the snapshot was being made in memory,
    /// the longest any request of the pool waited for it.
    pub fn snapshot_create(&self, disk: &str, name: &str) -> R<SnapshotCreated> {
        let _op = lock(&self.op);
        let f = self.find(disk)?;
        // The namespace is the disk's own name (`disk` may have reached it otherwise).
        let owner = f.entry.name.clone().unwrap_or_else(|| disk.to_string());
        let name = &thinpool::names::snapshot_name(&owner, name)
            .map_err(|e| Error::failed(e.to_string()))?;
        self.name_free(name)?;
        // A flat name `s` would be shadowed by (or shadow) an existing `disk@s`.
        let qualified = format!("{owner}@{name}");
        if !name.contains('@') && self.name_taken(&qualified) {
            return Err(Error::failed(format!(
                "the name '{name}' would be taken for '{qualified}', which is already in use"
            )));
        }
        // A disk being migrated: a snapshot taken now would be left behind.
        self.check_unpinned(&f, disk)?;
        // The change holds commits from its start: a commit under way (the timer's, a
        // FLUSH) is waited for here. The point in time taken, the change is made durable
        // (the registry written, the pool committed) with the guest's writes going on;
        // commits stay held until then, so none makes half of it durable. Then the writes
        // in flight at that point are waited for and made durable (Catalog::change), and
        // the reply waits for all of it. If it fails the snapshot is undone, and the
        // writes since stay on the origin.
        let t0 = Instant::now();
        let r = f.pool.change(|devices, reg| {
            let id = devices.next_id(reg);
            let in_memory = devices.create_snap(id, f.id)?;
            let entry = DeviceEntry {
                name: Some(name.to_string()),
                ..f.pool
                    .catalog
                    .new_snapshot_entry(reg, f.id, id, SnapshotKind::Kept)
            };
            reg.insert(id, entry)
                .map_err(|e| Error::failed(e.to_string()))?;
            Ok((id, in_memory))
        });
        let (id, pause) = r?;
        tracing::info!(
            "snapshot-create {name} of {disk}: thin device {id}, made in memory in {pause:?}, durable and settled after {:?}",
            t0.elapsed()
        );
        self.events.emit(Event::SnapshotCreated {
            disk: owner.clone(),
            snapshot: name.to_string(),
            pool: f.pool.name.clone(),
            thin_id: id,
            pause_us: pause.as_micros() as u64,
        });
        Ok(SnapshotCreated {
            name: name.clone(),
            thin_id: id,
            pause_us: pause.as_micros() as u64,
        })
    }

    pub fn snapshot_delete(&self, name: &str, force: bool) -> R<SnapshotDeleted> {
        let _op = lock(&self.op);
        let f = self.find(name)?;
        self.check_unpinned(&f, name)?;
        if let (Some(at), Some(img), false) =
            (f.entry.merge_offset, &f.entry.external_origin, force)
        {
            return Err(Error::failed(format!(
                "an interrupted merge of '{name}' into {img} stopped at byte {at}: the image is half written; finish it with origin-merge, or pass force to delete the snapshot anyway"
            )));
        }
        if !f.entry.snapshot {
            return Err(Error::failed(format!(
                "'{name}' is a disk, not a snapshot: use disk-remove"
            )));
        }
        // dm-thin keeps every device whole on its own: clones and snapshots made from this
        // one lose nothing, and keep its name as their deleted origin.
        let dependents = f.pool.delete_devices(&[f.id])?;
        self.events.emit(Event::SnapshotDeleted {
            snapshot: f.entry.name.clone().unwrap_or_else(|| name.to_string()),
            pool: f.pool.name.clone(),
            thin_id: f.id,
        });
        Ok(SnapshotDeleted { dependents })
    }

    /// The disk's contents become the snapshot's; the snapshot and newer ones are kept.
    pub fn snapshot_revert(&self, disk: &str, snapshot: &str) -> R<Done> {
        let _op = lock(&self.op);
        let d = self.find(disk)?;
        let s = self.find(snapshot)?;
        self.check_unpinned(&d, disk)?;
        if d.entry.snapshot {
            return Err(Error::failed(format!("'{disk}' is a snapshot, not a disk")));
        }
        if d.pool.name != s.pool.name {
            return Err(Error::failed("the snapshot is in another pool"));
        }
        // To a snapshot: its own, the one it was cloned from, or another one of the pool
        // (the disk re-imaged from it, keeping its name, serial and socket). Never to a
        // disk, itself included (that would delete it).
        if !s.entry.snapshot || s.id == d.id {
            return Err(Error::failed(format!(
                "'{snapshot}' is a disk, not a snapshot"
            )));
        }
        let served = lock(&self.disks).get(disk).map(|x| x.disk.clone());
        let gate = served
            .as_ref()
            .map(|x| x.io_gate.write().unwrap_or_else(|p| p.into_inner()));
        if served
            .as_ref()
            .is_some_and(|x| x.connected.load(Ordering::SeqCst))
        {
            return Err(Error::failed(format!(
                "disk '{disk}' is in use by a guest: its contents cannot change under it; shut the guest down first"
            )));
        }
        d.pool.change(|devices, _| {
            // Same thin id, new contents: the disk keeps its name, serial and socket.
            devices.replace_with_snapshot(d.id, s.id)?;
            Ok(())
        })?;
        drop(gate);
        d.pool.space.space_changed();
        self.events.emit(Event::DiskReverted {
            disk: d.entry.name.clone().unwrap_or_else(|| disk.to_string()),
            snapshot: s.entry.name.clone().unwrap_or_else(|| snapshot.to_string()),
        });
        Ok(Done {})
    }

    /// Changed blocks between two disks or snapshots of one pool, a page at a time: runs
    /// starting at virtual block `start` or later, at most `max` of them; `next` is where the
    /// following page starts. Computed from the mapping trees; no data is read. With
    /// `changed_only` the `same` runs are left out, and so are the tree nodes the two share
    /// (the cheap query for incremental copies).
    pub fn query_delta(
        &self,
        left: &str,
        right: &str,
        start: u64,
        max: u64,
        changed_only: bool,
    ) -> R<DeltaPage> {
        let l = self.find(left)?;
        let r = self.find(right)?;
        if l.pool.name != r.pool.name {
            return Err(Error::failed(format!(
                "'{left}' and '{right}' are in different pools"
            )));
        }
        let mode = if changed_only {
            DeltaMode::ChangedOnly
        } else {
            DeltaMode::Exact
        };
        let runs = l
            .pool
            .pool()
            .with_metadata(|md| thinpool::delta::runs(md, l.id, r.id, false, mode))?;
        let bs = l.pool.pool().block_bytes();
        let max = max.clamp(1, 100_000) as usize;
        let mut page = Vec::new();
        let mut next = None;
        for run in runs.iter().filter(|x| x.begin + x.length > start) {
            if page.len() == max {
                next = Some(run.begin.max(start));
                break;
            }
            let begin = run.begin.max(start);
            page.push(DeltaRun {
                kind: run.kind,
                begin,
                length: run.begin + run.length - begin,
            });
        }
        Ok(DeltaPage {
            block_size: bs,
            runs: page,
            next,
        })
    }

    pub fn pool_set_policy(
        &self,
        pool: Option<&str>,
        out_of_space: Option<&str>,
        timeout: Option<u64>,
        low_water_data: Option<u64>,
        low_water_metadata: Option<u64>,
    ) -> R<Done> {
        let p = self.pool(pool)?;
        // Converted once checked, so that no cast below can cut a number short.
        let percent = |v: Option<u64>| -> R<Option<u8>> {
            v.map(|v| {
                u8::try_from(v)
                    .ok()
                    .filter(|p| *p <= 100)
                    .ok_or_else(|| Error::failed("low-water marks are percentages, 0 to 100"))
            })
            .transpose()
        };
        let (low_water_data, low_water_metadata) =
            (percent(low_water_data)?, percent(low_water_metadata)?);
        if let Some(t) = timeout {
            vmm_config::limits::check_queue_timeout(t).map_err(Error::failed)?;
        }
        if let Some(m) = out_of_space {
            let mode = match m {
                "error" => OutOfSpace::Error,
                "queue" => OutOfSpace::Queue {
                    timeout: match timeout.unwrap_or(60) {
                        0 => None,
                        s => Some(Duration::from_secs(s)),
                    },
                },
                other => {
                    return Err(Error::failed(format!(
                        "Parameter 'out-of-space' must be 'error' or 'queue', not '{other}'"
                    )))
                }
            };
            p.space.set_mode(mode);
        } else if timeout.is_some() {
            return Err(Error::failed("'timeout' goes with out-of-space: 'queue'"));
        }
        let mut lw = lock(&p.low_water);
        if let Some(d) = low_water_data {
            lw.0 = d;
        }
        if let Some(m) = low_water_metadata {
            lw.1 = m;
        }
        // Kept for the next start. Set in memory already: a file that cannot be written
        // says so, and the setting holds until the daemon stops.
        if let Some(path) = &p.settings_path {
            let settings = PoolSettings::new(p.space.policy(), *lw);
            pool_settings::save(path, &settings).map_err(|e| {
                Error::failed(format!(
                    "the policy is set, but cannot be kept for the next start in {}: {e}",
                    path.display()
                ))
            })?;
        }
        Ok(Done {})
    }

    pub fn pool_reserve_metadata_snap(&self, pool: Option<&str>) -> R<MetadataSnap> {
        let p = self.pool(pool)?;
        let block = p.pool().reserve_metadata_snap()?;
        Ok(MetadataSnap { block })
    }

    pub fn pool_release_metadata_snap(&self, pool: Option<&str>) -> R<Done> {
        self.pool(pool)?.pool().release_metadata_snap()?;
        Ok(Done {})
    }

    pub fn pool_commit(&self, pool: Option<&str>) -> R<Done> {
        self.pool(pool)?.pool().flush()?;
        Ok(Done {})
    }

    /// dm-thin's `set_transaction_id OLD NEW` (see `Catalog::set_transaction_id`).
    pub fn pool_set_transaction_id(
        &self,
        pool: Option<&str>,
        old: u64,
        new: u64,
    ) -> R<TransactionId> {
        let _op = lock(&self.op);
        let p = self.pool(pool)?;
        p.catalog.set_transaction_id(old, new)?;
        Ok(TransactionId {
            transaction_id: new,
        })
    }

    pub fn pool_grow(&self, pool: Option<&str>) -> R<PoolGrown> {
        let p = self.pool(pool)?;
        let blocks = p.pool().grow_data()?;
        let meta = p.pool().grow_metadata()?;
        p.pool().flush()?;
        p.space.space_available();
        tracing::info!(
            "pool {}: {} of data, {} of metadata in use",
            p.name,
            crate::size::human(blocks * p.pool().block_bytes()),
            crate::size::human(meta * 4096)
        );
        self.events.emit(Event::PoolGrown {
            pool: p.name.clone(),
            data_blocks: blocks,
            metadata_blocks: meta,
        });
        Ok(PoolGrown {
            data_blocks: blocks,
            metadata_blocks: meta,
        })
    }
}

/// The queues of a disk to serve, checked (None: the defaults): a count or size out of
/// range is refused, not clamped, so the guest gets what was asked or an error says why.
fn queue_options(num_queues: Option<usize>, queue_size: Option<usize>) -> R<(usize, usize)> {
    let n = num_queues.unwrap_or(limits::DEFAULT_NUM_QUEUES);
    if !limits::num_queues_ok(n) {
        return Err(Error::failed(format!(
            "'num-queues' must be 1 to {}, not {n}",
            limits::MAX_NUM_QUEUES
        )));
    }
    let q = queue_size.unwrap_or(limits::DEFAULT_QUEUE_SIZE);
    if !limits::queue_size_ok(q) {
        return Err(Error::failed(format!(
            "'queue-size' must be a power of two, {} to {}, not {q}",
            limits::MIN_QUEUE_SIZE,
            limits::MAX_QUEUE_SIZE
        )));
    }
    Ok((n, q))
}

#[cfg(test)]
mod tests;
