//! Tier 1: the backend driven directly, no socket: a mock split queue in guest memory.
use super::*;
use thinpool::pool::{Pool, PoolOptions};
use thinpool::storage::{MemStorage, Storage};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::Address;

fn disk(read_only: bool) -> Arc<Disk> {
    disk_with(read_only, true)
}

fn disk_with(read_only: bool, discard: bool) -> Arc<Disk> {
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let data: Arc<dyn Storage> = Arc::new(MemStorage::new(16 << 20));
    let pool = Arc::new(Pool::create(meta, data, 128, PoolOptions::default()).unwrap());
    pool.create_thin(0).unwrap();
    Arc::new(Disk::new(
        pool,
        crate::blk::disk::DiskOptions {
            name: "t".into(),
            thin_id: 0,
            size: 8 << 20,
            read_only,
            serial: "serial-1".into(),
            num_queues: 1,
            queue_size: 64,
            discard,
        },
    ))
}

fn desc(addr: u64, len: u32, write: bool, next: Option<u16>) -> RawDescriptor {
    let mut f = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
    if next.is_some() {
        f |= VRING_DESC_F_NEXT as u16;
    }
    RawDescriptor::from(Descriptor::new(addr, len, f, next.unwrap_or(0)))
}

/// Out-of-space tests: a pool of 4 blocks of 64 KiB, all mapped (blocks 0 to 3 of the
/// disk hold 0x10 + their number), policy `queue` without timeout.
struct Full {
    disk: Arc<Disk>,
    data: Arc<MemStorage>,
    space: Arc<crate::blk::disk::SpacePolicy>,
}

const BLOCK: u64 = 64 << 10;

fn full_pool() -> Full {
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(MemStorage::new(4 * BLOCK));
    let pool = Arc::new(
        Pool::create(
            meta,
            data.clone() as Arc<dyn Storage>,
            128,
            PoolOptions::default(),
        )
        .unwrap(),
    );
    pool.create_thin(0).unwrap();
    for b in 0..4u64 {
        pool.write(0, b * BLOCK, &vec![0x10 + b as u8; BLOCK as usize])
            .unwrap();
    }
    let space = Arc::new(crate::blk::disk::SpacePolicy::new(
        crate::blk::disk::OutOfSpace::Queue { timeout: None },
    ));
    let disk = Arc::new(Disk::with_policy(
        pool,
        crate::blk::disk::DiskOptions {
            name: "t".into(),
            thin_id: 0,
            size: 8 << 20,
            read_only: false,
            serial: "serial-1".into(),
            num_queues: 1,
            queue_size: 64,
            discard: true,
        },
        space.clone(),
    ));
    Full { disk, data, space }
}

impl Full {
    /// The pool grows to 8 blocks, and says so.
    fn grow(&self) {
        self.data.set_len(8 * BLOCK);
        self.disk.target().pool.grow_data().unwrap();
        self.space.space_available();
    }
}

/// A split queue of 64 entries at 0x1000 in 1 MiB of guest memory, set up as the
/// vhost-user handler sets it up (next_used from the ring, next_avail as given).
fn vring_on(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    next_avail: u16,
) -> VringRwLock {
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let vring = VringRwLock::new(atomic, 64).unwrap();
    vring.set_queue_size(64);
    vring
        .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
        .unwrap();
    let used = mem
        .read_obj::<u16>(vq.used_addr().unchecked_add(2))
        .unwrap();
    vring.set_queue_next_used(used);
    vring.set_queue_next_avail(next_avail);
    vring.set_queue_ready(true);
    vring
}

/// A backend for `disk` on guest memory `mem`; with `region`, inflight tracking is on
/// (negotiated, the region handed over, the queue's wake eventfd watched).
fn backend_on(
    disk: &Arc<Disk>,
    mem: &GuestMemoryMmap,
    region: Option<&std::fs::File>,
) -> BlkBackend {
    let b = BlkBackend::new(disk.clone());
    b.update_memory(GuestMemoryAtomic::new(mem.clone()))
        .unwrap();
    if let Some(file) = region {
        let len = crate::blk::inflight::region_len(1, 64);
        let r = crate::blk::inflight::Region::open(file.try_clone().unwrap(), len, 0, 1, 64, 1)
            .unwrap();
        b.inflight().set_acked(true);
        b.inflight().set_region(r);
        b.wake_watched(0);
    }
    b
}

/// Request headers and data at 0x10000 + 0x4000 × n: header, 4 KiB of data, status
/// (set to 0xff, "not completed"). Returns the chain's descriptors for table slot
/// 3 × n.
fn request(mem: &GuestMemoryMmap, n: u16, kind: u32, sector: u64, fill: u8) -> Vec<RawDescriptor> {
    let at = 0x10000 + 0x4000 * n as u64;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
    mem.write_slice(&[fill; 4096], GuestAddress(at + 0x1000))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(at + 0x3000)).unwrap();
    let i = 3 * n;
    vec![
        desc(at, 16, false, Some(i + 1)),
        desc(at + 0x1000, 4096, kind == VIRTIO_BLK_T_IN, Some(i + 2)),
        desc(at + 0x3000, 1, true, None),
    ]
}

