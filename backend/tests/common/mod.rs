//! Helpers shared by the backend's integration tests: running the CLI, pools made with it,
//! the real thin-provisioning-tools, and a vhost-user-blk *frontend*: guest RAM is a memfd
//! mapped in this process and shared with the daemon; queues are laid out with
//! virtio-queue's mock driver.
//!
//! Compiled into every test binary, which each use part of it.
#![allow(dead_code)]

pub mod two_pools;

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// splitmix64: seedable, so a failing run can be replayed from the printed seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

pub const MEM_SIZE: u64 = 64 << 20;
pub const QSIZE: u16 = 64;
const QUEUE_AREA: u64 = 0x10_0000;
const BUF_AREA: u64 = 0x100_0000;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vhost-thin")
}

/// Runs the CLI; the caller checks the outcome.
pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run vhost-thin")
}

/// Runs the CLI, which must succeed; returns its stdout.
pub fn cli(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "vhost-thin {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `thin export` of device `id` (`size`: needed when the pool has no registry) to stdout,
/// which must succeed; returns the device's bytes.
pub fn export(m: &str, d: &str, id: &str, size: Option<&str>) -> Vec<u8> {
    let mut args = vec!["thin", "export", "-m", m, "-d", d, "--id", id, "-o", "-"];
    if let Some(size) = size {
        args.extend(["--size", size]);
    }
    let out = run(&args);
    assert!(
        out.status.success(),
        "vhost-thin {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A tool of thin-provisioning-tools, or None when it is not installed (a panic instead
/// when VHOST_THIN_REQUIRE_TOOLS=1, as in CI, so that nothing is quietly skipped).
pub fn tool(name: &str) -> Option<PathBuf> {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Some(p);
        }
    }
    if std::env::var("VHOST_THIN_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{name} is required (VHOST_THIN_REQUIRE_TOOLS=1) but not installed");
    }
    eprintln!("note: {name} not installed, skipping that part");
    None
}

