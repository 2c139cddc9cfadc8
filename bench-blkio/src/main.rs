//! `vhost-thin-blkio-bench`: a second vhost-user-blk load generator, built on libblkio
//! (the `blkio` crate: the library behind QEMU's `blkio` block driver and fio's libblkio
//! engine) instead of the project's own frontend (bench/). Its vhost-user handshake, rings,
//! EVENT_IDX handling and memory registration are libblkio's, so a figure both generators
//! agree on is not an artefact of either frontend. Options, output and JSON keys follow
//! bench/ (`vhost-thin-bench`) so ci/bench-daemon.sh can run either.

use anyhow::{anyhow, bail, Context, Result};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::{Parser, ValueEnum};
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Marks the start of every 512-byte sector written with `--verify`: the same stamp as
/// bench/ (sector number, then this), so data one generator wrote verifies with the other.
const MAGIC: u64 = 0x7668_6f73_7462_656e; // "vhostben"
/// What a read buffer's sector headers hold before the device fills them.
const POISON: u64 = 0xdead_beef_dead_beef;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Rw {
    Randread,
    Randwrite,
    Read,
    Write,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
        }
    }
    fn sequential(self) -> bool {
        matches!(self, Rw::Read | Rw::Write)
    }
    fn writes(self) -> bool {
        matches!(self, Rw::Randwrite | Rw::Write)
    }
}

/// Drive a vhost-user-blk backend through libblkio with READ/WRITE requests and report
/// IOPS, bandwidth and latency.
#[derive(Parser, Debug)]
#[command(name = "vhost-thin-blkio-bench", version)]
struct Args {
    /// The backend's vhost-user socket.
    #[arg(long)]
    socket: PathBuf,
    /// Queues to use, one thread each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Requests kept in flight per queue.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    iodepth: u16,
    /// Request size (`4k`, `128KiB`, `1M`, bytes); a multiple of 512.
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Access pattern. Sequential patterns split the span into one stretch per queue.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Rw,
    /// Seconds to run (fractions allowed).
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Bytes of the disk to use from offset 0 (default: the capacity).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Random offsets are multiples of this (default: bs).
    #[arg(long, value_parser = parse_size)]
    align: Option<u64>,
    /// Cover the span once and stop, each queue its own share: sequential patterns in order
    /// (e.g. to fill a disk), random ones in a shuffled order of the aligned offsets.
    #[arg(long)]
    single_pass: bool,
    /// After the run, send one FLUSH and report how long it took (not counted in IOPS).
    #[arg(long)]
    end_fsync: bool,
    /// Seed of the offset generator (each queue uses seed + queue index).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stamp every written 512-byte sector with its number (bench/'s format) and check
    /// every read sector holds its own number or zeroes.
    #[arg(long)]
    verify: bool,
    /// With --verify: a read sector of zeroes is an error too (the disk was filled before).
    #[arg(long, requires = "verify")]
    expect_written: bool,
    /// Use libblkio poll queues (spin in do_io) instead of waiting on the completion fd.
    #[arg(long)]
    poll: bool,
    /// Ring size (a power of two; default: libblkio's 256, or larger for deep queues).
    #[arg(long)]
    queue_size: Option<u16>,
    /// Give up (exit 3) when a queue sees no completion for this many seconds.
    #[arg(long, default_value_t = 30.0)]
    stall_timeout: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: not a size"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use k, M, G, T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// splitmix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0), by multiply-high.
    fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// The offsets one queue touches.
struct Workload {
    rw: Rw,
    bs: u64,
    align: u64,
    /// This queue's byte range: all of the span for random patterns, its own stretch for
    /// sequential and single-pass ones.
    start: u64,
    len: u64,
    single_pass: bool,
    rng: Rng,
    cursor: u64,
    done: bool,
    /// Random single pass: the aligned slots not yet used, in shuffled order (8 bytes a
    /// slot: 8 MiB for 64 GiB at --align 64k).
    order: Option<Vec<u64>>,
}

impl Workload {
    fn new(
        rw: Rw,
        bs: u64,
        align: u64,
        start: u64,
        len: u64,
        single_pass: bool,
        seed: u64,
    ) -> Workload {
        let mut rng = Rng(seed);
        let order = (single_pass && !rw.sequential()).then(|| {
            let slots = if len < bs { 0 } else { (len - bs) / align + 1 };
            let mut v: Vec<u64> = (0..slots).collect();
            // Fisher-Yates; popped from the end.
            for i in (1..v.len()).rev() {
                v.swap(i, rng.below(i as u64 + 1) as usize);
            }
            v
        });
        Workload {
            rw,
            bs,
            align,
            start,
            len,
            single_pass,
            rng,
            cursor: 0,
            done: len < bs,
            order,
        }
    }

