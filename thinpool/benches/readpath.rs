//! The engine's per-request cost on the read path: 4 KiB reads of mapped blocks through
//! `Pool::read`, against `pread` of the same bytes from the pool's data file, both from the
//! page cache (BENCH_DIR, default /dev/shm: tmpfs, as the daemon's RAM-backed benchmark).
//! The difference is what the engine adds per read (lookup, locks, cells). Prints figures,
//! asserts nothing.
//!
//!     cargo bench -p thinpool --bench readpath
//!
//! Environment: BENCH_BLOCKS (mapped 64 KiB blocks, default 16384 = 1 GiB), BENCH_READS
//! (reads per pass, default 2000000; a fixed count, so `valgrind --tool=callgrind` gives
//! repeatable instruction counts per read), BENCH_THREADS (default 1 and 2), BENCH_DIR.

mod common;

use common::{env_u64, file, Rng, BS};
use std::os::unix::fs::FileExt;
use std::time::Instant;
use thinpool::pool::{Pool, PoolOptions};

fn main() {
    let blocks = env_u64("BENCH_BLOCKS", 16384);
    let reads = env_u64("BENCH_READS", 2_000_000);
    let threads: Vec<u64> = match std::env::var("BENCH_THREADS") {
        Ok(v) => v.split(',').filter_map(|t| t.parse().ok()).collect(),
        Err(_) => vec![1, 2],
    };
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let dir = tempfile::tempdir_in(base).unwrap();
    let data_path = dir.path().join("pool.data");
    let pool = Pool::create(
        file(&dir.path().join("pool.meta"), 64 << 20),
        file(&data_path, blocks * BS),
        (BS / 512) as u32,
        PoolOptions::default(),
    )
    .unwrap();
    pool.create_thin(0).unwrap();
    // Every block written once (so mapped and in the page cache), then committed.
    let buf = vec![0x5au8; BS as usize];
    for vb in 0..blocks {
        pool.write(0, vb * BS, &buf).unwrap();
    }
    pool.commit().unwrap();
    let data = std::fs::File::open(&data_path).unwrap();
    println!(
        "read path: {blocks} mapped 64 KiB blocks in {}, {reads} random 4 KiB reads a thread",
        dir.path().display()
    );
    for &n in &threads {
        for (name, engine) in [("Pool::read", true), ("pread of the data file", false)] {
            let t = Instant::now();
            std::thread::scope(|s| {
                for i in 0..n {
                    let (pool, data) = (&pool, &data);
                    s.spawn(move || {
                        let mut rng = Rng(0x9e37_79b9 + i);
                        let mut b = vec![0u8; 4096];
                        for _ in 0..reads {
                            let off = (rng.next() % (blocks * 16)) * 4096;
                            if engine {
                                pool.read(0, off, &mut b).unwrap();
                            } else {
                                data.read_exact_at(&mut b, off).unwrap();
                            }
                        }
                        std::hint::black_box(&b);
                    });
                }
            });
            let d = t.elapsed();
            let total = reads * n;
            println!(
                "  {n} thread(s), {name:<24} {:>9.0} reads/s  {:>6.0} ns a read (wall / reads per thread)",
                total as f64 / d.as_secs_f64(),
                d.as_nanos() as f64 / reads as f64
            );
        }
    }
}