fn status(mem: &GuestMemoryMmap, n: u16) -> u8 {
    mem.read_obj(GuestAddress(0x10000 + 0x4000 * n as u64 + 0x3000))
        .unwrap()
}

fn data(mem: &GuestMemoryMmap, n: u16) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    mem.read_slice(&mut v, GuestAddress(0x10000 + 0x4000 * n as u64 + 0x1000))
        .unwrap();
    v
}

fn used_ids(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>) -> Vec<u32> {
    let used = vq.used_addr();
    let idx = mem.read_obj::<u16>(used.unchecked_add(2)).unwrap();
    (0..idx as u64)
        .map(|i| mem.read_obj::<u32>(used.unchecked_add(4 + 8 * i)).unwrap())
        .collect()
}

/// Runs `process_queue` in a thread: whether it returned within `limit` (a held write
/// keeps it).
fn process_within(
    b: &Arc<BlkBackend>,
    vring: &VringRwLock,
    limit: std::time::Duration,
) -> (bool, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (b, vring) = (b.clone(), vring.clone());
    let t = std::thread::spawn(move || {
        b.process_queue(&vring, 0).unwrap();
        let _ = tx.send(());
    });
    (rx.recv_timeout(limit).is_ok(), t)
}

const SECTORS_PER_BLOCK: u64 = BLOCK / 512;

/// A backend on `disk` with a call eventfd, EVENT_IDX as given (the driver asking to hear
/// of the first completion), and the connection's first signal already taken: what is
/// signalled from then on is the rules' doing.
fn signalling_backend(
    disk: &Arc<Disk>,
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    event_idx: bool,
) -> (Arc<BlkBackend>, VringRwLock, vmm_sys_util::eventfd::EventFd) {
    use std::os::fd::{FromRawFd, IntoRawFd};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let b = Arc::new(backend_on(disk, mem, None));
    b.set_event_idx(event_idx);
    let vring = vring_on(mem, vq, 0);
    vring.set_queue_event_idx(event_idx);
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    // SAFETY: a fresh descriptor from try_clone, owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(call.try_clone().unwrap().into_raw_fd()) };
    vring.set_call(Some(file));
    // The first completion is to be signalled.
    hear_of_completion(mem, vq, 0);
    b.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
        .unwrap();
    assert_eq!(call.read().ok(), Some(1), "the connection's first signal");
    (b, vring, call)
}

/// The driver asks to hear (with EVENT_IDX) of the completion after the first `n`: its
/// used_event, after the avail ring of 64 entries.
fn hear_of_completion(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, n: u16) {
    mem.write_obj(n, vq.avail_addr().unchecked_add(4 + 2 * 64))
        .unwrap();
}

/// Serves the queue in a thread, as after a kick; the receiver hears when the pass ends.
fn serve_in_thread(
    b: &Arc<BlkBackend>,
    vring: &VringRwLock,
) -> (std::thread::JoinHandle<()>, std::sync::mpsc::Receiver<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (b, vring) = (b.clone(), vring.clone());
    let worker = std::thread::spawn(move || {
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .unwrap();
        let _ = tx.send(());
    });
    (worker, rx)
}