/// The real thin_check passes on the metadata file `meta` (when installed, see [`tool`]).
pub fn thin_check_ok(meta: &str) {
    if let Some(tc) = tool("thin_check") {
        let o = Command::new(tc).arg(meta).output().unwrap();
        assert!(
            o.status.success(),
            "thin_check {meta}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// A pool's files in a temporary directory (`root`), removed on drop.
pub struct PoolFiles {
    pub dir: tempfile::TempDir,
    pub m: String,
    pub d: String,
    pub root: PathBuf,
}

pub fn new_pool(data_size: &str) -> PoolFiles {
    new_pool_with(&["--data-size", data_size])
}

/// A pool made by `pool create` with these extra arguments.
pub fn new_pool_with(args: &[&str]) -> PoolFiles {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("meta").to_str().unwrap().to_string();
    let d = dir.path().join("data").to_str().unwrap().to_string();
    let mut all = vec!["pool", "create", "-m", &m, "-d", &d];
    all.extend_from_slice(args);
    cli(&all);
    PoolFiles {
        root: dir.path().to_path_buf(),
        dir,
        m,
        d,
    }
}

/// The bytes of a file that are not holes (`SEEK_DATA`/`SEEK_HOLE`): the space `du`
/// counts, less the filesystem's own blocks for the file (ext4 keeps an extent tree's
/// index block after the extents it indexed were punched away).
pub fn allocated(p: &Path) -> u64 {
    use thinpool::storage::Storage;
    let f = thinpool::storage::FileStorage::open_read_only(p).unwrap();
    let holes: u64 = f
        .holes()
        .unwrap()
        .unwrap()
        .iter()
        .map(|(start, end)| end - start)
        .sum();
    f.len() - holes
}

/// [`allocated`] once `given_back` holds for it (the daemon gives the space back after the
/// commit, on a thread of its own), or after a minute.
pub fn allocated_once(p: &Path, given_back: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = allocated(p);
        if given_back(now) || Instant::now() > deadline {
            return now;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Writes `byte` over every hole of the file at `p`: its free blocks' ranges then hold data,
/// as a passdown cut short leaves them. Real writes, not `fallocate`: ext4 and XFS report
/// a range allocated by `fallocate` and never written as a hole.
pub fn fill_holes(p: &Path, byte: u8) {
    use std::os::unix::fs::FileExt;
    use thinpool::storage::Storage;
    let holes = thinpool::storage::FileStorage::open_read_only(p)
        .unwrap()
        .holes()
        .unwrap()
        .unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    let chunk = vec![byte; 1 << 20];
    for (start, end) in holes {
        let mut at = start;
        while at < end {
            let n = (end - at).min(chunk.len() as u64) as usize;
            f.write_all_at(&chunk[..n], at).unwrap();
            at += n as u64;
        }
    }
}

/// Test data: `len` bytes that differ with `seed` and along the buffer.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

/// Waits (up to 30 s) for `path` to exist: a socket the daemon creates.
pub fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM to `child`, then waits for it; returns its status and whatever output was piped.
pub fn sigterm(child: Child) -> Output {
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait_with_output().unwrap()
}

pub fn memfd(size: u64) -> File {
    // SAFETY: plain syscall with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"vhost-thin-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: the fd was just created and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// A split virtqueue laid out by hand. (virtio-queue's MockSplitQueue places the used ring
/// at avail + 4 + size bytes, over the second half of the avail ring: fine for a few
/// requests, wrong after size/2 of them.)
pub struct Queue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: EventFd,
    pub call: EventFd,
    next_desc: u16,
    submitted: u16,
}

pub struct Guest {
    pub mem: &'static GuestMemoryMmap,
    pub fe: Frontend,
    pub queues: Vec<Queue>,
    pub features: u64,
}

/// One descriptor as the test builds it: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct D(pub u64, pub u32, pub bool);

impl Guest {
    pub fn connect(sock: &Path, nq: usize) -> Guest {
        Self::connect_with(sock, nq, u64::MAX)
    }

    /// Handshake; `feature_mask` limits what the "driver" acknowledges.
    pub fn connect_with(sock: &Path, nq: usize, feature_mask: u64) -> Guest {
        Self::connect_laid_out(sock, nq, feature_mask, &Self::default_layout)
    }

    /// Where queue `q`'s descriptor table, avail ring and used ring are (guest addresses).
    pub fn default_layout(q: usize) -> (u64, u64, u64) {
        let desc = QUEUE_AREA + 0x10000 * q as u64;
        let avail = desc + 16 * QSIZE as u64;
        let used = (avail + 6 + 2 * QSIZE as u64).next_multiple_of(4);
        (desc, avail, used)
    }

    /// Handshake with the rings where `layout` puts them (a hostile test may put them where
    /// they do not fit). Waits for replies without a bound (the vhost crate's frontend
    /// retries a socket timeout forever): a test that must not hang checks first that the
    /// daemon answers.
    pub fn connect_laid_out(
        sock: &Path,
        nq: usize,
        feature_mask: u64,
        layout: &dyn Fn(usize) -> (u64, u64, u64),
    ) -> Guest {
        // Leaked so that the mock queues can borrow it for 'static; one per connection.
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::<()>::from_ranges_with_files(&[(
                GuestAddress(0),
                MEM_SIZE as usize,
                Some(FileOffset::new(memfd(MEM_SIZE), 0)),
            )])
            .unwrap(),
        ));
        let info =
            VhostUserMemoryRegionInfo::from_guest_region(mem.find_region(GuestAddress(0)).unwrap())
                .unwrap();
        let hva = |gpa: u64| info.userspace_addr + gpa;
        let mut fe = Frontend::connect(sock, nq as u64).unwrap();
        let features = fe.get_features().unwrap() & feature_mask;
        let proto = fe.get_protocol_features().unwrap();
        assert!(proto.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
        fe.set_protocol_features(proto).unwrap();
        fe.set_owner().unwrap();
        assert_eq!(fe.get_queue_num().unwrap(), nq as u64);
        fe.set_features(features).unwrap();
        fe.set_mem_table(&[info]).unwrap();
        let mut queues = Vec::new();
        for q in 0..nq {
            let (desc, avail, used) = layout(q);
            // Rings start zeroed: flags, idx and event fields all 0 (fresh memfd).
            fe.set_vring_num(q, QSIZE).unwrap();
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: hva(desc),
                    used_ring_addr: hva(used),
                    avail_ring_addr: hva(avail),
                    log_addr: None,
                },
            )
            .unwrap();
            fe.set_vring_base(q, 0).unwrap();
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            fe.set_vring_call(q, &call).unwrap();
            fe.set_vring_kick(q, &kick).unwrap();
            fe.set_vring_enable(q, true).unwrap();
            queues.push(Queue {
                desc,
                avail,
                used,
                kick,
                call,
                next_desc: 0,
                submitted: 0,
            });
        }
        Guest {
            mem,
            fe,
            queues,
            features,
        }
    }

    pub fn config(&mut self, len: u32) -> Vec<u8> {
        let (_, cfg) = self
            .fe
            .get_config(
                0,
                len,
                VhostUserConfigFlags::WRITABLE,
                &vec![0u8; len as usize],
            )
            .unwrap();
        cfg
    }

    /// Gives the daemon a backend channel (`SET_BACKEND_REQ_FD`), as QEMU does; returns
    /// our end, where the daemon's messages (config changes) arrive.
    pub fn open_backend_channel(&mut self) -> std::os::unix::net::UnixStream {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        self.fe.set_backend_request_fd(&theirs).unwrap();
        ours
    }

    /// Buffer area for request slot `slot` (1 MiB + a page each).
    pub fn buf(slot: u64) -> u64 {
        BUF_AREA + slot * 0x11_0000
    }

    /// Publishes a chain on queue `q` without waiting; returns its sequence number.
    pub fn submit(&mut self, q: usize, descs: &[D]) -> u16 {
        let mem = self.mem;
        let queue = &mut self.queues[q];
        let n = descs.len() as u16;
        // A chain must not run off the end of the table: start over at 0 (the requests
        // that used those slots are complete; tests keep few in flight).
        if queue.next_desc + n > QSIZE {
            queue.next_desc = 0;
        }
        let first = queue.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let last = i + 1 == descs.len();
                let mut flags = if d.2 { VRING_DESC_F_WRITE as u16 } else { 0 };
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last {
                    0
                } else {
                    (first + i as u16 + 1) % QSIZE
                };
                RawDescriptor::from(Descriptor::new(d.0, d.1, flags, next))
            })
            .collect();
        for (i, d) in raw.iter().enumerate() {
            mem.write_obj(
                *d,
                GuestAddress(queue.desc + 16 * (first as u64 + i as u64)),
            )
            .unwrap();
        }
        let avail = queue.avail;
        let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
        mem.write_obj(first, GuestAddress(avail + 4 + 2 * (idx % QSIZE) as u64))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
        queue.next_desc = first + n;
        queue.submitted += 1;
        queue.kick.write(1).unwrap();
        queue.submitted
    }

    /// Writes descriptor `index` of queue `q`'s table as it is: any address, length, flags
    /// and next (a hostile test's chains).
    pub fn put_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.queues[q].desc + 16 * index as u64;
        self.mem
            .write_obj(
                RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
                GuestAddress(at),
            )
            .unwrap();
    }

    /// Offers the chain at `head` (any value) on queue `q` and kicks; returns its sequence
    /// number, for [`Self::wait_used_for`] and [`Self::used_elem`].
    pub fn publish(&mut self, q: usize, head: u16) -> u16 {
        let avail = self.queues[q].avail;
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap();
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * (idx % QSIZE) as u64))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
        self.queues[q].submitted += 1;
        self.queues[q].kick.write(1).unwrap();
        self.queues[q].submitted
    }

    /// Forgets the last request offered on queue `q`, which the device can never use (its
    /// head is out of range), so that the next sequence numbers match the used ring again.
    pub fn forget_last(&mut self, q: usize) {
        self.queues[q].submitted -= 1;
    }

    /// Sets queue `q`'s avail idx to `idx` (offering whatever the ring holds) and kicks.
    pub fn set_avail_idx(&self, q: usize, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.queues[q].avail + 2))
            .unwrap();
        self.queues[q].kick.write(1).unwrap();
    }

    /// The used element of request `seq` (from 1) of queue `q`: (id, len).
    pub fn used_elem(&self, q: usize, seq: u16) -> (u32, u32) {
        let at = self.queues[q].used + 4 + 8 * ((seq - 1) % QSIZE) as u64;
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// Waits for used idx `count` on queue `q` for at most `patience`: whether it came.
    pub fn wait_used_for(&self, q: usize, count: u16, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        loop {
            let idx: u16 = self
                .mem
                .read_obj(GuestAddress(self.queues[q].used + 2))
                .unwrap();
            if idx >= count {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let _ = self.queues[q].call.read();
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until `count` requests of queue `q` have been used.
    pub fn wait_used(&self, q: usize, count: u16) {
        // A bound on hanging, not a speed figure.
        if !self.wait_used_for(q, count, Duration::from_secs(20)) {
            let idx: u16 = self
                .mem
                .read_obj(GuestAddress(self.queues[q].used + 2))
                .unwrap();
            panic!("queue {q}: timeout waiting for used idx {count}, at {idx}");
        }
    }

    /// Waits for used idx `count` on queue `q`, or until `stop` (the daemon may be gone):
    /// false if it stopped first. For guests that must never wait on a dead daemon.
    pub fn wait_used_or_stop(&self, q: usize, count: u16, stop: &AtomicBool) -> bool {
        loop {
            let idx: u16 = self
                .mem
                .read_obj(GuestAddress(self.queues[q].used + 2))
                .unwrap();
            if idx >= count {
                return true;
            }
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            thread::sleep(Duration::from_micros(200));
        }
    }

    /// Submits a chain and waits for it; returns the used length.
    pub fn run(&mut self, q: usize, descs: &[D]) -> u32 {
        let head = self.queues[q].next_desc;
        let head = if head + descs.len() as u16 > QSIZE {
            0
        } else {
            head
        };
        let seq = self.submit(q, descs);
        self.wait_used(q, seq);
        let used = self.queues[q].used;
        let used_idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        assert_eq!(
            used_idx, seq,
            "queue {q}: more requests used than submitted"
        );
        let slot = ((seq - 1) % QSIZE) as u64;
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(used + 4 + 8 * slot))
            .unwrap();
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(used + 8 + 8 * slot))
            .unwrap();
        assert_eq!(
            id as u16, head,
            "queue {q}: used element {seq} is not the chain submitted"
        );
        len
    }

    pub fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&hdr, GuestAddress(at)).unwrap();
    }

    pub fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// READ: returns (status, data).
    pub fn read(&mut self, q: usize, sector: u64, len: u32) -> (u8, Vec<u8>) {
        let b = Self::buf(0);
        self.header(b, VIRTIO_BLK_T_IN, sector);
        self.mem
            .write_obj(0xAAu8, GuestAddress(b + 0x10_0000 + 0x800))
            .unwrap();
        let used = self.run(
            q,
            &[
                D(b, 16, false),
                D(b + 0x1000, len, true),
                D(b + 0x10_0000 + 0x800, 1, true),
            ],
        );
        let mut data = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(b + 0x1000))
            .unwrap();
        let st = self.status(b + 0x10_0000 + 0x800);
        if st == 0 {
            assert_eq!(used, len + 1);
        }
        (st, data)
    }

    /// WRITE from `data`, split into `pieces` descriptors.
    pub fn write(&mut self, q: usize, sector: u64, data: &[u8], pieces: usize) -> u8 {
        let b = Self::buf(1);
        self.header(b, VIRTIO_BLK_T_OUT, sector);
        self.mem
            .write_slice(data, GuestAddress(b + 0x1000))
            .unwrap();
        let mut descs = vec![D(b, 16, false)];
        let chunk = data.len().div_ceil(pieces.max(1));
        let mut off = 0;
        while off < data.len() {
            let n = chunk.min(data.len() - off);
            descs.push(D(b + 0x1000 + off as u64, n as u32, false));
            off += n;
        }
        descs.push(D(b + 0x10_0000 + 0x800, 1, true));
        self.run(q, &descs);
        self.status(b + 0x10_0000 + 0x800)
    }

    pub fn simple(&mut self, q: usize, kind: u32) -> u8 {
        let b = Self::buf(2);
        self.header(b, kind, 0);
        self.run(q, &[D(b, 16, false), D(b + 0x800, 1, true)]);
        self.status(b + 0x800)
    }

    pub fn get_id(&mut self, q: usize) -> (u8, Vec<u8>) {
        let b = Self::buf(2);
        self.header(b, VIRTIO_BLK_T_GET_ID, 0);
        self.run(
            q,
            &[
                D(b, 16, false),
                D(b + 0x100, 20, true),
                D(b + 0x800, 1, true),
            ],
        );
        let mut id = vec![0u8; 20];
        self.mem
            .read_slice(&mut id, GuestAddress(b + 0x100))
            .unwrap();
        (self.status(b + 0x800), id)
    }

    /// DISCARD or WRITE_ZEROES with (sector, sectors, flags) segments.
    pub fn ranges(&mut self, q: usize, kind: u32, segs: &[(u64, u32, u32)]) -> u8 {
        let b = Self::buf(3);
        self.header(b, kind, 0);
        for (i, (s, n, f)) in segs.iter().enumerate() {
            let mut e = [0u8; 16];
            e[0..8].copy_from_slice(&s.to_le_bytes());
            e[8..12].copy_from_slice(&n.to_le_bytes());
            e[12..16].copy_from_slice(&f.to_le_bytes());
            self.mem
                .write_slice(&e, GuestAddress(b + 0x100 + 16 * i as u64))
                .unwrap();
        }
        self.run(
            q,
            &[
                D(b, 16, false),
                D(b + 0x100, 16 * segs.len() as u32, false),
                D(b + 0x800, 1, true),
            ],
        );
        self.status(b + 0x800)
    }

    pub fn stop(self) {
        for q in 0..self.queues.len() {
            let _ = self.fe.get_vring_base(q);
        }
    }
}

