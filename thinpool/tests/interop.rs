//! Interoperability with the real thin-provisioning-tools 0.9.0 (`thin_check`,
//! `thin_dump`, `thin_restore`, `thin_delta`, `thin_ls` in /usr/sbin): pools we make
//! must pass their checks and dump exactly as we dump them; metadata they make must
//! open, check clean and read back in our engine.
//!
//! Without `/usr/sbin/thin_check` every test prints a notice and passes, unless
//! `VHOST_THIN_REQUIRE_TOOLS=1`, which makes a missing tool a failure.

mod common;
use common::{run_tool, tools_available, Rng};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thinpool::check;
use thinpool::dump::{dump, restore};
use thinpool::pool::{Pool, PoolOptions};
use thinpool::storage::{FileStorage, Storage};
use thinpool::thin::device::Mapping;
use thinpool::thin::metadata::{MetadataOptions, ThinMetadata};
use thinpool::xml::{self, ParsedDump};

const BS: u64 = 64 * 1024;
const BLOCK_SECTORS: u32 = 128;

/// Runs a tool of /usr/sbin that must succeed; returns its stdout.
fn tool(tool: &str, args: &[&str]) -> String {
    run_tool(tool, args)
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn thin_check(meta: &Path) {
    tool("thin_check", &[path_str(meta)]);
}

fn thin_dump(meta: &Path, metadata_snap: bool) -> String {
    if metadata_snap {
        tool("thin_dump", &["-m", path_str(meta)])
    } else {
        tool("thin_dump", &[path_str(meta)])
    }
}

fn our_dump(md: &mut ThinMetadata, metadata_snap: bool) -> String {
    let mut out = Vec::new();
    dump(md, metadata_snap, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn pool_dump(pool: &Pool, metadata_snap: bool) -> String {
    pool.with_metadata(|md| our_dump(md, metadata_snap))
}

/// Compares two dumps, reporting the first line that differs (dumps are long).
fn assert_same_dump(ours: &str, theirs: &str, what: &str) {
    if ours == theirs {
        return;
    }
    for (i, (o, t)) in ours.lines().zip(theirs.lines()).enumerate() {
        assert_eq!(o, t, "{what}: line {} differs (ours, theirs)", i + 1);
    }
    panic!(
        "{what}: ours has {} lines, theirs {} (or the final newline differs)",
        ours.lines().count(),
        theirs.lines().count()
    );
}

fn assert_clean(meta: &Path, what: &str) -> check::CheckReport {
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open_read_only(meta).unwrap());
    let report = check::check(storage).unwrap();
    assert!(
        report.is_clean(),
        "{what}: our checker found errors: {:#?}",
        report.errors
    );
    report
}

fn file(path: &Path, len: u64) -> Arc<dyn Storage> {
    Arc::new(FileStorage::create(path, len).unwrap())
}

fn open_file(path: &Path) -> Arc<dyn Storage> {
    Arc::new(FileStorage::open(path).unwrap())
}

/// A new pool on the files `metadata` and `data` in `dir`, of these sizes in bytes, with
/// data blocks of `sectors` sectors and block zeroing off (a 512-byte write provisions a
/// block and leaves the data file sparse). Returns the pool and the two paths.
fn files_pool(
    dir: &Path,
    meta_bytes: u64,
    data_bytes: u64,
    sectors: u32,
) -> (Pool, PathBuf, PathBuf) {
    let meta = dir.join("metadata");
    let data = dir.join("data");
    let pool = Pool::create(
        file(&meta, meta_bytes),
        file(&data, data_bytes),
        sectors,
        PoolOptions {
            skip_block_zeroing: true,
            ..Default::default()
        },
    )
    .unwrap();
    (pool, meta, data)
}

/// Writes a 512-byte tag at the start of virtual block `vb` (block zeroing is off, so
/// this provisions a block while writing only 512 bytes to the sparse data file).
fn touch(pool: &Pool, dev: u32, vb: u64, tag: u64) {
    let mut buf = [0u8; 512];
    buf[..8].copy_from_slice(&tag.to_le_bytes());
    buf[8..12].copy_from_slice(&dev.to_le_bytes());
    pool.write(dev, vb * BS, &buf).unwrap();
}

struct Built {
    _dir: tempfile::TempDir,
    meta: PathBuf,
    data: PathBuf,
    pool: Pool,
}

/// A pool on files, filled by our engine: several devices, snapshots of snapshots,
/// deletes, discards, thousands of mappings (internal nodes in the bottom-level trees),
/// hundreds of devices (internal nodes in the top-level and details trees), and a held
/// metadata snapshot older than the last changes. Committed.
fn build_pool() -> Built {
    let dir = tempfile::tempdir().unwrap();
    let (pool, meta, data) = files_pool(dir.path(), 16 << 20, 16384 * BS, BLOCK_SECTORS);
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut tag = 0u64;
    let mut t = |pool: &Pool, dev: u32, vb: u64| {
        tag += 1;
        touch(pool, dev, vb, tag);
    };

    // Device 0: long runs (range mappings) and scattered blocks (single mappings).
    pool.create_thin(0).unwrap();
    for vb in 0..1500 {
        t(&pool, 0, vb);
    }
    for _ in 0..1500 {
        let vb = 2000 + rng.below(1 << 20);
        t(&pool, 0, vb);
    }
    pool.commit().unwrap();
    // Time 1: snapshot; both sides diverge (copies of shared blocks).
    pool.create_snap(1, 0).unwrap();
    for vb in (0..1500).step_by(3) {
        t(&pool, 0, vb);
    }
    for vb in (1..1500).step_by(5) {
        t(&pool, 1, vb);
    }
    // Time 2: a snapshot of the snapshot, written too.
    pool.create_snap(2, 1).unwrap();
    for _ in 0..400 {
        let vb = rng.below(1600);
        t(&pool, 2, vb);
    }
    // An unrelated device, a snapshot of it, and the origin deleted.
    pool.create_thin(3).unwrap();
    for _ in 0..2000 {
        let vb = rng.below(1 << 30);
        t(&pool, 3, vb);
    }
    pool.create_snap(4, 3).unwrap();
    for _ in 0..100 {
        let vb = rng.below(1 << 30);
        t(&pool, 4, vb);
    }
    pool.delete(3).unwrap();
    // Discards: whole blocks of a run, partial blocks (ignored), a shared range.
    pool.discard(0, 100 * BS, 200 * BS).unwrap();
    pool.discard(0, 700 * BS + 100, 3 * BS).unwrap();
    pool.discard(1, 1000 * BS, 300 * BS).unwrap();
    pool.discard(4, 0, (1 << 26) * BS).unwrap();
    // Many empty devices: multi-level top-level mapping and details trees.
    for id in 1000..1300 {
        pool.create_thin(id).unwrap();
    }
    pool.set_transaction_id(0, 7).unwrap();
    pool.commit().unwrap();
    // The held metadata snapshot, then more changes it must not see.
    pool.reserve_metadata_snap().unwrap();
    pool.create_snap(5, 2).unwrap();
    for vb in 0..300 {
        t(&pool, 0, vb * 7);
    }
    for _ in 0..300 {
        let vb = rng.below(1600);
        t(&pool, 5, vb);
    }
    pool.delete(1).unwrap();
    for id in (1000..1300).step_by(2) {
        pool.delete(id).unwrap();
    }
    pool.discard(2, 0, 50 * BS).unwrap();
    pool.set_transaction_id(7, 8).unwrap();
    pool.commit().unwrap();
    Built {
        _dir: dir,
        meta,
        data,
        pool,
    }
}

#[test]
fn our_pool_passes_the_real_tools() {
    if !tools_available("the interoperability test") {
        return;
    }
    let b = build_pool();
    let report = assert_clean(&b.meta, "our pool");
    assert!(report.mappings > 5000, "{} mappings", report.mappings);
    let status = b.pool.status();
    assert!(status.held_metadata_root.is_some());

    // (1) thin_check, of the live metadata and of the metadata snapshot.
    thin_check(&b.meta);
    tool("thin_check", &["-m", path_str(&b.meta)]);

    // (2) thin_dump and thin_dump -m print exactly what we print.
    let theirs = thin_dump(&b.meta, false);
    assert_same_dump(&pool_dump(&b.pool, false), &theirs, "thin_dump");
    let theirs_snap = thin_dump(&b.meta, true);
    assert_same_dump(&pool_dump(&b.pool, true), &theirs_snap, "thin_dump -m");
    assert_ne!(theirs, theirs_snap);
    // The dumps really have multi-level trees' worth of content.
    let parsed = xml::parse(&theirs).unwrap();
    assert!(parsed.devices.len() > 150);
    assert!(parsed.devices.iter().any(|d| d.block_count() > 1000));

    // (4) thin_delta and thin_ls run on our pool, live and on the snapshot.
    let m = path_str(&b.meta);
    let delta = tool("thin_delta", &["--snap1", "0", "--snap2", "5", m]);
    assert!(delta.contains("<diff left=\"0\" right=\"5\">"), "{delta}");
    tool("thin_delta", &["--snap1", "2", "--snap2", "4", m]);
    tool("thin_delta", &["-m", "--snap1", "0", "--snap2", "1", m]);
    let ls = tool("thin_ls", &[m]);
    assert!(ls.trim_start().starts_with("DEV "), "{ls}");
    assert_eq!(ls.lines().count(), 1 + parsed.devices.len(), "{ls}");
    tool("thin_ls", &["-m", m]);

    // (5) Our restore of thin_dump's XML passes thin_check and dumps identically.
    let dir = tempfile::tempdir().unwrap();
    let restored = dir.path().join("restored");
    let mut md = restore(
        &parsed,
        file(&restored, 16 << 20),
        MetadataOptions::default(),
    )
    .unwrap();
    assert_same_dump(&our_dump(&mut md, false), &theirs, "restored, our dump");
    drop(md);
    thin_check(&restored);
    assert_clean(&restored, "our restore");
    assert_same_dump(&thin_dump(&restored, false), &theirs, "restored, thin_dump");
    // The held snapshot's dump restores too, given the pool's real data size.
    let mut snap = xml::parse(&theirs_snap).unwrap();
    assert_eq!(snap.superblock.nr_data_blocks, 0);
    snap.superblock.nr_data_blocks = parsed.superblock.nr_data_blocks;
    let restored_snap = dir.path().join("restored-snap");
    drop(restore(&snap, file(&restored_snap, 16 << 20), Default::default()).unwrap());
    thin_check(&restored_snap);
    assert_same_dump(
        &thin_dump(&restored_snap, false),
        &snap.to_xml_string().unwrap(),
        "restored snapshot, thin_dump",
    );

    // Data device untouched by any of this; the pool still reads what was written.
    drop(b.pool);
    let pool = Pool::open(open_file(&b.meta), open_file(&b.data), Default::default()).unwrap();
    let mut buf = [0u8; 12];
    pool.read(4, 0, &mut buf).unwrap();
}

/// A hand-made dump: multi-level trees, runs and singles, data blocks shared by several
/// devices, extreme virtual blocks, device ids and times.
fn hand_made_dump() -> String {
    let nr_data_blocks = 40_000u64;
    let mut rng = Rng(0xfeed_beef_0000_0001);
    let mut s = format!("<superblock uuid=\"\" time=\"9\" transaction=\"123456789\" flags=\"0\" version=\"2\" data_block_size=\"{BLOCK_SECTORS}\" nr_data_blocks=\"{nr_data_blocks}\">\n");
    // Shared pool of data blocks 0..5000 used by several devices; private ones above.
    let mut next_private = 5000u64;
    for (dev, n) in [
        (0u32, 3000u64),
        (1, 2500),
        (7, 40),
        (4242, 1),
        (16_777_000, 0),
        (16_777_215, 700),
    ] {
        let mut lines = String::new();
        let mut vb = if dev == 16_777_215 {
            (1u64 << 40) - 10_000
        } else {
            0
        };
        let mut count = 0u64;
        while count < n {
            let len = if rng.below(4) == 0 {
                1 + rng.below(20).min(n - count - 1)
            } else {
                1
            };
            let shared = rng.below(3) == 0;
            let data = if shared {
                rng.below(5000 - len)
            } else {
                let d = next_private;
                next_private += len + rng.below(2);
                d
            };
            let time = if shared { rng.below(3) } else { rng.below(10) };
            if len == 1 {
                lines.push_str(&format!("    <single_mapping origin_block=\"{vb}\" data_block=\"{data}\" time=\"{time}\"/>\n"));
            } else {
                lines.push_str(&format!("    <range_mapping origin_begin=\"{vb}\" data_begin=\"{data}\" length=\"{len}\" time=\"{time}\"/>\n"));
            }
            count += len;
            vb += len + 1 + rng.below(3);
        }
        s.push_str(&format!("  <device dev_id=\"{dev}\" mapped_blocks=\"{n}\" transaction=\"{}\" creation_time=\"{}\" snap_time=\"9\">\n", dev % 5, dev % 9));
        s.push_str(&lines);
        s.push_str("  </device>\n");
    }
    s.push_str("</superblock>\n");
    assert!(next_private < nr_data_blocks);
    s
}

/// `thin_restore` of `xml_text` into a fresh file; checks it in our engine (clean, every
/// mapping reads back, identical dump), then changes it through a pool and has
/// `thin_check` accept the result.
fn thin_restore_then_use(xml_text: &str, what: &str) {
    let parsed: ParsedDump = xml::parse(xml_text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("dump.xml");
    std::fs::write(&input, xml_text).unwrap();
    let meta = dir.path().join("metadata");
    drop(file(&meta, 16 << 20));
    tool(
        "thin_restore",
        &["-i", path_str(&input), "-o", path_str(&meta)],
    );
    thin_check(&meta);

    let report = assert_clean(&meta, what);
    assert_eq!(report.devices, parsed.devices.len() as u64, "{what}");
    let mut md = ThinMetadata::open(
        open_file(&meta),
        MetadataOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut total = 0u64;
    for dev in &parsed.devices {
        let id = dev.device.dev_id;
        let d = md.device(id).unwrap();
        assert_eq!(
            d.mapped_blocks, dev.device.mapped_blocks,
            "{what}: device {id}"
        );
        assert_eq!(
            d.transaction_id, dev.device.transaction,
            "{what}: device {id}"
        );
        assert_eq!(
            d.creation_time, dev.device.creation_time,
            "{what}: device {id}"
        );
        assert_eq!(
            d.snapshotted_time, dev.device.snap_time,
            "{what}: device {id}"
        );
        for m in dev.mappings() {
            assert_eq!(
                md.lookup(id, m.vblock).unwrap(),
                Some(Mapping {
                    data_block: m.data_block,
                    time: m.time
                }),
                "{what}: device {id} virtual block {}",
                m.vblock
            );
            total += 1;
        }
    }
    assert_eq!(report.mappings, total, "{what}");
    assert_eq!(md.transaction_id(), parsed.superblock.transaction);
    assert_eq!(md.time(), parsed.superblock.time);
    assert_same_dump(
        &our_dump(&mut md, false),
        &parsed.to_xml_string().unwrap(),
        &format!("{what}: our dump of thin_restore's metadata"),
    );
    drop(md);

    // Changes through our pool keep it valid for thin_check.
    let data = dir.path().join("data");
    drop(file(&data, parsed.superblock.nr_data_blocks * BS));
    let pool = Pool::open(open_file(&meta), open_file(&data), Default::default()).unwrap();
    let ids: Vec<u32> = parsed.devices.iter().map(|d| d.device.dev_id).collect();
    let first = ids[0];
    let mut rng = Rng(0x1234);
    for i in 0..200 {
        let dev = ids[i % ids.len()];
        // Rewrite some mapped blocks (shared ones get copied), provision new ones.
        let vb = match parsed.devices[i % ids.len()].mappings().nth(i) {
            Some(m) => m.vblock,
            None => rng.below(1 << 20),
        };
        pool.write(dev, vb * BS + 512, &[i as u8; 1024]).unwrap();
    }
    pool.create_snap(99, first).unwrap();
    pool.write(99, 0, &[1u8; 4096]).unwrap();
    pool.delete(first).unwrap();
    pool.commit().unwrap();
    pool.reserve_metadata_snap().unwrap();
    pool.discard(99, 0, 100 * BS).unwrap();
    pool.commit().unwrap();
    drop(pool);
    thin_check(&meta);
    tool("thin_check", &["-m", path_str(&meta)]);
    assert_clean(&meta, &format!("{what}, changed"));
    let mut md = ThinMetadata::open(open_file(&meta), Default::default()).unwrap();
    assert_same_dump(
        &our_dump(&mut md, false),
        &thin_dump(&meta, false),
        &format!("{what}, changed: dump"),
    );
    assert_same_dump(
        &our_dump(&mut md, true),
        &thin_dump(&meta, true),
        &format!("{what}, changed: dump -m"),
    );
}

#[test]
fn thin_restore_output_works_in_our_engine() {
    if !tools_available("the interoperability test") {
        return;
    }
    // (3) Our own dump of a pool ...
    let b = build_pool();
    let ours = pool_dump(&b.pool, false);
    drop(b);
    thin_restore_then_use(&ours, "our dump");
    // ... and a hand-made one.
    thin_restore_then_use(&hand_made_dump(), "hand-made dump");
    // The hand-made one through our restore, for the real tools.
    let text = hand_made_dump();
    let parsed = xml::parse(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("metadata");
    drop(restore(&parsed, file(&meta, 16 << 20), Default::default()).unwrap());
    thin_check(&meta);
    assert_same_dump(
        &thin_dump(&meta, false),
        &parsed.to_xml_string().unwrap(),
        "hand-made dump, our restore",
    );
}

/// Space maps with several bitmaps (data blocks and metadata blocks beyond the first
/// bitmap's 16320 in use), reference counts of 3 and more (overflow trees), many
/// commits: still what the real tools accept and print.
#[test]
fn large_pool_with_several_bitmaps_passes_the_real_tools() {
    if !tools_available("the interoperability test") {
        return;
    }
    const BITMAP: u64 = 16320;
    let dir = tempfile::tempdir().unwrap();
    let (pool, meta, _data) = files_pool(
        dir.path(),
        (BITMAP + 3000) * 4096,
        (2 * BITMAP + 5000) * BS,
        BLOCK_SECTORS,
    );
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut tag = 0u64;
    pool.create_thin(0).unwrap();
    for vb in 0..6000 {
        tag += 1;
        touch(&pool, 0, vb, tag);
    }
    pool.commit().unwrap();
    // Three generations sharing the first 6000 blocks (counts of 3 and 4).
    pool.create_snap(1, 0).unwrap();
    pool.create_snap(2, 1).unwrap();
    pool.create_snap(3, 2).unwrap();
    let mut round = 0u32;
    let mut more_metadata = false;
    while pool.status().usage.data_used < BITMAP + 4000 || !more_metadata {
        round += 1;
        assert!(round < 2000, "never got past the first bitmaps");
        for _ in 0..100 {
            let dev = rng.below(4) as u32;
            let vb = if rng.below(2) == 0 {
                rng.below(6000)
            } else {
                6000 + rng.below(1 << 24)
            };
            tag += 1;
            touch(&pool, dev, vb, tag);
        }
        pool.commit().unwrap();
        more_metadata = pool.with_metadata(|md| {
            let sm = &md.tm().meta_sm;
            (BITMAP..sm.nr_blocks()).any(|b| sm.get(b).unwrap_or(0) > 0)
        });
    }
    eprintln!(
        "rounds: {round}, data used {}",
        pool.status().usage.data_used
    );
    let overflowing =
        pool.with_metadata(|md| (0..BITMAP).any(|b| md.data_block_count(b).unwrap_or(0) >= 3));
    assert!(overflowing, "no data block with a count of 3 or more");
    pool.reserve_metadata_snap().unwrap();
    pool.delete(1).unwrap();
    for _ in 0..500 {
        tag += 1;
        touch(&pool, 3, rng.below(6000), tag);
    }
    pool.discard(2, 0, 3000 * BS).unwrap();
    pool.commit().unwrap();

    let report = assert_clean(&meta, "large pool");
    assert!(report.data_blocks_used > BITMAP, "{report:?}");
    thin_check(&meta);
    tool("thin_check", &["-m", path_str(&meta)]);
    let theirs = thin_dump(&meta, false);
    assert_same_dump(&pool_dump(&pool, false), &theirs, "large pool: thin_dump");
    assert_same_dump(
        &pool_dump(&pool, true),
        &thin_dump(&meta, true),
        "large pool: thin_dump -m",
    );
    // Our restore of it is accepted as well.
    let restored = dir.path().join("restored");
    let parsed = xml::parse(&theirs).unwrap();
    drop(
        restore(
            &parsed,
            file(&restored, (BITMAP + 3000) * 4096),
            Default::default(),
        )
        .unwrap(),
    );
    thin_check(&restored);
    assert_same_dump(&thin_dump(&restored, false), &theirs, "large pool restored");
}

/// A pool whose data device grows (across a bitmap boundary, to an odd size), with a
/// larger data block size, and whose metadata snapshot is released: all still valid.
#[test]
fn grown_pool_and_released_snapshot_pass_the_real_tools() {
    if !tools_available("the interoperability test") {
        return;
    }
    const SECTORS: u32 = 1024;
    let bs = SECTORS as u64 * 512;
    let dir = tempfile::tempdir().unwrap();
    let (pool, meta, data) = files_pool(dir.path(), 8 << 20, 1001 * bs, SECTORS);
    let opts = PoolOptions {
        skip_block_zeroing: true,
        ..Default::default()
    };
    pool.create_thin(5).unwrap();
    for vb in 0..1001 {
        pool.write(5, vb * bs, &[vb as u8; 512]).unwrap();
    }
    assert!(
        pool.write(5, 2000 * bs, &[1; 512]).is_err(),
        "pool should be full"
    );
    pool.commit().unwrap();
    pool.reserve_metadata_snap().unwrap();
    drop(pool);
    thin_check(&meta);

    // Grow the data device to an odd size past the first bitmap; the pool puts it to use.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(17_001 * bs)
        .unwrap();
    let pool = Pool::open(open_file(&meta), open_file(&data), opts).unwrap();
    assert_eq!(pool.grow_data().unwrap(), 17_001);
    assert_eq!(pool.status().usage.data_blocks, 17_001);
    pool.create_snap(6, 5).unwrap();
    // 20 shared blocks broken (copied), then new blocks until the pool is full.
    for vb in (0..20).chain(1001..16_981) {
        pool.write(6, vb * bs + 512, &[2; 512]).unwrap();
    }
    pool.commit().unwrap();
    assert_eq!(pool.status().usage.data_used, 17_001);
    thin_check(&meta);
    assert_same_dump(
        &pool_dump(&pool, false),
        &thin_dump(&meta, false),
        "grown pool",
    );
    assert_same_dump(
        &pool_dump(&pool, true),
        &thin_dump(&meta, true),
        "grown pool -m",
    );
    // Release the metadata snapshot and free space: still valid, and no snapshot left.
    pool.release_metadata_snap().unwrap();
    pool.delete(5).unwrap();
    pool.discard(6, 0, 5000 * bs).unwrap();
    pool.commit().unwrap();
    thin_check(&meta);
    assert!(!common::tool_output("thin_dump", &["-m", path_str(&meta)])
        .status
        .success());
    assert_same_dump(
        &pool_dump(&pool, false),
        &thin_dump(&meta, false),
        "released",
    );
    assert_clean(&meta, "grown pool");
}

/// A freshly formatted pool, an empty device, and the NEEDS_CHECK flag.
#[test]
fn fresh_pool_and_needs_check_flag_match_the_real_tools() {
    if !tools_available("the interoperability test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // (Block zeroing off, as everywhere here: nothing is written to the data device.)
    let (pool, meta, _data) = files_pool(dir.path(), 4 << 20, 100 * BS, BLOCK_SECTORS);
    thin_check(&meta);
    assert_same_dump(&pool_dump(&pool, false), &thin_dump(&meta, false), "fresh");
    pool.create_thin(0).unwrap();
    pool.commit().unwrap();
    thin_check(&meta);
    assert_same_dump(
        &pool_dump(&pool, false),
        &thin_dump(&meta, false),
        "empty device",
    );
    pool.with_metadata(|md| md.write_needs_check(true)).unwrap();
    let theirs = thin_dump(&meta, false);
    assert!(theirs.contains(" flags=\"1\" "), "{theirs}");
    assert_same_dump(&pool_dump(&pool, false), &theirs, "needs_check");
    // A uuid is stored but, as with thin_restore's, never printed by thin_dump 0.9.0.
    let text = "<superblock uuid=\"abc\" time=\"0\" transaction=\"0\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"10\">\n</superblock>\n";
    let restored = dir.path().join("restored");
    let mut md = restore(
        &xml::parse(text).unwrap(),
        file(&restored, 4 << 20),
        Default::default(),
    )
    .unwrap();
    assert_eq!(&md.superblock().uuid[..4], b"abc\0");
    let theirs = thin_dump(&restored, false);
    assert_eq!(theirs, text.replacen("abc", "", 1));
    assert_same_dump(&our_dump(&mut md, false), &theirs, "uuid");
}

/// Our delta equals `thin_delta` (live, and `-m` on the held metadata snapshot) on a pool
/// made by a random workload: many snapshots, snapshots of snapshots, discards, deletes.
#[test]
fn delta_equals_thin_delta_on_random_pools() {
    if !tools_available("the delta comparison") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta");
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::create(&path, 16 << 20).unwrap());
    let mut md = ThinMetadata::format(storage, 128, 60_000, MetadataOptions::default()).unwrap();
    let mut rng = Rng(0x5eed);
    md.create_thin(0).unwrap();
    let mut ids = vec![0u32];
    let write = |md: &mut ThinMetadata, id: u32, rng: &mut Rng| {
        let start = rng.below(3000);
        for vb in start..start + 1 + rng.below(40) {
            let d = md.alloc_data_block().unwrap();
            md.insert_mapping(id, vb, d).unwrap();
        }
    };
    for _ in 0..40 {
        write(&mut md, 0, &mut rng);
    }
    for step in 0..300u32 {
        let id = ids[rng.below(ids.len() as u64) as usize];
        match rng.below(10) {
            0 | 1 if ids.len() < 30 => {
                let new = 100 + step;
                md.create_snap(new, id).unwrap();
                ids.push(new);
            }
            2 => {
                let b = rng.below(3000);
                md.remove_range(id, b, b + rng.below(60)).unwrap();
            }
            3 if ids.len() > 3 && id != 0 => {
                md.delete(id).unwrap();
                ids.retain(|&x| x != id);
            }
            _ => write(&mut md, id, &mut rng),
        }
        if step == 200 {
            md.reserve_metadata_snap().unwrap();
        }
    }
    md.commit().unwrap();
    let m = path.to_str().unwrap();
    let snap_ids: Vec<u32> = {
        let snap = md.metadata_snap().unwrap();
        let mut v = Vec::new();
        for &id in &ids {
            if thinpool::pdata::btree::lookup_u64(
                md.tm(),
                snap.mapping_root,
                id as u64,
                thinpool::pdata::btree::ValueKind::Subtree,
            )
            .unwrap()
            .is_some()
            {
                v.push(id);
            }
        }
        v
    };
    let mut compared = 0;
    for (pair, live) in ids
        .windows(2)
        .map(|w| (w, true))
        .chain(snap_ids.windows(2).map(|w| (w, false)))
    {
        let (a, b) = (pair[0], pair[1]);
        let (sa, sb) = (a.to_string(), b.to_string());
        let mut args = vec!["--snap1", sa.as_str(), "--snap2", sb.as_str(), m];
        if !live {
            args.insert(0, "-m");
        }
        let want = tool("thin_delta", &args);
        let runs = thinpool::delta::delta(&mut md, a, b, !live).unwrap();
        let mut got = Vec::new();
        thinpool::delta::write_xml(&mut md, a, b, !live, &runs, &mut got).unwrap();
        assert_eq!(
            String::from_utf8(got).unwrap(),
            want,
            "delta {a} {b} (live: {live})"
        );
        compared += 1;
    }
    assert!(compared >= 10, "only {compared} pairs compared");
}
