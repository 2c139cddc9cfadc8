//! The vhost-user control channel, relayed.
//!
//! A backend tells its frontend that the device configuration changed (a disk grew) with
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend channel, the socket the frontend
//! hands over with `VHOST_USER_SET_BACKEND_REQ_FD`. The vhost crate receives that socket
//! into a `Backend` that keeps it private and has no sender for this message. So the
//! daemon accepts the frontend's connection itself and carries every control message,
//! unchanged and with its file descriptors, to and from the vhost crate's handler over a
//! private socket; on the way it keeps a duplicate of the backend channel.
//!
//! Only control messages pass through here (a few dozen per connection): the virtqueues,
//! their kick and call eventfds and guest memory go straight between the guest and the
//! workers, so the relay costs nothing on the I/O path.
//!
//! The relay also speaks inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`),
//! which the vhost crate's handler refuses: it offers the feature in the handler's reply to
//! `GET_PROTOCOL_FEATURES`, notes whether the frontend acknowledged it, answers
//! `GET_INFLIGHT_FD` with a region of its own making and takes the region of
//! `SET_INFLIGHT_FD` for the backend's workers (see [`super::inflight`]). Those two never
//! reach the handler.

use super::inflight::{self, Inflight, Region};
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vhost::vhost_user::Listener;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Every vhost-user message starts with request, flags and payload size, 32 bits each.
const HEADER_LEN: usize = 12;
/// The largest payload relayed. vhost-user's own messages stay under 4 KiB (the vhost crate
/// refuses more); anything bigger is a broken or hostile peer and ends the connection.
const MAX_PAYLOAD: usize = 64 * 1024;
/// The most descriptors one message carries (the protocol's limit).
const MAX_FDS: usize = 32;
/// `VHOST_USER_SET_BACKEND_REQ_FD`: the frontend hands over the backend channel.
const SET_BACKEND_REQ_FD: u32 = 21;
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, on the backend channel.
const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;
/// Version 1 of the protocol, in the flags of every message.
const VERSION_1: u32 = 0x1;
/// `VHOST_USER_SET_MEM_TABLE` and `VHOST_USER_ADD_MEM_REG`: guest memory regions, each with
/// the descriptor of the file the backend maps it from.
const SET_MEM_TABLE: u32 = 5;
/// `VHOST_USER_SET_VRING_CALL` and `VHOST_USER_SET_VRING_ERR`: eventfds the backend writes.
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
/// `VHOST_USER_SET_VRING_NUM`: a queue's size.
const SET_VRING_NUM: u32 = 8;
const ADD_MEM_REG: u32 = 37;
/// One region in those messages: guest address, size, frontend address, file offset.
const REGION_LEN: usize = 32;
/// `VHOST_USER_GET_PROTOCOL_FEATURES` and `VHOST_USER_SET_PROTOCOL_FEATURES`.
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
/// `VHOST_USER_GET_INFLIGHT_FD` and `VHOST_USER_SET_INFLIGHT_FD`.
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
/// The protocol feature bit of inflight I/O tracking.
const F_INFLIGHT_SHMFD: u64 = 1 << 12;
/// Flags: a reply; the frontend asks for an ack (REPLY_ACK).
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// `VhostUserInflight`: mmap_size u64, mmap_offset u64, num_queues u16, queue_size u16
/// (QEMU sends it padded to 24 bytes).
const INFLIGHT_LEN: usize = 20;

/// The backend channel of the connected frontend, when it gave one.
#[derive(Default)]
pub struct BackendChannel {
    sock: Mutex<Option<UnixStream>>,
}

impl BackendChannel {
    fn set(&self, sock: Option<UnixStream>) {
        *self.sock.lock().unwrap_or_else(|p| p.into_inner()) = sock;
    }

