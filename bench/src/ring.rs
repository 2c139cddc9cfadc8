//! A minimal split-virtqueue driver for virtio-blk READ/WRITE, one per queue thread.
//!
//! Layout in guest memory, per queue: the descriptor table, the available ring, the used
//! ring (page aligned), then one 32-byte header/status area per request slot and one data
//! buffer per slot. Request slot `i` always uses descriptors `3i` (header, device-readable),
//! `3i+1` (data) and `3i+2` (status byte, device-writable), chained, so the head of slot `i`
//! is `3i`; only the data descriptor's WRITE flag changes between reads and writes.
//!
//! No EVENT_IDX: the driver never suppresses interrupts, and it kicks after each batch of
//! submissions unless the device set `VRING_USED_F_NO_NOTIFY`.

use crate::frontend::GuestMem;
use crate::hist::Histogram;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use vmm_sys_util::eventfd::EventFd;

pub const RING_ALIGN: u64 = 4096;
/// Per-slot header (16 bytes) + status byte, rounded up.
const HDR_STRIDE: u64 = 32;
/// Marks the start of every 512-byte sector written with `--verify`.
const MAGIC: u64 = 0x7668_6f73_7462_656e; // "vhostben"
/// What a read buffer's sector headers hold before the device fills them.
const POISON: u64 = 0xdead_beef_dead_beef;
const STATUS_POISON: u8 = 0xff;

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Guest addresses of one queue's rings and buffers.
#[derive(Clone, Debug)]
pub struct RingLayout {
    pub size: u16,
    pub slots: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub hdrs: u64,
    pub bufs: u64,
    pub buf_stride: u64,
    /// First address past this queue's area.
    pub end: u64,
}

impl RingLayout {
    pub fn new(base: u64, size: u16, slots: u16, bs: u64) -> RingLayout {
        assert!(size.is_power_of_two() && 3 * slots as u32 <= size as u32);
        let q = size as u64;
        let desc = base;
        let avail = desc + 16 * q;
        let used = align_up(avail + 6 + 2 * q, RING_ALIGN);
        let hdrs = align_up(used + 6 + 8 * q, 64);
        let bufs = align_up(hdrs + HDR_STRIDE * slots as u64, RING_ALIGN);
        let buf_stride = align_up(bs, RING_ALIGN);
        RingLayout {
            size,
            slots,
            desc,
            avail,
            used,
            hdrs,
            bufs,
            buf_stride,
            end: bufs + buf_stride * slots as u64,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    RandRead,
    RandWrite,
    Read,
    Write,
    RandReadWrite,
}

impl Rw {
    pub fn name(self) -> &'static str {
        match self {
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::RandReadWrite => "randrw",
        }
    }
    pub fn sequential(self) -> bool {
        matches!(self, Rw::Read | Rw::Write)
    }
    pub fn writes(self) -> bool {
        matches!(self, Rw::RandWrite | Rw::Write | Rw::RandReadWrite)
    }
}

/// splitmix64: small, fast, deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0), by multiply-high.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// A pseudo-random permutation of 0..n: a full-period LCG modulo the next power of two,
/// skipping values >= n (cycle walking), so every value comes exactly once per pass.
struct Perm {
    n: u64,
    mask: u64,
    a: u64,
    c: u64,
    x: u64,
    left: u64,
}

impl Perm {
    fn new(n: u64, rng: &mut Rng) -> Perm {
        let m = n.next_power_of_two().max(4);
        // a = 1 mod 4 and c odd give period m (Hull-Dobell).
        let a = (rng.next_u64() & (m - 1) & !3) | 1;
        let a = if a == 1 { 5 } else { a };
        Perm {
            n,
            mask: m - 1,
            a,
            c: rng.next_u64() | 1,
            x: rng.next_u64() & (m - 1),
            left: n,
        }
    }

