//! A malicious or broken vhost-user frontend: memory tables that cannot be mapped safely,
//! descriptor chains that break every rule, rings that do not fit, protocol messages out of
//! order or malformed, descriptors leaked or sent where none belong.
//!
//! Every test runs one daemon serving two disks, writes known data to both with a
//! well-behaved frontend, then connects misbehaving frontends to the first. After each case
//! the daemon must still be running and serve a new, well-behaved connection to each disk
//! that reads back the data byte for byte; at the end SIGTERM must end it with status 0
//! within a bound (a liveness bound, not a speed figure), while a frontend stalls in the
//! middle of a message. Refusals end the connection (the vhost crates' way: the frontend
//! sees the socket close, after a negative acknowledgement when it asked for one); the
//! daemon's log must say why.
//!
//! The typed frontend API of the vhost crate refuses to send most of these messages, so
//! most go out as raw vhost-user messages (`Raw`).

mod common;
use common::{bin, cli, memfd, new_pool, pattern, wait_output, Guest, PoolFiles, D, MEM_SIZE};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

// ----- vhost-user messages -----

const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const ADD_MEM_REG: u32 = 37;

/// Protocol features the raw frontend takes: MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS.
const PROTOCOL: u64 = 1 << 0 | 1 << 3 | 1 << 9 | 1 << 15;
/// The guest addresses of the raw frontend's rings.
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Where the raw frontend tells the daemon its memory is in its own address space (any
/// value: the daemon uses it only to translate ring addresses).
const UADDR: u64 = 0x7f00_0000_0000;

/// How long a reply (or the end of the connection) may take: a bound on hanging.
const PATIENCE: Duration = Duration::from_secs(10);

fn u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A memory region: guest address, size, frontend address, offset in its file.
fn region(gpa: u64, size: u64, uaddr: u64, offset: u64) -> Vec<u8> {
    u64s(&[gpa, size, uaddr, offset])
}

/// SET_MEM_TABLE's payload: the count (which a hostile test may make disagree), padding,
/// the regions.
fn table(count: u32, regions: &[Vec<u8>]) -> Vec<u8> {
    let mut v = u32s(&[count, 0]);
    for r in regions {
        v.extend_from_slice(r);
    }
    v
}

fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    u32s(&[request, flags, size])
}

/// A frontend that writes vhost-user messages byte by byte.
struct Raw(UnixStream);

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        Raw(s)
    }

    /// Sends bytes with descriptors attached; errors are ignored (the daemon may have ended
    /// the connection already, which the reply side shows).
    fn send_bytes(&self, bytes: &[u8], fds: &[RawFd]) {
        let Ok(n) = self.0.send_with_fds(&[bytes], fds) else {
            return;
        };
        let _ = (&self.0).write_all(&bytes[n..]);
    }

    fn send(&self, request: u32, flags: u32, payload: &[u8], fds: &[RawFd]) {
        let mut m = header(request, flags, payload.len() as u32);
        m.extend_from_slice(payload);
        self.send_bytes(&m, fds);
    }

    /// The next message from the daemon, None when it ended the connection. Panics when
    /// neither comes within [`PATIENCE`].
    fn recv(&self, case: &str) -> Option<(u32, Vec<u8>)> {
        let mut hdr = [0u8; 12];
        match (&self.0).read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ) =>
            {
                return None
            }
            Err(e) => panic!("{case}: no reply and no end of the connection: {e}"),
        }
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        assert_ne!(flags & REPLY, 0, "{case}: a reply without the reply flag");
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; size];
        match (&self.0).read_exact(&mut payload) {
            Ok(()) => Some((u32::from_le_bytes(hdr[0..4].try_into().unwrap()), payload)),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ) =>
            {
                None
            }
            Err(e) => panic!("{case}: truncated reply: {e}"),
        }
    }

    /// A request with a u64 reply (GET_FEATURES...).
    fn get_u64(&self, request: u32) -> u64 {
        self.send(request, VERSION_1, &[], &[]);
        let (code, p) = self.recv("get").expect("the daemon ended the connection");
        assert_eq!((code, p.len()), (request, 8));
        u64::from_le_bytes(p[..8].try_into().unwrap())
    }

    /// Sends with NEED_REPLY: the acknowledgement (0 is success), or None when the daemon
    /// ended the connection without one.
    fn acked(&self, case: &str, request: u32, payload: &[u8], fds: &[RawFd]) -> Option<u64> {
        self.send(request, VERSION_1 | NEED_REPLY, payload, fds);
        let (code, p) = self.recv(case)?;
        assert_eq!(
            (code, p.len()),
            (request, 8),
            "{case}: not an acknowledgement"
        );
        Some(u64::from_le_bytes(p[..8].try_into().unwrap()))
    }

    fn ok(&self, case: &str, request: u32, payload: &[u8], fds: &[RawFd]) {
        assert_eq!(
            self.acked(case, request, payload, fds),
            Some(0),
            "{case}: request {request} failed"
        );
    }

    /// The daemon ends the connection (after any replies still due), within [`PATIENCE`].
    fn assert_ended(&self, case: &str) {
        while self.recv(case).is_some() {}
    }

    /// The message is refused: a negative acknowledgement or none, and the connection ends.
    fn refused(&self, case: &str, request: u32, payload: &[u8], fds: &[RawFd]) {
        let ack = self.acked(case, request, payload, fds);
        assert_ne!(ack, Some(0), "{case}: accepted");
        self.assert_ended(case);
    }

    /// What a frontend sends first, as QEMU does: features, protocol features, owner.
    fn handshake(sock: &Path) -> Raw {
        let r = Raw::connect(sock);
        let features = r.get_u64(GET_FEATURES);
        let proto = r.get_u64(GET_PROTOCOL_FEATURES);
        assert_eq!(proto & PROTOCOL, PROTOCOL);
        r.send(SET_PROTOCOL_FEATURES, VERSION_1, &u64s(&[PROTOCOL]), &[]);
        r.ok("handshake", SET_OWNER, &[], &[]);
        r.ok("handshake", SET_FEATURES, &u64s(&[features]), &[]);
        r
    }

    /// Queue `q` with `size` entries on rings at DESC, AVAIL, USED; returns (kick, call).
    fn start_queue(&self, case: &str, q: u32, size: u32) -> (EventFd, EventFd) {
        self.ok(case, SET_VRING_NUM, &u32s(&[q, size]), &[]);
        let mut addr = u32s(&[q, 0]);
        addr.extend(u64s(&[UADDR + DESC, UADDR + USED, UADDR + AVAIL, 0]));
        self.ok(case, SET_VRING_ADDR, &addr, &[]);
        self.ok(case, SET_VRING_BASE, &u32s(&[q, 0]), &[]);
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        self.ok(
            case,
            SET_VRING_CALL,
            &u64s(&[q as u64]),
            &[call.as_raw_fd()],
        );
        self.ok(
            case,
            SET_VRING_KICK,
            &u64s(&[q as u64]),
            &[kick.as_raw_fd()],
        );
        self.ok(case, SET_VRING_ENABLE, &u32s(&[q, 1]), &[]);
        (kick, call)
    }
}