    /// Whether a frontend is connected and gave a backend channel.
    #[cfg(test)]
    pub fn is_open(&self) -> bool {
        self.sock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Tells the frontend to read the device configuration again. False when there is no
    /// channel (no frontend, or one that did not negotiate `BACKEND_REQ`).
    ///
    /// No reply is asked for: the frontend acts on the message (QEMU reads the
    /// configuration with `GET_CONFIG` and raises the virtio config interrupt) without one.
    pub fn notify_config_change(&self) -> io::Result<bool> {
        let mut guard = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sock) = guard.as_mut() else {
            return Ok(false);
        };
        let mut msg = [0u8; HEADER_LEN];
        msg[0..4].copy_from_slice(&BACKEND_CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        // A frontend that stopped reading must not hold the management command forever.
        sock.set_write_timeout(Some(std::time::Duration::from_secs(1)))?;
        match sock.write_all(&msg) {
            Ok(()) => Ok(true),
            Err(e) => {
                *guard = None;
                Err(e)
            }
        }
    }
}

/// One message: header, payload and the descriptors that came with it.
struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes(self.bytes[0..4].try_into().expect("header is 12 bytes"))
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes(self.bytes[4..8].try_into().expect("header is 12 bytes"))
    }

    fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// A reply to request `request` carrying `payload` and `fds`.
    fn reply(request: u32, payload: &[u8], fds: Vec<OwnedFd>) -> Message {
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(&request.to_le_bytes());
        bytes.extend_from_slice(&(VERSION_1 | FLAG_REPLY).to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(payload);
        Message { bytes, fds }
    }
}

/// What the relay does with a message.
enum Verdict {
    /// Carry it on.
    Forward,
    /// Keep it, and answer the sender with this.
    Reply(Message),
    /// Keep it; no answer.
    Taken,
}

/// A socket written by more than one thread: the frontend's, which gets the handler's
/// replies and the relay's own. Each message goes out whole under the lock, so that two
/// never interleave (vhost-user is request and reply, so only one is due at a time, but a
/// frontend that does not wait must not get torn messages).
#[derive(Clone, Copy)]
struct Sink<'a> {
    sock: &'a UnixStream,
    lock: &'a Mutex<()>,
}

impl Sink<'_> {
    fn send(&self, m: &Message) -> io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        send_message(self.sock, m)
    }
}

/// Inflight I/O tracking as the relay speaks it for one connection.
struct InflightRelay {
    state: Arc<Inflight>,
    /// The disk's queues: a region is made and taken for at most as many.
    max_queues: usize,
}