    fn next(&mut self) -> Option<u64> {
        if self.done {
            return None;
        }
        let off = if let Some(order) = &mut self.order {
            let Some(k) = order.pop() else {
                self.done = true;
                return None;
            };
            k * self.align
        } else if self.rw.sequential() {
            let b = self.cursor;
            self.cursor += 1;
            if self.cursor == self.len / self.bs {
                self.cursor = 0;
                self.done = self.single_pass;
            }
            b * self.bs
        } else {
            self.rng.below((self.len - self.bs) / self.align + 1) * self.align
        };
        Some(self.start + off)
    }
}

/// What one queue did.
#[derive(Default)]
struct Stats {
    ios: u64,
    bytes: u64,
    errors: u64,
    first_errors: Vec<String>,
    /// Every request's latency in ns (exact percentiles; 8 bytes a request is small next
    /// to a 5 s run at the IOPS a 2-core host reaches).
    lat: Vec<u64>,
    /// Read sectors that carried their own stamp, and read sectors of zeroes (--verify).
    stamped: u64,
    zero: u64,
}

impl Stats {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.first_errors.len() < 10 {
            self.first_errors.push(what);
        }
    }
}

/// A queue saw no completion for --stall-timeout.
struct Stall {
    queue: usize,
    in_flight: usize,
}

/// The I/O buffers of one queue: `depth` slots of `bs` bytes inside the memory region
/// libblkio registered with the backend.
struct Buffers {
    base: *mut u8,
    bs: usize,
}

// SAFETY: each queue thread gets its own, disjoint range of the mapped region, which stays
// mapped until every thread has been joined (the region is freed with the Blkio after that).
unsafe impl Send for Buffers {}

impl Buffers {
    fn slot(&self, s: usize) -> *mut u8 {
        // SAFETY: s < depth, and the region holds depth * bs bytes from base.
        unsafe { self.base.add(s * self.bs) }
    }
    /// Fills a write buffer with bench/'s stamps, or poisons a read buffer so a read the
    /// device did not fill shows up.
    fn prepare(&self, s: usize, offset: u64, write: bool) {
        let p = self.slot(s);
        for sec in 0..self.bs / 512 {
            let (a, b) = if write {
                (offset / 512 + sec as u64, MAGIC)
            } else {
                (POISON, POISON)
            };
            // SAFETY: inside this slot, which the device does not own while no request on
            // it is in flight.
            unsafe {
                let at = p.add(sec * 512);
                std::ptr::copy_nonoverlapping(a.to_le_bytes().as_ptr(), at, 8);
                std::ptr::copy_nonoverlapping(b.to_le_bytes().as_ptr(), at.add(8), 8);
            }
        }
    }
    /// Checks a completed read: every sector holds its own stamp or zeroes.
    fn check(&self, s: usize, offset: u64, st: &mut Stats, expect_written: bool) {
        let p = self.slot(s);
        for sec in 0..self.bs / 512 {
            // SAFETY: inside this slot; the device completed the request that used it.
            let data = unsafe { std::slice::from_raw_parts(p.add(sec * 512), 512) };
            let a = u64::from_le_bytes(data[0..8].try_into().unwrap());
            let b = u64::from_le_bytes(data[8..16].try_into().unwrap());
            let want = offset / 512 + sec as u64;
            if b == MAGIC && a == want {
                st.stamped += 1;
                continue;
            }
            if data.iter().all(|&x| x == 0) {
                st.zero += 1;
                if expect_written {
                    st.error(format!("read verification: sector {want} is zeroes"));
                    return;
                }
                continue;
            }
            let what = if a == POISON && b == POISON {
                "the device did not fill the buffer".to_string()
            } else if b == MAGIC {
                format!("holds the data of sector {a}")
            } else {
                format!("holds unexpected data {a:#018x} {b:#018x}")
            };
            st.error(format!("read verification: sector {want} {what}"));
            return;
        }
    }
}