    fn next(&mut self) -> Option<u64> {
        if self.left == 0 {
            return None;
        }
        loop {
            self.x = (self.a.wrapping_mul(self.x).wrapping_add(self.c)) & self.mask;
            // Scramble the weak low bits with an invertible xor-shift on the same bits.
            let v = self.x ^ (self.x >> (self.mask.count_ones() / 2 + 1));
            if v < self.n {
                self.left -= 1;
                return Some(v);
            }
        }
    }
}

/// Which offsets one queue touches and whether each request reads or writes.
pub struct Workload {
    pub rw: Rw,
    pub bs: u64,
    /// Byte range of the disk this queue uses: the whole span for random patterns, this
    /// queue's share of it for sequential and single-pass ones.
    pub start: u64,
    pub len: u64,
    /// Random offsets are multiples of this (>= 512); sequential ones step by bs.
    pub align: u64,
    pub rwmixread: u32,
    /// Stop after one pass over the range: sequential patterns in order, random patterns
    /// in a random permutation of the aligned offsets (each exactly once).
    pub single_pass: bool,
    pub rng: Rng,
    cursor: u64,
    perm: Option<Perm>,
    pub exhausted: bool,
}

impl Workload {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rw: Rw,
        bs: u64,
        align: u64,
        start: u64,
        len: u64,
        rwmixread: u32,
        single_pass: bool,
        seed: u64,
    ) -> Workload {
        let mut rng = Rng::new(seed);
        let slots = Self::random_slots(bs, align, len);
        let perm =
            (single_pass && !rw.sequential() && slots > 0).then(|| Perm::new(slots, &mut rng));
        Workload {
            rw,
            bs,
            start,
            len,
            align,
            rwmixread,
            single_pass,
            rng,
            cursor: 0,
            perm,
            exhausted: len < bs,
        }
    }

    /// How many random offsets fit: k * align with k * align + bs <= len.
    fn random_slots(bs: u64, align: u64, len: u64) -> u64 {
        if len < bs {
            0
        } else {
            (len - bs) / align + 1
        }
    }

    /// The next request: (is_write, byte offset), or None when a single pass is over.
    pub fn next(&mut self) -> Option<(bool, u64)> {
        if self.exhausted {
            return None;
        }
        let write = match self.rw {
            Rw::RandRead | Rw::Read => false,
            Rw::RandWrite | Rw::Write => true,
            Rw::RandReadWrite => self.rng.below(100) >= self.rwmixread as u64,
        };
        let offset = if self.rw.sequential() {
            let b = self.cursor;
            self.cursor += 1;
            if self.cursor == self.len / self.bs {
                self.cursor = 0;
                if self.single_pass {
                    self.exhausted = true;
                }
            }
            b * self.bs
        } else if let Some(p) = &mut self.perm {
            let k = p.next()?;
            if p.left == 0 {
                self.exhausted = true;
            }
            k * self.align
        } else {
            self.rng
                .below(Self::random_slots(self.bs, self.align, self.len))
                * self.align
        };
        Some((write, self.start + offset))
    }
}

/// A request that came back with a bad status or failed verification.
#[derive(Debug, Clone)]
pub struct IoError {
    pub queue: usize,
    pub write: bool,
    pub offset: u64,
    pub what: String,
}

#[derive(Default)]
pub struct QueueStats {
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    pub errors: u64,
    pub first_errors: Vec<IoError>,
    pub hist: Histogram,
    pub elapsed: Duration,
}

/// Why a queue gave up.
#[derive(Debug)]
pub struct Stall {
    pub queue: usize,
    pub in_flight: usize,
    pub avail_idx: u16,
    pub used_idx: u16,
    pub waited: Duration,
}

