//! Pools made by the Linux kernel's dm-thin target (see `tests/fixtures/*/README.md`):
//! we must open them, read every thin device exactly as the kernel did, check them
//! clean, dump them exactly as `thin_dump` did, and change them in ways the real
//! `thin_check` still accepts.
//!
//! The real tools are used when `/usr/sbin/thin_check` exists; without them those
//! steps are skipped with a notice, unless `VHOST_THIN_REQUIRE_TOOLS=1`.

mod common;
use common::{run_tool_on, tools_available, THIN_CHECK};
use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thinpool::check;
use thinpool::dump::dump;
use thinpool::pool::{Pool, PoolOptions};
use thinpool::storage::{MemStorage, Storage};

const THIN_DUMP: &str = "/usr/sbin/thin_dump";

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// Every fixture directory holding a kernel-made pool.
fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("metadata.bin.gz").exists())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 2,
        "expected the kernel fixtures in {:?}, found {dirs:?}",
        fixtures_dir()
    );
    dirs
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    out
}

struct Fixture {
    dir: PathBuf,
    metadata: Vec<u8>,
    data: Vec<u8>,
    /// dev id → (virtual size in bytes, sha256 of the full contents)
    devices: BTreeMap<u32, (u64, String)>,
}

fn load(dir: &Path) -> Fixture {
    let metadata = gunzip(&dir.join("metadata.bin.gz"));
    let data = gunzip(&dir.join("data.bin.gz"));
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    assert_eq!(metadata.len() as u64, expected["metadata_bytes"]);
    assert_eq!(data.len() as u64, expected["data_bytes"]);
    assert_eq!(hex(&Sha256::digest(&metadata)), expected["metadata_sha256"]);
    assert_eq!(hex(&Sha256::digest(&data)), expected["data_sha256"]);
    let mut devices = BTreeMap::new();
    for line in std::fs::read_to_string(dir.join("sha256.txt"))
        .unwrap()
        .lines()
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 3, "sha256.txt line {line:?}");
        let sectors: u64 = f[1].parse().unwrap();
        devices.insert(f[0].parse().unwrap(), (sectors * 512, f[2].to_string()));
    }
    assert!(!devices.is_empty());
    Fixture {
        dir: dir.to_path_buf(),
        metadata,
        data,
        devices,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const CHUNK: usize = 4 << 20;

/// sha256 of `size` bytes of device `dev`, read through [`Pool::read`] in chunks, with
/// `patch` applied to each chunk first (to compute what a device should hold).
fn device_sha(pool: &Pool, dev: u32, size: u64, patch: &mut dyn FnMut(u64, &mut [u8])) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        pool.read(dev, off, &mut buf[..n])
            .unwrap_or_else(|e| panic!("read of device {dev} at {off}: {e}"));
        patch(off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    hex(&h.finalize())
}

fn mem(bytes: &[u8]) -> Arc<MemStorage> {
    Arc::new(MemStorage::from_vec(bytes.to_vec()))
}

fn open(meta: &Arc<MemStorage>, data: &Arc<MemStorage>, read_only: bool) -> Pool {
    Pool::open(
        meta.clone() as Arc<dyn Storage>,
        data.clone() as Arc<dyn Storage>,
        PoolOptions {
            read_only,
            ..Default::default()
        },
    )
    .unwrap()
}

fn our_dump(pool: &Pool, metadata_snap: bool) -> String {
    let mut out = Vec::new();
    pool.with_metadata(|md| dump(md, metadata_snap, &mut out))
        .unwrap();
    String::from_utf8(out).unwrap()
}

fn assert_clean(meta: &Arc<MemStorage>, what: &str) -> check::CheckReport {
    let report = check::check(meta.clone() as Arc<dyn Storage>).unwrap();
    assert!(
        report.is_clean(),
        "{what}: our checker found errors: {:#?}",
        report.errors
    );
    report
}

#[test]
fn kernel_fixtures_read_check_and_dump_exactly() {
    for dir in fixture_dirs() {
        let fx = load(&dir);
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let thin_dump = std::fs::read_to_string(dir.join("thin_dump.xml")).unwrap();
        let snap_dump = std::fs::read_to_string(dir.join("thin_dump-metadata-snap.xml")).ok();
        for read_only in [false, true] {
            let meta = mem(&fx.metadata);
            let data = mem(&fx.data);
            let pool = open(&meta, &data, read_only);
            let what = format!("{name} (read_only={read_only})");
            assert_eq!(
                pool.devices().iter().map(|(id, _)| *id).collect::<Vec<_>>(),
                fx.devices.keys().copied().collect::<Vec<_>>(),
                "{what}: devices"
            );
            for (&dev, (size, sha)) in &fx.devices {
                assert_eq!(
                    &device_sha(&pool, dev, *size, &mut |_, _| {}),
                    sha,
                    "{what}: contents of device {dev}"
                );
            }
            let report = assert_clean(&meta, &what);
            assert_eq!(report.devices, fx.devices.len() as u64);
            assert_eq!(our_dump(&pool, false), thin_dump, "{what}: dump");
            match &snap_dump {
                Some(expected) => {
                    assert!(pool.status().held_metadata_root.is_some());
                    assert_eq!(&our_dump(&pool, true), expected, "{what}: dump -m");
                }
                None => assert!(pool.status().held_metadata_root.is_none()),
            }
            // Opening and reading changed nothing.
            drop(pool);
            assert!(meta.to_vec() == fx.metadata, "{what}: metadata was written");
        }
        if tools_available("the checks with the real tools") {
            // Our view of the fixture agrees with the real tools' (sanity for the
            // comparisons above: the recorded files are what thin_dump prints here).
            assert_eq!(run_tool_on(THIN_DUMP, &[], &fx.metadata, &name), thin_dump);
            run_tool_on(THIN_CHECK, &[], &fx.metadata, &name);
        }
        assert!(fx.dir.exists());
    }
}

/// The pool's space as the kernel's `dmsetup status` printed it while the pool was active
/// in the state the fixture's metadata holds (`pool-status-history.txt`: the last line
/// with a held metadata snapshot for a fixture that holds one, else the last without):
/// metadata used counts the blocks allocated plus the reserve dm-thin keeps back (a tenth
/// of the device, at most 4096 blocks), so that is what "used" means in our status too.
/// (`thin_check` 0.9's `METADATA_FREE_BLOCKS` is no guide: it prints the device's blocks
/// less one for every pool, these kernel-made ones included.)
#[test]
fn space_used_is_counted_as_the_kernel_counts_it() {
    for dir in fixture_dirs() {
        let fx = load(&dir);
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let history = std::fs::read_to_string(dir.join("pool-status-history.txt")).unwrap();
        let pool = open(&mem(&fx.metadata), &mem(&fx.data), true);
        let st = pool.status();
        let held = st.held_metadata_root.is_some();
        // "<phase>: 0 <len> thin-pool <trans> <meta used>/<total> <data used>/<total> <held> …"
        let line = history
            .lines()
            .rfind(|l| {
                l.split_whitespace()
                    .nth(7)
                    .is_some_and(|h| (h != "-") == held)
            })
            .unwrap_or_else(|| panic!("{name}: no status line for held={held}"));
        let f: Vec<&str> = line.split_whitespace().collect();
        let ratio = |s: &str| -> (u64, u64) {
            let (a, b) = s.split_once('/').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        };
        let u = &st.usage;
        assert_eq!(
            (u.metadata_used, u.metadata_blocks),
            ratio(f[5]),
            "{name}: metadata used/total against the kernel's {line:?}"
        );
        assert_eq!(
            (u.data_used, u.data_blocks),
            ratio(f[6]),
            "{name}: data used/total against the kernel's {line:?}"
        );
        assert_eq!(u.metadata_used, u.metadata_allocated + u.metadata_reserve);
    }
}

/// A write made by the test: device, byte offset, bytes.
type Write = (u32, u64, Vec<u8>);

/// Applies the writes to device `dev` that overlap the chunk at `off`.
fn apply(writes: &[Write], dev: u32, off: u64, buf: &mut [u8]) {
    let end = off + buf.len() as u64;
    for (d, w_off, bytes) in writes {
        let w_end = w_off + bytes.len() as u64;
        if *d != dev || w_end <= off || *w_off >= end {
            continue;
        }
        let lo = (*w_off).max(off);
        let hi = w_end.min(end);
        buf[(lo - off) as usize..(hi - off) as usize]
            .copy_from_slice(&bytes[(lo - w_off) as usize..(hi - w_off) as usize]);
    }
}

fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| tag.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

#[test]
fn kernel_pool_changed_by_us_stays_valid() {
    let fx = load(&fixtures_dir().join("dm-thin-kernel-clean"));
    const BS: u64 = 64 * 1024;
    // The original pool, on copies of its own, as the reference for expected contents.
    let orig = open(&mem(&fx.metadata), &mem(&fx.data), true);
    let meta = mem(&fx.metadata);
    let data = mem(&fx.data);
    let pool = open(&meta, &data, false);

    // Device 3 (snapshot of 1, sharing blocks with 0 and 1) and device 0: writes into
    // shared blocks (copy), into blocks the device owns alone (in place), into unmapped
    // blocks (provision), across block boundaries and unaligned.
    let mut writes: Vec<Write> = vec![
        (3, 100, pattern(1, 5000)),             // block 0: shared with 1 (data 13)
        (3, 2 * BS - 7, pattern(2, 20)),        // blocks 1-2: shared with 0 and 1
        (3, 800 * BS + 4096, pattern(3, 4096)), // its own block (data 22)
        (3, 5000 * BS, pattern(4, 3 * BS as usize)), // unmapped
        (0, 0, pattern(5, BS as usize)),        // whole shared block, no copy needed
        (0, 4094 * BS + 10, pattern(6, 10)),    // shared by 0, 1 and 3
        (0, 3200 * BS + 512, pattern(7, 512)),  // its own block
        (0, 100 * BS, pattern(8, 70_000)),      // unmapped, two blocks
    ];
    for (dev, off, bytes) in &writes {
        pool.write(*dev, *off, bytes).unwrap();
    }
    // Snapshot of the changed device 3, then more writes to 3 that 5 must not see.
    pool.create_snap(5, 3).unwrap();
    let size3 = fx.devices[&3].0;
    let writes_before_snap = writes.clone();
    let later: Vec<Write> = vec![
        (3, 100 * BS, pattern(9, 1000)),
        (3, 0, pattern(10, 64)),
        (5, 2048 * BS + 1, pattern(11, 33)),
    ];
    for (dev, off, bytes) in &later {
        pool.write(*dev, *off, bytes).unwrap();
    }
    writes.extend(later.iter().filter(|w| w.0 != 5).cloned());
    pool.delete(1).unwrap();
    pool.commit().unwrap();
    drop(pool);

    assert_clean(&meta, "changed kernel pool");
    if tools_available("the checks with the real tools") {
        let image = meta.to_vec();
        let what = "the changed kernel pool";
        run_tool_on(THIN_CHECK, &[], &image, what);
        // And the real thin_dump sees what we see.
        let reopened = open(&meta, &data, true);
        assert_eq!(
            run_tool_on(THIN_DUMP, &[], &image, what),
            our_dump(&reopened, false)
        );
    }

    // Contents after a fresh open: the changed devices hold the reference contents plus
    // the writes; the snapshot holds 3 as it was plus its own write; 2 is untouched.
    let pool = open(&meta, &data, false);
    assert_eq!(
        pool.devices().iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![0, 2, 3, 5]
    );
    assert!(pool.device(1).is_err());
    for dev in [0u32, 3] {
        let size = fx.devices[&dev].0;
        let want = device_sha(&orig, dev, size, &mut |off, buf| {
            apply(&writes, dev, off, buf)
        });
        assert_eq!(
            device_sha(&pool, dev, size, &mut |_, _| {}),
            want,
            "device {dev}"
        );
    }
    let snap_later: Vec<Write> = later
        .iter()
        .filter(|w| w.0 == 5)
        .map(|w| (3, w.1, w.2.clone()))
        .collect();
    let want5 = device_sha(&orig, 3, size3, &mut |off, buf| {
        apply(&writes_before_snap, 3, off, buf);
        apply(&snap_later, 3, off, buf);
    });
    assert_eq!(
        device_sha(&pool, 5, size3, &mut |_, _| {}),
        want5,
        "device 5"
    );
    let (size2, sha2) = &fx.devices[&2];
    assert_eq!(&device_sha(&pool, 2, *size2, &mut |_, _| {}), sha2);
}

/// Our delta of the kernel-made pools equals the `thin_delta` output recorded with them
/// (live trees; the held-snap pool prints its held root), and `thin_delta -m` run now.
#[test]
fn delta_equals_thin_delta() {
    for dir in fixture_dirs() {
        let f = load(&dir);
        let meta = mem(&f.metadata);
        let data = mem(&f.data);
        let pool = open(&meta, &data, true);
        for (a, b) in [(0u32, 1u32), (1, 3)] {
            let want =
                std::fs::read_to_string(dir.join(format!("thin_delta-{a}-{b}.xml"))).unwrap();
            let got = pool.with_metadata(|md| {
                let runs = thinpool::delta::delta(md, a, b, false).unwrap();
                let mut out = Vec::new();
                thinpool::delta::write_xml(md, a, b, false, &runs, &mut out).unwrap();
                String::from_utf8(out).unwrap()
            });
            assert_eq!(got, want, "{}: delta {a} {b}", dir.display());
        }
        let held = pool.with_metadata(|md| md.held_root());
        if held.is_some() && tools_available("thin_delta -m") {
            let want = run_tool_on(
                "/usr/sbin/thin_delta",
                &["-m", "--snap1", "0", "--snap2", "1"],
                &f.metadata,
                &dir.display().to_string(),
            );
            let got = pool.with_metadata(|md| {
                let runs = thinpool::delta::delta(md, 0, 1, true).unwrap();
                let mut out = Vec::new();
                thinpool::delta::write_xml(md, 0, 1, true, &runs, &mut out).unwrap();
                String::from_utf8(out).unwrap()
            });
            assert_eq!(got, want, "{}: delta -m 0 1", dir.display());
        }
    }
}
