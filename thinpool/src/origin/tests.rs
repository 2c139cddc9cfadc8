use super::*;
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