/// Writes a queue's initial ring state, its fixed descriptor chains and random data into
/// its buffers. Call before the vring is handed to the device.
pub fn init(mem: &GuestMem, l: &RingLayout, fill_seed: u64) {
    let ring_bytes = (l.hdrs - l.desc) as usize;
    // SAFETY: the ring area is inside guest memory (checked by `ptr`), not yet shared.
    unsafe { std::ptr::write_bytes(mem.ptr(l.desc, ring_bytes), 0, ring_bytes) };
    let desc = |i: u64, addr: u64, len: u32, flags: u32, next: u64| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
        d[14..16].copy_from_slice(&(next as u16).to_le_bytes());
        // SAFETY: inside the descriptor table.
        unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), mem.ptr(l.desc + 16 * i, 16), 16) };
    };
    let mut rng = Rng::new(fill_seed);
    for s in 0..l.slots as u64 {
        let hdr = l.hdrs + s * HDR_STRIDE;
        let buf = l.bufs + s * l.buf_stride;
        desc(3 * s, hdr, 16, VRING_DESC_F_NEXT, 3 * s + 1);
        desc(
            3 * s + 1,
            buf,
            l.buf_stride as u32,
            VRING_DESC_F_NEXT,
            3 * s + 2,
        );
        desc(3 * s + 2, hdr + 16, 1, VRING_DESC_F_WRITE, 0);
        // Incompressible, non-zero data for writes.
        let p = mem.ptr(buf, l.buf_stride as usize);
        for w in 0..(l.buf_stride / 8) as usize {
            // SAFETY: inside this slot's buffer.
            unsafe { p.add(8 * w).cast::<u64>().write_unaligned(rng.next_u64()) };
        }
    }
}

pub struct QueueDriver<'a> {
    pub index: usize,
    mem: &'a GuestMem,
    l: RingLayout,
    kick: &'a EventFd,
    call: &'a EventFd,
    avail_idx: u16,
    last_used: u16,
    verify: bool,
    poll: bool,
    /// Per slot: submitted at, is_write, offset.
    inflight: Vec<Option<(Instant, bool, u64)>>,
    /// Requests slower than this are printed to standard error (`--log-slow-ms`).
    pub log_slow: Option<Duration>,
}