/// Waits (10 s at most) for a signal on `call`.
fn wait_for_signal(call: &vmm_sys_util::eventfd::EventFd, what: &str) {
    let start = Instant::now();
    while call.read().is_err() {
        assert!(start.elapsed().as_secs() < 10, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn reads_and_overwrites_complete_while_a_write_waits_for_space_on_the_same_queue() {
    let f = full_pool();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 64);
    let (region, _) = crate::blk::inflight::create(1, 64, 1).unwrap();
    let b = Arc::new(backend_on(&f.disk, &mem, Some(&region)));
    let vring = vring_on(&mem, &vq, 0);
    // 0: a write to block 5, unmapped: needs a block the pool does not have.
    // 1: a read of block 0; 2: an overwrite in block 1 (mapped).
    let chains: Vec<RawDescriptor> = [
        request(&mem, 0, VIRTIO_BLK_T_OUT, 5 * SECTORS_PER_BLOCK, 0x55),
        request(&mem, 1, VIRTIO_BLK_T_IN, 0, 0),
        request(&mem, 2, VIRTIO_BLK_T_OUT, SECTORS_PER_BLOCK + 8, 0x77),
    ]
    .concat();
    vq.add_desc_chains(&chains, 0).unwrap();
    let (returned, _t) = process_within(&b, &vring, std::time::Duration::from_secs(5));
    assert!(
        returned,
        "the queue's worker is held by the write waiting for space"
    );
    assert_eq!(
        used_ids(&mem, &vq),
        vec![3, 6],
        "the read and the overwrite complete"
    );
    assert_eq!((status(&mem, 1), status(&mem, 2)), (0, 0));
    assert_eq!(data(&mem, 1), vec![0x10; 4096]);
    assert_eq!(status(&mem, 0), 0xff, "the write waits");
    let mut back = vec![0u8; 4096];
    f.disk
        .target()
        .pool
        .read(0, BLOCK + 4096, &mut back)
        .unwrap();
    assert_eq!(back, vec![0x77; 4096]);
    assert_eq!(f.space.waiting.load(Ordering::SeqCst), 1);

    // Space appears: the queue's worker is woken, and the write completes.
    f.grow();
    let wake = b.waker.event(0).unwrap();
    let start = Instant::now();
    while wake.read().is_err() {
        assert!(start.elapsed().as_secs() < 5, "the queue was not woken");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(b.process_queue(&vring, 0).unwrap());
    assert_eq!(used_ids(&mem, &vq), vec![3, 6, 0]);
    assert_eq!(status(&mem, 0), 0);
    f.disk.target().pool.read(0, 5 * BLOCK, &mut back).unwrap();
    assert_eq!(back, vec![0x55; 4096]);
    assert_eq!(f.space.waiting.load(Ordering::SeqCst), 0);
}

#[test]
fn without_inflight_tracking_a_write_waiting_for_space_holds_its_queue() {
    let f = full_pool();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 64);
    let b = Arc::new(backend_on(&f.disk, &mem, None));
    let vring = vring_on(&mem, &vq, 0);
    let chains: Vec<RawDescriptor> = [
        request(&mem, 0, VIRTIO_BLK_T_OUT, 5 * SECTORS_PER_BLOCK, 0x55),
        request(&mem, 1, VIRTIO_BLK_T_IN, 0, 0),
    ]
    .concat();
    vq.add_desc_chains(&chains, 0).unwrap();
    let (returned, t) = process_within(&b, &vring, std::time::Duration::from_millis(600));
    assert!(!returned, "the write was not held in its worker");
    assert!(
        used_ids(&mem, &vq).is_empty(),
        "a request after the held write completed"
    );
    f.grow();
    t.join().unwrap();
    // In order, as before.
    assert_eq!(used_ids(&mem, &vq), vec![0, 3]);
    assert_eq!((status(&mem, 0), status(&mem, 1)), (0, 0));
}

/// A request completed before a write that waits for space (held in its worker: no
/// inflight records to park it) is signalled while the write waits, not when the wait ends
/// (which may be never: policy `queue` without timeout), with EVENT_IDX or without.
#[test]
fn a_completion_before_a_write_waiting_for_space_is_signalled_while_it_waits() {
    for event_idx in [true, false] {
        completion_signalled_while_a_later_write_waits(event_idx);
    }
}

fn completion_signalled_while_a_later_write_waits(event_idx: bool) {
    let f = full_pool();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 64);
    let (b, vring, call) = signalling_backend(&f.disk, &mem, &vq, event_idx);
    // 0: a read of block 0; 1: a write to block 5, which needs a block the pool lacks.
    let chains: Vec<RawDescriptor> = [
        request(&mem, 0, VIRTIO_BLK_T_IN, 0, 0),
        request(&mem, 1, VIRTIO_BLK_T_OUT, 5 * SECTORS_PER_BLOCK, 0x55),
    ]
    .concat();
    vq.add_desc_chains(&chains, 0).unwrap();
    let (worker, ended) = serve_in_thread(&b, &vring);
    wait_for_signal(
        &call,
        &format!("the read was not signalled while the write waits (EVENT_IDX {event_idx})"),
    );
    assert_eq!(used_ids(&mem, &vq), vec![0], "only the read has completed");
    assert_eq!(status(&mem, 0), 0);
    assert_eq!(data(&mem, 0), vec![0x10; 4096]);
    assert!(
        ended.try_recv().is_err(),
        "the worker finished: the write did not wait for space"
    );
    // Nothing more to tell while it waits: no signal as its wait goes round (every 200
    // ms). A late signal would show here; none can come if the rule holds, however slow.
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert!(
        call.read().is_err(),
        "signalled again while the write waits (EVENT_IDX {event_idx})"
    );
    f.grow();
    worker.join().unwrap();
    assert_eq!(used_ids(&mem, &vq), vec![0, 3]);
    assert_eq!(status(&mem, 1), 0);
}

/// A large request's completion is signalled within the pass that served it, not once the
/// pass ends: here the pass goes on to a FLUSH that waits (commits are held), and the
/// 256 KiB read before it has been signalled meanwhile, with EVENT_IDX or without.
#[test]
fn a_large_completion_is_signalled_before_its_pass_ends() {
    for event_idx in [true, false] {
        completion_signalled_while_a_later_flush_waits(event_idx, 256 << 10);
    }
}

/// A small completion too, when the request after it is a FLUSH: the FLUSH's commit may
/// take long (it syncs what was written since the last), and the read is not held up
/// behind it.
#[test]
fn a_completion_before_a_flush_is_signalled_while_the_flush_commits() {
    for event_idx in [true, false] {
        completion_signalled_while_a_later_flush_waits(event_idx, 4096);
    }
}

fn completion_signalled_while_a_later_flush_waits(event_idx: bool, read_len: u32) {
    let d = disk(false);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 64);
    let (b, vring, call) = signalling_backend(&d, &mem, &vq, event_idx);
    // 0: a read of `read_len` into 0x80000; 1: a FLUSH. Headers at 0x10000 and 0x14000.
    let header = |at: u64, kind: u32| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(at + 0x3000)).unwrap();
    };
    header(0x10000, VIRTIO_BLK_T_IN);
    header(0x14000, VIRTIO_BLK_T_FLUSH);
    let chains = vec![
        desc(0x10000, 16, false, Some(1)),
        desc(0x80000, read_len, true, Some(2)),
        desc(0x13000, 1, true, None),
        desc(0x14000, 16, false, Some(4)),
        desc(0x17000, 1, true, None),
    ];
    let pool = d.target().pool.clone();
    let held = pool.hold_commits();
    vq.add_desc_chains(&chains, 0).unwrap();
    let (worker, ended) = serve_in_thread(&b, &vring);
    wait_for_signal(
        &call,
        &format!("the read was not signalled while its pass went on (EVENT_IDX {event_idx})"),
    );
    assert_eq!(used_ids(&mem, &vq), vec![0], "only the read has completed");
    assert_eq!(status(&mem, 0), 0, "the read succeeded");
    assert!(
        ended.try_recv().is_err(),
        "the pass ended: the FLUSH did not wait for the held commits"
    );
    // The driver reaped the read and asks to hear of the next completion.
    hear_of_completion(&mem, &vq, 1);
    drop(held);
    worker.join().unwrap();
    assert_eq!(used_ids(&mem, &vq), vec![0, 3]);
    assert_eq!(
        call.read().ok(),
        Some(1),
        "the FLUSH's completion signalled"
    );
}