impl InflightRelay {
    /// The frontend's messages about inflight tracking: `None` for the others.
    fn watch(&self, name: &str, m: &Message) -> io::Result<Option<Verdict>> {
        match m.request() {
            SET_PROTOCOL_FEATURES => {
                if let Some(v) = m.payload().get(0..8) {
                    let features = u64::from_le_bytes(v.try_into().expect("8 bytes"));
                    self.state.set_acked(features & F_INFLIGHT_SHMFD != 0);
                }
                Ok(Some(Verdict::Forward))
            }
            GET_INFLIGHT_FD => {
                let (_, _, num_queues, queue_size) = inflight_fields(m)?;
                let mut payload = m.payload().to_vec();
                let (fds, size) = match inflight::create(num_queues, queue_size, self.max_queues) {
                    Ok((file, size)) => (vec![OwnedFd::from(file)], size),
                    Err(e) => {
                        // A size of 0 tells the frontend to go on without tracking.
                        tracing::warn!("{name}: GET_INFLIGHT_FD: {e}; no inflight tracking");
                        (Vec::new(), 0)
                    }
                };
                payload[0..8].copy_from_slice(&size.to_le_bytes());
                payload[8..16].copy_from_slice(&0u64.to_le_bytes());
                Ok(Some(Verdict::Reply(Message::reply(
                    GET_INFLIGHT_FD,
                    &payload,
                    fds,
                ))))
            }
            SET_INFLIGHT_FD => {
                let (size, offset, num_queues, queue_size) = inflight_fields(m)?;
                let need_reply = m.flags() & FLAG_NEED_REPLY != 0;
                let opened = match m.fds.as_slice() {
                    [fd] => fd.try_clone().map_err(|e| e.to_string()).and_then(|fd| {
                        Region::open(
                            fd.into(),
                            size,
                            offset,
                            num_queues,
                            queue_size,
                            self.max_queues,
                        )
                        .map_err(|e| e.to_string())
                    }),
                    fds => Err(format!("{} descriptors, not one", fds.len())),
                };
                let ok = match opened {
                    Ok(region) => {
                        tracing::info!(
                            "{name}: inflight tracking on ({num_queues} queue(s) of \
                             {queue_size} entries)"
                        );
                        self.state.set_region(region);
                        true
                    }
                    Err(why) if need_reply => {
                        tracing::warn!("{name}: SET_INFLIGHT_FD refused: {why}");
                        false
                    }
                    // No way to say no: the connection ends, as for other refused messages.
                    Err(why) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("SET_INFLIGHT_FD refused: {why}"),
                        ))
                    }
                };
                Ok(Some(if need_reply {
                    Verdict::Reply(Message::reply(
                        SET_INFLIGHT_FD,
                        &u64::from(!ok).to_le_bytes(),
                        Vec::new(),
                    ))
                } else {
                    Verdict::Taken
                }))
            }
            _ => Ok(None),
        }
    }

    /// The handler's reply to `GET_PROTOCOL_FEATURES` offers inflight tracking too.
    fn offer(m: &mut Message) {
        if m.request() == GET_PROTOCOL_FEATURES
            && m.flags() & FLAG_REPLY != 0
            && m.bytes.len() == HEADER_LEN + 8
        {
            let at = HEADER_LEN..HEADER_LEN + 8;
            let v = u64::from_le_bytes(m.bytes[at.clone()].try_into().expect("8 bytes"));
            m.bytes[at].copy_from_slice(&(v | F_INFLIGHT_SHMFD).to_le_bytes());
        }
    }
}

/// The fields of a `VhostUserInflight` payload: mmap_size, mmap_offset, num_queues,
/// queue_size.
fn inflight_fields(m: &Message) -> io::Result<(u64, u64, u16, u16)> {
    let p = m.payload();
    if p.len() < INFLIGHT_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "inflight message {} of {} bytes (at least {INFLIGHT_LEN})",
                m.request(),
                p.len()
            ),
        ));
    }
    let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().expect("8 bytes"));
    let u16_at = |i: usize| u16::from_le_bytes(p[i..i + 2].try_into().expect("2 bytes"));
    Ok((u64_at(0), u64_at(8), u16_at(16), u16_at(18)))
}

/// Reads exactly `buf.len()` bytes, collecting any descriptors that arrive with them.
/// `Ok(false)` on end of stream before the first byte.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
        // SAFETY: the iovec covers `rest`, a live, exclusively borrowed byte slice that any
        // bytes may be written to; the descriptors received are wrapped below at once.
        let r = unsafe { sock.recv_with_fds(&mut iov, &mut raw) };
        let (n, nfds) = match r {
            Ok(v) => v,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        };
        for &fd in &raw[..nfds] {
            // SAFETY: recvmsg just installed this descriptor in our table and nothing else
            // owns it.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

/// Reads one whole message; `None` at a clean end of stream.
fn recv_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut bytes = vec![0u8; HEADER_LEN];
    let mut fds = Vec::new();
    if !recv_exact(sock, &mut bytes, &mut fds)? {
        return Ok(None);
    }
    let size = u32::from_le_bytes(bytes[8..12].try_into().expect("12-byte header")) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes (the most is {MAX_PAYLOAD})"),
        ));
    }
    bytes.resize(HEADER_LEN + size, 0);
    if !recv_exact(sock, &mut bytes[HEADER_LEN..], &mut fds)? && size > 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(Message { bytes, fds }))
}

