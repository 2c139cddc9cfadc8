//! A send/receive stream from an untrusted sender: the bytes are received into a small
//! pool in memory (`thinpool::stream::receive`, what `vhost-thin receive` and the daemon's
//! receive and migration jobs call), through the format's reader and the receiver's writes
//! into the pool. No input may panic; errors are expected, and each must leave the pool as
//! the receive promises: a failed receive leaves nothing behind, an interrupted resumable
//! one keeps its device until it is aborted, and the metadata stays consistent throughout.
//!
//! The pool holds a disk and a snapshot of it, `base`, with the guid the incremental seeds
//! in corpus/stream/ build on (they are made by `write_fuzz_seeds` in
//! thinpool/src/stream/tests.rs, with the same guid and size). An input that fails is
//! received a second time with its checksums recomputed, so that mutations reach past them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use thinpool::catalog::{Catalog, CatalogError};
use thinpool::pool::{Pool, PoolOptions};
use thinpool::registry::{DeviceEntry, Registry};
use thinpool::storage::MemStorage;
use thinpool::stream::format::{MAGIC, MAX_DATA, MAX_HEADER};
use thinpool::stream::{abort, receive, ReceiveError, ReceiveOptions, StreamError};

/// The guid and size of the base snapshot the incremental seeds were sent on top of.
const BASE_GUID: &str = "0123456789abcdef0123456789abcdef";
const BASE_SIZE: u64 = 1 << 20;
/// 64 KiB blocks, 16 of them: the smallest metadata device the format allows, and a data
/// device small enough that a stream can fill it (out of space is a path to take too).
const BLOCK_SECTORS: u32 = 128;
const DATA_BYTES: u64 = 16 << 16;
const METADATA_BYTES: u64 = 512 * 4096;

struct Fixture {
    cat: Catalog,
    meta: Arc<MemStorage>,
}

fn fixture(dir: &Path) -> Fixture {
    let meta = Arc::new(MemStorage::new(METADATA_BYTES));
    let data = Arc::new(MemStorage::new(DATA_BYTES));
    let pool =
        Pool::create(meta.clone(), data, BLOCK_SECTORS, PoolOptions::default()).expect("a pool");
    let cat = Catalog::new(
        Arc::new(pool),
        Registry::new(dir.join("registry.json"), 0),
        0,
    );
    let disk = DeviceEntry {
        name: Some("disk".into()),
        size: BASE_SIZE,
        serial: "fuzz".into(),
        ..Default::default()
    };
    let base = DeviceEntry {
        name: Some("base".into()),
        snapshot: true,
        read_only: true,
        origin: Some(0),
        guid: Some(BASE_GUID.into()),
        ..disk.clone()
    };
    // What the base holds does not matter to a receive (it takes the guid and size on
    // trust), so the disk and its snapshot are left empty: each input pays for less.
    cat.change(|devices, reg| -> Result<(), CatalogError> {
        devices.create_thin(0)?;
        devices.create_snap(1, 0)?;
        reg.insert(0, disk)?;
        reg.insert(1, base)?;
        Ok(())
    })
    .expect("a disk and its snapshot");
    Fixture { cat, meta }
}

impl Fixture {
    fn receive(&self, data: &[u8], resumable: bool) -> Result<u32, ReceiveError> {
        let opts = ReceiveOptions {
            resumable,
            // Small, so that a resumable receive also commits part way.
            commit_every: 128 << 10,
            ..Default::default()
        };
        let mut last = 0;
        let r = receive(&self.cat, data, &opts, &mut |done, total| {
            assert!(done <= total, "progress {done} of {total}");
            assert!(done >= last, "progress went back from {last} to {done}");
            last = done;
        });
        r.map(|got| got.id)
    }

    fn registered(&self) -> BTreeSet<u32> {
        self.cat.registry().devices.keys().copied().collect()
    }

    fn in_pool(&self) -> BTreeSet<u32> {
        self.cat
            .pool()
            .devices()
            .iter()
            .map(|(id, _)| *id)
            .collect()
    }