/// A pass waiting for the disk's I/O gate (a snapshot or a migration's switch drains the
/// disk) does not hold back the completions it made before.
#[test]
fn completions_are_signalled_before_a_pass_waits_for_a_drain() {
    for event_idx in [true, false] {
        completions_signalled_before_waiting_for_a_drain(event_idx);
    }
}

fn completions_signalled_before_waiting_for_a_drain(event_idx: bool) {
    let d = disk(false);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 64);
    let (b, vring, call) = signalling_backend(&d, &mem, &vq, event_idx);
    // 0: a read; 1: a FLUSH, which waits for commits held here (without the gate, so the
    // drain below is taken at once); 2: a read, which then waits for the drain to end.
    let chains: Vec<RawDescriptor> = [
        request(&mem, 0, VIRTIO_BLK_T_IN, 0, 0),
        request(&mem, 1, VIRTIO_BLK_T_FLUSH, 0, 0),
        request(&mem, 2, VIRTIO_BLK_T_IN, SECTORS_PER_BLOCK, 0),
    ]
    .concat();
    let pool = d.target().pool.clone();
    let held = pool.hold_commits();
    vq.add_desc_chains(&chains, 0).unwrap();
    let (worker, ended) = serve_in_thread(&b, &vring);
    wait_for_signal(
        &call,
        &format!("the read was not signalled before the FLUSH (EVENT_IDX {event_idx})"),
    );
    assert_eq!(used_ids(&mem, &vq), vec![0]);
    // The driver reaped the read and asks to hear of the next completion.
    hear_of_completion(&mem, &vq, 1);
    let drained = d.drain();
    drop(held);
    wait_for_signal(
        &call,
        &format!("the FLUSH was not signalled while the pass waited for the drain (EVENT_IDX {event_idx})"),
    );
    assert_eq!(used_ids(&mem, &vq), vec![0, 3], "the last read waits");
    assert!(ended.try_recv().is_err(), "the pass ended: it did not wait");
    hear_of_completion(&mem, &vq, 2);
    drop(drained);
    worker.join().unwrap();
    assert_eq!(used_ids(&mem, &vq), vec![0, 3, 6]);
    assert_eq!(
        call.read().ok(),
        Some(1),
        "the last read signalled once (EVENT_IDX {event_idx})"
    );
}

/// A completion told of within its pass is not told of again when the pass ends (without
/// EVENT_IDX every signal is an interrupt).
#[test]
fn a_completion_signalled_within_its_pass_is_not_signalled_again() {
    for event_idx in [true, false] {
        let d = disk(false);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 64);
        let (b, vring, call) = signalling_backend(&d, &mem, &vq, event_idx);
        // A read of 256 KiB into 0x80000: signalled as soon as it completes.
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x10000)).unwrap();
        let chain = vec![
            desc(0x10000, 16, false, Some(1)),
            desc(0x80000, 256 << 10, true, Some(2)),
            desc(0x13000, 1, true, None),
        ];
        vq.add_desc_chains(&chain, 0).unwrap();
        let (worker, _) = serve_in_thread(&b, &vring);
        worker.join().unwrap();
        assert_eq!(used_ids(&mem, &vq), vec![0]);
        assert_eq!(
            call.read().ok(),
            Some(1),
            "signalled other than once (EVENT_IDX {event_idx})"
        );
    }
}