impl<'a> QueueDriver<'a> {
    /// Takes over a queue whose memory [`init`] prepared.
    pub fn attach(
        index: usize,
        mem: &'a GuestMem,
        l: RingLayout,
        kick: &'a EventFd,
        call: &'a EventFd,
        verify: bool,
        poll: bool,
    ) -> QueueDriver<'a> {
        QueueDriver {
            index,
            mem,
            inflight: vec![None; l.slots as usize],
            l,
            kick,
            call,
            avail_idx: 0,
            last_used: 0,
            verify,
            poll,
            log_slow: None,
        }
    }

    fn atomic16(&self, gpa: u64) -> &AtomicU16 {
        // SAFETY: aligned (ring fields are 2-aligned), inside guest memory, and only ever
        // accessed atomically by this process while the mapping lives.
        unsafe { &*(self.mem.ptr(gpa, 2) as *const AtomicU16) }
    }
    fn atomic32(&self, gpa: u64) -> &AtomicU32 {
        // SAFETY: as above, 4-aligned.
        unsafe { &*(self.mem.ptr(gpa, 4) as *const AtomicU32) }
    }
    fn set_data_desc(&self, slot: u64, len: u32, device_writes: bool) {
        let at = self.l.desc + 16 * (3 * slot + 1);
        let flags = VRING_DESC_F_NEXT as u16
            | if device_writes {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
        self.atomic32(at + 8).store(len.to_le(), Ordering::Relaxed);
        self.atomic16(at + 12)
            .store(flags.to_le(), Ordering::Relaxed);
    }

    fn buf(&self, slot: u64, len: u64) -> *mut u8 {
        self.mem
            .ptr(self.l.bufs + slot * self.l.buf_stride, len as usize)
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.atomic16(self.l.used + 2).load(Ordering::Acquire))
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.iter().filter(|s| s.is_some()).count()
    }

    /// Fills slot `slot` with a request and puts it in the available ring (not yet
    /// published: see [`Self::publish`]).
    fn prepare(&mut self, slot: u16, write: bool, offset: u64, bs: u64, now: Instant) {
        let s = slot as u64;
        let hdr = self.mem.ptr(self.l.hdrs + s * HDR_STRIDE, 17);
        let kind = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
        // SAFETY: the header area of a slot the device does not own.
        unsafe {
            std::ptr::copy_nonoverlapping(h.as_ptr(), hdr, 16);
            hdr.add(16).write(STATUS_POISON);
        }
        if self.verify {
            let p = self.buf(s, bs);
            for sec in 0..bs / 512 {
                let (a, b) = if write {
                    (offset / 512 + sec, MAGIC)
                } else {
                    (POISON, POISON)
                };
                // SAFETY: inside this slot's buffer, which the device does not own now.
                unsafe {
                    let at = p.add((sec * 512) as usize);
                    std::ptr::copy_nonoverlapping(a.to_le_bytes().as_ptr(), at, 8);
                    std::ptr::copy_nonoverlapping(b.to_le_bytes().as_ptr(), at.add(8), 8);
                }
            }
        }
        self.set_data_desc(s, bs as u32, !write);
        let ring_at = self.l.avail + 4 + 2 * (self.avail_idx % self.l.size) as u64;
        self.atomic16(ring_at)
            .store((3 * slot).to_le(), Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.inflight[slot as usize] = Some((now, write, offset));
    }

    /// Publishes the prepared requests and kicks the device unless it asked not to be.
    fn publish(&self) {
        self.atomic16(self.l.avail + 2)
            .store(self.avail_idx.to_le(), Ordering::Release);
        fence(Ordering::SeqCst);
        let flags = u16::from_le(self.atomic16(self.l.used).load(Ordering::Relaxed));
        if flags & VRING_USED_F_NO_NOTIFY as u16 == 0 {
            let _ = self.kick.write(1);
        }
    }

    /// Collects used requests into `free`; returns how many.
    fn harvest(
        &mut self,
        bs: u64,
        free: &mut Vec<u16>,
        st: &mut QueueStats,
        now: Instant,
    ) -> usize {
        let used_idx = self.used_idx();
        let mut n = 0;
        while self.last_used != used_idx {
            let at = self.l.used + 4 + 8 * (self.last_used % self.l.size) as u64;
            let id = u32::from_le(self.atomic32(at).load(Ordering::Relaxed));
            self.last_used = self.last_used.wrapping_add(1);
            n += 1;
            let slot = id / 3;
            let entry = if id % 3 == 0 && (slot as usize) < self.inflight.len() {
                self.inflight[slot as usize].take()
            } else {
                None
            };
            let Some((t0, write, offset)) = entry else {
                st.errors += 1;
                if st.first_errors.len() < 5 {
                    st.first_errors.push(IoError {
                        queue: self.index,
                        write: false,
                        offset: 0,
                        what: format!("used ring returned head {id}, which is not in flight"),
                    });
                }
                continue;
            };
            let took = now.saturating_duration_since(t0);
            st.hist.record(took.as_nanos() as u64);
            if self.log_slow.is_some_and(|slow| took > slow) {
                let at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                eprintln!(
                    "slow: {:.3} queue {} {} at {offset} took {:.1} ms",
                    at.as_secs_f64(),
                    self.index,
                    if write { "write" } else { "read" },
                    took.as_secs_f64() * 1e3
                );
            }
            if write {
                st.writes += 1;
            } else {
                st.reads += 1;
            }
            st.bytes += bs;
            let status = self.status(slot as u64);
            let problem = if status != VIRTIO_BLK_S_OK as u8 {
                Some(format!("status {status}"))
            } else if self.verify && !write {
                self.check(slot as u64, offset, bs)
            } else {
                None
            };
            if let Some(what) = problem {
                st.errors += 1;
                if st.first_errors.len() < 5 {
                    st.first_errors.push(IoError {
                        queue: self.index,
                        write,
                        offset,
                        what,
                    });
                }
            }
            free.push(slot as u16);
        }
        n
    }

    fn status(&self, slot: u64) -> u8 {
        let p = self.mem.ptr(self.l.hdrs + slot * HDR_STRIDE + 16, 1);
        // SAFETY: inside guest memory; the device finished with it (acquired via used idx).
        unsafe { p.read_volatile() }
    }

    /// Every sector of a read must carry its own number (written with --verify) or be all
    /// zeroes (never written).
    fn check(&self, slot: u64, offset: u64, bs: u64) -> Option<String> {
        let p = self.buf(slot, bs);
        for sec in 0..bs / 512 {
            // SAFETY: inside this slot's buffer, which the device has finished with.
            let data = unsafe { std::slice::from_raw_parts(p.add((sec * 512) as usize), 512) };
            let a = u64::from_le_bytes(data[0..8].try_into().unwrap());
            let b = u64::from_le_bytes(data[8..16].try_into().unwrap());
            let want = offset / 512 + sec;
            if b == MAGIC && a == want {
                continue;
            }
            if data.iter().all(|&x| x == 0) {
                continue;
            }
            let what = if a == POISON && b == POISON {
                "the device did not fill the buffer".to_string()
            } else if b == MAGIC {
                format!("holds the data of sector {a}")
            } else {
                format!("holds unexpected data {a:#018x} {b:#018x}")
            };
            return Some(format!("read verification: sector {want} {what}"));
        }
        None
    }

    /// Waits for the call eventfd (or spins with --poll) at most `max`.
    fn wait(&self, max: Duration) {
        if self.poll {
            std::hint::spin_loop();
            return;
        }
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(self.call),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = max.as_millis().clamp(1, 100) as i32;
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }

    /// Sends one FLUSH (on slot 0, which must be free: call after [`Self::run`]) and waits
    /// for it. Returns its latency, or what went wrong with it.
    pub fn flush(&mut self, stall: Duration) -> Result<Result<Duration, String>, Stall> {
        self.one_request(VIRTIO_BLK_T_FLUSH, None, stall)
    }

    /// Sends one DISCARD of `len` bytes at `offset` (one segment: at most 4 GiB - 512,
    /// and within the device's max_discard_sectors) on slot 0, as [`Self::flush`].
    pub fn discard(
        &mut self,
        offset: u64,
        len: u64,
        stall: Duration,
    ) -> Result<Result<Duration, String>, Stall> {
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&(offset / 512).to_le_bytes());
        seg[8..12].copy_from_slice(&((len / 512) as u32).to_le_bytes());
        self.one_request(VIRTIO_BLK_T_DISCARD, Some(&seg), stall)
    }

    /// One request of type `kind` on slot 0, with `data` for the device to read (or no
    /// data descriptor), waited for.
    fn one_request(
        &mut self,
        kind: u32,
        data: Option<&[u8]>,
        stall: Duration,
    ) -> Result<Result<Duration, String>, Stall> {
        let hdr = self.mem.ptr(self.l.hdrs, 17);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        // SAFETY: slot 0's header area; the device owns no request now.
        unsafe {
            std::ptr::copy_nonoverlapping(h.as_ptr(), hdr, 16);
            hdr.add(16).write(STATUS_POISON);
        }
        let next_at = self.l.desc + 14;
        match data {
            Some(d) => {
                let p = self.buf(0, d.len() as u64);
                // SAFETY: slot 0's buffer, which the device does not own now.
                unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), p, d.len()) };
                self.set_data_desc(0, d.len() as u32, false);
            }
            // Header straight to status: no data descriptor.
            None => self
                .atomic16(next_at)
                .store(2u16.to_le(), Ordering::Relaxed),
        }
        let ring_at = self.l.avail + 4 + 2 * (self.avail_idx % self.l.size) as u64;
        self.atomic16(ring_at).store(0, Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let t0 = Instant::now();
        self.publish();
        loop {
            if !self.poll {
                let _ = self.call.read();
            }
            if self.used_idx() != self.last_used {
                let at = self.l.used + 4 + 8 * (self.last_used % self.l.size) as u64;
                let id = u32::from_le(self.atomic32(at).load(Ordering::Relaxed));
                let took = t0.elapsed();
                self.last_used = self.last_used.wrapping_add(1);
                self.atomic16(next_at)
                    .store(1u16.to_le(), Ordering::Relaxed);
                let status = self.status(0);
                return Ok(if id != 0 {
                    Err(format!("used ring returned head {id}, expected 0"))
                } else if status != VIRTIO_BLK_S_OK as u8 {
                    Err(format!("status {status}"))
                } else {
                    Ok(took)
                });
            }
            let waited = t0.elapsed();
            if waited > stall {
                return Err(Stall {
                    queue: self.index,
                    in_flight: 1,
                    avail_idx: self.avail_idx,
                    used_idx: self.used_idx(),
                    waited,
                });
            }
            self.wait(stall - waited);
        }
    }

    /// Runs the workload until `deadline` (or until a single pass is done), keeping every
    /// slot in flight, then drains. `stall` bounds how long no completion may arrive.
    pub fn run(
        &mut self,
        w: &mut Workload,
        deadline: Instant,
        stall: Duration,
    ) -> Result<QueueStats, Stall> {
        let mut st = QueueStats::default();
        let mut free: Vec<u16> = (0..self.l.slots).rev().collect();
        let start = Instant::now();
        let mut last_progress = start;
        loop {
            let now = Instant::now();
            let stopping = now >= deadline || w.exhausted;
            if !stopping && !free.is_empty() {
                let mut any = false;
                while let Some(&slot) = free.last() {
                    let Some((write, offset)) = w.next() else {
                        break;
                    };
                    free.pop();
                    self.prepare(slot, write, offset, w.bs, now);
                    any = true;
                }
                if any {
                    self.publish();
                }
            }
            if free.len() == self.l.slots as usize && (stopping || w.exhausted) {
                break;
            }
            // Clear the eventfd before looking at the used ring, so that a completion after
            // the look leaves it readable.
            if !self.poll {
                let _ = self.call.read();
            }
            let n = self.harvest(w.bs, &mut free, &mut st, Instant::now());
            if n > 0 {
                last_progress = Instant::now();
                continue;
            }
            let waited = last_progress.elapsed();
            if waited > stall {
                return Err(Stall {
                    queue: self.index,
                    in_flight: self.in_flight(),
                    avail_idx: self.avail_idx,
                    used_idx: self.used_idx(),
                    waited,
                });
            }
            self.wait(stall - waited);
        }
        st.elapsed = start.elapsed();
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_single_pass_covers_range_once() {
        let mut w = Workload::new(Rw::Write, 4096, 4096, 8192, 4096 * 5, 50, true, 1);
        let offs: Vec<u64> = std::iter::from_fn(|| w.next())
            .map(|(wr, o)| {
                assert!(wr);
                o
            })
            .collect();
        assert_eq!(offs, vec![8192, 12288, 16384, 20480, 24576]);
    }

    #[test]
    fn random_offsets_aligned_in_span_and_deterministic() {
        let mut a = Workload::new(Rw::RandReadWrite, 4096, 4096, 0, 1 << 20, 50, false, 7);
        let mut b = Workload::new(Rw::RandReadWrite, 4096, 4096, 0, 1 << 20, 50, false, 7);
        let mut writes = 0;
        for _ in 0..10_000 {
            let x = a.next().unwrap();
            assert_eq!(Some(x), b.next());
            assert_eq!(x.1 % 4096, 0);
            assert!(x.1 < 1 << 20);
            writes += x.0 as u32;
        }
        assert!((4000..6000).contains(&writes), "{writes}");
    }

    #[test]
    fn random_single_pass_is_a_permutation() {
        for n in [1u64, 2, 3, 5, 16, 1000, 16384] {
            let mut w = Workload::new(Rw::RandWrite, 4096, 65536, 65536, n * 65536, 50, true, n);
            let mut seen: Vec<u64> = std::iter::from_fn(|| w.next())
                .map(|(_, o)| {
                    assert_eq!(o % 65536, 0);
                    (o - 65536) / 65536
                })
                .collect();
            assert!(w.exhausted);
            let first: Vec<u64> = seen.iter().take(8).copied().collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n={n}");
            if n >= 1000 {
                assert_ne!(first, (0..8).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn alignment_smaller_than_bs_stays_in_range() {
        let mut w = Workload::new(Rw::RandRead, 8192, 512, 0, 16384, 50, false, 3);
        for _ in 0..1000 {
            let (_, o) = w.next().unwrap();
            assert!(o % 512 == 0 && o + 8192 <= 16384);
        }
    }

    #[test]
    fn layout_fits() {
        let l = RingLayout::new(0, 128, 32, 4096);
        assert!(l.avail >= 16 * 128 && l.used % RING_ALIGN == 0 && l.bufs % RING_ALIGN == 0);
        assert_eq!(l.end, l.bufs + 32 * 4096);
    }
}