/// Why `m` must not reach the vhost crate's handler, if it must not.
///
/// Guest memory regions past the end of their file: the vhost crate maps whatever size the
/// frontend names (`VhostUserMemoryRegion::mmap_region`, vhost 0.18 message.rs, through
/// vm-memory's `MmapRegion::from_file`, which does not look at the file's size), and a page
/// of such a mapping past the file's end raises SIGBUS when touched: the whole daemon, every
/// disk it serves, dies on the first request whose header or ring lies there. So every
/// region must lie within its file, and the file must be a regular one (memfd, tmpfs,
/// hugetlbfs: what QEMU and other VMMs share guest memory with), whose size is known.
/// (A frontend that shrinks the file after this check is not stopped by it: see
/// docs/SECURITY.md.)
fn refusal(m: &Message) -> Option<String> {
    let payload = &m.bytes[HEADER_LEN..];
    // A split virtqueue's size is a power of two (virtio 1.2, 2.7). virtio-queue's
    // `Queue::set_size` refuses any other with a log line and keeps the size it had, and
    // vhost-user-backend's `set_vring_num` (handler.rs) acknowledges it all the same: the
    // device would walk rings of another size than the driver laid out.
    if m.request() == SET_VRING_NUM && payload.len() == 8 {
        let num = u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes"));
        if !num.is_power_of_two() {
            return Some(format!(
                "SET_VRING_NUM refused: {num} entries, not a power of two"
            ));
        }
    }
    let regions: Vec<&[u8]> = match m.request() {
        // Count and padding, then the regions; a count that disagrees with the payload or
        // the descriptors is the handler's to refuse.
        SET_MEM_TABLE => payload.get(8..)?.chunks_exact(REGION_LEN).collect(),
        // Padding, then one region.
        ADD_MEM_REG => vec![payload.get(8..8 + REGION_LEN)?],
        _ => return None,
    };
    let name = if m.request() == SET_MEM_TABLE {
        "SET_MEM_TABLE"
    } else {
        "ADD_MEM_REG"
    };
    for (i, (r, fd)) in regions.iter().zip(&m.fds).enumerate() {
        let field = |k: usize| u64::from_le_bytes(r[8 * k..8 * k + 8].try_into().expect("8"));
        let (gpa, size, offset) = (field(0), field(1), field(3));
        if let Err(why) = region_fits_its_file(fd, size, offset) {
            return Some(format!(
                "{name} refused: region {i} (guest address {gpa:#x}, {size} bytes at file \
                 offset {offset}): {why}"
            ));
        }
    }
    None
}

