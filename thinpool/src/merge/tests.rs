use super::*;
use crate::origin::ExternalOrigin;
use crate::pool::PoolOptions;
use crate::storage::MemStorage;
use std::sync::Arc;

const BS: u64 = 64 * 1024;

fn mem_pool() -> Pool {
    Pool::create(
        Arc::new(MemStorage::new(4 << 20)),
        Arc::new(MemStorage::new(64 * BS)),
        128,
        PoolOptions::default(),
    )
    .unwrap()
}

fn read_all(p: &Pool, dev: u32, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    p.read(dev, 0, &mut v).unwrap();
    v
}

/// A golden image file of `len` bytes, a thin device over it with writes here and there
/// (one past the image's end, one a partial block), and a snapshot of it: id 1.
fn setup(dir: &Path, len: u64) -> (Pool, PathBuf) {
    let path = dir.join("golden.img");
    let img: Vec<u8> = (0..len).map(|i| (i % 253) as u8 + 1).collect();
    std::fs::write(&path, img).unwrap();
    let p = mem_pool();
    p.create_thin(0).unwrap();
    let o = ExternalOrigin::open(&path).unwrap();
    p.set_external_origin(0, Some(Arc::new(o))).unwrap();
    p.write(0, 100, &[7u8; 300]).unwrap();
    p.write(0, 3 * BS, &vec![8u8; 2 * BS as usize]).unwrap();
    p.write(0, 9 * BS + 512, &[9u8; 512]).unwrap();
    p.create_snap(1, 0).unwrap();
    (p, path)
}

#[test]
fn a_merge_makes_the_file_the_device_and_extends_it() {
    let dir = tempfile::tempdir().unwrap();
    let size = 12 * BS;
    let (p, path) = setup(dir.path(), 5 * BS + 4096);
    let want = read_all(&p, 1, size);
    let mut seen = Vec::new();
    let opts = MergeOptions {
        start_offset: 0,
        checkpoint_bytes: BS,
    };
    let out = merge_into_origin(&p, 1, size, &path, &opts, &mut |done, total| {
        seen.push((done, total));
        true
    })
    .unwrap();
    assert!(out.complete);
    assert_eq!(out.next_offset, size);
    // Four mapped blocks: 0, 3, 4 and 9.
    assert_eq!(out.bytes_written, 4 * BS);
    assert_eq!(std::fs::read(&path).unwrap(), want);
    // A checkpoint after each block, and one at the end.
    assert_eq!(
        seen,
        vec![
            (BS, size),
            (4 * BS, size),
            (5 * BS, size),
            (10 * BS, size),
            (size, size)
        ]
    );
    // Once more: nothing changes (each block write is idempotent).
    merge_into_origin(&p, 1, size, &path, &opts, &mut |_, _| true).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), want);
}

#[test]
fn a_cancelled_merge_stops_at_a_checkpoint_and_resumes_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let size = 10 * BS;
    let (p, path) = setup(dir.path(), size);
    let want = read_all(&p, 1, size);
    let opts = MergeOptions {
        start_offset: 0,
        checkpoint_bytes: 2 * BS,
    };
    let out = merge_into_origin(&p, 1, size, &path, &opts, &mut |_, _| false).unwrap();
    assert!(!out.complete);
    // Blocks 0 and 3 written: the checkpoint is past block 3.
    assert_eq!(out.next_offset, 4 * BS);
    assert_ne!(std::fs::read(&path).unwrap(), want);
    let resumed = MergeOptions {
        start_offset: out.next_offset,
        ..opts
    };
    let out = merge_into_origin(&p, 1, size, &path, &resumed, &mut |_, _| true).unwrap();
    assert!(out.complete);
    assert_eq!(out.bytes_written, BS + 10 * BS - 9 * BS);
    assert_eq!(std::fs::read(&path).unwrap(), want);
}

#[test]
fn a_merge_that_does_not_fit_or_makes_no_sense_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let size = 10 * BS;
    let (p, path) = setup(dir.path(), size);
    let opts = MergeOptions::default();
    let mut go = |_, _| true;
    // Storage that cannot grow (as a block device) and is shorter than the data.
    let short = MemStorage::new(9 * BS);
    let e = merge_into_storage(&p, 1, size, &short, &opts, &mut go).unwrap_err();
    assert!(
        matches!(e, MergeError::TooSmall { len, needed } if len == 9 * BS && needed == 10 * BS),
        "{e}"
    );
    // Long enough for every mapped block, if shorter than the device: fine.
    let p2 = mem_pool();
    p2.create_thin(0).unwrap();
    p2.write(0, 0, &[1u8; 10]).unwrap();
    let fits = MemStorage::new(BS);
    merge_into_storage(&p2, 0, size, &fits, &opts, &mut go).unwrap();
    assert_eq!(&fits.to_vec()[..11], &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]);

    let past = MergeOptions {
        start_offset: size + 1,
        ..Default::default()
    };
    assert!(matches!(
        merge_into_origin(&p, 1, size, &path, &past, &mut go),
        Err(MergeError::InvalidArgument(_))
    ));
    assert!(matches!(
        merge_into_origin(&p, 1, size + 1, &path, &opts, &mut go),
        Err(MergeError::InvalidArgument(_))
    ));
    assert!(matches!(
        merge_into_origin(&p, 1, size, &dir.path().join("nope"), &opts, &mut go),
        Err(MergeError::Origin(OriginError::NotFound { .. }))
    ));
    assert!(matches!(
        merge_into_origin(&p, 7, size, &path, &opts, &mut go),
        Err(MergeError::Pool(crate::Error::NoSuchDevice(7)))
    ));
    // A device with nothing mapped merges to nothing.
    p2.create_thin(5).unwrap();
    let out = merge_into_storage(&p2, 5, size, &fits, &opts, &mut go).unwrap();
    assert!(out.complete);
    assert_eq!(out.bytes_written, 0);
}
