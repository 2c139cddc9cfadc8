use super::*;
use proptest::prelude::*;

struct VecMem(Vec<u8>);

impl GuestView for VecMem {
    fn contains(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len)
            .is_some_and(|e| e <= self.0.len() as u64)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        if !self.contains(addr, buf.len() as u64) {
            return false;
        }
        buf.copy_from_slice(&self.0[addr as usize..addr as usize + buf.len()]);
        true
    }
}

const LIMITS: Limits = Limits {
    capacity_sectors: 2048,
    read_only: false,
    max_discard_seg: 4,
    max_discard_sectors: 1 << 20,
    max_write_zeroes_seg: 4,
    max_write_zeroes_sectors: 1 << 20,
};

fn mem_with_header(kind: u32, sector: u64) -> VecMem {
    let mut m = vec![0u8; 1 << 16];
    m[0..4].copy_from_slice(&kind.to_le_bytes());
    m[8..16].copy_from_slice(&sector.to_le_bytes());
    VecMem(m)
}

fn r(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: false,
    }
}
fn w(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: true,
    }
}

#[test]
fn read_write_flush_getid() {
    let m = mem_with_header(VIRTIO_BLK_T_IN, 4);
    let p = parse(&[r(0, 16), w(0x1000, 1024), w(0x2000, 1)], &m, &LIMITS);
    assert_eq!(p.status, Some(0x2000));
    assert_eq!(
        p.request.unwrap().op,
        Op::Read {
            offset: 2048,
            data: vec![Seg {
                addr: 0x1000,
                len: 1024
            }]
        }
    );
    // Status as the last byte of the data descriptor, header split over two descriptors.
    let m = mem_with_header(VIRTIO_BLK_T_IN, 0);
    let p = parse(&[r(0, 10), r(10, 6), w(0x1000, 513)], &m, &LIMITS);
    assert_eq!(p.status, Some(0x1000 + 512));
    assert!(
        matches!(p.request.unwrap().op, Op::Read { offset: 0, ref data } if data[0].len == 512)
    );
    // Header and data in one readable descriptor.
    let m = mem_with_header(VIRTIO_BLK_T_OUT, 1);
    let p = parse(&[r(0, 16 + 512), w(0x2000, 1)], &m, &LIMITS);
    assert_eq!(
        p.request.unwrap().op,
        Op::Write {
            offset: 512,
            data: vec![Seg { addr: 16, len: 512 }]
        }
    );
    let m = mem_with_header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        parse(&[r(0, 16), w(0x2000, 1)], &m, &LIMITS)
            .request
            .unwrap()
            .op,
        Op::Flush
    );
    let m = mem_with_header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        parse(&[r(0, 16), w(0x1000, 64), w(0x2000, 1)], &m, &LIMITS)
            .request
            .unwrap()
            .op,
        Op::GetId {
            data: vec![Seg {
                addr: 0x1000,
                len: 20
            }]
        }
    );
}

#[test]
fn discard_and_write_zeroes_segments() {
    let mut m = mem_with_header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let seg = |s: u64, n: u32, f: u32| {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&s.to_le_bytes());
        b[8..12].copy_from_slice(&n.to_le_bytes());
        b[12..16].copy_from_slice(&f.to_le_bytes());
        b
    };
    m.0[0x100..0x110].copy_from_slice(&seg(8, 16, 1));
    m.0[0x110..0x120].copy_from_slice(&seg(100, 1, 0));
    let p = parse(&[r(0, 16), r(0x100, 32), w(0x2000, 1)], &m, &LIMITS);
    assert_eq!(
        p.request.unwrap().op,
        Op::WriteZeroes(vec![
            Range {
                offset: 4096,
                len: 8192,
                unmap: true
            },
            Range {
                offset: 51200,
                len: 512,
                unmap: false
            }
        ])
    );
    // Discard refuses the unmap flag (UNSUPP), and out-of-range segments (IOERR).
    m.0[0..4].copy_from_slice(&VIRTIO_BLK_T_DISCARD.to_le_bytes());
    let e = parse(&[r(0, 16), r(0x100, 32), w(0x2000, 1)], &m, &LIMITS)
        .request
        .unwrap_err();
    assert!(e.is_unsupported(), "{e}");
    m.0[0x100..0x110].copy_from_slice(&seg(2040, 16, 0));
    let e = parse(&[r(0, 16), r(0x100, 16), w(0x2000, 1)], &m, &LIMITS)
        .request
        .unwrap_err();
    assert!(matches!(e, ParseError::OutOfRange { .. }));
    let e = parse(&[r(0, 16), r(0x100, 24), w(0x2000, 1)], &m, &LIMITS)
        .request
        .unwrap_err();
    assert!(matches!(e, ParseError::BadSegments(24)));
    let e = parse(&[r(0, 16), r(0x100, 80), w(0x2000, 1)], &m, &LIMITS)
        .request
        .unwrap_err();
    assert!(matches!(e, ParseError::TooManySegments(5, 4)));
}