// ----- the daemon -----

/// Queues of disk0 and disk1.
const NQ: [usize; 2] = [2, 1];
/// Bytes written to each disk before the hostile frontends come, and read back after each.
const DATA_LEN: usize = 64 << 10;
/// Where hostile requests that might pass as writes point: far from the checked data.
const FAR_SECTOR: u64 = 8192;

struct Daemon {
    pool: PoolFiles,
    socks: [PathBuf; 2],
    child: Option<Child>,
    data: [Vec<u8>; 2],
}

impl Daemon {
    fn start() -> Daemon {
        let pool = new_pool("64MiB");
        for id in ["0", "1"] {
            let name = format!("disk{id}");
            cli(&[
                "thin", "create", "-m", &pool.m, "-d", &pool.d, "--id", id, "--size", "16MiB",
                "--name", &name,
            ]);
        }
        let socks = [pool.root.join("disk0.sock"), pool.root.join("disk1.sock")];
        let log = File::create(pool.root.join("daemon.log")).unwrap();
        let child = Command::new(bin())
            .args(["serve", "-m", &pool.m, "-d", &pool.d, "--disk"])
            .arg(format!("id=0,socket={},num-queues=2", socks[0].display()))
            .arg("--disk")
            .arg(format!("id=1,socket={}", socks[1].display()))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Daemon {
            pool,
            socks,
            child: Some(child),
            data: [pattern(DATA_LEN, 11), pattern(DATA_LEN, 22)],
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.socks.iter().all(|s| s.exists()) {
            d.assert_alive("start");
            assert!(Instant::now() < deadline, "the sockets did not appear");
            std::thread::sleep(Duration::from_millis(10));
        }
        for (i, &nq) in NQ.iter().enumerate() {
            let mut g = Guest::connect(&d.socks[i], nq);
            assert_eq!(g.write(0, 0, &d.data[i], 4), 0);
            g.stop();
        }
        d
    }

    fn sock(&self) -> &Path {
        &self.socks[0]
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.pool.root.join("daemon.log")).unwrap_or_default()
    }

    fn assert_alive(&mut self, case: &str) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("{case}: the daemon exited: {status}");
        }
    }

    /// The daemon runs, and new well-behaved connections to both disks read back what was
    /// written before.
    fn assert_unharmed(&mut self, case: &str) {
        self.assert_alive(case);
        for (i, &nq) in NQ.iter().enumerate() {
            // Answered within PATIENCE first: the typed frontend below waits forever.
            let probe = Raw::connect(&self.socks[i]);
            probe.send(GET_FEATURES, VERSION_1, &[], &[]);
            assert!(
                probe.recv(case).is_some(),
                "{case}: disk{i}: the connection ended unanswered"
            );
            drop(probe);
            let mut g = Guest::connect(&self.socks[i], nq);
            let (st, got) = g.read(0, 0, DATA_LEN as u32);
            assert_eq!(st, 0, "{case}: disk{i}: read failed");
            assert!(got == self.data[i], "{case}: disk{i}: data changed");
            g.stop();
        }
    }

    /// SIGTERM, with a frontend stalled halfway through a message on disk0 and another idle
    /// after its handshake on disk1: exit status 0 within the bound. Returns the log.
    fn stop(mut self) -> String {
        let stalled = Raw::connect(self.sock());
        stalled.send_bytes(&header(GET_FEATURES, VERSION_1, 0)[..5], &[]);
        let idle = Raw::handshake(&self.socks[1]);
        let child = self.child.take().unwrap();
        // SAFETY: a signal to our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let (out, in_time) = wait_output(child, Duration::from_secs(30));
        assert!(in_time, "SIGTERM: the daemon did not exit within 30 s");
        assert!(out.status.success(), "SIGTERM: {:?}", out.status);
        drop((stalled, idle));
        self.log()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- daemon log -----\n{}", self.log());
        }
    }
}

