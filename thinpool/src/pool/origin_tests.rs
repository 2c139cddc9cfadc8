//! The data path of devices with an external origin.

use super::*;
use crate::storage::MemStorage;

const BS: u64 = 64 * 1024;

fn mem_pool(data_blocks: u64) -> Pool {
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let data: Arc<dyn Storage> = Arc::new(MemStorage::new(data_blocks * BS));
    Pool::create(meta, data, 128, PoolOptions::default()).unwrap()
}

/// Bytes that differ from block to block and from byte to byte, never zero.
fn image(len: u64) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 + 1).collect()
}

/// An origin of `len` bytes holding [`image`].
fn origin(len: u64) -> Arc<ExternalOrigin> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(image(len)));
    Arc::new(ExternalOrigin::from_storage(s, "golden").unwrap())
}

fn read_vec(p: &Pool, dev: u32, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0xEEu8; len];
    p.read(dev, off, &mut b).unwrap();
    b
}

/// What a device over [`image`] of `origin_len` bytes reads at `[off, off + len)` when
/// nothing is mapped.
fn expected(origin_len: u64, off: u64, len: usize) -> Vec<u8> {
    let img = image(origin_len);
    (off..off + len as u64)
        .map(|i| img.get(i as usize).copied().unwrap_or(0))
        .collect()
}

#[test]
fn unmapped_blocks_read_the_origin_and_zeroes_past_its_end() {
    let p = mem_pool(16);
    p.create_thin(0).unwrap();
    // Ends halfway into block 2; the device is larger than the origin.
    let olen = 2 * BS + BS / 2;
    p.set_external_origin(0, Some(origin(olen))).unwrap();
    assert_eq!(p.external_origin(0).unwrap().len(), olen);
    let all = read_vec(&p, 0, 0, 4 * BS as usize);
    assert_eq!(all, expected(olen, 0, 4 * BS as usize));
    // A read straddling the origin's end, vectored over two buffers.
    let (mut a, mut b) = (vec![0xEE; 100], vec![0xEE; 200]);
    p.read_vectored(
        0,
        olen - 150,
        &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)],
    )
    .unwrap();
    assert_eq!(a, expected(olen, olen - 150, 100));
    assert_eq!(b, expected(olen, olen - 50, 200));
    assert!(b[50..].iter().all(|&x| x == 0));
    // Nothing was provisioned by reading.
    assert_eq!(p.device(0).unwrap().mapped_blocks, 0);
    // Another device without an origin still reads zeroes.
    p.create_thin(1).unwrap();
    assert_eq!(read_vec(&p, 1, 0, 4096), vec![0; 4096]);
}

#[test]
fn a_partial_write_copies_the_rest_of_the_block_from_the_origin() {
    for skip_block_zeroing in [false, true] {
        let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
        let data: Arc<dyn Storage> = Arc::new(MemStorage::new(16 * BS));
        let opts = PoolOptions {
            skip_block_zeroing,
            ..Default::default()
        };
        let p = Pool::create(meta, data.clone(), 128, opts).unwrap();
        p.create_thin(0).unwrap();
        let olen = 2 * BS + 4096;
        p.set_external_origin(0, Some(origin(olen))).unwrap();
        // Stale bytes where new blocks land must not show through.
        data.write_at(&vec![0xAB; 16 * BS as usize], 0).unwrap();
        let mut want = expected(olen, 0, 4 * BS as usize);
        for (off, len) in [(1000u64, 512usize), (2 * BS + 100, 8000), (3 * BS + 7, 9)] {
            p.write(0, off, &vec![7u8; len]).unwrap();
            want[off as usize..off as usize + len].fill(7);
        }
        assert_eq!(p.device(0).unwrap().mapped_blocks, 3);
        assert_eq!(read_vec(&p, 0, 0, 4 * BS as usize), want);
        // A whole-block write needs no copy.
        p.write(0, BS, &vec![9u8; BS as usize]).unwrap();
        want[BS as usize..2 * BS as usize].fill(9);
        assert_eq!(read_vec(&p, 0, 0, 4 * BS as usize), want);
    }
}

