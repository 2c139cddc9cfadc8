//! `vhost-thin-bench`: a host-side vhost-user-blk load generator, like fio for a
//! vhost-user socket. It plays the guest: its own memory (a shared memfd), its own
//! split-ring driver, one thread per queue keeping `--iodepth` requests in flight.

mod frontend;
mod hist;
mod ring;

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};
use frontend::GuestMem;
use hist::Histogram;
use ring::{QueueDriver, QueueStats, RingLayout, Rw, Workload};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

#[derive(Copy, Clone, Debug, ValueEnum)]
enum RwArg {
    Randread,
    Randwrite,
    Read,
    Write,
    Randrw,
}

impl From<RwArg> for Rw {
    fn from(r: RwArg) -> Rw {
        match r {
            RwArg::Randread => Rw::RandRead,
            RwArg::Randwrite => Rw::RandWrite,
            RwArg::Read => Rw::Read,
            RwArg::Write => Rw::Write,
            RwArg::Randrw => Rw::RandReadWrite,
        }
    }
}

/// Drive a vhost-user-blk backend with READ/WRITE requests and report IOPS, bandwidth
/// and latency.
#[derive(Parser, Debug)]
#[command(name = "vhost-thin-bench", version)]
struct Args {
    /// The backend's vhost-user socket.
    #[arg(long)]
    socket: PathBuf,
    /// Queues to use, one thread each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Requests kept in flight per queue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    iodepth: u16,
    /// Request size (`4k`, `128KiB`, `1M`, bytes); a multiple of 512.
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Access pattern. Sequential patterns split the span into one stretch per queue.
    #[arg(long, value_enum, default_value = "randread")]
    rw: RwArg,
    /// Percentage of reads for randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    rwmixread: u32,
    /// Seconds to run (fractions allowed).
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Bytes of the disk to use from offset 0 (default: the capacity from GET_CONFIG).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Random offsets are multiples of this (default: bs); e.g. `--bs 4k --align 64k`
    /// touches one pool block per request.
    #[arg(long, value_parser = parse_size)]
    align: Option<u64>,
    /// Cover the span exactly once and stop: sequential patterns in order (e.g. to prefill
    /// a disk), random ones in a random permutation of the aligned offsets. Each queue
    /// takes its own share of the span. --runtime still bounds the run.
    #[arg(long)]
    single_pass: bool,
    /// After the run, send one FLUSH and report how long it took (not counted in IOPS).
    #[arg(long)]
    end_fsync: bool,
    /// Seed of the offset generator (each queue uses seed + queue index).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stamp every written 512-byte sector with its number and check every read sector
    /// holds its own number or zeroes. Costs a little CPU per request.
    #[arg(long)]
    verify: bool,
    /// Spin on the used ring instead of waiting on the call eventfd.
    #[arg(long)]
    poll: bool,
    /// Ring size (a power of two; default: smallest holding 3 descriptors per request, at
    /// least 16).
    #[arg(long)]
    queue_size: Option<u16>,
    /// Give up (exit 3) when a queue sees no completion for this many seconds.
    #[arg(long, default_value_t = 30.0)]
    stall_timeout: f64,
    /// Print each request that took longer than this many milliseconds to standard error,
    /// with the wall-clock time it completed at (to set beside a daemon's log).
    #[arg(long, value_name = "MS")]
    log_slow_ms: Option<f64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Instead of a load: discard the first BYTES of the disk (one DISCARD per GiB, or per
    /// the device's max_discard_sectors, one at a time, from queue 0), then FLUSH; reports how long the discards and the FLUSH took
    /// (`discard_ms`, `flush_ms`).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    discard: Option<u64>,
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

struct Report {
    stats: QueueStats,
    /// The discards of --discard.
    discard: Option<Duration>,
    /// Until every queue drained (the final FLUSH excluded).
    seconds: f64,
    flush: Option<Duration>,
}

struct Flush {
    ran_for: Duration,
    result: Result<Result<Duration, String>, ring::Stall>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vhost-thin-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(a: &Args) -> Result<ExitCode> {
    let rw: Rw = a.rw.into();
    let nq = a.queues as usize;
    let depth = a.iodepth;
    if a.bs == 0 || a.bs % 512 != 0 {
        bail!("--bs {} is not a positive multiple of 512", a.bs);
    }
    if a.bs > u32::MAX as u64 / 2 {
        bail!("--bs {} is too large", a.bs);
    }
    if !(a.runtime > 0.0 && a.runtime.is_finite()) {
        bail!("--runtime must be positive");
    }
    let qsize = match a.queue_size {
        Some(q) => {
            if !q.is_power_of_two() || (q as u32) < 3 * depth as u32 {
                bail!("--queue-size {q} must be a power of two of at least 3 x iodepth");
            }
            q
        }
        None => (3 * depth as u32).next_power_of_two().clamp(16, 32768) as u16,
    };

    let mut conn = frontend::connect(&a.socket, nq)?;
    let info = conn.info.clone();
    // QSD offers SIZE_MAX with size_max 0: no limit.
    if let Some(max) = info.size_max.filter(|&m| m > 0) {
        if a.bs > max as u64 {
            bail!(
                "--bs {} is larger than the device's size_max {max} (one data segment per request)",
                a.bs
            );
        }
    }
    if rw.writes() && info.read_only {
        bail!("the device is read-only");
    }
    let span = match (a.size, info.capacity_bytes) {
        (Some(s), Some(cap)) if s > cap => bail!("--size {s} is larger than the capacity {cap}"),
        (Some(s), _) => s,
        (None, Some(cap)) => cap,
        (None, None) => bail!("the device gives no capacity (no CONFIG): pass --size"),
    };
    let align = a.align.unwrap_or(a.bs);
    if align == 0 || align % 512 != 0 {
        bail!("--align {align} is not a positive multiple of 512");
    }
    let span = span / a.bs * a.bs;
    // Sequential and single-pass patterns: one stretch per queue.
    let split = rw.sequential() || a.single_pass;
    let stretch = if split {
        let unit = if rw.sequential() { a.bs } else { align };
        span / nq as u64 / unit * unit
    } else {
        span
    };
    if stretch < a.bs {
        bail!("the span ({span} bytes) is smaller than bs x queues");
    }

    let mut layouts = Vec::new();
    let mut base = 0;
    for _ in 0..nq {
        let l = RingLayout::new(base, qsize, depth, a.bs);
        base = l.end;
        layouts.push(l);
    }
    let mem = GuestMem::new(base as usize)?;
    // The rings must be written before the device sees them.
    for (q, l) in layouts.iter().enumerate() {
        ring::init(&mem, l, a.seed ^ ((q as u64 + 1) << 32));
    }
    let fds = conn.setup(&mem, &layouts)?;

    let runtime = Duration::from_secs_f64(a.runtime);
    let stall = Duration::from_secs_f64(a.stall_timeout);
    let barrier = Barrier::new(nq);
    let any_stall = AtomicBool::new(false);
    let discard_time = &std::sync::Mutex::new(None);
    // One segment per DISCARD, at most a GiB and what the device takes.
    let max_discard = info
        .max_discard_sectors
        .map_or(1 << 30, |n| (n as u64 * 512).min(1 << 30));
    let start = Instant::now();
    let deadline = start + runtime;
    type Outcome = (Result<QueueStats, ring::Stall>, Option<Flush>);
    let results: Vec<std::thread::Result<Outcome>> = std::thread::scope(|s| {
        let handles: Vec<_> = layouts
            .iter()
            .enumerate()
            .map(|(q, l)| {
                let (mem, fd, l) = (&mem, &fds[q], l.clone());
                let (barrier, any_stall) = (&barrier, &any_stall);
                std::thread::Builder::new()
                    .name(format!("queue-{q}"))
                    .spawn_scoped(s, move || {
                        let mut drv =
                            QueueDriver::attach(q, mem, l, &fd.kick, &fd.call, a.verify, a.poll);
                        drv.log_slow = a.log_slow_ms.map(|ms| Duration::from_secs_f64(ms / 1e3));
                        let (wstart, wlen) = if split {
                            (q as u64 * stretch, stretch)
                        } else {
                            (0, span)
                        };
                        let mut w = Workload::new(
                            rw,
                            a.bs,
                            align,
                            wstart,
                            wlen,
                            a.rwmixread,
                            a.single_pass,
                            a.seed.wrapping_add(q as u64),
                        );
                        let r = match a.discard {
                            None => drv.run(&mut w, deadline, stall),
                            Some(n) if q == 0 => {
                                discard(&mut drv, n, max_discard, stall, discard_time)
                            }
                            Some(_) => Ok(QueueStats::default()),
                        };
                        if r.is_err() {
                            any_stall.store(true, Ordering::SeqCst);
                        }
                        // Every queue has drained: the FLUSH covers all their writes.
                        barrier.wait();
                        let end_fsync = a.end_fsync || a.discard.is_some();
                        let flush = (q == 0 && end_fsync && !any_stall.load(Ordering::SeqCst))
                            .then(|| Flush {
                                ran_for: start.elapsed(),
                                result: drv.flush(stall),
                            });
                        (r, flush)
                    })
                    .expect("spawn a queue thread")
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut seconds = start.elapsed().as_secs_f64();
    let mut flush_time = None;

    let mut total = QueueStats::default();
    let mut stalled = Vec::new();
    for r in results {
        let r = match r {
            Ok((r, flush)) => {
                if let Some(f) = flush {
                    seconds = f.ran_for.as_secs_f64();
                    match f.result {
                        Ok(Ok(d)) => flush_time = Some(d),
                        Ok(Err(e)) => {
                            total.errors += 1;
                            total.first_errors.push(ring::IoError {
                                queue: 0,
                                write: false,
                                offset: 0,
                                what: format!("FLUSH: {e}"),
                            });
                        }
                        Err(stall) => stalled.push(stall),
                    }
                }
                Ok(r)
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(Ok(st)) => {
                total.reads += st.reads;
                total.writes += st.writes;
                total.bytes += st.bytes;
                total.errors += st.errors;
                total.first_errors.extend(st.first_errors);
                total.hist.merge(&st.hist);
                total.elapsed = total.elapsed.max(st.elapsed);
            }
            Ok(Err(stall)) => stalled.push(stall),
            Err(_) => bail!("a queue thread panicked"),
        }
    }
    if !stalled.is_empty() {
        for s in &stalled {
            eprintln!(
                "vhost-thin-bench: STALL on queue {}: no completion for {:.1} s; {} request(s) in flight, avail idx {}, used idx {}",
                s.queue,
                s.waited.as_secs_f64(),
                s.in_flight,
                s.avail_idx,
                s.used_idx
            );
        }
        // The backend still owns requests in flight: do not tear the rings down.
        std::process::exit(3);
    }
    conn.teardown(nq);

    let rep = Report {
        discard: *discard_time.lock().unwrap(),
        stats: total,
        seconds,
        flush: flush_time,
    };
    print_report(a, rw, span, qsize, &info, &rep);
    if rep.stats.errors > 0 {
        for e in &rep.stats.first_errors {
            eprintln!(
                "vhost-thin-bench: error on queue {}: {} at offset {} ({}): {}",
                e.queue,
                if e.write { "write" } else { "read" },
                e.offset,
                e.offset / 512,
                e.what
            );
        }
        eprintln!("vhost-thin-bench: {} request(s) failed", rep.stats.errors);
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// The discards of `--discard`: the first `bytes` of the disk, `max` bytes per request.
fn discard(
    drv: &mut QueueDriver<'_>,
    bytes: u64,
    max: u64,
    stall: Duration,
    took: &std::sync::Mutex<Option<Duration>>,
) -> Result<QueueStats, ring::Stall> {
    let mut st = QueueStats::default();
    let t0 = Instant::now();
    let mut at = 0;
    while at < bytes {
        let n = (bytes - at).min(max);
        if let Err(e) = drv.discard(at, n, stall)? {
            st.errors += 1;
            st.first_errors.push(ring::IoError {
                queue: 0,
                write: true,
                offset: at,
                what: format!("DISCARD: {e}"),
            });
            break;
        }
        at += n;
    }
    *took.lock().unwrap() = Some(t0.elapsed());
    Ok(st)
}

fn us(ns: f64) -> f64 {
    ns / 1000.0
}

fn print_report(a: &Args, rw: Rw, span: u64, qsize: u16, info: &frontend::DeviceInfo, r: &Report) {
    let st = &r.stats;
    let h: &Histogram = &st.hist;
    let ios = st.reads + st.writes;
    let secs = r.seconds.max(1e-9);
    let iops = ios as f64 / secs;
    let mibs = st.bytes as f64 / secs / (1 << 20) as f64;
    if a.json {
        let v = serde_json::json!({
            "socket": a.socket.display().to_string(),
            "rw": rw.name(),
            "bs": a.bs,
            "iodepth": a.iodepth,
            "queues": a.queues,
            "queue_size": qsize,
            "span": span,
            "seed": a.seed,
            "verify": a.verify,
            "runtime": a.runtime,
            "seconds": r.seconds,
            "reads": st.reads,
            "writes": st.writes,
            "bytes": st.bytes,
            "errors": st.errors,
            "iops": iops,
            "mib_s": mibs,
            "lat_samples": h.count(),
            "lat_mean_us": us(h.mean()),
            "lat_min_us": us(h.min() as f64),
            "lat_p50_us": us(h.quantile(0.50) as f64),
            "lat_p99_us": us(h.quantile(0.99) as f64),
            "lat_p999_us": us(h.quantile(0.999) as f64),
            "lat_max_us": us(h.max() as f64),
            "align": a.align.unwrap_or(a.bs),
            "single_pass": a.single_pass,
            "flush_ms": r.flush.map(|d| d.as_secs_f64() * 1000.0),
            "discard_ms": r.discard.map(|d| d.as_secs_f64() * 1000.0),
            "device_features": format!("{:#x}", info.device_features),
            "acked_features": format!("{:#x}", info.acked_features),
            "device_queues": info.device_queues,
            "capacity": info.capacity_bytes,
        });
        println!("{v}");
    } else {
        println!(
            "{}: {} bs={} iodepth={} queues={} span={} bytes{}",
            a.socket.display(),
            rw.name(),
            a.bs,
            a.iodepth,
            a.queues,
            span,
            if a.verify { " verify" } else { "" }
        );
        println!(
            "  {} ios ({} reads, {} writes) in {:.2} s: {:.0} IOPS, {:.1} MiB/s",
            ios, st.reads, st.writes, r.seconds, iops, mibs
        );
        println!(
            "  latency us: mean {:.1}, min {:.1}, p50 {:.1}, p99 {:.1}, p99.9 {:.1}, max {:.1}",
            us(h.mean()),
            us(h.min() as f64),
            us(h.quantile(0.5) as f64),
            us(h.quantile(0.99) as f64),
            us(h.quantile(0.999) as f64),
            us(h.max() as f64)
        );
        if let Some(d) = r.discard {
            println!("  discards: {:.3} ms", d.as_secs_f64() * 1000.0);
        }
        if let Some(d) = r.flush {
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
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("4x").is_err());
        assert!(parse_size("").is_err());
    }
}
