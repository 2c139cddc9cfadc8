//! The vhost-user-blk backend of one disk: features, config space, and one worker thread
//! per virtqueue (`VhostUserBackend` with interior mutability, so queues run in parallel).
//!
//! A new backend is made for every connection (the library's per-connection state must not
//! be reused); the disk and its pool live on across connections.

use super::chain;
use super::disk::{Disk, Stats, Target};
use super::execute::{execute, fail, flush, Done, NeedsSpace};
use super::inflight::{Inflight, Tracker};
use super::park::{Parked, Waker};
use super::poll::PollWindow;
use super::request::{parse, Desc, GuestView, Limits, Op, MAX_DATA_BYTES};
use crate::sync::{lock, read, write};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

/// Most segments in one discard or write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 16;
/// Most sectors in one discard or write-zeroes segment (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Largest data segment ever offered to the guest.
pub const SIZE_MAX: u32 = 1 << 20;
/// Smallest: a guest page (Linux wants max_segment_size to be at least that).
const MIN_SIZE_MAX: u64 = 4096;
/// Within one pass over a queue, the completions are signalled each time this many bytes
/// of requests were served (a batch of 32 4 KiB requests stays under it).
const SIGNAL_EVERY_BYTES: u64 = 256 << 10;

/// seg_max and size_max for a queue of `queue_size`: as many segments as a chain that fits
/// the ring can carry (less the header and the status), each as large as possible while
/// seg_max × size_max stays within the parser's [`MAX_DATA_BYTES`], the single limit of a
/// request's data, so that no request within the advertised limits is refused.
pub fn segment_limits(queue_size: usize) -> (u32, u32) {
    let seg_max = (queue_size as u64)
        .saturating_sub(2)
        .clamp(1, MAX_DATA_BYTES / MIN_SIZE_MAX);
    let size_max = (MAX_DATA_BYTES / seg_max / MIN_SIZE_MAX * MIN_SIZE_MAX).min(SIZE_MAX as u64);
    (seg_max as u32, size_max as u32)
}

#[derive(Copy, Clone, Default)]
#[repr(transparent)]
struct BlkConfig(virtio_blk_config);
// SAFETY: a plain bindgen struct of integers, no padding that matters for reads.
unsafe impl ByteValued for BlkConfig {}

/// Guest memory as the request parser sees it.
struct View<'a>(&'a GuestMemoryMmap);

impl GuestView for View<'_> {
    fn contains(&self, addr: u64, len: u64) -> bool {
        usize::try_from(len).is_ok_and(|len| self.0.get_slice(GuestAddress(addr), len).is_ok())
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.0.read_slice(buf, GuestAddress(addr)).is_ok()
    }
}

pub struct BlkBackend {
    disk: Arc<Disk>,
    event_idx: AtomicBool,
    /// Inflight tracking, negotiated and handed over through the relay.
    inflight: Arc<Inflight>,
    /// Per queue: what its worker keeps across events.
    queues: Vec<Mutex<QueueState>>,
    /// Wakes queues with parked writes; says when the connection is over (set by
    /// `signal_exit`).
    waker: Arc<Waker>,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    exit_notifiers: Mutex<Vec<Option<EventNotifier>>>,
    /// Per queue: this connection has signalled the guest at least once (see
    /// [`BlkBackend::first_event`]).
    signalled: Vec<AtomicBool>,
    /// The exit consumers handed to the vhost crate, which it never closes: see
    /// [`BlkBackend::close_leaked_exit_consumers`].
    exit_consumers: Mutex<Vec<LeakedFd>>,
    /// Per queue: a fault of the driver's (rings that do not fit, an avail idx out of range)
    /// was logged, and is not again until the queue is sound.
    reported: Vec<AtomicBool>,
}

/// What a queue's worker keeps across events.
#[derive(Default)]
struct QueueState {
    /// The queue's inflight records, with the generation of the region they are in.
    tracker: Option<(u64, Tracker)>,
    /// Heads a previous backend took and did not complete, to execute before new ones.
    resubmit: VecDeque<u16>,
    /// Writes waiting for pool space, in arrival order (only with inflight tracking).
    parked: VecDeque<Parked>,
    /// The queue's vring, kept to complete parked writes when the connection ends.
    vring: Option<VringRwLock>,
    /// The ring is larger than the region's records: logged once.
    reported_size: bool,
    /// Completions were added to the used ring since the driver was last signalled: a
    /// signal without one is an interrupt for nothing (without EVENT_IDX, every signal is
    /// one).
    unsignalled: AtomicBool,
    /// How long to watch the avail ring after a pass (see [`super::poll`]).
    poll: PollWindow,
}

/// A descriptor given away to code that will not close it, with the inode it had, so that
/// it is closed later only if the number still names the same file.
struct LeakedFd {
    fd: RawFd,
    ino: u64,
}

