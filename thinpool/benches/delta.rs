//! Changed blocks between snapshots of one device: our tree walk (exact and changed-only)
//! against `thin_delta` 0.9.0 on the same metadata file, live and on the metadata snapshot,
//! and against the simple merge the walk replaced. Prints figures, asserts only that the
//! outputs agree.
//!
//!     cargo bench -p thinpool --bench delta
//!
//! Environment: DELTA_BLOCKS (1048576 mapped blocks), DELTA_REPEAT (3: best of),
//! BENCH_DIR (default /var/tmp).

mod common;

use common::{big_pool, cores, env_u64, fill, scratch_dir, tool, Rng};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thinpool::delta::{DeltaKind, DeltaMode, DeltaRun};
use thinpool::pdata::btree::{self, node, ValueKind};
use thinpool::storage::FileStorage;
use thinpool::thin::metadata::{MetadataOptions, ThinMetadata};

/// Opens the metadata as `vhost-thin thin delta` does: read-only, an empty cache.
fn open(meta: &Path) -> ThinMetadata {
    ThinMetadata::open(
        Arc::new(FileStorage::open_read_only(meta).unwrap()),
        MetadataOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn best<T>(repeat: u64, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut out = None;
    let mut best = Duration::MAX;
    for _ in 0..repeat {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed());
        out = Some(v);
    }
    (best, out.expect("repeat >= 1"))
}

struct Ours {
    runs: Vec<DeltaRun>,
    nodes_read: u64,
    xml: Vec<u8>,
}

/// Our delta from opening the metadata to the XML in memory (as the command line tool does).
fn ours(meta: &Path, a: u32, b: u32, msnap: bool, mode: DeltaMode) -> Ours {
    let mut md = open(meta);
    let (runs, stats) = thinpool::delta::delta_with_stats(&mut md, a, b, msnap, mode).unwrap();
    let mut xml = Vec::new();
    thinpool::delta::write_xml(&mut md, a, b, msnap, &runs, &mut xml).unwrap();
    Ours {
        runs,
        nodes_read: stats.nodes_read,
        xml,
    }
}

fn root(md: &mut ThinMetadata, dev: u32) -> u64 {
    let top = md.superblock().mapping_root;
    btree::lookup_u64(md.tm(), top, dev as u64, ValueKind::Subtree)
        .unwrap()
        .unwrap()
}

/// The previous implementation, for reference: every mapping of both devices read into
/// memory, then merged. Returns the number of runs and of tree nodes read.
fn simple_merge(meta: &Path, a: u32, b: u32) -> (usize, u64) {
    fn collect(md: &mut ThinMetadata, b: u64, out: &mut Vec<(u64, u64)>) -> u64 {
        let n = btree::read_node(md.tm(), b, ValueKind::Data).unwrap();
        if node::is_leaf(&n) {
            for i in 0..node::nr_entries(&n) {
                out.push((node::key(&n, i), node::value_u64(&n, i) >> 24));
            }
            return 1;
        }
        let mut read = 1;
        for i in 0..node::nr_entries(&n) {
            read += collect(md, node::value_u64(&n, i), out);
        }
        read
    }
    let mut md = open(meta);
    let (mut l, mut r) = (Vec::new(), Vec::new());
    let (ra, rb) = (root(&mut md, a), root(&mut md, b));
    let nodes = collect(&mut md, ra, &mut l) + collect(&mut md, rb, &mut r);
    let mut runs: Vec<(DeltaKind, u64, u64)> = Vec::new();
    let mut push = |k: DeltaKind, vb: u64| match runs.last_mut() {
        Some(x) if x.0 == k && x.1 + x.2 == vb => x.2 += 1,
        _ => runs.push((k, vb, 1)),
    };
    let (mut i, mut j) = (0, 0);
    while i < l.len() || j < r.len() {
        match (l.get(i), r.get(j)) {
            (Some(&(va, da)), Some(&(vb, db))) if va == vb => {
                push(
                    if da == db {
                        DeltaKind::Same
                    } else {
                        DeltaKind::Different
                    },
                    va,
                );
                i += 1;
                j += 1;
            }
            (Some(&(va, _)), Some(&(vb, _))) if va < vb => {
                push(DeltaKind::LeftOnly, va);
                i += 1;
            }
            (Some(&(va, _)), None) => {
                push(DeltaKind::LeftOnly, va);
                i += 1;
            }
            (_, Some(&(vb, _))) => {
                push(DeltaKind::RightOnly, vb);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (runs.len(), nodes)
}

fn thin_delta(td: &str, meta: &Path, a: u32, b: u32, msnap: bool) -> Vec<u8> {
    let (sa, sb) = (a.to_string(), b.to_string());
    let mut cmd = Command::new(td);
    if msnap {
        cmd.arg("-m");
    }
    let o = cmd
        .args(["--snap1", &sa, "--snap2", &sb])
        .arg(meta)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "thin_delta: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

fn row(what: &str, d: Duration, nodes: Option<u64>, runs: usize) {
    let nodes = nodes.map_or("—".to_string(), |n| n.to_string());
    println!("| {what} | {:.1?} | {nodes} | {runs} |", d);
}

fn main() {
    let blocks = env_u64("DELTA_BLOCKS", 1 << 20);
    let repeat = env_u64("DELTA_REPEAT", 3).max(1);
    let changes = (blocks / 100).max(1);
    let dir = scratch_dir();
    println!(
        "vhost-thin delta benchmark ({} cores, dir {}, best of {repeat})",
        cores(),
        dir.path().display()
    );

    // Device 0 fully mapped; snapshots 1 and 2 of it; then 1% of the origin overwritten at
    // scattered blocks, and 1% of snapshot 2 in 1 MiB extents (16 blocks).
    let meta_path = dir.path().join("meta");
    let data_blocks = blocks + 2 * changes + 1024;
    let pool = big_pool(&meta_path, &dir.path().join("data"), data_blocks);
    pool.create_thin(0).unwrap();
    let t = Instant::now();
    fill(&pool, 0, blocks);
    pool.commit().unwrap();
    println!("fill: {blocks} mappings in {:.2?}", t.elapsed());
    pool.create_snap(1, 0).unwrap();
    pool.create_snap(2, 0).unwrap();
    let mut rng = Rng(0x0de1_7a5e_ed00_0001);
    pool.with_metadata(|md| {
        for _ in 0..changes {
            let d = md.alloc_data_block().unwrap();
            md.insert_mapping(0, rng.next() % blocks, d).unwrap();
        }
        let extent = 16.min(blocks);
        for _ in 0..changes.div_ceil(extent) {
            let start = rng.next() % (blocks - extent + 1);
            for vb in start..start + extent {
                let d = md.alloc_data_block().unwrap();
                md.insert_mapping(2, vb, d).unwrap();
            }
        }
    });
    pool.commit().unwrap();
    pool.reserve_metadata_snap().unwrap();
    pool.commit().unwrap();
    let st = pool.status();
    println!(
        "pool: {} devices, {} data blocks used, {} metadata blocks used",
        st.devices, st.usage.data_used, st.usage.metadata_used
    );
    drop(pool);

    let td = tool("thin_delta");
    let mut all_equal = true;
    for (a, b, what) in [
        (1, 0, "1% of blocks overwritten in the origin, scattered"),
        (1, 2, "1% of blocks overwritten in 16-block extents"),
    ] {
        println!();
        println!("delta --snap1 {a} --snap2 {b}: {blocks} mapped blocks, {what}");
        println!();
        println!("| what | time | tree nodes read | runs |");
        println!("|---|---|---|---|");
        let (d, exact) = best(repeat, || ours(&meta_path, a, b, false, DeltaMode::Exact));
        row(
            "vhost-thin, exact (thin_delta's runs)",
            d,
            Some(exact.nodes_read),
            exact.runs.len(),
        );
        let (d, changed) = best(repeat, || {
            ours(&meta_path, a, b, false, DeltaMode::ChangedOnly)
        });
        row(
            "vhost-thin, changed-only",
            d,
            Some(changed.nodes_read),
            changed.runs.len(),
        );
        let (d, (n, nodes)) = best(repeat, || simple_merge(&meta_path, a, b));
        row("simple merge of both trees (before)", d, Some(nodes), n);
        let (d, exact_m) = best(repeat, || ours(&meta_path, a, b, true, DeltaMode::Exact));
        row(
            "vhost-thin -m, exact",
            d,
            Some(exact_m.nodes_read),
            exact_m.runs.len(),
        );
        let want_changed: Vec<DeltaRun> = exact
            .runs
            .iter()
            .filter(|r| r.kind != DeltaKind::Same)
            .copied()
            .collect();
        all_equal &= changed.runs == want_changed && n == exact.runs.len();
        match &td {
            Some(td) => {
                let (d, xml) = best(repeat, || thin_delta(td, &meta_path, a, b, false));
                row("thin_delta 0.9.0", d, None, exact.runs.len());
                all_equal &= xml == exact.xml;
                let (d, xml) = best(repeat, || thin_delta(td, &meta_path, a, b, true));
                row("thin_delta 0.9.0 -m", d, None, exact_m.runs.len());
                all_equal &= xml == exact_m.xml;
            }
            None => println!("| thin_delta | not installed | | |"),
        }
    }
    println!();
    if all_equal {
        println!("outputs equal (exact XML = thin_delta's, live and -m; changed-only = exact minus same)");
    } else {
        println!("OUTPUTS DIFFER");
        std::process::exit(1);
    }
}