#[test]
fn a_new_backend_executes_again_exactly_the_write_the_dead_one_held() {
    let f = full_pool();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 64);
    let (region, _) = crate::blk::inflight::create(1, 64, 1).unwrap();
    {
        let b = Arc::new(backend_on(&f.disk, &mem, Some(&region)));
        let vring = vring_on(&mem, &vq, 0);
        let chains: Vec<RawDescriptor> = [
            request(&mem, 0, VIRTIO_BLK_T_OUT, 5 * SECTORS_PER_BLOCK, 0x55),
            request(&mem, 1, VIRTIO_BLK_T_IN, 0, 0),
        ]
        .concat();
        vq.add_desc_chains(&chains, 0).unwrap();
        assert!(b.process_queue(&vring, 0).unwrap());
        assert_eq!(used_ids(&mem, &vq), vec![3]);
        // The daemon dies here: no completion, no exit.
    }
    // The guest saw the read complete and reuses its buffers.
    mem.write_slice(&[0xee; 4096], GuestAddress(0x10000 + 0x4000 + 0x1000))
        .unwrap();
    mem.write_obj(0xeeu8, GuestAddress(0x10000 + 0x4000 + 0x3000))
        .unwrap();
    // ... and makes another request available.
    vq.add_desc_chains(&request(&mem, 2, VIRTIO_BLK_T_IN, SECTORS_PER_BLOCK, 0), 6)
        .unwrap();
    f.grow();
    // QEMU resumes the queue at the used index (1).
    let b = Arc::new(backend_on(&f.disk, &mem, Some(&region)));
    let vring = vring_on(&mem, &vq, 1);
    assert!(b.process_queue(&vring, 0).unwrap());
    assert_eq!(
        used_ids(&mem, &vq),
        vec![3, 0, 6],
        "the held write, then the new read"
    );
    assert_eq!(
        data(&mem, 1),
        vec![0xee; 4096],
        "the completed read ran again"
    );
    assert_eq!(status(&mem, 1), 0xee);
    assert_eq!((status(&mem, 0), status(&mem, 2)), (0, 0));
    assert_eq!(data(&mem, 2), vec![0x11; 4096]);
    assert_eq!(vring.get_ref().get_queue().next_avail(), 3);
    let mut back = vec![0u8; 4096];
    f.disk.target().pool.read(0, 5 * BLOCK, &mut back).unwrap();
    assert_eq!(back, vec![0x55; 4096]);
    // Nothing is left in flight: a third backend executes nothing again.
    let b = Arc::new(backend_on(&f.disk, &mem, Some(&region)));
    let vring = vring_on(&mem, &vq, 3);
    assert!(!b.process_queue(&vring, 0).unwrap());
    assert_eq!(used_ids(&mem, &vq).len(), 3);
}

#[test]
fn a_looping_chain_left_in_flight_is_returned_without_being_executed() {
    let f = full_pool();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 64);
    let (region, _) = crate::blk::inflight::create(1, 64, 1).unwrap();
    {
        let b = Arc::new(backend_on(&f.disk, &mem, Some(&region)));
        let vring = vring_on(&mem, &vq, 0);
        vq.add_desc_chains(
            &request(&mem, 0, VIRTIO_BLK_T_OUT, 5 * SECTORS_PER_BLOCK, 0x55),
            0,
        )
        .unwrap();
        assert!(b.process_queue(&vring, 0).unwrap());
        assert!(used_ids(&mem, &vq).is_empty());
    }
    // A hostile guest turns the held chain into a loop: 0 → 1 → 2 → 0.
    vq.desc_table()
        .store(2, desc(0x13000, 1, true, Some(0)))
        .unwrap();
    f.grow();
    let b = Arc::new(backend_on(&f.disk, &mem, Some(&region)));
    let vring = vring_on(&mem, &vq, 0);
    assert!(b.process_queue(&vring, 0).unwrap());
    assert_eq!(used_ids(&mem, &vq), vec![0]);
    assert_eq!(
        status(&mem, 0),
        0xff,
        "a chain that cannot be read was executed"
    );
    let mut back = vec![0u8; 4096];
    f.disk.target().pool.read(0, 5 * BLOCK, &mut back).unwrap();
    assert_eq!(back, vec![0; 4096]);
}