struct QueueRun<'a> {
    a: &'a Args,
    index: usize,
    q: Blkioq,
    buf: Buffers,
    stall: Duration,
}

impl QueueRun<'_> {
    fn submit(&mut self, s: usize, offset: u64, write: bool) {
        let bs = self.buf.bs;
        if self.a.verify {
            self.buf.prepare(s, offset, write);
        }
        let p = self.buf.slot(s);
        if write {
            self.q.write(offset, p, bs, s, ReqFlags::empty());
        } else {
            self.q.read(offset, p, bs, s, ReqFlags::empty());
        }
    }

    /// Waits for at least one completion; Err on a stall.
    fn reap(
        &mut self,
        comps: &mut [MaybeUninit<Completion>],
        in_flight: usize,
    ) -> Result<Vec<Completion>, Stall> {
        let mut t = self.stall;
        match self.q.do_io(comps, 1, Some(&mut t), None) {
            Ok(n) => Ok(comps[..n]
                .iter()
                // SAFETY: do_io initialised the first n entries.
                .map(|c| unsafe { c.assume_init_read() })
                .collect()),
            Err(e) if e.errno() == libc_errno_time() => Err(Stall {
                queue: self.index,
                in_flight,
            }),
            Err(e) => panic!("queue {}: do_io: {e}", self.index),
        }
    }

    /// Keeps --iodepth requests in flight until the deadline (or the single pass ends),
    /// then drains.
    fn run(&mut self, w: &mut Workload, deadline: Instant) -> Result<Stats, Stall> {
        let depth = self.a.iodepth as usize;
        let write = self.a.rw.writes();
        let mut st = Stats {
            lat: Vec::with_capacity(1 << 16),
            ..Stats::default()
        };
        let mut slots: Vec<Option<(Instant, u64)>> = vec![None; depth];
        let mut in_flight = 0;
        while in_flight < depth {
            let Some(off) = w.next() else { break };
            slots[in_flight] = Some((Instant::now(), off));
            self.submit(in_flight, off, write);
            in_flight += 1;
        }
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..depth).map(|_| MaybeUninit::uninit()).collect();
        while in_flight > 0 {
            let done = self.reap(&mut comps, in_flight)?;
            let now = Instant::now();
            for c in done {
                let s = c.user_data;
                let (t0, off) = slots[s].take().expect("a completion for a free slot");
                in_flight -= 1;
                st.lat.push(now.duration_since(t0).as_nanos() as u64);
                if c.ret != 0 {
                    st.error(format!(
                        "{} at offset {off}: {}",
                        if write { "write" } else { "read" },
                        std::io::Error::from_raw_os_error(-c.ret)
                    ));
                } else {
                    st.ios += 1;
                    st.bytes += self.buf.bs as u64;
                    if self.a.verify && !write {
                        self.buf.check(s, off, &mut st, self.a.expect_written);
                    }
                }
                if now < deadline {
                    if let Some(off) = w.next() {
                        slots[s] = Some((Instant::now(), off));
                        self.submit(s, off, write);
                        in_flight += 1;
                    }
                }
            }
        }
        Ok(st)
    }

    /// One FLUSH after the run; its latency, or what went wrong.
    fn flush(&mut self) -> Result<Result<Duration, String>, Stall> {
        let mut comps = [MaybeUninit::uninit()];
        let t0 = Instant::now();
        self.q.flush(0, ReqFlags::empty());
        let c = self.reap(&mut comps, 1)?;
        let d = t0.elapsed();
        Ok(match c.first() {
            Some(c) if c.ret == 0 => Ok(d),
            Some(c) => Err(std::io::Error::from_raw_os_error(-c.ret).to_string()),
            None => Err("no completion".to_string()),
        })
    }
}