/// Makes the eventfds the backend writes (call, err) non-blocking. A frontend that hands a
/// blocking one and lets its counter fill would block the queue's worker in its write for
/// good (vhost-user-backend's `signal_used_queue`), and with it the join of the workers at
/// disconnect: the disk would never take another connection. Non-blocking, the write fails
/// and the worker logs it. (The flag belongs to the file description, which the frontend
/// shares: QEMU and cloud-hypervisor make these eventfds non-blocking themselves; a frontend
/// that clears the flag again is not stopped by this, see docs/SECURITY.md.)
fn make_nonblocking(m: &Message) -> io::Result<()> {
    if !matches!(m.request(), SET_VRING_CALL | SET_VRING_ERR) {
        return Ok(());
    }
    for fd in &m.fds {
        // SAFETY: fcntl on a descriptor we own, reading and setting file status flags only.
        let ok = unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !ok {
            return Err(io::Error::other(format!(
                "SET_VRING_CALL/ERR refused: cannot make the eventfd non-blocking: {}",
                io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Whether `size` bytes at `offset` of the file `fd` lie within it.
fn region_fits_its_file(fd: &OwnedFd, size: u64, offset: u64) -> Result<(), String> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a stat for the open descriptor `fd` into `st` and nothing else.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(format!("fstat: {}", io::Error::last_os_error()));
    }
    // SAFETY: fstat succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(format!(
            "guest memory must be a regular file (memfd, tmpfs, hugetlbfs), not file type {:#o}",
            st.st_mode & libc::S_IFMT
        ));
    }
    let len = st.st_size as u64;
    match offset.checked_add(size) {
        Some(end) if end <= len => Ok(()),
        _ => Err(format!("past the end of its file ({len} bytes)")),
    }
}

/// Sends one message with its descriptors attached to its first bytes, where the
/// receiver's header read finds them.
fn send_message(sock: &UnixStream, msg: &Message) -> io::Result<()> {
    let raw: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = loop {
        match sock.send_with_fds(&[&msg.bytes[..]], &raw) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    };
    // A short send leaves the rest to go as plain bytes.
    while sent < msg.bytes.len() {
        sent += (&*sock).write(&msg.bytes[sent..])?;
    }
    Ok(())
}

/// Carries messages from `from` to `to` until either side ends, then ends both (so the
/// other direction, the frontend and the vhost crate's handler all see the connection
/// close). `watch` sees each message before it goes on: it may change it, keep it (and
/// answer on `back`), or end the connection with an error.
fn pump(
    from: &UnixStream,
    back: Sink<'_>,
    to: Sink<'_>,
    watch: &dyn Fn(&mut Message) -> io::Result<Verdict>,
) -> io::Result<()> {
    let r = (|| loop {
        match recv_message(from)? {
            None => return Ok(()),
            Some(mut m) => match watch(&mut m)? {
                Verdict::Forward => to.send(&m)?,
                Verdict::Reply(r) => back.send(&r)?,
                Verdict::Taken => {}
            },
        }
    })();
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.sock.shutdown(Shutdown::Both);
    r
}

/// Relays one connection between `frontend` (the guest's VMM) and `handler` (our end of the
/// private socket the vhost crate's handler serves), recording the backend channel in
/// `channel` and inflight tracking in `inflight` (for a disk of `max_queues` queues).
/// Returns the two pump threads; both end when either side closes.
pub fn start(
    name: &str,
    frontend: UnixStream,
    handler: UnixStream,
    channel: std::sync::Arc<BackendChannel>,
    inflight: Arc<Inflight>,
    max_queues: usize,
) -> io::Result<[JoinHandle<()>; 2]> {
    let (f2, h2) = (frontend.try_clone()?, handler.try_clone()?);
    // Both threads write to the frontend: the handler's replies and the relay's own.
    let frontend_lock = Arc::new(Mutex::new(()));
    let handler_lock = Arc::new(Mutex::new(()));
    let down = {
        let channel = channel.clone();
        let name = name.to_string();
        let (frontend_lock, handler_lock) = (frontend_lock.clone(), handler_lock.clone());
        let tracking = InflightRelay {
            state: inflight,
            max_queues,
        };
        std::thread::Builder::new()
            .name(format!("relay-{name}"))
            .spawn(move || {
                let watch = |m: &mut Message| {
                    // Refused: the connection ends, as the vhost crate ends it on any
                    // message it refuses (the frontend sees it close).
                    if let Some(why) = refusal(m) {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, why));
                    }
                    if let Some(v) = tracking.watch(&name, m)? {
                        return Ok(v);
                    }
                    make_nonblocking(m)?;
                    if m.request() == SET_BACKEND_REQ_FD && m.fds.len() == 1 {
                        // Our own duplicate: the handler gets the original and keeps it.
                        match m.fds[0].try_clone() {
                            Ok(fd) => channel.set(Some(UnixStream::from(fd))),
                            Err(e) => {
                                tracing::warn!("{name}: cannot keep the backend channel: {e}")
                            }
                        }
                    }
                    Ok(Verdict::Forward)
                };
                let back = Sink {
                    sock: &frontend,
                    lock: &frontend_lock,
                };
                let to = Sink {
                    sock: &handler,
                    lock: &handler_lock,
                };
                if let Err(e) = pump(&frontend, back, to, &watch) {
                    tracing::warn!("{name}: vhost-user connection: {e}");
                }
                channel.set(None);
            })?
    };
    let up = std::thread::Builder::new()
        .name(format!("relay-{name}-reply"))
        .spawn(move || {
            let back = Sink {
                sock: &h2,
                lock: &handler_lock,
            };
            let to = Sink {
                sock: &f2,
                lock: &frontend_lock,
            };
            // Replies: errors here are the same connection ending, reported once above.
            let _ = pump(&h2, back, to, &|m| {
                InflightRelay::offer(m);
                Ok(Verdict::Forward)
            });
        })?;
    Ok([down, up])
}