/// A backend with inflight records on a full pool, and a write in its queue that
/// needs a new block (not taken yet): the queue, the region, the backend, its vring.
fn write_to_a_full_pool<'a>(
    f: &Full,
    mem: &'a GuestMemoryMmap,
) -> (
    MockSplitQueue<'a, GuestMemoryMmap>,
    std::fs::File,
    Arc<BlkBackend>,
    VringRwLock,
) {
    let vq = MockSplitQueue::create(mem, GuestAddress(0x1000), 64);
    let (region, _) = crate::blk::inflight::create(1, 64, 1).unwrap();
    let b = Arc::new(backend_on(&f.disk, mem, Some(&region)));
    let vring = vring_on(mem, &vq, 0);
    vq.add_desc_chains(
        &request(mem, 0, VIRTIO_BLK_T_OUT, 5 * SECTORS_PER_BLOCK, 0x55),
        0,
    )
    .unwrap();
    (vq, region, b, vring)
}

#[test]
fn a_write_parked_for_space_fails_when_the_connection_ends() {
    let f = full_pool();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (vq, region, b, vring) = write_to_a_full_pool(&f, &mem);
    assert!(b.process_queue(&vring, 0).unwrap());
    assert!(used_ids(&mem, &vq).is_empty());
    b.signal_exit();
    assert_eq!(used_ids(&mem, &vq), vec![0]);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(f.space.waiting.load(Ordering::SeqCst), 0);
    // Nothing is left in flight for a next backend.
    let b = Arc::new(backend_on(&f.disk, &mem, Some(&region)));
    let vring = vring_on(&mem, &vq, 1);
    assert!(!b.process_queue(&vring, 0).unwrap());
}

/// GET_VRING_BASE (a VM stop, a migration) takes every request handed over as done:
/// a write parked for space is completed there (IOERR, the pool still full) rather
/// than left for rings that may never come back.
#[test]
fn a_stopped_queue_completes_its_parked_writes() {
    let f = full_pool();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (vq, _region, b, vring) = write_to_a_full_pool(&f, &mem);
    assert!(b.process_queue(&vring, 0).unwrap());
    assert!(used_ids(&mem, &vq).is_empty());
    vring.set_queue_ready(false);
    b.stop_vring(0).unwrap();
    assert_eq!(used_ids(&mem, &vq), vec![0]);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(f.space.waiting.load(Ordering::SeqCst), 0);
}

/// A connection that ends while a queue is stopped (the guest rebooting: its rings and
/// buffers may be in use for something else) writes nothing into them.
#[test]
fn a_parked_write_of_a_stopped_queue_is_not_completed_when_the_connection_ends() {
    let f = full_pool();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (vq, _region, b, vring) = write_to_a_full_pool(&f, &mem);
    assert!(b.process_queue(&vring, 0).unwrap());
    vring.set_queue_ready(false);
    b.signal_exit();
    assert!(used_ids(&mem, &vq).is_empty());
    assert_eq!(status(&mem, 0), 0xff, "the status byte was written");
    assert_eq!(f.space.waiting.load(Ordering::SeqCst), 0);
}

#[test]
fn a_parked_write_of_a_device_reset_since_is_dropped_not_completed_into_the_new_rings() {
    let f = full_pool();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (vq, region, b, vring) = write_to_a_full_pool(&f, &mem);
    b.process_queue(&vring, 0).unwrap();
    assert_eq!(f.space.waiting.load(Ordering::SeqCst), 1);

    // The same region handed over again (the device stopped and started): kept.
    let reopen = |file: &std::fs::File| {
        let len = crate::blk::inflight::region_len(1, 64);
        crate::blk::inflight::Region::open(file.try_clone().unwrap(), len, 0, 1, 64, 1).unwrap()
    };
    b.inflight().set_region(reopen(&region));
    b.process_queue(&vring, 0).unwrap();
    assert_eq!(f.space.waiting.load(Ordering::SeqCst), 1);

    // The guest resets the device: new, empty rings, and QEMU makes a new region.
    for a in [vq.avail_addr().0 + 2, vq.used_addr().0 + 2] {
        mem.write_obj(0u16, GuestAddress(a)).unwrap();
    }
    let (fresh, _) = crate::blk::inflight::create(1, 64, 1).unwrap();
    b.inflight().set_region(reopen(&fresh));
    let vring = vring_on(&mem, &vq, 0);
    f.grow();
    assert!(!b.process_queue(&vring, 0).unwrap());
    assert!(
        used_ids(&mem, &vq).is_empty(),
        "a request of the old rings was completed"
    );
    assert_eq!(status(&mem, 0), 0xff);
    assert_eq!(f.space.waiting.load(Ordering::SeqCst), 0);
}

#[test]
fn a_parked_write_fails_when_its_queue_timeout_passes() {
    let f = full_pool();
    f.space.set_mode(crate::blk::disk::OutOfSpace::Queue {
        timeout: Some(std::time::Duration::from_millis(300)),
    });
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (vq, _region, b, vring) = write_to_a_full_pool(&f, &mem);
    b.process_queue(&vring, 0).unwrap();
    assert!(used_ids(&mem, &vq).is_empty());
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert!(b.process_queue(&vring, 0).unwrap());
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_IOERR as u8);
    assert!(
        f.space.timed_out(),
        "the timeout did not switch the policy to failing"
    );
}