/// The daemon's open descriptors.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The log says `what` (checked after the daemon exited, so nothing is still unwritten).
fn assert_logged(log: &str, what: &str) {
    assert!(log.contains(what), "the log does not say {what:?}:\n{log}");
}

// ----- memory tables -----

/// A memfd of `len` bytes mapped in this process, to lay out rings and requests in.
struct Mem {
    file: File,
    mem: vm_memory::GuestMemoryMmap,
}

impl Mem {
    fn new(len: u64) -> Mem {
        let file = memfd(len);
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            len as usize,
            Some(vm_memory::FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        Mem { file, mem }
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// A one-descriptor-per-part request at chain 0 of a queue at DESC/AVAIL/USED, offered
    /// as avail entry `n`.
    fn offer(&self, n: u16, descs: &[D]) {
        for (i, d) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let mut flags = if d.2 { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let raw = virtio_queue::desc::RawDescriptor::from(
                virtio_queue::desc::split::Descriptor::new(d.0, d.1, flags, i as u16 + 1),
            );
            self.mem
                .write_obj(raw, GuestAddress(DESC + 16 * i as u64))
                .unwrap();
        }
        self.mem
            .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * n as u64))
            .unwrap();
        self.mem.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }
}

/// A READ whose header is at `hdr` (which may be where the file behind the memory ends):
/// what makes the daemon touch that address.
fn read_at(m: &Mem, hdr: u64) -> [D; 3] {
    let hdr_bytes = {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h
    };
    // Written where it can be (inside the file); the daemon reads it where it is told.
    let _ = m.mem.write_slice(&hdr_bytes, GuestAddress(hdr));
    [D(hdr, 16, false), D(0x8000, 512, true), D(0x9000, 1, true)]
}

/// Offers a request on a queue set up on memory that was accepted though it should not
/// have been, and waits until it is used or the daemon dies: shows what accepting it costs.
fn use_it(d: &mut Daemon, r: &Raw, m: &Mem, case: &str, hdr: u64) {
    let (kick, _call) = r.start_queue(case, 0, 64);
    m.offer(0, &read_at(m, hdr));
    kick.write(1).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while m.used_idx() == 0 && Instant::now() < deadline {
        d.assert_alive(case);
        std::thread::sleep(Duration::from_millis(5));
    }
    d.assert_alive(case);
}

#[test]
fn memory_regions_past_the_end_of_their_file_are_refused_not_mapped() {
    let mut d = Daemon::start();
    // SET_MEM_TABLE: 64 MiB of guest memory on a 1 MiB file. Mapped, the pages past the
    // file's end raise SIGBUS when the daemon touches them (here: a request header there),
    // which kills the whole daemon and every disk it serves.
    let case = "SET_MEM_TABLE: a region larger than its file";
    let m = Mem::new(1 << 20);
    let r = Raw::handshake(d.sock());
    let t = table(1, &[region(0, 64 << 20, UADDR, 0)]);
    if r.acked(case, SET_MEM_TABLE, &t, &[m.fd()]) == Some(0) {
        use_it(&mut d, &r, &m, case, 32 << 20);
        panic!("{case}: accepted");
    }
    r.assert_ended(case);
    d.assert_unharmed(case);

    // The same with an offset: the region fits the file's size, not what is left after it.
    let case = "SET_MEM_TABLE: a region whose offset leaves it past the file's end";
    let m = Mem::new(1 << 20);
    let r = Raw::handshake(d.sock());
    let t = table(1, &[region(0, 1 << 20, UADDR, 512 << 10)]);
    if r.acked(case, SET_MEM_TABLE, &t, &[m.fd()]) == Some(0) {
        use_it(&mut d, &r, &m, case, 0xF_0000);
        panic!("{case}: accepted");
    }
    r.assert_ended(case);
    d.assert_unharmed(case);

    // ADD_MEM_REG (CONFIGURE_MEM_SLOTS) maps regions too.
    let case = "ADD_MEM_REG: a region larger than its file";
    let m = Mem::new(1 << 20);
    let more = memfd(1 << 20);
    let r = Raw::handshake(d.sock());
    r.ok(
        case,
        SET_MEM_TABLE,
        &table(1, &[region(0, 1 << 20, UADDR, 0)]),
        &[m.fd()],
    );
    let mut add = u64s(&[0]);
    add.extend(region(16 << 20, 64 << 20, UADDR + (16 << 20), 0));
    if r.acked(case, ADD_MEM_REG, &add, &[more.as_raw_fd()]) == Some(0) {
        use_it(&mut d, &r, &m, case, 48 << 20);
        panic!("{case}: accepted");
    }
    r.assert_ended(case);
    d.assert_unharmed(case);

    let log = d.stop();
    assert_logged(&log, "past the end of its file");
}