#[test]
fn snapshots_inherit_the_origin_and_delete_forgets_it() {
    let p = mem_pool(32);
    let olen = 4 * BS;
    let o = origin(olen);
    p.create_thin(0).unwrap();
    p.set_external_origin(0, Some(o.clone())).unwrap();
    p.write(0, 10, &[1u8; 10]).unwrap();
    p.create_snap(1, 0).unwrap();
    p.create_snap(2, 1).unwrap();
    for id in [1, 2] {
        assert!(p.external_origin(id).unwrap().same_as(&o));
    }
    // The snapshot of a snapshot: the origin where nothing is mapped, the shared block
    // where it is, and its own partial writes copy the origin too.
    p.write(2, BS + 3, &[5u8; 3]).unwrap();
    let mut want = expected(olen, 0, 2 * BS as usize);
    want[10..20].fill(1);
    let mut want2 = want.clone();
    want2[BS as usize + 3..BS as usize + 6].fill(5);
    assert_eq!(read_vec(&p, 2, 0, 2 * BS as usize), want2);
    assert_eq!(read_vec(&p, 1, 0, 2 * BS as usize), want);
    assert_eq!(read_vec(&p, 0, 0, 2 * BS as usize), want);
    p.delete(2).unwrap();
    assert!(p.external_origin(2).is_none());
    // An id used again starts without one.
    p.create_thin(2).unwrap();
    assert!(p.external_origin(2).is_none());
    assert_eq!(read_vec(&p, 2, 0, 4096), vec![0; 4096]);
    // Taking the origin away: unmapped blocks read zeroes again.
    p.set_external_origin(1, None).unwrap();
    assert_eq!(read_vec(&p, 1, BS, 4096), vec![0; 4096]);
    assert!(matches!(
        p.set_external_origin(9, Some(o)),
        Err(Error::NoSuchDevice(9))
    ));
}

#[test]
fn discard_brings_the_origin_back_and_write_zeroes_reads_zeroes() {
    let p = mem_pool(32);
    let olen = 3 * BS;
    p.create_thin(0).unwrap();
    p.set_external_origin(0, Some(origin(olen))).unwrap();
    let len = 6 * BS as usize;
    p.write(0, 0, &vec![3u8; len]).unwrap();
    // Discard unmaps whole blocks 1 and 4, which read the origin (zeroes past it) again.
    assert_eq!(p.discard(0, BS - 5, 4 * BS + 10).unwrap(), 4);
    let mut want = vec![3u8; len];
    let origin_bytes = expected(olen, 0, len);
    want[BS as usize..5 * BS as usize].copy_from_slice(&origin_bytes[BS as usize..5 * BS as usize]);
    assert_eq!(read_vec(&p, 0, 0, len), want);
    // Write-zeroes with unmap over all of it: zeroes everywhere, whether mapped or not,
    // whole or partial, inside or past the origin.
    for unmap in [true, false] {
        p.write(0, 0, &vec![3u8; len]).unwrap();
        p.discard(0, 0, len as u64).unwrap();
        p.write_zeroes(0, 100, len as u64 - 200, unmap).unwrap();
        let got = read_vec(&p, 0, 0, len);
        assert_eq!(&got[..100], &origin_bytes[..100]);
        assert!(got[100..len - 100].iter().all(|&x| x == 0), "unmap {unmap}");
        assert_eq!(&got[len - 100..], &origin_bytes[len - 100..]);
        // Blocks past the origin need no space to read as zeroes.
        let mapped = p.device(0).unwrap().mapped_blocks;
        assert_eq!(mapped, 3, "unmap {unmap}");
    }
}

#[test]
fn an_unavailable_origin_fails_what_needs_it_and_nothing_else() {
    let p = mem_pool(16);
    p.create_thin(0).unwrap();
    p.write(0, 0, &vec![4u8; BS as usize]).unwrap();
    let gone = ExternalOrigin::unavailable("/nonexistent/golden.img", "no such file");
    p.set_external_origin(0, Some(Arc::new(gone))).unwrap();
    assert_eq!(read_vec(&p, 0, 0, 10), vec![4u8; 10]);
    let mut b = vec![0u8; 10];
    assert!(matches!(p.read(0, BS, &mut b), Err(Error::OriginIo { .. })));
    assert!(matches!(p.write(0, BS, &[1]), Err(Error::OriginIo { .. })));
    // The failed write gave its block back.
    assert_eq!(p.device(0).unwrap().mapped_blocks, 1);
    p.write(0, 2 * BS, &vec![1u8; BS as usize]).unwrap();
    assert_eq!(p.device(0).unwrap().mapped_blocks, 2);
}