#[test]
fn write_then_read_through_a_mock_queue() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 64);
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let vring = VringRwLock::new(atomic.clone(), 64).unwrap();
    vring.set_queue_size(64);
    vring
        .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
        .unwrap();
    vring.set_queue_ready(true);
    let backend = BlkBackend::new(disk(false));
    backend.update_memory(atomic).unwrap();

    let hdr = |at: u64, kind: u32, sector: u64| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    };
    hdr(0x10000, VIRTIO_BLK_T_OUT, 3);
    mem.write_slice(&[0x5a; 1024], GuestAddress(0x11000))
        .unwrap();
    hdr(0x20000, VIRTIO_BLK_T_IN, 3);
    hdr(0x30000, VIRTIO_BLK_T_GET_ID, 0);
    vq.add_desc_chains(
        &[
            desc(0x10000, 16, false, Some(1)),
            desc(0x11000, 1024, false, Some(2)),
            desc(0x12000, 1, true, None),
            desc(0x20000, 16, false, Some(4)),
            desc(0x21000, 1024, true, Some(5)),
            desc(0x22000, 1, true, None),
            desc(0x30000, 16, false, Some(7)),
            desc(0x31000, 20, true, Some(8)),
            desc(0x32000, 1, true, None),
        ],
        0,
    )
    .unwrap();
    assert!(backend.process_queue(&vring, 0).unwrap());
    let used = |i: usize| vq.used().ring().ref_at(i).unwrap().load();
    assert_eq!((used(0).id(), used(0).len()), (0, 1));
    assert_eq!((used(1).id(), used(1).len()), (3, 1025));
    assert_eq!((used(2).id(), used(2).len()), (6, 21));
    for s in [0x12000u64, 0x22000, 0x32000] {
        assert_eq!(mem.read_obj::<u8>(GuestAddress(s)).unwrap(), 0);
    }
    let mut back = [0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(0x21000)).unwrap();
    assert_eq!(back, [0x5a; 1024]);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(0x31000)).unwrap();
    assert_eq!(&id[..8], b"serial-1");
    // The empty queue is fine (handle_event fires on enable too).
    assert!(!backend.process_queue(&vring, 0).unwrap());
}

/// A new connection after the daemon died or stopped: the guest's used ring holds
/// completions that the previous process added but never signalled (it died between
/// `add_used` and the interrupt, or stopped at the drain after finishing a request), and
/// nothing is left in the avail ring. With EVENT_IDX the guest asked to be interrupted at
/// `used_event`, which those completions passed already, so only a signal from this
/// connection tells it to look: without one its requests wait forever.
#[test]
fn a_new_connection_signals_each_queue_once_for_completions_it_did_not_make() {
    use std::os::fd::{FromRawFd, IntoRawFd};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    const Q: u16 = 64;
    let (desc, avail, used) = (0x1000u64, 0x2000u64, 0x3000u64);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    // Three requests were made available and completed (used idx 3); the guest last
    // saw the first one and asked for an interrupt after it (used_event 1).
    mem.write_obj(3u16, GuestAddress(avail + 2)).unwrap();
    mem.write_obj(1u16, GuestAddress(avail + 4 + 2 * Q as u64))
        .unwrap();
    mem.write_obj(3u16, GuestAddress(used + 2)).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let vring = VringRwLock::new(atomic.clone(), Q).unwrap();
    vring.set_queue_size(Q);
    vring.set_queue_info(desc, avail, used).unwrap();
    // As the vhost-user handler does: next_used from the ring, next_avail from
    // SET_VRING_BASE (QEMU sends the used index when the old backend is gone).
    vring.set_queue_next_used(3);
    vring.set_queue_next_avail(3);
    vring.set_queue_event_idx(true);
    vring.set_queue_ready(true);
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    // SAFETY: a fresh descriptor from try_clone, owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(call.try_clone().unwrap().into_raw_fd()) };
    vring.set_call(Some(file));
    let backend = BlkBackend::new(disk(false));
    backend.set_event_idx(true);
    backend.update_memory(atomic).unwrap();

    // The first event of the queue (the vhost-user-backend crate sends one when the
    // queue is enabled): nothing to process, and still a signal.
    backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
        .unwrap();
    assert_eq!(
        call.read().ok(),
        Some(1),
        "the guest was not told about the completions in its used ring"
    );
    // Only once: later events signal by the usual rules (nothing new, no signal).
    backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
        .unwrap();
    assert!(call.read().is_err(), "signalled again with nothing new");
}

#[test]
fn config_and_features() {
    let b = BlkBackend::new(disk(true));
    for (off, len) in [(0u32, 57u32), (0, 60), (8, 4), (90, 40), (500, 10)] {
        assert_eq!(b.get_config(off, len).len(), len as usize);
    }
    let cfg = b.get_config(0, 60);
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        (8 << 20) / 512
    );
    let f = b.features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    let rw = BlkBackend::new(disk(false));
    assert_ne!(rw.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    let cfg = rw.get_config(0, 64);
    // discard_sector_alignment = pool block in sectors.
    assert_eq!(u32::from_le_bytes(cfg[44..48].try_into().unwrap()), 128);
}