#[test]
fn memory_tables_that_cannot_be_mapped_are_refused() {
    let mut d = Daemon::start();
    let a = memfd(2 << 20);
    let b = memfd(2 << 20);
    let (pipe_r, _pipe_w) = {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors, owned from here on.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: just made, owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    };
    let dir = File::open(&d.pool.root).unwrap();
    let r2 = |gpa: u64| region(gpa, 2 << 20, UADDR + gpa, 0);
    let many: Vec<Vec<u8>> = (0..33).map(|i| r2(i << 21)).collect();
    let many_fds: Vec<File> = (0..33).map(|_| a.try_clone().unwrap()).collect();
    let many_raw: Vec<RawFd> = many_fds.iter().map(|f| f.as_raw_fd()).collect();
    let cases: Vec<(&str, Vec<u8>, Vec<RawFd>)> = vec![
        (
            "overlapping regions",
            table(2, &[r2(0), region(1 << 20, 2 << 20, UADDR + (8 << 20), 0)]),
            vec![a.as_raw_fd(), b.as_raw_fd()],
        ),
        (
            "guest address + size overflows",
            table(1, &[region(u64::MAX - 0xFFFF, 2 << 20, UADDR, 0)]),
            vec![a.as_raw_fd()],
        ),
        (
            "frontend address + size overflows",
            table(1, &[region(0, 2 << 20, u64::MAX - 0xFFFF, 0)]),
            vec![a.as_raw_fd()],
        ),
        (
            "offset + size overflows",
            table(1, &[region(0, 2 << 20, UADDR, u64::MAX - 0xFFF)]),
            vec![a.as_raw_fd()],
        ),
        (
            "a region of 2^60 bytes",
            table(1, &[region(0, 1 << 60, UADDR, 0)]),
            vec![a.as_raw_fd()],
        ),
        (
            "a region of 0 bytes",
            table(1, &[region(0, 0, UADDR, 0)]),
            vec![a.as_raw_fd()],
        ),
        ("zero regions", table(0, &[]), vec![]),
        ("33 regions", table(33, &many), many_raw.clone()),
        (
            "a count of 40 with one region",
            table(40, &[r2(0)]),
            vec![a.as_raw_fd()],
        ),
        (
            "two regions, one descriptor",
            table(2, &[r2(0), r2(4 << 20)]),
            vec![a.as_raw_fd()],
        ),
        (
            "one region, two descriptors",
            table(1, &[r2(0)]),
            vec![a.as_raw_fd(), b.as_raw_fd()],
        ),
        ("a pipe", table(1, &[r2(0)]), vec![pipe_r.as_raw_fd()]),
        ("a directory", table(1, &[r2(0)]), vec![dir.as_raw_fd()]),
        ("a socket", table(1, &[r2(0)]), vec![d_sock_fd()]),
    ];
    for (case, payload, fds) in &cases {
        let case = format!("SET_MEM_TABLE: {case}");
        let r = Raw::handshake(d.sock());
        r.refused(&case, SET_MEM_TABLE, payload, fds);
        d.assert_unharmed(&case);
    }

    // A table that is fine, then one added region that overlaps it.
    let case = "ADD_MEM_REG: a region overlapping the table";
    let r = Raw::handshake(d.sock());
    r.ok(case, SET_MEM_TABLE, &table(1, &[r2(0)]), &[a.as_raw_fd()]);
    let mut add = u64s(&[0]);
    add.extend(region(1 << 20, 1 << 20, UADDR + (32 << 20), 0));
    r.refused(case, ADD_MEM_REG, &add, &[b.as_raw_fd()]);
    d.assert_unharmed(case);
    d.stop();
}

/// A descriptor the daemon cannot map: one end of a fresh socket pair (the other end is
/// dropped; the daemon gets its own reference with the message).
fn d_sock_fd() -> RawFd {
    let (s, _) = UnixStream::pair().unwrap();
    // Leaked on purpose: a test process's descriptor, alive for the message.
    let fd = s.as_raw_fd();
    std::mem::forget(s);
    fd
}

// ----- descriptor chains and rings -----

const N: u16 = VRING_DESC_F_NEXT as u16;
const W: u16 = VRING_DESC_F_WRITE as u16;
const I: u16 = VRING_DESC_F_INDIRECT as u16;

/// Offers the chain at descriptor `head` on queue 0 and waits for it: its used length.
fn used_len(g: &mut Guest, case: &str, head: u16) -> u32 {
    let seq = g.publish(0, head);
    assert!(
        g.wait_used_for(0, seq, PATIENCE),
        "{case}: the chain was never used"
    );
    let (id, len) = g.used_elem(0, seq);
    assert_eq!(id, head as u32, "{case}: the used element is another chain");
    len
}