/// `m` locked, if that happens within `limit`.
fn lock_within<T>(
    m: &Mutex<T>,
    limit: std::time::Duration,
) -> Option<std::sync::MutexGuard<'_, T>> {
    let start = Instant::now();
    loop {
        match m.try_lock() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if start.elapsed() < limit => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

fn inode(fd: RawFd) -> Option<u64> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat only writes a stat into `st`; a closed or reused number is an error or
    // another file's inode, both handled by the caller.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    (st.st_mode & libc::S_IFMT == libc::S_IFIFO).then_some(st.st_ino)
}

impl BlkBackend {
    pub fn new(disk: Arc<Disk>) -> Self {
        let n = disk.num_queues;
        BlkBackend {
            waker: Arc::new(Waker::new(disk.clone(), n)),
            disk,
            event_idx: AtomicBool::new(false),
            inflight: Arc::default(),
            queues: (0..n).map(|_| Mutex::default()).collect(),
            mem: RwLock::new(None),
            exit_notifiers: Mutex::new((0..n).map(|_| None).collect()),
            signalled: (0..n).map(|_| AtomicBool::new(false)).collect(),
            exit_consumers: Mutex::new(Vec::new()),
            reported: (0..n).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// The connection's inflight tracking state, for the relay.
    pub fn inflight(&self) -> Arc<Inflight> {
        self.inflight.clone()
    }

    /// The event data under which queue `q`'s wake eventfd is registered in its worker's
    /// epoll set (above the queues and the exit event, which the vhost crate reserves).
    pub fn wake_token(&self) -> u64 {
        self.disk.num_queues as u64 + 1
    }

    /// Queue `q`'s wake eventfd (see [`Waker`]), to register with the worker that serves
    /// it under [`BlkBackend::wake_token`].
    pub fn wake_fd(&self, q: usize) -> Option<RawFd> {
        self.waker.event(q).map(|e| e.as_raw_fd())
    }

    /// Queue `q`'s worker watches its wake eventfd: with inflight tracking, it may park
    /// writes that wait for space.
    pub fn wake_watched(&self, q: usize) {
        self.waker.set_watched(q);
    }

    /// Closes the exit consumers that the vhost crate leaks: `VringEpollHandler::new`
    /// (vhost-user-backend 0.24 event_loop.rs:125) adds `consumer.into_raw_fd()` to its
    /// epoll set and never closes it, one descriptor per worker thread per connection, so
    /// a daemon whose frontends reconnect runs out of descriptors. Call only after the
    /// connection's `VhostUserDaemon` (and so its handler, which joins the workers) is
    /// dropped. Each consumer is a pipe's read end, whose inode is unique: a number the
    /// crate did close (a fixed version) and that was reused since is left alone.
    pub fn close_leaked_exit_consumers(&self) {
        for l in lock(&self.exit_consumers).drain(..) {
            if inode(l.fd) == Some(l.ino) {
                // SAFETY: the number still names the pipe we made and gave away, which
                // nothing uses any more (its epoll set and worker are gone).
                unsafe { libc::close(l.fd) };
            }
        }
    }

    /// Whether queue `vring` can be served: its rings lie in guest memory and its avail idx
    /// is at most a ring ahead of the next entry. Otherwise the driver is broken or hostile:
    /// the reason is logged (once until the queue is sound again) and the queue is left
    /// alone until the driver sets it up again, so that the device neither touches memory
    /// that is not there nor spins on entries it can never take.
    fn queue_is_sound(&self, vring: &VringRwLock, mem: &GuestMemoryMmap, index: usize) -> bool {
        let why = {
            let state = vring.get_ref();
            let q = state.get_queue();
            let size = q.size() as usize;
            let fits = |addr: u64, len: usize| {
                GuestMemoryBackend::check_range(mem, GuestAddress(addr), len)
            };
            if !fits(q.desc_table(), 16 * size)
                || !fits(q.avail_ring(), 6 + 2 * size)
                || !fits(q.used_ring(), 6 + 8 * size)
            {
                Some(format!(
                    "rings do not fit in guest memory (descriptors {:#x}, avail {:#x}, used \
                     {:#x}, {size} entries)",
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring()
                ))
            } else {
                match q.avail_idx(mem, Ordering::Acquire) {
                    Err(e) => Some(format!("cannot read the avail idx: {e}")),
                    Ok(idx) => {
                        let ahead = idx.0.wrapping_sub(q.next_avail());
                        (ahead as usize > size).then(|| {
                            format!(
                                "avail idx {} is {ahead} entries ahead of the next one ({}), \
                                 more than the ring's {size}",
                                idx.0,
                                q.next_avail()
                            )
                        })
                    }
                }
            }
        };
        let reported = &self.reported[index.min(self.reported.len() - 1)];
        match why {
            None => {
                reported.store(false, Ordering::Relaxed);
                true
            }
            Some(why) => {
                if !reported.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "{}: queue {index}: {why}; not served until the driver sets it up again",
                        self.disk.name
                    );
                }
                false
            }
        }
    }

