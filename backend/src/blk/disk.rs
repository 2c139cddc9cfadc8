//! A disk served to a guest: one thin device of a pool, plus what the guest is told.

use super::mirror::{Mirror, MirrorError};
use super::relay::BackendChannel;
use crate::sync::lock;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};
use thinpool::pool::Pool;
use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

/// What a write does when the pool has no free data block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutOfSpace {
    /// Fail it at once (IOERR).
    Error,
    /// Hold it until space appears or `timeout` passes (None: forever), then IOERR.
    Queue { timeout: Option<Duration> },
}

/// The out-of-space policy of a pool, shared by its disks. `space_changed` wakes held
/// writes when the pool grows or blocks are freed.
pub struct SpacePolicy {
    mode: Mutex<OutOfSpace>,
    changed: Mutex<u64>,
    cv: Condvar,
    /// Writes being held now.
    pub waiting: AtomicU64,
    /// A held write's queue timeout passed: as dm-thin when its no_space_timeout expires,
    /// writes that need space fail at once from then on, until space appears (the pool is
    /// grown or blocks are freed) or the policy is set again.
    timed_out: AtomicBool,
}

impl SpacePolicy {
    pub fn new(mode: OutOfSpace) -> Self {
        SpacePolicy {
            mode: Mutex::new(mode),
            changed: Mutex::new(0),
            cv: Condvar::new(),
            waiting: AtomicU64::new(0),
            timed_out: AtomicBool::new(false),
        }
    }

    /// What a write that finds the pool full does now: the configured policy, or `Error`
    /// once a queue timeout has passed (see [`SpacePolicy::queue_timed_out`]).
    pub fn mode(&self) -> OutOfSpace {
        if self.timed_out.load(Ordering::SeqCst) {
            return OutOfSpace::Error;
        }
        self.policy()
    }

    /// The configured policy.
    pub fn policy(&self) -> OutOfSpace {
        *lock(&self.mode)
    }

    pub fn set_mode(&self, m: OutOfSpace) {
        *lock(&self.mode) = m;
        self.timed_out.store(false, Ordering::SeqCst);
        self.space_changed();
    }

    /// A held write waited out its queue timeout: later writes that need space fail at once.
    pub fn queue_timed_out(&self) {
        if !self.timed_out.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                "the out-of-space queue timeout passed: writes that need a new block fail at \
                 once until the pool has free blocks again"
            );
        }
    }

    /// Whether a queue timeout passed with the pool still full.
    pub fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
    }

    /// The pool has free data blocks again (grown, or blocks freed): writes are queued
    /// again under policy `queue`, and held ones retry.
    pub fn space_available(&self) {
        self.timed_out.store(false, Ordering::SeqCst);
        self.space_changed();
    }

    /// Space may have appeared (pool grown, blocks freed, policy changed).
    pub fn space_changed(&self) {
        *lock(&self.changed) += 1;
        self.cv.notify_all();
    }

    /// Waits for a change of space or policy, up to `deadline`. False when the deadline passed.
    pub fn wait(&self, deadline: Option<Instant>) -> bool {
        let g = lock(&self.changed);
        let seen = *g;
        let step = Duration::from_millis(200);
        let timeout = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) => left.min(step),
                None => return false,
            },
            None => step,
        };
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |c| *c == seen)
            .unwrap();
        drop(g);
        deadline.is_none_or(|d| Instant::now() < d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passed_queue_timeout_fails_writes_at_once_until_space_appears() {
        let queue = OutOfSpace::Queue {
            timeout: Some(Duration::from_secs(60)),
        };
        let p = SpacePolicy::new(queue);
        assert_eq!(p.mode(), queue);
        p.queue_timed_out();
        assert_eq!(p.mode(), OutOfSpace::Error);
        assert_eq!(p.policy(), queue, "the configured policy is kept");
        // Waking held writes (a disk stopping, say) does not end it; space does.
        p.space_changed();
        assert_eq!(p.mode(), OutOfSpace::Error);
        p.space_available();
        assert_eq!(p.mode(), queue);
        p.queue_timed_out();
        p.set_mode(queue);
        assert_eq!(p.mode(), queue, "setting the policy again starts over");
    }
}

impl Default for SpacePolicy {
    fn default() -> Self {
        SpacePolicy::new(OutOfSpace::Error)
    }
}

/// Where a disk's requests go: a thin device of a pool, and while a migration mirrors the
/// disk, a second device its changes go to as well. It changes only under the I/O gate
/// held exclusively (disk-migrate).
pub struct Target {
    pub pool: Arc<Pool>,
    pub thin_id: u32,
    /// Installed by disk-migrate (see [`Mirror`]).
    pub mirror: Option<Arc<Mirror>>,
}