#[test]
fn descriptor_chains_that_break_the_rules_get_errors_and_the_queue_keeps_serving() {
    let mut d = Daemon::start();
    let b = Guest::buf(6);
    let st = b + 0x800;
    let data = b + 0x1000;
    // An indirect table, and a second one of 65535 descriptors (1 MiB).
    let t = b + 0x10000;
    let big = 32 << 20;
    let ioerr = Some(VIRTIO_BLK_S_IOERR as u8);
    type Case = (
        &'static str,
        u32,
        &'static [(u16, u64, u32, u16, u16)],
        Option<u8>,
    );
    // (name, request type in the header at b, descriptors (index, addr, len, flags, next)
    // with the head first, the status byte expected at `st` if any). Addresses given as
    // 0..16 stand for b, st, data, t, big and the edges of guest memory (see `at`).
    let cases: &[Case] = &[
        (
            "a header outside guest memory",
            VIRTIO_BLK_T_IN,
            &[(40, 100, 16, N, 41), (41, 1, 1, W, 0)],
            ioerr,
        ),
        (
            "data straddling the end of guest memory",
            VIRTIO_BLK_T_IN,
            &[
                (40, 0, 16, N, 41),
                (41, 101, 512, W | N, 42),
                (42, 1, 1, W, 0),
            ],
            ioerr,
        ),
        (
            "data whose address + length overflows",
            VIRTIO_BLK_T_IN,
            &[
                (40, 0, 16, N, 41),
                (41, 102, 512, W | N, 42),
                (42, 1, 1, W, 0),
            ],
            ioerr,
        ),
        (
            "4 GiB - 64 KiB of data",
            VIRTIO_BLK_T_IN,
            &[
                (40, 0, 16, N, 41),
                (41, 2, 0xFFFF_0000, W | N, 42),
                (42, 1, 1, W, 0),
            ],
            ioerr,
        ),
        // The chain's bytes overflow a u32: virtio-queue's iterator ends it before the data
        // (chain.rs), so the daemon sees a header alone, with no status byte to set.
        (
            "u32::MAX bytes of data",
            VIRTIO_BLK_T_IN,
            &[
                (40, 0, 16, N, 41),
                (41, 2, u32::MAX, W | N, 42),
                (42, 1, 1, W, 0),
            ],
            None,
        ),
        (
            "a zero-length status",
            VIRTIO_BLK_T_FLUSH,
            &[(40, 0, 16, N, 41), (41, 1, 0, W, 0)],
            None,
        ),
        (
            "a loop of readable descriptors",
            VIRTIO_BLK_T_OUT,
            &[(40, 0, 16, N, 41), (41, 2, 512, N, 40)],
            None,
        ),
        (
            "a loop through writable descriptors",
            VIRTIO_BLK_T_IN,
            &[
                (40, 0, 16, N, 41),
                (41, 2, 512, W | N, 42),
                (42, 1, 1, W | N, 41),
            ],
            None,
        ),
        (
            "next beyond the table",
            VIRTIO_BLK_T_IN,
            &[(40, 0, 16, N, 1000)],
            None,
        ),
        (
            "an indirect table with a loop",
            VIRTIO_BLK_T_IN,
            &[(40, 3, 48, I, 0)],
            None,
        ),
        (
            "an indirect table of u32::MAX bytes",
            VIRTIO_BLK_T_IN,
            &[(40, 3, 0xFFFF_FFF0, I, 0)],
            None,
        ),
        (
            "an indirect table of 65535 chained descriptors",
            VIRTIO_BLK_T_OUT,
            &[(40, 4, 0xFFFF0, I, 0)],
            None,
        ),
        (
            "an indirect table outside guest memory",
            VIRTIO_BLK_T_IN,
            &[(40, 100, 64, I, 0)],
            None,
        ),
        (
            "an indirect table that is not whole descriptors",
            VIRTIO_BLK_T_IN,
            &[(40, 3, 40, I, 0)],
            None,
        ),
        (
            "an indirect descriptor inside an indirect table",
            VIRTIO_BLK_T_IN,
            &[(40, 3, 16, I, 0)],
            None,
        ),
    ];
    let at = |a: u64| match a {
        0 => b,
        1 => st,
        2 => data,
        3 => t,
        4 => big,
        100 => 1 << 40,
        101 => MEM_SIZE - 256,
        102 => u64::MAX - 255,
        _ => unreachable!(),
    };
    for &(case, kind, descs, status) in cases {
        let mut g = Guest::connect(d.sock(), NQ[0]);
        g.header(b, kind, FAR_SECTOR);
        g.mem.write_obj(0xAAu8, GuestAddress(st)).unwrap();
        for &(i, a, len, flags, next) in descs {
            g.put_desc(0, i, at(a), len, flags, next);
        }
        // The indirect tables: a loop (header, data, status, back to the data), or a
        // descriptor pointing at the table itself; the big one chains all its entries.
        let desc = |addr: u64, len: u32, flags: u16, next: u16| {
            virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
                addr, len, flags, next,
            ))
        };
        if case.contains("inside an indirect") {
            g.mem.write_obj(desc(t, 16, I, 0), GuestAddress(t)).unwrap();
        } else {
            for (k, e) in [
                desc(b, 16, N, 1),
                desc(data, 512, W | N, 2),
                desc(st, 1, W | N, 1),
            ]
            .into_iter()
            .enumerate()
            {
                g.mem.write_obj(e, GuestAddress(t + 16 * k as u64)).unwrap();
            }
        }
        if case.contains("65535") {
            for k in 0..0xFFFFu64 {
                let e = desc(b, 16, if k < 0xFFFE { N } else { 0 }, k as u16 + 1);
                g.mem.write_obj(e, GuestAddress(big + 16 * k)).unwrap();
            }
        }
        let len = used_len(&mut g, case, descs[0].0);
        if let Some(s) = status {
            assert_eq!((len, g.status(st)), (1, s), "{case}");
        }
        // The same queue serves the next request.
        assert_eq!(
            g.read(0, 0, 4096),
            (0, d.data[0][..4096].to_vec()),
            "{case}: the queue stopped serving"
        );
        drop(g);
        d.assert_unharmed(case);
    }

    // A head out of the ring's range: the chain can never be put in the used ring, and
    // the queue goes on with the next one.
    let case = "a head index beyond the queue size";
    let mut g = Guest::connect(d.sock(), NQ[0]);
    g.publish(0, 1000);
    g.forget_last(0);
    assert_eq!(
        g.read(0, 0, 4096),
        (0, d.data[0][..4096].to_vec()),
        "{case}: the queue stopped serving"
    );
    drop(g);
    d.assert_unharmed(case);

    // The avail idx far ahead of what the ring can hold: nothing to do but refuse to read
    // the ring, and keep serving the other queue and, after it, the next connection.
    let case = "the avail idx 1000 ahead";
    let mut g = Guest::connect(d.sock(), NQ[0]);
    g.set_avail_idx(0, 1000);
    assert_eq!(
        g.read(1, 0, 4096),
        (0, d.data[0][..4096].to_vec()),
        "{case}: the other queue stopped serving"
    );
    drop(g);
    d.assert_unharmed(case);

    let log = d.stop();
    assert_logged(&log, "avail idx");
}

