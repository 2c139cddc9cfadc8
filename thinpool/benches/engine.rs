//! Engine benchmark: prints figures, asserts nothing. Compares against peers in the same run
//! (thin_check for checking; plain pwrite to a raw file for the write path).
//!
//!     cargo bench -p thinpool --bench engine
//!
//! Environment: BENCH_MAPPINGS (default 1000000), BENCH_SNAPSHOTS (100), BENCH_SECONDS (3),
//! BENCH_DIR (default: a temporary directory under /var/tmp).

mod common;

use common::{big_pool, cores, drop_caches_hint, env_u64, file, fill, scratch_dir, tool, Rng, BS};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thinpool::pool::{Pool, PoolOptions};
use thinpool::storage::FileStorage;

fn main() {
    let mappings = env_u64("BENCH_MAPPINGS", 1_000_000);
    let snapshots = env_u64("BENCH_SNAPSHOTS", 100) as u32;
    let seconds = env_u64("BENCH_SECONDS", 3);
    let dir = scratch_dir();
    println!(
        "vhost-thin engine benchmark ({} cores, dir {})",
        cores(),
        dir.path().display()
    );
    println!();

    // ---------- a pool with many mappings and snapshots ----------
    let meta_path = dir.path().join("big.meta");
    let data_blocks = mappings + snapshots as u64 * 200 + 1024;
    let pool = big_pool(&meta_path, &dir.path().join("big.data"), data_blocks);
    pool.create_thin(0).unwrap();
    let t = Instant::now();
    fill(&pool, 0, mappings);
    pool.commit().unwrap();
    let filled = t.elapsed();
    println!(
        "metadata fill: {mappings} mappings in {:.2?} ({:.0} mappings/s, metadata only)",
        filled,
        mappings as f64 / filled.as_secs_f64()
    );

    let t = Instant::now();
    pool.create_snap(1, 0).unwrap();
    let snap_only = t.elapsed();
    let t = Instant::now();
    pool.commit().unwrap();
    let snap_commit = t.elapsed();
    println!(
        "snapshot of a device with {mappings} mapped blocks: {:.1?} to take, {:.1?} to commit",
        snap_only, snap_commit
    );

    let mut rng = Rng(0x1234_5678);
    let t = Instant::now();
    for s in 2..snapshots + 1 {
        let origin = if s % 3 == 0 { 0 } else { s - 1 };
        pool.create_snap(s, origin).unwrap();
        pool.with_metadata(|md| {
            for _ in 0..100 {
                let vb = rng.next() % mappings;
                let d = md.alloc_data_block().unwrap();
                md.insert_mapping(s, vb, d).unwrap();
            }
        });
        pool.commit().unwrap();
    }
    println!(
        "{} more snapshots, each with 100 diverging blocks and a commit: {:.2?}",
        snapshots - 1,
        t.elapsed()
    );
    let st = pool.status();
    println!(
        "pool: {} devices, {} data blocks used, {} metadata blocks used ({} MiB)",
        st.devices,
        st.usage.data_used,
        st.usage.metadata_used,
        (st.usage.metadata_used * 4096) >> 20
    );
    drop(pool);

    drop_caches_hint();
    let t = Instant::now();
    let report =
        thinpool::check::check(Arc::new(FileStorage::open_read_only(&meta_path).unwrap())).unwrap();
    let ours = t.elapsed();
    assert!(report.is_clean(), "{:?}", report.errors);
    let tc = tool("thin_check");
    let theirs = tc.map(|tc| {
        drop_caches_hint();
        let t = Instant::now();
        let o = Command::new(tc).arg(&meta_path).output().unwrap();
        (t.elapsed(), o.status.success())
    });
    println!();
    println!(
        "check of {} mappings (summed over devices) in {} devices ({} metadata blocks):",
        report.mappings, report.devices, report.metadata_blocks_used
    );
    println!("  vhost-thin pool check   {:>10.2?}", ours);
    match theirs {
        Some((d, ok)) => println!(
            "  thin_check 0.9.0        {:>10.2?}{}",
            d,
            if ok { "" } else { "  (FAILED)" }
        ),
        None => println!("  thin_check              not installed"),
    }

    // ---------- 4 KiB random writes, single thread ----------
    println!();
    println!("single-thread 4 KiB random writes, buffered (page cache), {seconds} s each:");
    let dev_blocks: u64 = 65536; // 4 GiB virtual
    let meta = file(&dir.path().join("w.meta"), 64 << 20);
    let data = file(&dir.path().join("w.data"), dev_blocks * BS);
    let pool = Pool::create(meta, data, 128, PoolOptions::default()).unwrap();
    pool.create_thin(0).unwrap();
    let buf = vec![0x5au8; 4096];
    let limit = Duration::from_secs(seconds);

    // First writes: each provisions (and zero-fills) a fresh 64 KiB block.
    let mut order: Vec<u64> = (0..dev_blocks).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let t = Instant::now();
    let mut n = 0u64;
    let mut last_commit = Instant::now();
    while n < dev_blocks && t.elapsed() < limit {
        let vb = order[n as usize];
        pool.write(0, vb * BS + (rng.next() % 16) * 4096, &buf)
            .unwrap();
        n += 1;
        if last_commit.elapsed() >= Duration::from_secs(1) {
            pool.commit().unwrap();
            last_commit = Instant::now();
        }
    }
    pool.commit().unwrap();
    let first = (n, t.elapsed());

    // Overwrites of mapped blocks: in place.
    let provisioned = n;
    let t = Instant::now();
    let mut m = 0u64;
    while t.elapsed() < limit {
        let vb = order[(rng.next() % provisioned) as usize];
        pool.write(0, vb * BS + (rng.next() % 16) * 4096, &buf)
            .unwrap();
        m += 1;
    }
    pool.commit().unwrap();
    let over = (m, t.elapsed());

    // Random reads of mapped blocks.
    let mut rbuf = vec![0u8; 4096];
    let t = Instant::now();
    let mut r = 0u64;
    while t.elapsed() < limit {
        let vb = order[(rng.next() % provisioned) as usize];
        pool.read(0, vb * BS + (rng.next() % 16) * 4096, &mut rbuf)
            .unwrap();
        r += 1;
    }
    let reads = (r, t.elapsed());

    // Peer: plain pwrite/pread on a raw file of the same size. First writes go to a sparse
    // file (the file system allocates), overwrites to pages written before.
    let raw = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("raw"))
        .unwrap();
    raw.set_len(dev_blocks * BS).unwrap();
    let pages = dev_blocks * 16;
    let mut page_order: Vec<u64> = (0..pages).collect();
    for i in (1..page_order.len()).rev() {
        page_order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let t = Instant::now();
    let mut k = 0u64;
    while k < pages && t.elapsed() < limit {
        raw.write_all_at(&buf, page_order[k as usize] * 4096)
            .unwrap();
        k += 1;
    }
    raw.sync_data().unwrap();
    let raw_first = (k, t.elapsed());
    let zero = vec![0u8; 1 << 20];
    for off in (0..dev_blocks * BS).step_by(1 << 20) {
        raw.write_all_at(&zero, off).unwrap();
    }
    raw.sync_data().unwrap();
    let t = Instant::now();
    let mut k = 0u64;
    while t.elapsed() < limit {
        raw.write_all_at(&buf, (rng.next() % pages) * 4096).unwrap();
        k += 1;
    }
    let raw_w = (k, t.elapsed());
    let t = Instant::now();
    let mut k = 0u64;
    while t.elapsed() < limit {
        raw.read_exact_at(&mut rbuf, (rng.next() % pages) * 4096)
            .unwrap();
        k += 1;
    }
    let raw_r = (k, t.elapsed());

    let line = |name: &str, (n, d): (u64, Duration)| {
        let iops = n as f64 / d.as_secs_f64();
        println!(
            "  {name:<44} {:>9.0} IOPS {:>8.1} MiB/s  ({n} ops)",
            iops,
            iops * 4096.0 / 1048576.0
        );
    };
    line("thin: first write (provision + zero 64 KiB)", first);
    line("thin: overwrite (mapped, in place)", over);
    line("thin: random read (mapped)", reads);
    line("raw file: first pwrite (sparse file)", raw_first);
    line("raw file: pwrite over written pages", raw_w);
    line("raw file: pread", raw_r);
    println!();
    println!("(buffered I/O on {}: compare like with like; guests' O_DIRECT figures come with the daemon)", base_fs(dir.path()));
}

fn base_fs(p: &Path) -> String {
    Command::new("df")
        .args(["--output=fstype", p.to_str().unwrap()])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().nth(1).map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "?".into())
}