/// A listening socket only this process reaches (in a fresh directory of mode 0700), where
/// the vhost crate's handler accepts the relay's end of each connection. (An abstract
/// socket would be simpler but any local process could connect to it.)
pub struct HandlerSocket {
    dir: PathBuf,
    path: PathBuf,
    listener: Listener,
}

impl HandlerSocket {
    pub fn new() -> io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        static SWEPT: std::sync::Once = std::sync::Once::new();
        let base = std::env::temp_dir();
        SWEPT.call_once(|| remove_stale_dirs(&base));
        let dir = loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!("vhost-thin-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => break dir,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let path = dir.join("h.sock");
        let listener = match UnixListener::bind(&path) {
            Ok(l) => Listener::from(l),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
        };
        Ok(HandlerSocket {
            dir,
            path,
            listener,
        })
    }

    /// The relay's end of a new connection; the handler accepts the other end.
    pub fn connect(&self) -> io::Result<UnixStream> {
        UnixStream::connect(&self.path)
    }

    pub fn listener(&mut self) -> &mut Listener {
        &mut self.listener
    }
}

/// Removes the directories of handler sockets whose process is gone. A daemon that exits
/// (SIGTERM exits without unwinding the threads that own them) or is killed leaves its
/// `vhost-thin-PID-N` behind, one per disk it served; without this they pile up in the
/// temporary directory across restarts.
fn remove_stale_dirs(base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("vhost-thin-"))
            .and_then(|rest| rest.split_once('-'))
            .filter(|(_, n)| n.parse::<u64>().is_ok())
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Only what a handler socket leaves: its socket, then the empty directory (a
        // directory holding anything else is not ours and stays).
        let dir = e.path();
        let _ = std::fs::remove_file(dir.join("h.sock"));
        let _ = std::fs::remove_dir(&dir);
    }
}