#[test]
fn rings_that_do_not_fit_in_guest_memory_are_not_served() {
    let mut d = Daemon::start();
    let end = MEM_SIZE;
    // Each ring starts inside guest memory (so the vhost crate takes its address) and ends
    // past it.
    let layouts: [(&str, (u64, u64, u64)); 3] = [
        (
            "a descriptor table past the end of guest memory",
            (end - 16, 0x20_0000, 0x20_1000),
        ),
        (
            "an avail ring past the end of guest memory",
            (0x20_0000, end - 4, 0x20_1000),
        ),
        (
            "a used ring past the end of guest memory",
            (0x20_0000, 0x20_1000, end - 8),
        ),
    ];
    for (case, rings) in layouts {
        let layout = move |q: usize| {
            if q == 0 {
                rings
            } else {
                Guest::default_layout(q)
            }
        };
        let mut g = Guest::connect_laid_out(d.sock(), NQ[0], u64::MAX, &layout);
        // A write far from the data, as the avail ring's first entry (which is where it
        // can be written), descriptors 0..3 (which may be all that fits).
        let b = Guest::buf(7);
        g.header(b, VIRTIO_BLK_T_OUT, FAR_SECTOR);
        let descs = [(b, 16, N), (b + 0x1000, 512, N), (b + 0x800, 1, W)];
        for (i, &(a, len, f)) in descs.iter().enumerate() {
            let _ = std::panic::catch_unwind(|| g.put_desc(0, i as u16, a, len, f, i as u16 + 1));
        }
        let _ = g.mem.write_obj(0u16, GuestAddress(g.queues[0].avail + 4));
        g.set_avail_idx(0, 1);
        // The other queue serves meanwhile.
        assert_eq!(
            g.read(1, 0, 4096),
            (0, d.data[0][..4096].to_vec()),
            "{case}: the other queue stopped serving"
        );
        drop(g);
        d.assert_unharmed(case);
    }
    let log = d.stop();
    assert_logged(&log, "do not fit in guest memory");
}

// ----- vhost-user messages out of range or out of order -----

/// A connection with one region of 1 MiB of guest memory at guest address 0.
fn with_memory(sock: &Path) -> (Raw, Mem) {
    let m = Mem::new(1 << 20);
    let r = Raw::handshake(sock);
    r.ok(
        "memory",
        SET_MEM_TABLE,
        &table(1, &[region(0, 1 << 20, UADDR, 0)]),
        &[m.fd()],
    );
    (r, m)
}

fn vring_addr(q: u32, flags: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut v = u32s(&[q, flags]);
    v.extend(u64s(&[desc, used, avail, 0]));
    v
}