#[test]
fn malformed_chains() {
    let m = mem_with_header(VIRTIO_BLK_T_IN, 0);
    let cases: Vec<(Vec<Desc>, ParseError)> = vec![
        (vec![], ParseError::Empty),
        (vec![w(0x1000, 512), r(0, 16)], ParseError::BadOrder),
        (vec![r(0, 16)], ParseError::NoStatus),
        (vec![r(0, 8), w(0x1000, 1)], ParseError::ShortHeader(8)),
        (
            vec![r(0, 16), w(0x1000, 100), w(0x2000, 1)],
            ParseError::Unaligned(100),
        ),
        (
            vec![r(0, 16), r(0x100, 512), w(0x2000, 1)],
            ParseError::WrongDirection,
        ),
        (
            vec![r(0, 16), w(0xFFFF_0000, 512), w(0x2000, 1)],
            ParseError::OutOfMemory {
                addr: 0xFFFF_0000,
                len: 512,
            },
        ),
    ];
    for (descs, want) in cases {
        assert_eq!(
            parse(&descs, &m, &LIMITS).request.unwrap_err(),
            want,
            "{descs:?}"
        );
    }
    // Beyond capacity.
    let m = mem_with_header(VIRTIO_BLK_T_IN, 2047);
    let e = parse(&[r(0, 16), w(0x1000, 1024), w(0x2000, 1)], &m, &LIMITS)
        .request
        .unwrap_err();
    assert!(matches!(e, ParseError::OutOfRange { .. }));
    let m = mem_with_header(VIRTIO_BLK_T_IN, u64::MAX);
    let e = parse(&[r(0, 16), w(0x1000, 1024), w(0x2000, 1)], &m, &LIMITS)
        .request
        .unwrap_err();
    assert!(matches!(e, ParseError::OutOfRange { .. }));
    // Read-only disk: writes are refused, reads are not.
    let ro = Limits {
        read_only: true,
        ..LIMITS
    };
    let m = mem_with_header(VIRTIO_BLK_T_OUT, 0);
    let e = parse(&[r(0, 16 + 512), w(0x2000, 1)], &m, &ro)
        .request
        .unwrap_err();
    assert_eq!(e, ParseError::ReadOnly);
    // Unknown type: UNSUPP, status still known.
    let m = mem_with_header(99, 0);
    let p = parse(&[r(0, 16), w(0x2000, 1)], &m, &LIMITS);
    assert_eq!(p.status, Some(0x2000));
    assert!(p.request.unwrap_err().is_unsupported());
}

fn arb_desc() -> impl Strategy<Value = Desc> {
    (
        prop_oneof![0u64..0x1_0000, any::<u64>()],
        prop_oneof![0u32..2048, any::<u32>()],
        any::<bool>(),
    )
        .prop_map(|(addr, len, writable)| Desc {
            addr,
            len,
            writable,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    /// Structured fuzzing: any chain, any header, any segment payload. The parser never
    /// panics; whatever it accepts lies inside guest memory and the disk.
    #[test]
    fn parser_never_panics_and_accepts_only_sane_requests(
        descs in proptest::collection::vec(arb_desc(), 0..8),
        kind in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
        sector in prop_oneof![0u64..4096, any::<u64>()],
        payload in proptest::collection::vec(any::<u8>(), 64),
        read_only in any::<bool>(),
    ) {
        let mut m = mem_with_header(kind, sector);
        m.0[16..80].copy_from_slice(&payload);
        let limits = Limits { read_only, ..LIMITS };
        let p = parse(&descs, &m, &limits);
        if let Ok(req) = &p.request {
            prop_assert_eq!(Some(req.status), p.status);
            prop_assert!(m.contains(req.status, 1));
            let check = |segs: &[Seg]| segs.iter().all(|s| m.contains(s.addr, s.len as u64));
            match &req.op {
                Op::Read { offset, data } | Op::Write { offset, data } => {
                    let len: u64 = data.iter().map(|s| s.len as u64).sum();
                    prop_assert!(check(data));
                    prop_assert_eq!(len % 512, 0);
                    prop_assert!(offset + len <= limits.capacity_sectors * 512);
                    if matches!(req.op, Op::Write { .. }) {
                        prop_assert!(!read_only);
                    }
                }
                Op::GetId { data } => prop_assert!(check(data)),
                Op::Discard(rs) | Op::WriteZeroes(rs) => {
                    prop_assert!(!read_only);
                    for r in rs {
                        prop_assert!(r.offset + r.len <= limits.capacity_sectors * 512);
                    }
                }
                Op::Flush => {}
            }
        }
    }
}