/// A pool made with the CLI, and a running daemon serving device 0 on `sock`.
pub struct Served {
    pub dir: tempfile::TempDir,
    pub m: String,
    pub d: String,
    pub sock: PathBuf,
    pub child: Option<Child>,
}

impl Served {
    pub fn new(disk_opts: &str) -> Served {
        Self::with_pool(disk_opts, "64MiB")
    }

    pub fn with_pool(disk_opts: &str, data_size: &str) -> Served {
        let PoolFiles { dir, m, d, .. } = new_pool(data_size);
        cli(&[
            "thin", "create", "-m", &m, "-d", &d, "--id", "0", "--size", "16MiB", "--name", "disk0",
        ]);
        let sock = dir.path().join("disk0.sock");
        let mut s = Served {
            dir,
            m,
            d,
            sock,
            child: None,
        };
        s.start(disk_opts);
        s
    }

    pub fn start(&mut self, disk_opts: &str) {
        let _ = std::fs::remove_file(&self.sock);
        let spec = format!("id=0,socket={}{disk_opts}", self.sock.display());
        let qmp = self.qmp();
        let _ = std::fs::remove_file(&qmp);
        let child = Command::new(bin())
            .args([
                "serve", "-m", &self.m, "-d", &self.d, "--disk", &spec, "--qmp",
            ])
            .arg(&qmp)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        // Held first, so that the daemon is killed (on drop) should it never make its socket.
        self.child = Some(child);
        wait_for(&self.sock);
    }