    /// The pool and its registry name the same devices, `want`, and the metadata checks.
    fn assert_holds(&self, want: &BTreeSet<u32>, after: &str) {
        assert_eq!(&self.registered(), want, "registry after {after}");
        assert_eq!(&self.in_pool(), want, "pool after {after}");
        self.cat.pool().commit().expect("a commit");
        let report = thinpool::check::check(self.meta.clone()).expect("a check");
        assert!(
            report.errors.is_empty(),
            "after {after}: {:?}",
            report.errors
        );
    }
}

/// Where the registry file goes: its commits fsync the file and its directory, which on
/// tmpfs costs nothing and on a disk would cost the fuzzer most of its speed.
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("vhost-thin-fuzz")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::tempdir().expect("a temporary directory")
}

/// The input with every checksum that the reader checks recomputed, found by walking the
/// stream as the reader does (docs/STREAMS.md); the walk stops where the reader would stop
/// before a checksum (an oversized header, an unknown record kind, the end of the input).
fn with_checksums(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    if v.len() < 16 || &v[..8] != MAGIC {
        return v;
    }
    let json_len = u32::from_le_bytes(v[12..16].try_into().unwrap()) as usize;
    if json_len > MAX_HEADER {
        return v;
    }
    let mut pos = 16 + json_len;
    if !put_crc(&mut v, 0, pos) {
        return v;
    }
    pos += 4;
    while v.len() >= pos + 20 {
        let kind = v[pos];
        let length = u64::from_le_bytes(v[pos + 12..pos + 20].try_into().unwrap());
        let payload = match kind {
            1 if (1..=MAX_DATA).contains(&length) => length as usize,
            1 => return v,
            2 | 3 => 0,
            _ => return v,
        };
        let end = pos + 20 + payload;
        if !put_crc(&mut v, pos, end) || kind == 3 {
            return v;
        }
        pos = end + 4;
    }
    v
}

/// Writes the crc32c of `v[from..to]` at `to`, if the input is long enough to hold it.
fn put_crc(v: &mut [u8], from: usize, to: usize) -> bool {
    if v.len() < to + 4 {
        return false;
    }
    let crc = crc32c::crc32c(&v[from..to]);
    v[to..to + 4].copy_from_slice(&crc.to_le_bytes());
    true
}

/// Receives `data` and checks what the pool is left with.
fn receive_and_check(f: &Fixture, data: &[u8]) {
    // What a failed receive must leave.
    let before = f.registered();
    match f.receive(data, false) {
        Ok(id) => {
            let e = f.cat.registry().devices[&id].clone();
            assert!(e.snapshot && e.receiving.is_none() && e.name.is_some());
            let mut want = before.clone();
            want.insert(id);
            f.assert_holds(&want, "a receive");
        }
        Err(ReceiveError::Interrupted(i)) => {
            panic!("a receive that is not resumable was interrupted: {i}")
        }
        Err(ReceiveError::Failed(e)) => {
            f.assert_holds(&before, &format!("a failed receive ({e})"));
            // A failure past the header came after the device was made: the same bytes
            // received resumably stop with the device kept, which an abort then drops.
            let past_header = !matches!(
                e,
                StreamError::NotAStream(_)
                    | StreamError::Version(_)
                    | StreamError::BadHeader(_)
                    | StreamError::Refused(_)
            );
            if !past_header {
                return;
            }
            match f.receive(data, true) {
                Ok(id) => panic!(
                    "a stream that failed ({e}) arrived whole as thin device {id} when resumable"
                ),
                Err(ReceiveError::Interrupted(i)) => {
                    let id = abort(&f.cat, &i.token.guid).expect("an abort");
                    assert!(!before.contains(&id), "abort dropped thin device {id}");
                    f.assert_holds(&before, &format!("aborting thin device {id}"));
                }
                Err(ReceiveError::Failed(e)) => {
                    f.assert_holds(&before, &format!("a failed resumable receive ({e})"))
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir();
    let f = fixture(dir.path());
    receive_and_check(&f, data);
    // Nearly every mutation breaks a checksum, and the reader stops there, before the
    // records' own checks and the pool: the same bytes with their checksums made right
    // go on to those. A stream that was received whole had them right already; one that
    // failed left the pool as it was (checked above), so it takes the second one as well.
    let fixed = with_checksums(data);
    if fixed != data {
        receive_and_check(&f, &fixed);
    }
});
