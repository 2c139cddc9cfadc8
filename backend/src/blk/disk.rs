//! A disk served to a guest: one thin device of a pool, plus what the guest is told.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use thinpool::pool::Pool;
use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

pub struct Disk {
    pub name: String,
    pub pool: Arc<Pool>,
    pub thin_id: u32,
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    pub read_only: bool,
    pub serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    pub num_queues: usize,
    pub queue_size: usize,
    /// Held shared by every request being executed; taken exclusively to drain I/O
    /// (shutdown, snapshots of a running disk).
    pub io_gate: RwLock<()>,
    pub connected: AtomicBool,
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
}

impl Disk {
    pub fn new(pool: Arc<Pool>, o: DiskOptions) -> Self {
        let mut s = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let b = o.serial.as_bytes();
        let n = b.len().min(s.len());
        s[..n].copy_from_slice(&b[..n]);
        Disk {
            name: o.name,
            pool,
            thin_id: o.thin_id,
            size: o.size / 512 * 512,
            read_only: o.read_only,
            serial: s,
            num_queues: o.num_queues,
            queue_size: o.queue_size,
            io_gate: RwLock::new(()),
            connected: AtomicBool::new(false),
            stats: Stats::default(),
        }
    }
}