    pub fn qmp(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// A management client (waits for the socket).
    pub fn client(&self) -> vhost_thin::ctl::Client {
        wait_for(&self.qmp());
        vhost_thin::ctl::Client::connect(&self.qmp()).unwrap()
    }

    /// SIGTERM; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        sigterm(self.child.take().expect("running")).status
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A management connection that sends text as it is (what `ctl::Client` cannot: duplicate
/// keys, bytes no serialiser would write), negotiated, with a read timeout so that a daemon
/// that stops answering fails the test instead of hanging it.
pub struct RawQmp {
    writer: std::os::unix::net::UnixStream,
    lines: std::io::Lines<std::io::BufReader<std::os::unix::net::UnixStream>>,
}

impl RawQmp {
    pub fn connect(qmp: &Path) -> RawQmp {
        use std::io::BufRead;
        wait_for(qmp);
        let s = std::os::unix::net::UnixStream::connect(qmp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut c = RawQmp {
            lines: std::io::BufReader::new(s.try_clone().unwrap()).lines(),
            writer: s,
        };
        let greeting = c.next_line();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        let r = c.send(r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(r, serde_json::json!({"return": {}}));
        c
    }

    fn next_line(&mut self) -> serde_json::Value {
        let line = self
            .lines
            .next()
            .expect("the daemon closed the connection")
            .expect("no reply within a minute");
        serde_json::from_str(&line).unwrap()
    }

    /// Sends `text` and a newline; the next reply (events are skipped).
    pub fn send(&mut self, text: &str) -> serde_json::Value {
        use std::io::Write;
        self.writer.write_all(text.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        loop {
            let v = self.next_line();
            if v.get("event").is_none() {
                return v;
            }
        }
    }
}

/// Waits for `child` to exit, for at most `patience`; its output (what was piped), and
/// whether it exited in time (if not, it is killed). A thread waits, so that a daemon that
/// never exits fails the test rather than hangs it.
pub fn wait_output(child: Child, patience: Duration) -> (Output, bool) {
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    if let Ok(out) = rx.recv_timeout(patience) {
        let _ = waiter.join();
        return (out.unwrap(), true);
    }
    // Not reaped yet (its waiter is still waiting for it), so the pid is still ours.
    let _ = Command::new("kill").args(["-KILL", &pid]).status();
    let out = rx.recv().unwrap().unwrap();
    let _ = waiter.join();
    (out, false)
}