    /// Serves queue `vring` after a kick: requests are taken and completed until none is
    /// left. Errors are the driver's (memory it withdrew, a call descriptor that fails):
    /// they are logged and the worker thread lives on, so that the queue serves again once
    /// the driver sets it up anew on the same connection (as after a guest reboot). An
    /// error returned to the vhost crate would end the thread silently, for good.
    fn serve_queue(&self, vring: &VringRwLock, index: usize) -> io::Result<()> {
        let Some(atomic) = read(&self.mem).clone() else {
            // No memory table yet: nothing can be read; the kick is not lost, since a
            // queue is looked at again on its next kick and the driver kicks after setup.
            return Ok(());
        };
        let e = |e: virtio_queue::Error| io::Error::other(e.to_string());
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        if event_idx || super::poll::enabled() {
            // Whether requests are known to be offered: a pass that then takes nothing has
            // met a ring it cannot serve (`queue_is_sound` catches what is known to cause
            // that, a stopped ring pops nothing), and the loop stops rather than spin.
            let mut offered = false;
            loop {
                if !self.queue_is_sound(vring, &atomic.memory(), index) {
                    // Kicks on again (a watch turns them off), so the next setup is seen.
                    let _ = vring.enable_notification();
                    return Ok(());
                }
                if event_idx {
                    // No kicks for what this pass will take anyway. Without EVENT_IDX they
                    // are turned off only while the worker watches: a request published
                    // between a pass that took nothing and the re-check below would
                    // otherwise be kicked for by no one.
                    vring.disable_notification().map_err(e)?;
                }
                let progress = self.process_queue(vring, index)?;
                if offered && !progress {
                    let _ = vring.enable_notification();
                    break;
                }
                let window = self.poll_window(index);
                let watch = (!window.is_zero()).then(super::poll::Watch::take).flatten();
                if watch.is_some() {
                    // The driver hears of this pass now, not after the watch: it reaps and
                    // submits again while the worker watches.
                    self.signal_pass(vring, index, event_idx).map_err(e)?;
                    if !event_idx {
                        vring.disable_notification().map_err(e)?;
                    }
                    let found = self.poll_avail(vring, &atomic.memory(), window);
                    drop(watch);
                    self.poll_watched(index, found);
                    if found {
                        offered = true;
                        continue;
                    }
                }
                if !vring.enable_notification().map_err(e)? {
                    break;
                }
                offered = true;
            }
            self.signal_pass(vring, index, event_idx).map_err(e)?;
        } else if self.queue_is_sound(vring, &atomic.memory(), index) {
            self.process_queue(vring, index)?;
            // Not when the pass's completions were all signalled within it already.
            self.signal_pass(vring, index, false).map_err(e)?;
        }
        Ok(())
    }

