//! A disk served to a guest: one thin device of a pool, plus what the guest is told.

use super::relay::BackendChannel;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
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
}

impl SpacePolicy {
    pub fn new(mode: OutOfSpace) -> Self {
        SpacePolicy {
            mode: Mutex::new(mode),
            changed: Mutex::new(0),
            cv: Condvar::new(),
            waiting: AtomicU64::new(0),
        }
    }

    pub fn mode(&self) -> OutOfSpace {
        *self.mode.lock().unwrap()
    }

    pub fn set_mode(&self, m: OutOfSpace) {
        *self.mode.lock().unwrap() = m;
        self.space_changed();
    }

    /// Space may have appeared (pool grown, blocks freed, policy changed).
    pub fn space_changed(&self) {
        *self.changed.lock().unwrap() += 1;
        self.cv.notify_all();
    }

    /// Waits for a change of space or policy, up to `deadline`. False when the deadline passed.
    pub fn wait(&self, deadline: Option<Instant>) -> bool {
        let g = self.changed.lock().unwrap();
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

impl Default for SpacePolicy {
    fn default() -> Self {
        SpacePolicy::new(OutOfSpace::Error)
    }
}

pub struct Disk {
    pub name: String,
    pub pool: Arc<Pool>,
    pub thin_id: u32,
    size: AtomicU64,
    read_only: AtomicBool,
    pub serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    pub num_queues: usize,
    pub queue_size: usize,
    /// Whether the guest is offered DISCARD (off for a pool with `discard: ignore`).
    pub discard: bool,
    pub space: Arc<SpacePolicy>,
    /// Held shared by every request being executed; taken exclusively to drain I/O
    /// (shutdown, snapshots of a running disk).
    pub io_gate: RwLock<()>,
    pub connected: AtomicBool,
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
            pool,
            thin_id: o.thin_id,
            size: AtomicU64::new(o.size / 512 * 512),
            read_only: AtomicBool::new(o.read_only),
            serial: s,
            num_queues: o.num_queues,
            queue_size: o.queue_size,
            discard: o.discard,
            space,
            io_gate: RwLock::new(()),
            connected: AtomicBool::new(false),
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
        self.space.space_changed();
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}
