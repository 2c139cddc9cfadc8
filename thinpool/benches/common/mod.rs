//! Helpers shared by the benchmarks (each uses a subset, hence the allowance below).
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use thinpool::pool::Pool;
use thinpool::storage::{FileStorage, Storage};

/// Pool block size of the benchmarks: 64 KiB (128 sectors, dm-thin's common choice).
pub const BS: u64 = 64 * 1024;

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64: reproducible runs without a dependency.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A sparse file of `len` bytes.
pub fn file(path: &Path, len: u64) -> Arc<dyn Storage> {
    Arc::new(FileStorage::create(path, len).unwrap())
}

/// The benchmark's scratch directory, under BENCH_DIR (default /var/tmp: a disk, not tmpfs).
pub fn scratch_dir() -> tempfile::TempDir {
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    tempfile::tempdir_in(base).unwrap()
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A pool on sparse files for metadata-heavy runs: 1 GiB of metadata, `data_blocks` blocks
/// of 64 KiB, a 256 MiB metadata cache.
pub fn big_pool(meta: &Path, data: &Path, data_blocks: u64) -> Pool {
    Pool::create(
        file(meta, 1 << 30),
        file(data, data_blocks * BS),
        (BS / 512) as u32,
        thinpool::pool::PoolOptions {
            cache_blocks: 65536,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Maps virtual blocks `0..n` of `dev` to fresh data blocks, through the metadata only
/// (no data is written: the figures of interest are the trees').
pub fn fill(pool: &Pool, dev: u32, n: u64) {
    pool.with_metadata(|md| {
        for vb in 0..n {
            let d = md.alloc_data_block().unwrap();
            md.insert_mapping(dev, vb, d).unwrap();
        }
    });
}

/// A thin-provisioning-tools program, if installed.
pub fn tool(name: &str) -> Option<String> {
    ["/usr/sbin", "/sbin", "/usr/bin"]
        .into_iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| Path::new(p).exists())
}

pub fn drop_caches_hint() {
    // Not root-only on purpose: when it works, the timings that follow are cold-cache.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}