    /// Signals the completions of a pass the driver has not heard of, or the first event of
    /// the connection (see [`BlkBackend::first_event`]).
    fn signal_pass(
        &self,
        vring: &VringRwLock,
        index: usize,
        event_idx: bool,
    ) -> Result<(), virtio_queue::Error> {
        // With EVENT_IDX the unsignalled flag is left as it is: `needs_notification` counts
        // what was added since it last asked, so a stale flag costs one question, never a
        // signal. Asked first: it also resets the library's count of what was added.
        let needed = if event_idx {
            vring.needs_notification()?
        } else {
            self.take_unsignalled(index)
        };
        if needed | self.first_event(index) {
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!("{}: cannot signal the used ring: {e}", self.disk.name);
            }
        }
        Ok(())
    }

    /// Watches queue `vring`'s avail ring for up to `window` (the driver's kicks are off):
    /// whether a request was offered meanwhile. It spins: yielding the CPU between looks
    /// was tried and cost 2 queues on 2 cores a fifth of their IOPS (docs/BENCHMARKS.md).
    fn poll_avail(&self, vring: &VringRwLock, mem: &GuestMemoryMmap, window: Duration) -> bool {
        let start = Instant::now();
        loop {
            {
                let state = vring.get_ref();
                let q = state.get_queue();
                // A ring the frontend stopped (GET_VRING_BASE) pops nothing: not watched.
                if !q.ready() {
                    return false;
                }
                if q.avail_idx(mem, Ordering::Acquire)
                    .is_ok_and(|i| i.0 != q.next_avail())
                {
                    return true;
                }
            }
            if start.elapsed() >= window {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Opens queue `index`'s poll window, as a watch that found work does.
    #[cfg(test)]
    fn open_poll_window(&self, index: usize) {
        lock(&self.queues[index]).poll = PollWindow::opened();
    }

    /// How long to watch queue `index` after the pass that just ended (see [`super::poll`]).
    fn poll_window(&self, index: usize) -> Duration {
        self.queues
            .get(index)
            .map_or(Duration::ZERO, |q| lock(q).poll.after_pass())
    }

    /// What the watch of queue `index` found.
    fn poll_watched(&self, index: usize, found: bool) {
        if let Some(q) = self.queues.get(index) {
            lock(q).poll.watched(found);
        }
    }

    /// Whether queue `index` completed requests that were not signalled (see
    /// `QueueState::unsignalled`); they count as signalled from now.
    fn take_unsignalled(&self, index: usize) -> bool {
        self.queues
            .get(index)
            .is_some_and(|q| lock(q).unsignalled.swap(false, Ordering::Relaxed))
    }

    /// The disk's target, for a request of queue state `q`'s: held while the request runs.
    /// A drain holds the gate for as long as a snapshot or a migration's switch needs: the
    /// completions not yet told of are signalled before waiting for it.
    fn gate<'a>(&'a self, q: &QueueState, vring: &VringRwLock) -> RwLockReadGuard<'a, Target> {
        self.disk.try_target().unwrap_or_else(|| {
            self.signal_completed(q, vring);
            self.disk.target()
        })
    }

    /// Signals the completions added since the driver last heard, if any (with EVENT_IDX,
    /// only if it asked to hear of one of them). Called with the disk's I/O gate released:
    /// a frontend that stops reading its call eventfd can block the write.
    fn signal_completed(&self, q: &QueueState, vring: &VringRwLock) {
        if !q.unsignalled.swap(false, Ordering::Relaxed) {
            return;
        }
        match vring.needs_notification() {
            Ok(true) => {
                if let Err(e) = vring.signal_used_queue() {
                    tracing::warn!("{}: cannot signal the used ring: {e}", self.disk.name);
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "{}: cannot read the driver's used_event: {e}",
                self.disk.name
            ),
        }
    }

    /// Whether this is the first event of queue `index` in this connection: it ends with a
    /// signal, needed or not. The used ring may hold completions that a previous process
    /// added and never signalled (killed between `add_used` and the interrupt, or stopped by
    /// SIGTERM while requests waited at the drain): the guest would not look at them, and
    /// with EVENT_IDX its `used_event` is already behind them, so no later completion would
    /// be signalled either and its requests would wait forever. The library sends an event
    /// when a queue is enabled, so this happens at once on a new connection, which also
    /// executes what the guest made available before the daemon started. A spurious
    /// interrupt costs the guest one look at its used ring (libvhost-user signals on every
    /// SET_VRING_CALL for the same reason).
    fn first_event(&self, index: usize) -> bool {
        self.signalled
            .get(index)
            .is_some_and(|s| !s.swap(true, Ordering::SeqCst))
    }

    /// Asks every worker thread to leave its loop; writes held or parked for space give up
    /// (IOERR), so that nothing is left in flight.
    pub fn signal_exit(&self) {
        self.waker.exit();
        self.disk.space().space_changed();
        // The workers leave at the exit event without looking at their queues again: the
        // parked writes of idle workers are failed here. A worker in the middle of a pass
        // (which may wait for the I/O gate for as long as a snapshot or migration holds
        // it) fails its own at the end of the pass, having seen `exiting`, set before: so
        // the lock is only tried, for a while, never waited on without bound.
        if let Some(atomic) = read(&self.mem).clone() {
            let mem = atomic.memory();
            for slot in &self.queues {
                let Some(mut q) = lock_within(slot, std::time::Duration::from_secs(1)) else {
                    continue;
                };
                let Some(vring) = q.vring.clone() else {
                    continue;
                };
                // A queue stopped, or reset and not yet taken up again, has no rings to
                // complete into: the buffers may be the rebooting guest's own by now.
                if !self.rings_are_the_parked_writes(&q, &vring) {
                    self.drop_parked(
                        std::mem::take(&mut q.parked),
                        "the queue was stopped or reset",
                    );
                    continue;
                }
                if self.retry_parked(&mut q, &vring, &mem, None) {
                    let _ = vring.signal_used_queue();
                }
            }
        }
        for n in lock(&self.exit_notifiers).iter().flatten() {
            let _ = n.notify();
        }
    }

    /// Whether the rings queue state `q` parked its writes from are still the live ones:
    /// the queue runs and its inflight records are those of the current region.
    fn rings_are_the_parked_writes(&self, q: &QueueState, vring: &VringRwLock) -> bool {
        let ready = vring.get_ref().get_queue().ready();
        let generation = self.inflight.region().map(|(g, _)| g);
        ready && q.tracker.as_ref().map(|(g, _)| *g) == generation
    }

    /// Forgets the parked writes without completing them (their rings are gone).
    fn drop_parked(&self, parked: impl IntoIterator<Item = Parked>, why: &str) {
        for p in parked {
            p.space.waiting.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                "{}: a write waiting for space (head {}) dropped: {why}",
                self.disk.name,
                p.head
            );
        }
    }

    /// `GET_VRING_BASE` stops queue `index`: a frontend stopping a queue (VM stop,
    /// migration, reset) expects every request it handed over to be completed, since the
    /// base it gets back counts them as taken. Parked writes are tried once more and those
    /// that still find no space fail (IOERR), rather than being left for rings that may
    /// not come back.
    fn finish_parked_at_stop(&self, index: usize) {
        let Some(slot) = self.queues.get(index) else {
            return;
        };
        let Some(atomic) = read(&self.mem).clone() else {
            return;
        };
        let mem = atomic.memory();
        let mut q = lock(slot);
        let Some(vring) = q.vring.clone() else {
            return;
        };
        if q.parked.is_empty() {
            return;
        }
        let completed = self.retry_parked(
            &mut q,
            &vring,
            &mem,
            Some("write (out of space, queue stopped)"),
        );
        self.waker.set_parked(index, 0);
        if completed {
            let _ = vring.signal_used_queue();
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            capacity_sectors: self.disk.size() / 512,
            read_only: self.disk.read_only(),
            max_discard_seg: MAX_DISCARD_SEG,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
        }
    }

    fn config(&self) -> BlkConfig {
        let bs = self.disk.target().pool.block_bytes();
        let block_sectors = (bs / 512) as u32;
        let (seg_max, size_max) = segment_limits(self.disk.queue_size);
        BlkConfig(virtio_blk_config {
            capacity: (self.disk.size() / 512).to_le(),
            size_max: size_max.to_le(),
            seg_max: seg_max.to_le(),
            blk_size: 512u32.to_le(),
            // Physical block = pool block: writes of whole blocks avoid zeroing and copying.
            physical_block_exp: block_sectors.trailing_zeros() as u8,
            min_io_size: 8u16.to_le(),
            opt_io_size: block_sectors.to_le(),
            num_queues: (self.disk.num_queues as u16).to_le(),
            max_discard_sectors: MAX_DISCARD_SECTORS.to_le(),
            max_discard_seg: MAX_DISCARD_SEG.to_le(),
            discard_sector_alignment: block_sectors.to_le(),
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS.to_le(),
            max_write_zeroes_seg: MAX_DISCARD_SEG.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        })
    }

    /// Executes and completes what queue `index` offers: writes parked for space first (in
    /// arrival order), then the requests a previous backend left in flight, then every
    /// available request. Returns whether any request was taken or completed.
    pub fn process_queue(&self, vring: &VringRwLock, index: usize) -> io::Result<bool> {
        let Some(atomic) = read(&self.mem).clone() else {
            return Ok(false);
        };
        let Some(slot) = self.queues.get(index) else {
            return Ok(false);
        };
        let mem = atomic.memory();
        let limits = self.limits();
        let mut q = lock(slot);
        if q.vring.is_none() {
            q.vring = Some(vring.clone());
        }
        self.take_up_records(&mut q, vring, &mem, index);
        let mut progress = self.retry_parked(&mut q, vring, &mem, None);
        while let Some(head) = q.resubmit.pop_front() {
            progress = true;
            let mut io = Some(self.gate(&q, vring));
            let (table, size) = {
                let state = vring.get_ref();
                (state.get_queue().desc_table(), state.get_queue().size())
            };
            match chain::walk(&mem, table, size, head) {
                Ok(descs) => {
                    self.handle(&mut q, vring, &mem, &limits, head, &descs, &mut io, index)
                }
                Err(e) => {
                    tracing::warn!(
                        "{}: queue {index}: request {head} left in flight by the previous \
                         backend cannot be read again: {e}",
                        self.disk.name
                    );
                    Stats::add(&self.disk.stats.errors, 1);
                    self.complete(&q, vring, &mem, head, None, 0);
                }
            }
        }
        let mut moved = 0u64;
        loop {
            // Held while this request runs, so shutdown and snapshots can drain I/O (a
            // write waiting for pool space lets go of it meanwhile: see `run`).
            let mut io = Some(self.gate(&q, vring));
            // The vring lock is held only to pop: never across I/O.
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            progress = true;
            let head = chain.head_index();
            if let Some((_, t)) = q.tracker.as_mut() {
                t.taken(head);
            }
            let descs: Vec<Desc> = chain
                .map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    writable: d.is_write_only(),
                })
                .collect();
            self.handle(&mut q, vring, &mem, &limits, head, &descs, &mut io, index);
            drop(io);
            // Large requests are told of within the pass, so the driver reaps and submits
            // again while the rest of it runs; small ones once per pass, as signalling each
            // costs the driver a wake-up per request. Sent with the I/O gate released.
            moved += descs.iter().map(|d| u64::from(d.len)).sum::<u64>();
            if moved >= SIGNAL_EVERY_BYTES {
                self.signal_completed(&q, vring);
                moved = 0;
            }
        }
        if self.waker.exiting() {
            // The connection ended during this pass: nothing stays parked (see
            // `signal_exit`).
            progress |= self.retry_parked(&mut q, vring, &mem, None);
        }
        self.waker.set_parked(index, q.parked.len());
        Ok(progress)
    }

    /// Takes up queue `index`'s inflight records when a region was handed over since it
    /// last looked (a new connection, or a restart of the device): what a previous backend
    /// left in flight is queued to execute again, and the avail ring resumes after it.
    fn take_up_records(
        &self,
        q: &mut QueueState,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        index: usize,
    ) {
        let Some((generation, region)) = self.inflight.region() else {
            q.tracker = None;
            return;
        };
        if q.tracker.as_ref().is_some_and(|(g, _)| *g == generation) {
            return;
        }
        q.tracker = None;
        let Some(mut tracker) = Tracker::new(region, index) else {
            return;
        };
        let (size, used) = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            (queue.size(), queue.used_idx(mem, Ordering::Acquire))
        };
        if size > tracker.queue_size() {
            if !std::mem::replace(&mut q.reported_size, true) {
                tracing::warn!(
                    "{}: queue {index}: {size} entries, more than the inflight records \
                     hold ({}): not tracked, writes waiting for space hold the queue",
                    self.disk.name,
                    tracker.queue_size()
                );
            }
            return;
        }
        let Ok(used) = used else {
            // queue_is_sound checked that the used ring lies in guest memory.
            return;
        };
        let r = tracker.recover(used.0, size);
        for head in &r.dropped {
            tracing::warn!(
                "{}: queue {index}: inflight record of head {head}, beyond the ring's {size} \
                 entries, dropped",
                self.disk.name
            );
        }
        // The records say what is in flight. Heads this backend holds already (parked, or
        // queued to execute again) that they name are the same requests: the region was
        // handed over again on the same connection, after the device was stopped and
        // started. Those they do not name belong to rings that are gone (the device was
        // reset, and the frontend made a new region): completing them would write into
        // the new rings, so they are dropped.
        let (kept, gone): (VecDeque<Parked>, VecDeque<Parked>) = std::mem::take(&mut q.parked)
            .into_iter()
            .partition(|p| r.heads.contains(&p.head));
        q.parked = kept;
        self.drop_parked(gone, "the device was reset");
        q.resubmit.retain(|h| r.heads.contains(h));
        let fresh: Vec<u16> = r
            .heads
            .iter()
            .copied()
            .filter(|h| !q.parked.iter().any(|p| p.head == *h) && !q.resubmit.contains(h))
            .collect();
        if !fresh.is_empty() {
            tracing::info!(
                "{}: queue {index}: {} request(s) left in flight by the previous backend \
                 executed again",
                self.disk.name,
                fresh.len()
            );
        }
        tracing::debug!(
            "{}: queue {index}: inflight records taken up: used index {} ({} in the \
             records), the frontend's base {}, {} in flight, resuming at {}",
            self.disk.name,
            used.0,
            r.recorded_used,
            vring.get_ref().get_queue().next_avail(),
            r.heads.len(),
            r.next_avail
        );
        vring.set_queue_next_avail(r.next_avail);
        q.resubmit.extend(fresh);
        q.tracker = Some((generation, tracker));
    }

    /// Parses and executes one request taken from the queue, and completes it, unless it is
    /// a write that must wait for space and can be parked.
    #[allow(clippy::too_many_arguments)]
    fn handle<'a>(
        &'a self,
        q: &mut QueueState,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        limits: &Limits,
        head: u16,
        descs: &[Desc],
        io: &mut Option<RwLockReadGuard<'a, Target>>,
        index: usize,
    ) {
        let parsed = parse(descs, &View(mem), limits);
        Stats::add(&self.disk.stats.requests, 1);
        let (status, written) = match parsed.request {
            Ok(req) if self.can_park(q, index) && !matches!(req.op, Op::Flush) => {
                let to = io.get_or_insert_with(|| self.disk.target());
                match execute(&req.op, mem, &self.disk, to) {
                    Ok(done) => (Some((req.status, done.status)), done.written + 1),
                    Err(NeedsSpace { error, timeout }) => {
                        *io = None;
                        if self.giving_up() {
                            let done =
                                fail(&self.disk, "write (out of space, disk stopping)", &error);
                            (Some((req.status, done.status)), done.written + 1)
                        } else {
                            let space = self.disk.space();
                            space.waiting.fetch_add(1, Ordering::SeqCst);
                            q.parked.push_back(Parked {
                                head,
                                op: req.op,
                                status: req.status,
                                // A deadline beyond what Instant can hold is no deadline.
                                deadline: timeout.and_then(|t| Instant::now().checked_add(t)),
                                error,
                                space,
                            });
                            return;
                        }
                    }
                }
            }
            Ok(req) => {
                let done = self.run(q, &req.op, mem, vring, io);
                (Some((req.status, done.status)), done.written + 1)
            }
            Err(e) => {
                tracing::warn!("{}: bad request (chain {head}): {e}", self.disk.name);
                Stats::add(&self.disk.stats.errors, 1);
                let code = if e.is_unsupported() {
                    VIRTIO_BLK_S_UNSUPP
                } else {
                    VIRTIO_BLK_S_IOERR
                } as u8;
                match parsed.status {
                    Some(at) => (Some((at, code)), 1),
                    None => (None, 0),
                }
            }
        };
        self.complete(q, vring, mem, head, status, written);
    }

    /// Whether a write that must wait for space can be parked: only when the queue keeps
    /// inflight records (a restart must know which requests were taken and not completed
    /// once they complete out of order) and its worker can be woken.
    fn can_park(&self, q: &QueueState, index: usize) -> bool {
        q.tracker.is_some() && q.vring.is_some() && self.waker.can_wake(index)
    }

    /// Tries the parked writes again, in arrival order; those that still find no space and
    /// whose timeout has not passed stay parked, unless `stopping` says why none may stay
    /// (they fail). Returns whether any was completed.
    fn retry_parked(
        &self,
        q: &mut QueueState,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        stopping: Option<&str>,
    ) -> bool {
        let mut left = VecDeque::new();
        let mut completed = false;
        while let Some(p) = q.parked.pop_front() {
            let done = if self.giving_up() {
                // Without the gate: a shutdown may hold it for good.
                Some(fail(
                    &self.disk,
                    "write (out of space, disk stopping)",
                    &p.error,
                ))
            } else {
                let to = self.gate(q, vring);
                match execute(&p.op, mem, &self.disk, &to) {
                    Ok(done) => Some(done),
                    Err(NeedsSpace { error, .. }) => {
                        drop(to);
                        if p.deadline.is_some_and(|d| Instant::now() >= d) {
                            self.disk.space().queue_timed_out();
                            Some(fail(
                                &self.disk,
                                "write (out of space, queue timeout passed)",
                                &error,
                            ))
                        } else {
                            stopping.map(|why| fail(&self.disk, why, &error))
                        }
                    }
                }
            };
            match done {
                Some(done) => {
                    p.space.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.complete(
                        q,
                        vring,
                        mem,
                        p.head,
                        Some((p.status, done.status)),
                        done.written + 1,
                    );
                    completed = true;
                }
                None => left.push_back(p),
            }
        }
        q.parked = left;
        completed
    }

    /// Writes the status byte and returns head `head` to the guest, the inflight record
    /// following (see [`Tracker`] for the order).
    fn complete(
        &self,
        q: &QueueState,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        head: u16,
        status: Option<(u64, u8)>,
        written: u32,
    ) {
        if let Some((at, code)) = status {
            if mem.write_obj(code, GuestAddress(at)).is_err() {
                tracing::warn!(
                    "{}: cannot write the status byte at {at:#x}",
                    self.disk.name
                );
            }
        }
        let tracker = q.tracker.as_ref().map(|(_, t)| t);
        if let Some(t) = tracker {
            t.completing(head);
        }
        // A head the ring cannot hold (beyond its size) cannot be returned: the chain is
        // skipped, and the ones after it are served.
        if let Err(e) = vring.add_used(head, written) {
            tracing::warn!(
                "{}: chain {head} cannot be put in the used ring: {e}",
                self.disk.name
            );
        }
        if let Some(t) = tracker {
            t.completed(head, vring.get_ref().get_queue().next_used());
        }
        q.unsignalled.store(true, Ordering::Relaxed);
    }

    /// Executes one request. A write that finds the pool full under policy `queue` is held
    /// here until space appears, the timeout passes (dm-thin's no_space_timeout) or the disk
    /// stops; the I/O gate `io` is released while it waits, so that a snapshot, a revert or
    /// a shutdown (which take the gate exclusively) need not wait for space, and taken again
    /// before the write is retried.
    fn run<'a>(
        &'a self,
        q: &QueueState,
        op: &Op,
        mem: &GuestMemoryMmap,
        vring: &VringRwLock,
        io: &mut Option<RwLockReadGuard<'a, Target>>,
    ) -> Done {
        if let Op::Flush = op {
            // A FLUSH changes no data, so it need not be wholly before or after a snapshot:
            // it commits without the gate. A snapshot holds commits and then drains the
            // requests in flight; a FLUSH holding the gate while it waits for the commit
            // lock would hold the snapshot up (or, with the order reversed, deadlock).
            let (pool, mirror) = io.get_or_insert_with(|| self.disk.target()).flush_targets();
            *io = None;
            // The commit may take a while (it syncs the data written since the last one):
            // the requests this pass completed before the FLUSH are told of first.
            self.signal_completed(q, vring);
            return flush(&self.disk, &pool, mirror.as_deref());
        }
        let mut deadline = None;
        loop {
            let to = io.get_or_insert_with(|| self.disk.target());
            let NeedsSpace { error, timeout } = match execute(op, mem, &self.disk, to) {
                Ok(done) => return done,
                Err(n) => n,
            };
            if self.giving_up() {
                return fail(&self.disk, "write (out of space, disk stopping)", &error);
            }
            let first_wait = deadline.is_none();
            // A deadline beyond what Instant can hold is no deadline: the entry points cap
            // the timeout, this keeps one that slipped through from panicking.
            let d = *deadline
                .get_or_insert_with(|| timeout.and_then(|t| Instant::now().checked_add(t)));
            *io = None;
            // The policy of the pool the write failed in; a disk moved to another pool
            // meanwhile wakes this wait, and the retry goes to the new pool.
            let space = self.disk.space();
            // The requests this pass completed before this one are told of now, not when
            // the wait ends (it may last until space appears); once, as the wait goes
            // round (without EVENT_IDX every signal would be an interrupt).
            if first_wait {
                self.signal_completed(q, vring);
            }
            space.waiting.fetch_add(1, Ordering::SeqCst);
            let more = space.wait(d);
            space.waiting.fetch_sub(1, Ordering::SeqCst);
            if self.giving_up() {
                return fail(&self.disk, "write (out of space, disk stopping)", &error);
            }
            if !more {
                space.queue_timed_out();
                return fail(
                    &self.disk,
                    "write (out of space, queue timeout passed)",
                    &error,
                );
            }
        }
    }

    /// Whether a held write should stop waiting: the disk stops being served, or this
    /// connection ends (its worker threads are joined before the next connection).
    fn giving_up(&self) -> bool {
        self.disk.stopping() || self.waker.exiting()
    }
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        // The connection is over: a watcher left waking its queues leaves too.
        self.waker.exit();
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.disk.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.disk.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            // dm-thin's ignore_discard turns discard support off; so does not offering it.
            if self.disk.discard {
                f |= 1 << VIRTIO_BLK_F_DISCARD;
            }
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // The frontend hands over a channel for our messages: the relay keeps it to
            // announce a grown disk (CONFIG_CHANGE_MSG).
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Exactly `size` bytes, whatever the range: anything else is an empty reply.
        let cfg = self.config();
        let bytes = cfg.as_slice();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(bytes.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(bytes.len());
        out[..end - start].copy_from_slice(&bytes[start..end]);
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        tracing::debug!(
            "{}: guest memory has {} region(s)",
            self.disk.name,
            mem.memory().num_regions()
        );
        *write(&self.mem) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.disk.num_queues).map(|i| 1u64 << i).collect()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.finish_parked_at_stop(queue_index as usize);
        Ok(())
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // A pipe rather than an eventfd: the crate leaks the consumer, which is closed
        // after the connection (`close_leaked_exit_consumers`), and a pipe's inode tells
        // it from any other file its number may name by then. The crate only polls the
        // consumer, never reads it; a notification is 8 bytes, and there are two at most.
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills `fds` with two new descriptors, owned from here on.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return None;
        }
        // SAFETY: both descriptors were just made and are owned by nobody else.
        let (c, n) = unsafe {
            (
                EventConsumer::from_raw_fd(fds[0]),
                EventNotifier::from_raw_fd(fds[1]),
            )
        };
        let ino = inode(fds[0])?;
        self.exit_consumers
            .lock()
            .unwrap()
            .push(LeakedFd { fd: fds[0], ino });
        let keep = n.try_clone().ok()?;
        if let Some(slot) = lock(&self.exit_notifiers).get_mut(thread_index) {
            *slot = Some(keep);
        }
        Some((c, n))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // With one queue per thread, device_event indexes this thread's vrings: always 0.
        // One queue per thread: the thread's index is the queue's.
        let vring = if u64::from(device_event) == self.wake_token() {
            // Parked writes may go on (space appeared, a timeout passed): only a queue that
            // runs (not stopped by GET_VRING_BASE, enabled) is served.
            self.waker.consume(thread_id);
            match vrings.first() {
                Some(v) if v.get_ref().get_queue().ready() && v.get_ref().is_enabled() => v,
                _ => return Ok(()),
            }
        } else {
            let Some(vring) = vrings.get(device_event as usize) else {
                return Ok(());
            };
            vring
        };
        if let Err(e) = self.serve_queue(vring, thread_id) {
            tracing::warn!("{}: queue {thread_id}: {e}", self.disk.name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