/// The changing requests go through these, which apply them to the mirror too when there
/// is one; reads need only the target's own device.
impl Target {
    pub fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), MirrorError> {
        match &self.mirror {
            Some(m) => m.write_vectored(&self.pool, self.thin_id, offset, bufs),
            None => self
                .pool
                .write_vectored(self.thin_id, offset, bufs)
                .map_err(MirrorError::Primary),
        }
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), MirrorError> {
        match &self.mirror {
            Some(m) => m.write_zeroes(&self.pool, self.thin_id, offset, len, unmap),
            None => self
                .pool
                .write_zeroes(self.thin_id, offset, len, unmap)
                .map_err(MirrorError::Primary),
        }
    }

    pub fn discard(&self, offset: u64, len: u64) -> Result<u64, MirrorError> {
        match &self.mirror {
            Some(m) => m.discard(&self.pool, self.thin_id, offset, len),
            None => self
                .pool
                .discard(self.thin_id, offset, len)
                .map_err(MirrorError::Primary),
        }
    }

    /// The pools a FLUSH commits: the target's, and the mirror's (see `execute::flush`).
    pub fn flush_targets(&self) -> (Arc<Pool>, Option<Arc<Mirror>>) {
        (self.pool.clone(), self.mirror.clone())
    }
}

pub struct Disk {
    pub name: String,
    size: AtomicU64,
    read_only: AtomicBool,
    pub serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    pub num_queues: usize,
    pub queue_size: usize,
    /// Whether the guest is offered DISCARD (off for a pool with `discard: ignore`).
    pub discard: bool,
    /// Held shared by every request being executed, which reads its target from it; taken
    /// exclusively to drain I/O (shutdown, snapshots of a running disk) and to move the
    /// disk to another pool.
    pub io_gate: RwLock<Target>,
    /// The out-of-space policy of the target's pool, which held writes wait on. Apart from
    /// the gate so that waking them never waits for the gate.
    space: Mutex<Arc<SpacePolicy>>,
    pub connected: AtomicBool,
    /// New guest connections are refused while set: the external origin the disk reads is
    /// being rewritten (origin-merge).
    pub refuse_connections: AtomicBool,
    /// Set when the disk stops being served (disk-remove, shutdown): writes held for pool
    /// space give up (IOERR) instead of keeping the stop waiting for space that may never come.
    stopping: AtomicBool,
    /// Where the connected frontend listens for our messages (config changes).
    pub backend_channel: Arc<BackendChannel>,
    pub stats: Stats,
}

#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

impl Stats {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// What a disk is, apart from its pool.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    pub name: String,
    pub thin_id: u32,
    /// Virtual size in bytes (rounded down to a multiple of 512).
    pub size: u64,
    pub read_only: bool,
    pub serial: String,
    pub num_queues: usize,
    pub queue_size: usize,
    /// Offer DISCARD to the guest.
    pub discard: bool,
}

impl Disk {
    pub fn new(pool: Arc<Pool>, o: DiskOptions) -> Self {
        Self::with_policy(pool, o, Arc::default())
    }

    pub fn with_policy(pool: Arc<Pool>, o: DiskOptions, space: Arc<SpacePolicy>) -> Self {
        let mut s = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let b = o.serial.as_bytes();
        let n = b.len().min(s.len());
        s[..n].copy_from_slice(&b[..n]);
        Disk {
            name: o.name,
            size: AtomicU64::new(o.size / 512 * 512),
            read_only: AtomicBool::new(o.read_only),
            serial: s,
            num_queues: o.num_queues,
            queue_size: o.queue_size,
            discard: o.discard,
            io_gate: RwLock::new(Target {
                pool,
                thin_id: o.thin_id,
                mirror: None,
            }),
            space: Mutex::new(space),
            connected: AtomicBool::new(false),
            refuse_connections: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            backend_channel: Arc::default(),
            stats: Stats::default(),
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    pub fn set_size(&self, bytes: u64) {
        self.size.store(bytes / 512 * 512, Ordering::SeqCst);
    }

    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::SeqCst)
    }

    pub fn set_read_only(&self, ro: bool) {
        self.read_only.store(ro, Ordering::SeqCst);
    }

    /// The disk is going away: held writes fail at once, and so do later ones that find the
    /// pool full.
    pub fn stop_held_writes(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.space().space_changed();
    }

    /// The target, shared: requests in flight keep it from changing.
    pub fn target(&self) -> RwLockReadGuard<'_, Target> {
        self.io_gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The target, if that needs no wait (no drain holds or waits for the gate).
    pub fn try_target(&self) -> Option<RwLockReadGuard<'_, Target>> {
        match self.io_gate.try_read() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// The target, exclusively: waits for requests in flight, holds new ones.
    pub fn drain(&self) -> RwLockWriteGuard<'_, Target> {
        self.io_gate.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn space(&self) -> Arc<SpacePolicy> {
        self.space.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Moves the disk to thin device `thin_id` of `pool` (whose policy is `space`), mirrored
    /// to `mirror` if given, under the gate held exclusively (`drained`, from
    /// [`Disk::drain`]). Writes held for space in the old pool are woken and retried on the
    /// new target.
    pub fn retarget(
        &self,
        drained: &mut RwLockWriteGuard<'_, Target>,
        pool: Arc<Pool>,
        thin_id: u32,
        space: Arc<SpacePolicy>,
        mirror: Option<Arc<Mirror>>,
    ) {
        **drained = Target {
            pool,
            thin_id,
            mirror,
        };
        let old = std::mem::replace(
            &mut *self.space.lock().unwrap_or_else(|p| p.into_inner()),
            space,
        );
        old.space_changed();
    }

    pub fn thin_id(&self) -> u32 {
        self.target().thin_id
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}