#[test]
fn a_pool_that_ignores_discards_does_not_offer_them() {
    let b = BlkBackend::new(disk_with(false, false));
    assert_eq!(b.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(b.features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);

    // A discard sent anyway is unsupported, and the data stays.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 64);
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let vring = VringRwLock::new(atomic.clone(), 64).unwrap();
    vring.set_queue_size(64);
    vring
        .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
        .unwrap();
    vring.set_queue_ready(true);
    b.update_memory(atomic).unwrap();
    let hdr = |at: u64, kind: u32| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    };
    hdr(0x10000, VIRTIO_BLK_T_OUT);
    mem.write_slice(&[0x5a; 4096], GuestAddress(0x11000))
        .unwrap();
    hdr(0x20000, VIRTIO_BLK_T_DISCARD);
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&128u32.to_le_bytes()); // sector 0, one pool block
    mem.write_slice(&seg, GuestAddress(0x21000)).unwrap();
    vq.add_desc_chains(
        &[
            desc(0x10000, 16, false, Some(1)),
            desc(0x11000, 4096, false, Some(2)),
            desc(0x12000, 1, true, None),
            desc(0x20000, 16, false, Some(4)),
            desc(0x21000, 16, false, Some(5)),
            desc(0x22000, 1, true, None),
        ],
        0,
    )
    .unwrap();
    assert!(b.process_queue(&vring, 0).unwrap());
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x12000)).unwrap(), 0);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x22000)).unwrap(),
        VIRTIO_BLK_S_UNSUPP as u8
    );
    let mut back = vec![0u8; 4096];
    b.disk.target().pool.read(0, 0, &mut back).unwrap();
    assert_eq!(back, vec![0x5a; 4096]);
}

#[test]
fn advertised_segments_stay_within_what_the_parser_takes() {
    for q in (1..=15).map(|e| 1usize << e) {
        let (seg, size) = segment_limits(q);
        assert!(
            seg >= 1 && seg as usize <= q.max(3) - 2,
            "queue {q}: seg_max {seg}"
        );
        assert!(size as u64 >= MIN_SIZE_MAX && size <= SIZE_MAX, "queue {q}");
        assert!(
            seg as u64 * size as u64 <= MAX_DATA_BYTES,
            "queue {q}: {seg} segments of {size} bytes"
        );
    }
    assert_eq!(segment_limits(256), (254, 128 << 10));
    assert_eq!(segment_limits(32), (30, 1 << 20));
    // The configuration space says the same.
    let b = BlkBackend::new(disk(false));
    let cfg = b.get_config(0, 16);
    let (seg, size) = segment_limits(64);
    assert_eq!(u32::from_le_bytes(cfg[8..12].try_into().unwrap()), size);
    assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), seg);
    // A request as large as advertised parses.
    let descs: Vec<Desc> = std::iter::once(Desc {
        addr: 0,
        len: 16,
        writable: false,
    })
    .chain((0..seg).map(|i| Desc {
        addr: 0x1000 + i as u64 * size as u64,
        len: size,
        writable: false,
    }))
    .chain(std::iter::once(Desc {
        addr: 0,
        len: 1,
        writable: true,
    }))
    .collect();
    struct Zeroes;
    impl GuestView for Zeroes {
        fn contains(&self, _: u64, _: u64) -> bool {
            true
        }
        fn read(&self, _: u64, buf: &mut [u8]) -> bool {
            buf.fill(0);
            buf[0] = VIRTIO_BLK_T_OUT as u8;
            true
        }
    }
    let limits = Limits {
        capacity_sectors: 1 << 30,
        ..b.limits()
    };
    let p = parse(&descs, &Zeroes, &limits);
    assert!(p.request.is_ok(), "{:?}", p.request.err());
}

/// A ring the frontend stopped (GET_VRING_BASE: no longer ready) with requests still
/// offered pops nothing: the worker watching it goes back to its event loop instead of
/// watching and passing for ever (it would never see its exit event, and the disconnect,
/// which joins it, would hang).
#[test]
fn a_stopped_ring_with_requests_offered_is_not_watched_for_ever() {
    for event_idx in [true, false] {
        let d = disk(false);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 64);
        let (b, vring, _call) = signalling_backend(&d, &mem, &vq, event_idx);
        b.open_poll_window(0);
        vq.add_desc_chains(&request(&mem, 0, VIRTIO_BLK_T_IN, 0, 0), 0)
            .unwrap();
        vring.set_queue_ready(false);
        let (worker, ended) = serve_in_thread(&b, &vring);
        assert!(
            ended
                .recv_timeout(std::time::Duration::from_secs(10))
                .is_ok(),
            "the worker kept watching a stopped ring (EVENT_IDX {event_idx})"
        );
        worker.join().unwrap();
        assert!(used_ids(&mem, &vq).is_empty(), "nothing served");
    }
}