/// libblkio reports a do_io timeout as ETIME.
fn libc_errno_time() -> blkio::Errno {
    blkio::Errno::from_raw_os_error(libc::ETIME)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vhost-thin-blkio-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn bl<T>(what: &str, r: blkio::Result<T>) -> Result<T> {
    r.map_err(|e| anyhow!("{what}: {e} ({})", e.errno()))
}

fn run(a: &Args) -> Result<ExitCode> {
    let nq = a.queues as usize;
    let depth = a.iodepth as usize;
    if a.bs == 0 || a.bs % 512 != 0 || a.bs > 1 << 30 {
        bail!(
            "--bs {} is not a multiple of 512 between 512 and 1 GiB",
            a.bs
        );
    }
    if !(a.runtime > 0.0 && a.runtime.is_finite()) {
        bail!("--runtime must be positive");
    }
    let align = a.align.unwrap_or(a.bs);
    if align == 0 || align % 512 != 0 {
        bail!("--align {align} is not a positive multiple of 512");
    }

    let mut b = bl("blkio_new", Blkio::new("virtio-blk-vhost-user"))?;
    let path = a.socket.to_str().context("the socket path is not UTF-8")?;
    bl("set path", b.set_str("path", path))?;
    bl(&format!("connect to {path}"), b.connect())?;
    let capacity = bl("capacity", b.get_u64("capacity"))?;
    let max_queues = bl("max-queues", b.get_i32("max-queues"))?;
    if nq as i32 > max_queues {
        bail!("--queues {nq}: the device has {max_queues} queue(s)");
    }
    // 0: no limit (QSD offers SIZE_MAX with size_max 0); libblkio sends one data segment
    // per read()/write().
    let max_seg = bl("max-segment-len", b.get_i32("max-segment-len"))?;
    if max_seg > 0 && a.bs > max_seg as u64 {
        bail!(
            "--bs {} is larger than the device's size_max {max_seg}",
            a.bs
        );
    }
    if a.rw.writes() && bl("read-only", b.get_bool("read-only"))? {
        bail!("the device is read-only");
    }
    // libblkio's virtio driver uses 3 descriptors a request (header, data, status).
    let qsize = match a.queue_size {
        Some(q) if !q.is_power_of_two() || (q as usize) < 3 * depth => {
            bail!("--queue-size {q} must be a power of two of at least 3 x iodepth")
        }
        Some(q) => q as i32,
        None => (3 * depth).next_power_of_two().max(256) as i32,
    };
    bl("queue-size", b.set_i32("queue-size", qsize))?;
    if a.poll {
        bl("num-queues", b.set_i32("num-queues", 0))?;
        bl("num-poll-queues", b.set_i32("num-poll-queues", nq as i32))?;
    } else {
        bl("num-queues", b.set_i32("num-queues", nq as i32))?;
    }
    let span = match a.size {
        Some(s) if s > capacity => bail!("--size {s} is larger than the capacity {capacity}"),
        Some(s) => s,
        None => capacity,
    };
    let span = span / a.bs * a.bs;
    // Sequential and single-pass patterns: one stretch per queue.
    let split = a.rw.sequential() || a.single_pass;
    let stretch = if split {
        let unit = if a.rw.sequential() { a.bs } else { align };
        span / nq as u64 / unit * unit
    } else {
        span
    };
    if stretch < a.bs || span < align {
        bail!("the span ({span} bytes) is smaller than bs x queues");
    }

    let started = bl("start", b.start())?;
    let queues = if a.poll {
        started.poll_queues
    } else {
        started.queues
    };
    if queues.len() != nq {
        bail!("libblkio started {} queues, not {nq}", queues.len());
    }
    // One shared-memory region for every buffer: the backend maps it (SET_MEM_TABLE).
    let mem_align = bl("mem-region-alignment", b.get_u64("mem-region-alignment"))?.max(4096);
    let len = (nq * depth * a.bs as usize).div_ceil(mem_align as usize) * mem_align as usize;
    let region = bl("alloc_mem_region", b.alloc_mem_region(len))?;
    bl("map_mem_region", b.map_mem_region(&region))?;

    let runtime = Duration::from_secs_f64(a.runtime);
    let stall = Duration::from_secs_f64(a.stall_timeout);
    let barrier = Barrier::new(nq);
    let start = Instant::now();
    let deadline = start + runtime;
    type Outcome = (
        Result<Stats, Stall>,
        Option<(Duration, Result<Result<Duration, String>, Stall>)>,
    );
    let results: Vec<std::thread::Result<Outcome>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let buf = Buffers {
                    // In bounds: i * depth * bs < len.
                    base: (region.addr + i * depth * a.bs as usize) as *mut u8,
                    bs: a.bs as usize,
                };
                let barrier = &barrier;
                std::thread::Builder::new()
                    .name(format!("queue-{i}"))
                    .spawn_scoped(s, move || {
                        let mut qr = QueueRun {
                            a,
                            index: i,
                            q,
                            buf,
                            stall,
                        };
                        let mut w = Workload::new(
                            a.rw,
                            a.bs,
                            align,
                            if split { i as u64 * stretch } else { 0 },
                            stretch,
                            a.single_pass,
                            a.seed.wrapping_add(i as u64),
                        );
                        let r = qr.run(&mut w, deadline);
                        // Every queue has drained: the FLUSH covers all their writes.
                        barrier.wait();
                        let flush = (i == 0 && a.end_fsync && r.is_ok())
                            .then(|| (start.elapsed(), qr.flush()));
                        (r, flush)
                    })
                    .expect("spawn a queue thread")
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut seconds = start.elapsed().as_secs_f64();

    let mut total = Stats::default();
    let mut flush_time = None;
    let mut stalls = Vec::new();
    for r in results {
        let (r, flush) = r.map_err(|_| anyhow!("a queue thread panicked"))?;
        if let Some((ran_for, f)) = flush {
            seconds = ran_for.as_secs_f64();
            match f {
                Ok(Ok(d)) => flush_time = Some(d),
                Ok(Err(e)) => total.error(format!("FLUSH: {e}")),
                Err(s) => stalls.push(s),
            }
        }
        match r {
            Ok(st) => {
                total.ios += st.ios;
                total.bytes += st.bytes;
                total.errors += st.errors;
                total.first_errors.extend(st.first_errors);
                total.lat.extend(st.lat);
                total.stamped += st.stamped;
                total.zero += st.zero;
            }
            Err(s) => stalls.push(s),
        }
    }
    if !stalls.is_empty() {
        for s in &stalls {
            eprintln!(
                "vhost-thin-blkio-bench: STALL on queue {}: no completion for {:.1} s, {} request(s) in flight",
                s.queue, a.stall_timeout, s.in_flight
            );
        }
        // The backend still owns requests in flight: do not tear the rings down.
        std::process::exit(3);
    }
    b.unmap_mem_region(&region);
    drop(b);

    report(a, span, qsize, capacity, &mut total, seconds, flush_time);
    if total.errors > 0 {
        for e in &total.first_errors {
            eprintln!("vhost-thin-blkio-bench: {e}");
        }
        eprintln!("vhost-thin-blkio-bench: {} request(s) failed", total.errors);
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn report(
    a: &Args,
    span: u64,
    qsize: i32,
    capacity: u64,
    st: &mut Stats,
    seconds: f64,
    flush: Option<Duration>,
) {
    st.lat.sort_unstable();
    let n = st.lat.len();
    let q = |p: f64| -> f64 {
        if n == 0 {
            return 0.0;
        }
        // Nearest rank.
        let i = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
        st.lat[i] as f64 / 1000.0
    };
    let mean = if n == 0 {
        0.0
    } else {
        st.lat.iter().map(|&v| v as f64).sum::<f64>() / n as f64 / 1000.0
    };
    let secs = seconds.max(1e-9);
    let iops = st.ios as f64 / secs;
    let mibs = st.bytes as f64 / secs / (1 << 20) as f64;
    let (reads, writes) = if a.rw.writes() {
        (0, st.ios)
    } else {
        (st.ios, 0)
    };
    let (lmin, lmax) = (
        q(0.0),
        if n == 0 {
            0.0
        } else {
            st.lat[n - 1] as f64 / 1000.0
        },
    );
    if a.json {
        let v = serde_json::json!({
            "generator": "blkio",
            "socket": a.socket.display().to_string(),
            "rw": a.rw.name(),
            "bs": a.bs,
            "iodepth": a.iodepth,
            "queues": a.queues,
            "queue_size": qsize,
            "span": span,
            "seed": a.seed,
            "verify": a.verify,
            "runtime": a.runtime,
            "seconds": seconds,
            "reads": reads,
            "writes": writes,
            "bytes": st.bytes,
            "errors": st.errors,
            "iops": iops,
            "mib_s": mibs,
            "lat_samples": n,
            "lat_mean_us": mean,
            "lat_min_us": lmin,
            "lat_p50_us": q(0.50),
            "lat_p99_us": q(0.99),
            "lat_p999_us": q(0.999),
            "lat_max_us": lmax,
            "align": a.align.unwrap_or(a.bs),
            "single_pass": a.single_pass,
            "flush_ms": flush.map(|d| d.as_secs_f64() * 1000.0),
            "verified_sectors": st.stamped,
            "zero_sectors": st.zero,
            "capacity": capacity,
            "poll": a.poll,
        });
        println!("{v}");
    } else {
        println!(
            "{} (libblkio): {} bs={} iodepth={} queues={} span={} bytes{}",
            a.socket.display(),
            a.rw.name(),
            a.bs,
            a.iodepth,
            a.queues,
            span,
            if a.verify { " verify" } else { "" }
        );
        println!(
            "  {} ios ({reads} reads, {writes} writes) in {seconds:.2} s: {iops:.0} IOPS, {mibs:.1} MiB/s",
            st.ios
        );
        println!(
            "  latency us: mean {mean:.1}, min {lmin:.1}, p50 {:.1}, p99 {:.1}, p99.9 {:.1}, max {lmax:.1}",
            q(0.5),
            q(0.99),
            q(0.999)
        );
        if a.verify && !a.rw.writes() {
            println!(
                "  verified: {} sectors held their stamp, {} were zeroes",
                st.stamped, st.zero
            );
        }
        if let Some(d) = flush {
            println!("  final FLUSH: {:.3} ms", d.as_secs_f64() * 1000.0);
        }
        if st.errors > 0 {
            println!("  errors: {}", st.errors);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128KiB"), Ok(128 << 10));
        assert!(parse_size("4x").is_err());
    }

    #[test]
    fn sequential_single_pass_covers_the_stretch_once() {
        let mut w = Workload::new(Rw::Write, 4096, 4096, 8192, 4 * 4096, true, 1);
        let v: Vec<u64> = std::iter::from_fn(|| w.next()).collect();
        assert_eq!(v, vec![8192, 12288, 16384, 20480]);
    }

    #[test]
    fn random_single_pass_touches_every_aligned_offset_once() {
        let mut w = Workload::new(Rw::Randwrite, 4096, 65536, 1 << 20, 1 << 20, true, 3);
        let mut v: Vec<u64> = std::iter::from_fn(|| w.next()).collect();
        assert_ne!(
            v,
            (0..16).map(|k| (1 << 20) + k * 65536).collect::<Vec<_>>()
        );
        v.sort_unstable();
        assert_eq!(
            v,
            (0..16).map(|k| (1 << 20) + k * 65536).collect::<Vec<_>>()
        );
    }

    #[test]
    fn random_offsets_stay_aligned_inside_the_span() {
        let mut w = Workload::new(Rw::Randread, 4096, 65536, 0, 1 << 20, false, 7);
        for _ in 0..1000 {
            let o = w.next().unwrap();
            assert_eq!(o % 65536, 0);
            assert!(o + 4096 <= 1 << 20);
        }
    }
}