#[test]
fn vring_setup_out_of_range_is_refused() {
    let mut d = Daemon::start();
    let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let efd = e.as_raw_fd();
    let cases: Vec<(&str, u32, Vec<u8>, Vec<RawFd>)> = vec![
        ("SET_VRING_NUM 0", SET_VRING_NUM, u32s(&[0, 0]), vec![]),
        (
            "SET_VRING_NUM 100, not a power of two",
            SET_VRING_NUM,
            u32s(&[0, 100]),
            vec![],
        ),
        (
            "SET_VRING_NUM 32768, above the size offered",
            SET_VRING_NUM,
            u32s(&[0, 32768]),
            vec![],
        ),
        (
            "SET_VRING_NUM 65535",
            SET_VRING_NUM,
            u32s(&[0, 65535]),
            vec![],
        ),
        (
            "SET_VRING_NUM for queue 5 of 2",
            SET_VRING_NUM,
            u32s(&[5, 64]),
            vec![],
        ),
        (
            "SET_VRING_ADDR for queue 7 of 2",
            SET_VRING_ADDR,
            vring_addr(7, 0, UADDR + DESC, UADDR + USED, UADDR + AVAIL),
            vec![],
        ),
        (
            "SET_VRING_ADDR outside the memory table",
            SET_VRING_ADDR,
            vring_addr(0, 0, 0x1000, 0x3000, 0x2000),
            vec![],
        ),
        (
            "SET_VRING_ADDR with a misaligned table",
            SET_VRING_ADDR,
            vring_addr(0, 0, UADDR + DESC + 8, UADDR + USED, UADDR + AVAIL),
            vec![],
        ),
        (
            "SET_VRING_ADDR with unknown flags",
            SET_VRING_ADDR,
            vring_addr(0, 0x10, UADDR + DESC, UADDR + USED, UADDR + AVAIL),
            vec![],
        ),
        (
            "SET_VRING_BASE for queue 9",
            SET_VRING_BASE,
            u32s(&[9, 0]),
            vec![],
        ),
        (
            "GET_VRING_BASE for queue 9",
            GET_VRING_BASE,
            u32s(&[9, 0]),
            vec![],
        ),
        (
            "SET_VRING_ENABLE 2",
            SET_VRING_ENABLE,
            u32s(&[0, 2]),
            vec![],
        ),
        (
            "SET_VRING_ENABLE for queue 3",
            SET_VRING_ENABLE,
            u32s(&[3, 1]),
            vec![],
        ),
        (
            "SET_VRING_KICK for queue 200",
            SET_VRING_KICK,
            u64s(&[200]),
            vec![efd],
        ),
        (
            "SET_VRING_KICK without its descriptor",
            SET_VRING_KICK,
            u64s(&[0]),
            vec![],
        ),
        (
            "SET_VRING_CALL saying 'no descriptor' with one",
            SET_VRING_CALL,
            u64s(&[0x100]),
            vec![efd],
        ),
    ];
    for (case, request, payload, fds) in &cases {
        let (r, _m) = with_memory(d.sock());
        r.refused(case, *request, payload, fds);
        d.assert_unharmed(case);
    }

    // Not an error: GET_VRING_BASE of a queue never started answers, and the connection
    // goes on.
    let case = "GET_VRING_BASE on a queue never started";
    let (r, _m) = with_memory(d.sock());
    r.send(GET_VRING_BASE, VERSION_1, &u32s(&[1, 0]), &[]);
    let (code, p) = r.recv(case).expect("an answer");
    assert_eq!((code, p), (GET_VRING_BASE, u32s(&[1, 0])), "{case}");
    assert_ne!(r.get_u64(GET_FEATURES), 0, "{case}: the connection goes on");
    drop(r);
    d.assert_unharmed(case);
    let log = d.stop();
    assert_logged(&log, "not a power of two");
}

#[test]
fn protocol_messages_out_of_order_or_malformed_are_refused() {
    let mut d = Daemon::start();
    let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let fds3 = [e.as_raw_fd(), e.as_raw_fd(), e.as_raw_fd()];
    let fds34 = [e.as_raw_fd(); 34];

    // Kick, call and enable before the memory table (and a kick delivered then): the
    // queue serves once the frontend sets the rest up.
    let case = "SET_VRING_KICK, CALL, ENABLE before SET_MEM_TABLE";
    let m = Mem::new(1 << 20);
    let r = Raw::handshake(d.sock());
    r.ok(case, SET_VRING_NUM, &u32s(&[0, 64]), &[]);
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    r.ok(case, SET_VRING_CALL, &u64s(&[0]), &[call.as_raw_fd()]);
    r.ok(case, SET_VRING_KICK, &u64s(&[0]), &[kick.as_raw_fd()]);
    r.ok(case, SET_VRING_ENABLE, &u32s(&[0, 1]), &[]);
    kick.write(1).unwrap();
    r.ok(
        case,
        SET_MEM_TABLE,
        &table(1, &[region(0, 1 << 20, UADDR, 0)]),
        &[m.fd()],
    );
    r.ok(
        case,
        SET_VRING_ADDR,
        &vring_addr(0, 0, UADDR + DESC, UADDR + USED, UADDR + AVAIL),
        &[],
    );
    let flush = {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
        m.mem.write_slice(&h, GuestAddress(0x8000)).unwrap();
        [D(0x8000, 16, false), D(0x9000, 1, true)]
    };
    m.mem.write_obj(0xAAu8, GuestAddress(0x9000)).unwrap();
    m.offer(0, &flush);
    kick.write(1).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while m.used_idx() == 0 {
        assert!(Instant::now() < deadline, "{case}: the queue never served");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        m.mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(),
        0,
        "{case}"
    );
    drop(r);
    d.assert_unharmed(case);

    let features = {
        let r = Raw::connect(d.sock());
        r.get_u64(GET_FEATURES)
    };
    d.assert_unharmed("GET_FEATURES alone");
    let refusals: Vec<(&str, u32, Vec<u8>, &[RawFd])> = vec![
        (
            "SET_VRING_ADDR before SET_MEM_TABLE",
            SET_VRING_ADDR,
            vring_addr(0, 0, UADDR + DESC, UADDR + USED, UADDR + AVAIL),
            &[],
        ),
        (
            "SET_FEATURES with bits never offered",
            SET_FEATURES,
            u64s(&[features | 1 << 50]),
            &[],
        ),
        ("request 99", 99, vec![], &[]),
        (
            "GET_FEATURES carrying three descriptors",
            GET_FEATURES,
            vec![],
            &fds3,
        ),
        (
            "SET_VRING_CALL carrying three descriptors",
            SET_VRING_CALL,
            u64s(&[0]),
            &fds3,
        ),
        (
            "a message carrying 34 descriptors",
            GET_FEATURES,
            vec![],
            &fds34,
        ),
        ("SET_BACKEND_REQ_FD with an eventfd", 21, vec![], &fds3[..1]),
        (
            "SET_MEM_TABLE with a payload of 4097 bytes",
            SET_MEM_TABLE,
            vec![0u8; 4097],
            &[],
        ),
    ];
    for (case, request, payload, fds) in &refusals {
        let r = Raw::handshake(d.sock());
        r.refused(case, *request, payload, fds);
        d.assert_unharmed(case);
    }

    // Headers that are not what they should be.
    let headers: Vec<(&str, Vec<u8>)> = vec![
        (
            "the reply flag on a request",
            header(GET_FEATURES, VERSION_1 | REPLY, 0),
        ),
        ("version 0", header(GET_FEATURES, 0, 0)),
        (
            "a payload of 65 KiB announced",
            header(SET_MEM_TABLE, VERSION_1, 65 << 10),
        ),
        (
            "a payload of 4 GiB announced",
            header(SET_MEM_TABLE, VERSION_1, u32::MAX),
        ),
    ];
    for (case, bytes) in &headers {
        let r = Raw::handshake(d.sock());
        r.send_bytes(bytes, &[]);
        r.assert_ended(case);
        d.assert_unharmed(case);
    }

    // Closing in the middle of a message.
    let cut: Vec<(&str, Vec<u8>)> = vec![
        (
            "7 bytes of a header, then the end",
            header(GET_FEATURES, VERSION_1, 0)[..7].to_vec(),
        ),
        ("4 of 8 payload bytes, then the end", {
            let mut v = header(SET_FEATURES, VERSION_1, 8);
            v.extend([0u8; 4]);
            v
        }),
    ];
    for (case, bytes) in &cut {
        let r = Raw::handshake(d.sock());
        r.send_bytes(bytes, &[]);
        drop(r);
        d.assert_unharmed(case);
    }
    d.stop();
}

