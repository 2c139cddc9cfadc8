use super::*;
use crate::pool::PoolOptions;
use crate::registry::DeviceEntry;
use crate::storage::MemStorage;
use std::io::Write;

#[test]
fn open_reads_a_file_and_zeroes_past_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("golden.img");
    std::fs::write(&path, vec![7u8; 1024]).unwrap();
    let o = ExternalOrigin::open(&path).unwrap();
    assert_eq!((o.len(), o.path()), (1024, path.as_path()));
    assert!(o.unavailable_reason().is_none());
    let mut b = vec![0xEEu8; 100];
    o.read_at(&mut b, 1000).unwrap();
    assert!(b[..24].iter().all(|&x| x == 7) && b[24..].iter().all(|&x| x == 0));
    o.read_at(&mut b, 5000).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // Two openings of one file are the same origin; another file is not.
    assert!(o.same_as(&ExternalOrigin::open(&path).unwrap()));
    let other = dir.path().join("other.img");
    std::fs::write(&other, vec![7u8; 1024]).unwrap();
    assert!(!o.same_as(&ExternalOrigin::open(&other).unwrap()));
}

#[test]
fn open_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    assert!(matches!(
        ExternalOrigin::open(&missing),
        Err(OriginError::NotFound { .. })
    ));
    assert!(matches!(
        ExternalOrigin::open(dir.path()),
        Err(OriginError::NotFileOrDevice { .. })
    ));
    let odd = dir.path().join("odd.img");
    std::fs::File::create(&odd)
        .unwrap()
        .write_all(&[1; 1000])
        .unwrap();
    let e = ExternalOrigin::open(&odd).unwrap_err();
    assert!(matches!(e, OriginError::Unaligned { len: 1000, .. }));
    assert!(e.to_string().contains("odd.img"), "{e}");
}

#[test]
fn an_unavailable_origin_fails_every_read() {
    let o = ExternalOrigin::unavailable("/x/golden.img", "gone");
    assert_eq!(o.unavailable_reason(), Some("gone"));
    let mut b = [0u8; 4];
    assert!(o.read_at(&mut b, 1 << 40).is_err());
}

#[test]
fn attach_from_registry_opens_each_path_once_and_reports_the_missing() {
    let dir = tempfile::tempdir().unwrap();
    let golden = dir.path().join("golden.img");
    std::fs::write(&golden, vec![9u8; 4096]).unwrap();
    let pool = Pool::create(
        Arc::new(MemStorage::new(4 << 20)),
        Arc::new(MemStorage::new(16 << 20)),
        128,
        PoolOptions::default(),
    )
    .unwrap();
    let mut reg = Registry::new(dir.path().join("reg.json"), 0);
    let entry = |origin: Option<&std::path::Path>| DeviceEntry {
        size: 1 << 20,
        external_origin: origin.map(|p| p.to_string_lossy().into_owned()),
        ..Default::default()
    };
    for id in 0..4 {
        pool.create_thin(id).unwrap();
    }
    reg.insert(0, entry(Some(&golden))).unwrap();
    reg.insert(1, entry(Some(&golden))).unwrap();
    reg.insert(2, entry(Some(&dir.path().join("missing.img"))))
        .unwrap();
    reg.insert(3, entry(None)).unwrap();
    // Not in the pool: skipped.
    reg.insert(7, entry(Some(&golden))).unwrap();
    // Device 3 had an origin the registry no longer names: it is taken away.
    let stale = ExternalOrigin::from_storage(Arc::new(MemStorage::new(512)), "stale").unwrap();
    pool.set_external_origin(3, Some(Arc::new(stale))).unwrap();

    let failures = attach_from_registry(&pool, &reg);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].id, 2);
    assert!(matches!(*failures[0].error, OriginError::NotFound { .. }));
    assert!(failures[0].to_string().contains("missing.img"));
    let (a, b) = (
        pool.external_origin(0).unwrap(),
        pool.external_origin(1).unwrap(),
    );
    assert!(Arc::ptr_eq(&a, &b));
    assert!(pool.external_origin(3).is_none());
    let mut buf = [0u8; 8];
    pool.read(0, 0, &mut buf).unwrap();
    assert_eq!(buf, [9; 8]);
    // The device whose origin is missing fails where it would need it.
    assert!(pool
        .external_origin(2)
        .unwrap()
        .unavailable_reason()
        .is_some());
    assert!(pool.read(2, 0, &mut buf).is_err());
}