impl Drop for HandlerSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::Arc;

    fn msg(request: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&request.to_le_bytes());
        v.extend_from_slice(&VERSION_1.to_le_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn handler_socket_directories_of_gone_processes_are_removed() {
        let base = tempfile::tempdir().unwrap();
        // No process has pid 4194304 (above the kernel's pid_max limit).
        let stale = base.path().join("vhost-thin-4194304-0");
        std::fs::create_dir(&stale).unwrap();
        drop(UnixListener::bind(stale.join("h.sock")).unwrap());
        let live = base
            .path()
            .join(format!("vhost-thin-{}-7", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        let other = base.path().join("vhost-thin-4194304-1");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("keep"), b"x").unwrap();
        remove_stale_dirs(base.path());
        assert!(!stale.exists());
        assert!(live.exists());
        assert!(other.join("keep").exists());
    }

    #[test]
    fn messages_and_descriptors_pass_both_ways_and_the_backend_channel_is_kept() {
        let (front_peer, front) = UnixStream::pair().unwrap();
        let (handler, handler_peer) = UnixStream::pair().unwrap();
        let channel = Arc::new(BackendChannel::default());
        let threads = start("t", front, handler, channel.clone(), Arc::default(), 1).unwrap();

        // A message with a payload, split over two writes, arrives whole.
        let m = msg(1, &[7u8; 8]);
        (&front_peer).write_all(&m[..5]).unwrap();
        (&front_peer).write_all(&m[5..]).unwrap();
        let got = recv_message(&handler_peer).unwrap().unwrap();
        assert_eq!(got.bytes, m);

        // SET_BACKEND_REQ_FD: the handler gets the descriptor, and so do we.
        let (chan_ours, chan_frontend) = UnixStream::pair().unwrap();
        front_peer
            .send_with_fds(
                &[&msg(SET_BACKEND_REQ_FD, &[])[..]],
                &[chan_ours.as_raw_fd()],
            )
            .unwrap();
        drop(chan_ours);
        let got = recv_message(&handler_peer).unwrap().unwrap();
        assert_eq!(got.request(), SET_BACKEND_REQ_FD);
        assert_eq!(got.fds.len(), 1);
        assert!(channel.is_open());
        assert!(channel.notify_config_change().unwrap());
        let mut hdr = [0u8; HEADER_LEN];
        (&chan_frontend).read_exact(&mut hdr).unwrap();
        assert_eq!(hdr.to_vec(), msg(BACKEND_CONFIG_CHANGE_MSG, &[]));

        // Replies come back.
        let r = msg(1, &5u64.to_le_bytes());
        (&handler_peer).write_all(&r).unwrap();
        let got = recv_message(&front_peer).unwrap().unwrap();
        assert_eq!(got.bytes, r);

        // The frontend leaves: the handler sees the end, the channel is dropped.
        drop(front_peer);
        assert!(recv_message(&handler_peer).unwrap().is_none());
        for t in threads {
            t.join().unwrap();
        }
        assert!(!channel.is_open());
        assert!(!channel.notify_config_change().unwrap());
    }

    fn inflight_payload(size: u64, offset: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(&num_queues.to_le_bytes());
        p.extend_from_slice(&queue_size.to_le_bytes());
        p.extend_from_slice(&[0u8; 4]); // QEMU's padding to 24 bytes
        p
    }

    fn with_flags(mut m: Vec<u8>, flags: u32) -> Vec<u8> {
        m[4..8].copy_from_slice(&flags.to_le_bytes());
        m
    }

    #[test]
    fn inflight_tracking_is_offered_and_its_regions_made_and_taken_here() {
        let (front_peer, front) = UnixStream::pair().unwrap();
        let (handler, handler_peer) = UnixStream::pair().unwrap();
        let state = Arc::new(Inflight::default());
        let threads = start("t", front, handler, Arc::default(), state.clone(), 2).unwrap();

        // The handler's protocol features gain INFLIGHT_SHMFD on the way back.
        (&handler_peer)
            .write_all(&with_flags(
                msg(GET_PROTOCOL_FEATURES, &0x8u64.to_le_bytes()),
                VERSION_1 | FLAG_REPLY,
            ))
            .unwrap();
        let got = recv_message(&front_peer).unwrap().unwrap();
        assert_eq!(got.payload(), &(0x8u64 | 1 << 12).to_le_bytes());

        // The frontend acknowledges it: forwarded (the handler stores it), and noted.
        let ack = msg(SET_PROTOCOL_FEATURES, &(1u64 << 12).to_le_bytes());
        (&front_peer).write_all(&ack).unwrap();
        assert_eq!(recv_message(&handler_peer).unwrap().unwrap().bytes, ack);

        // GET_INFLIGHT_FD: answered here, with a region of the size it says.
        (&front_peer)
            .write_all(&msg(GET_INFLIGHT_FD, &inflight_payload(0, 0, 2, 128)))
            .unwrap();
        let got = recv_message(&front_peer).unwrap().unwrap();
        assert_eq!(got.request(), GET_INFLIGHT_FD);
        assert_ne!(got.flags() & FLAG_REPLY, 0);
        assert_eq!(got.payload().len(), 24);
        let (size, offset, nq, qs) = inflight_fields(&got).unwrap();
        assert_eq!(
            (size, offset, nq, qs),
            (inflight::region_len(2, 128), 0, 2, 128)
        );
        assert_eq!(got.fds.len(), 1);
        let file = std::fs::File::from(got.fds.into_iter().next().unwrap());
        assert_eq!(file.metadata().unwrap().len(), size);

        // SET_INFLIGHT_FD with need_reply: taken here, acknowledged with 0.
        assert!(state.region().is_none());
        front_peer
            .send_with_fds(
                &[&with_flags(
                    msg(SET_INFLIGHT_FD, &inflight_payload(size, 0, 2, 128)),
                    VERSION_1 | FLAG_NEED_REPLY,
                )[..]],
                &[file.as_raw_fd()],
            )
            .unwrap();
        let got = recv_message(&front_peer).unwrap().unwrap();
        assert_eq!(got.request(), SET_INFLIGHT_FD);
        assert_eq!(got.payload(), &0u64.to_le_bytes());
        let (_, region) = state.region().expect("the region was not taken");
        assert_eq!((region.num_queues(), region.queue_size()), (2, 128));

        // A region too small for what the frontend says: refused (nonzero ack), and the
        // connection goes on.
        front_peer
            .send_with_fds(
                &[&with_flags(
                    msg(SET_INFLIGHT_FD, &inflight_payload(size, 0, 2, 256)),
                    VERSION_1 | FLAG_NEED_REPLY,
                )[..]],
                &[file.as_raw_fd()],
            )
            .unwrap();
        let got = recv_message(&front_peer).unwrap().unwrap();
        assert_eq!(got.payload(), &1u64.to_le_bytes());

        // Neither inflight message reached the handler: the next one it gets is this.
        let next = msg(1, &[]);
        (&front_peer).write_all(&next).unwrap();
        assert_eq!(recv_message(&handler_peer).unwrap().unwrap().bytes, next);

        drop(front_peer);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_bad_inflight_region_without_need_reply_ends_the_connection() {
        let (front_peer, front) = UnixStream::pair().unwrap();
        let (handler, handler_peer) = UnixStream::pair().unwrap();
        let state = Arc::new(Inflight::default());
        state.set_acked(true);
        let threads = start("t", front, handler, Arc::default(), state.clone(), 1).unwrap();
        // GET_INFLIGHT_FD for more queues than the disk has: no region (size 0).
        (&front_peer)
            .write_all(&msg(GET_INFLIGHT_FD, &inflight_payload(0, 0, 4, 128)))
            .unwrap();
        let got = recv_message(&front_peer).unwrap().unwrap();
        assert_eq!(inflight_fields(&got).unwrap().0, 0);
        assert!(got.fds.is_empty());
        // A short payload ends the connection.
        (&front_peer)
            .write_all(&msg(SET_INFLIGHT_FD, &[0u8; 8]))
            .unwrap();
        assert!(recv_message(&handler_peer).unwrap().is_none());
        for t in threads {
            t.join().unwrap();
        }

        // A region smaller than its file says, no need_reply: the connection ends.
        let (front_peer, front) = UnixStream::pair().unwrap();
        let (handler, handler_peer) = UnixStream::pair().unwrap();
        let threads = start("t", front, handler, Arc::default(), state.clone(), 1).unwrap();
        let (file, len) = inflight::create(1, 64, 1).unwrap();
        front_peer
            .send_with_fds(
                &[&msg(SET_INFLIGHT_FD, &inflight_payload(len, 0, 1, 128))[..]],
                &[file.as_raw_fd()],
            )
            .unwrap();
        assert!(recv_message(&handler_peer).unwrap().is_none());
        let mut buf = [0u8; 1];
        assert_eq!((&front_peer).read(&mut buf).unwrap(), 0);
        for t in threads {
            t.join().unwrap();
        }
        assert!(state.region().is_none());
    }

    #[test]
    fn an_oversized_message_ends_the_connection() {
        let (front_peer, front) = UnixStream::pair().unwrap();
        let (handler, handler_peer) = UnixStream::pair().unwrap();
        let threads = start("t", front, handler, Arc::default(), Arc::default(), 1).unwrap();
        let mut m = msg(1, &[]);
        m[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        (&front_peer).write_all(&m).unwrap();
        assert!(recv_message(&handler_peer).unwrap().is_none());
        let mut buf = [0u8; 1];
        assert_eq!((&front_peer).read(&mut buf).unwrap(), 0);
        for t in threads {
            t.join().unwrap();
        }
    }
}