#[test]
fn many_connections_and_refusals_leak_no_descriptors() {
    let mut d = Daemon::start();
    let pid = d.pid();
    // Counted while a connection to each disk that has been answered is open: the daemon
    // serves one connection of a disk at a time, so every earlier one has been taken down
    // by then, and the connections open are the same each time.
    let count = |d: &Daemon| {
        let open: Vec<Raw> = d.socks.iter().map(|s| Raw::connect(s)).collect();
        for r in &open {
            r.get_u64(GET_FEATURES);
        }
        fd_count(pid)
    };
    let before = count(&d);
    let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let big = Mem::new(1 << 20);
    for _ in 0..20 {
        let mut g = Guest::connect(d.sock(), NQ[0]);
        assert_eq!(g.read(0, 0, 512).0, 0);
        drop(g);
        drop(Raw::connect(d.sock()));
        Raw::handshake(d.sock()).refused("fds", GET_FEATURES, &[], &[e.as_raw_fd(); 3]);
        Raw::handshake(d.sock()).refused(
            "past the end",
            SET_MEM_TABLE,
            &table(1, &[region(0, 4 << 20, UADDR, 0)]),
            &[big.fd()],
        );
        let (r, _m) = with_memory(d.sock());
        r.ok("kick", SET_VRING_KICK, &u64s(&[1]), &[e.as_raw_fd()]);
        r.ok("call", SET_VRING_CALL, &u64s(&[1]), &[e.as_raw_fd()]);
    }
    // Many connections opened and dropped as fast as they come.
    for _ in 0..100 {
        drop(UnixStream::connect(d.sock()).unwrap());
    }
    let after = count(&d);
    assert_eq!(
        after, before,
        "the daemon's open descriptors grew from {before} to {after}"
    );
    d.assert_unharmed("many connections");
    d.stop();
}

/// A call eventfd that cannot take a notification (blocking, its counter one short of the
/// most it holds): a write to it would block the queue's worker for good, and the join of
/// the workers on disconnect with it, so that the disk would never take another connection.
#[test]
fn a_call_descriptor_that_would_block_does_not_wedge_the_disk() {
    let mut d = Daemon::start();
    let case = "a full, blocking call eventfd";
    // Without EVENT_IDX every completion notifies.
    let mask = !(1u64 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
    let mut g = Guest::connect_with(d.sock(), NQ[0], mask);
    let full = EventFd::new(0).unwrap();
    full.write(0xFFFF_FFFF_FFFF_FFFE).unwrap();
    g.fe.set_vring_call(0, &full).unwrap();
    // Completed in the used ring; only the interrupt cannot be given.
    assert_eq!(
        g.read(0, 0, 4096),
        (0, d.data[0][..4096].to_vec()),
        "{case}"
    );
    drop(g);
    d.assert_unharmed(case);
    d.stop();
}
