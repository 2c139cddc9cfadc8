use super::*;
use thinpool::pool::PoolOptions;
use thinpool::storage::held::HeldWrite;
use thinpool::storage::testing::{FaultOp, FaultyStorage};
use thinpool::storage::{MemStorage, Storage};

const BS: u64 = 64 << 10;
/// Regions of data that make one write-back.
const STEP: u64 = COPY_WRITE_BACK_BYTES / BS;

fn pool(data: Arc<dyn Storage>) -> Arc<Pool> {
    pool_of(data, BS)
}

fn pool_of(data: Arc<dyn Storage>, block_bytes: u64) -> Arc<Pool> {
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let sectors = (block_bytes / 512) as u32;
    let p = Pool::create(meta, data, sectors, PoolOptions::default()).unwrap();
    p.create_thin(0).unwrap();
    Arc::new(p)
}

#[test]
fn the_copy_writes_the_secondary_back_every_few_mib_of_data_it_wrote() {
    let blocks = 2 * STEP + 8;
    let src = pool(Arc::new(MemStorage::new(blocks * BS)));
    let data = Arc::new(FaultyStorage::new(MemStorage::new(blocks * BS)));
    let dst = pool(data.clone());
    // Data in every block but eight, from STEP - 4 on, which read as zeroes.
    let zeroes = STEP - 4..STEP + 4;
    for k in (0..blocks).filter(|k| !zeroes.contains(k)) {
        src.write(0, k * BS, &[k as u8 | 1; 512]).unwrap();
    }
    let m = Mirror::new(dst.clone(), 0, BS, OnError::GiveUp);
    let mut buf = Vec::new();
    let mut write_backs = Vec::new();
    for k in 0..blocks {
        m.copy_region(&src, 0, k, &mut buf).unwrap();
        write_backs.push(data.count(FaultOp::Writeback));
    }
    // After each STEP blocks of data: the blocks of zeroes (unmapped, nothing written)
    // do not count.
    let at = |k: u64| write_backs[k as usize];
    assert_eq!((at(STEP - 1), at(STEP + 6), at(STEP + 7)), (0, 0, 1));
    assert_eq!((at(2 * STEP + 6), at(2 * STEP + 7)), (1, 2));
    let mut b = [0u8; 512];
    dst.read(0, (STEP + 5) * BS, &mut b).unwrap();
    assert_eq!(b, [(STEP + 5) as u8 | 1; 512]);
}

#[test]
fn the_copy_into_bigger_blocks_counts_the_whole_blocks_it_writes() {
    let src = pool(Arc::new(MemStorage::new(STEP * BS)));
    let data = Arc::new(FaultyStorage::new(MemStorage::new(STEP * BS)));
    let dst = pool_of(data.clone(), 2 * BS);
    // The secondary mapped (as where the disk's snapshot was copied), the source all
    // zeroes (discarded since): each region writes zeroes into half a block.
    dst.write(0, 0, &vec![7u8; (STEP * BS) as usize]).unwrap();
    let m = Mirror::new(dst.clone(), 0, BS, OnError::GiveUp);
    let mut buf = Vec::new();
    for k in (0..STEP).step_by(2) {
        m.copy_region(&src, 0, k, &mut buf).unwrap();
    }
    // STEP / 2 regions, each in a block of 2 * BS: the copy's 8 MiB.
    assert_eq!(data.count(FaultOp::Writeback), 1);
    let mut b = vec![9u8; 2 * BS as usize];
    dst.read(0, 2 * BS, &mut b).unwrap();
    assert!(b[..BS as usize].iter().all(|&x| x == 0));
    assert!(b[BS as usize..].iter().all(|&x| x == 7));
}

/// Storage whose next write-back, once armed, is held until released, and whose writes
/// wait while it is held: as the kernel's write-back holds the pages it writes out
/// locked, and a write into one of them waits (all of them, here).
struct WriteBackHeld {
    inner: MemStorage,
    hold: Mutex<(bool, bool)>,
    changed: std::sync::Condvar,
}

impl WriteBackHeld {
    fn new(inner: MemStorage) -> Self {
        WriteBackHeld {
            inner,
            hold: Mutex::new((false, false)),
            changed: std::sync::Condvar::new(),
        }
    }
    /// (armed, holding)
    fn state(&self) -> std::sync::MutexGuard<'_, (bool, bool)> {
        self.hold.lock().unwrap()
    }
    fn hold_next_write_back(&self) {
        self.state().0 = true;
    }
    fn wait_until_holding(&self) {
        let mut h = self.state();
        while !h.1 {
            h = self.changed.wait(h).unwrap();
        }
    }
    fn release(&self) {
        *self.state() = (false, false);
        self.changed.notify_all();
    }
    fn wait_while_held(&self) {
        let mut h = self.state();
        while h.1 {
            h = self.changed.wait(h).unwrap();
        }
    }
}

impl Storage for WriteBackHeld {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.wait_while_held();
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn writeback(&self) -> std::io::Result<()> {
        let mut h = self.state();
        if h.0 {
            *h = (false, true);
            self.changed.notify_all();
        }
        drop(h);
        self.wait_while_held();
        Ok(())
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
}

/// Region `k` of `p`'s device 0.
/// A primary of `blocks` blocks, each stamped with its number in its first sector.
fn stamped_source(blocks: u64) -> Arc<Pool> {
    let src = pool(Arc::new(MemStorage::new(blocks * BS)));
    for k in 0..blocks {
        src.write(0, k * BS, &[k as u8 | 1; 512]).unwrap();
    }
    src
}

fn region_of(p: &Pool, k: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    p.read(0, k * BS, &mut b).unwrap();
    b
}

/// Whether `f`, on a thread of its own, ends within 10 s.
fn ends_soon(f: impl FnOnce() + Send + 'static) -> (bool, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    let ended = rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok();
    (ended, t)
}

#[test]
fn a_guest_write_to_a_copied_region_does_not_wait_for_the_copys_write_back() {
    let blocks = STEP + 4;
    let src = stamped_source(blocks);
    let data = Arc::new(WriteBackHeld::new(MemStorage::new(blocks * BS)));
    let dst = pool(data.clone());
    let m = Arc::new(Mirror::new(dst.clone(), 0, BS, OnError::GiveUp));
    m.defer_to_copy(blocks, std::slice::from_ref(&(0..blocks)));
    data.hold_next_write_back();
    // The copy's STEPth region writes the copy back, and that is held.
    let copier = {
        let (m, src) = (m.clone(), src.clone());
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            for k in 0..STEP {
                m.copy_region(&src, 0, k, &mut buf).unwrap();
            }
        })
    };
    data.wait_until_holding();
    let (ended, guest) = {
        let (m, src) = (m.clone(), src.clone());
        ends_soon(move || {
            let w = [IoSlice::new(&[0xee; 4096])];
            m.write_vectored(&src, 0, 3 * BS + 4096, &w).unwrap();
        })
    };
    data.release();
    copier.join().unwrap();
    guest.join().unwrap();
    assert!(ended, "the guest's write waited for the copy's write-back");
    let mut buf = Vec::new();
    for k in STEP..blocks {
        m.copy_region(&src, 0, k, &mut buf).unwrap();
    }
    // Region 3, written after its copy, is copied again; from then on, writes go to
    // both sides.
    let again = m.end_deferral().unwrap();
    assert_eq!(again, [3]);
    for k in again {
        m.copy_region(&src, 0, k, &mut buf).unwrap();
    }
    let w = [IoSlice::new(&[0xdd; 4096])];
    m.write_vectored(&src, 0, 5 * BS, &w).unwrap();
    for k in 0..blocks {
        assert!(region_of(&src, k) == region_of(&dst, k), "region {k}");
    }
    assert_eq!(region_of(&dst, 5)[..4096], [0xdd; 4096]);
}

/// A disk of four regions of which `plan` is the copy's, its first 8 KiB written, mirrored to
/// a pool of `dst_block` blocks: the copy of region 0 held in its write to the secondary
/// while the guest writes 512 bytes at `at`. Whether that write ended within 10 s, then
/// the mirror and both pools, with the copy's write let go.
fn guest_write_during_a_held_copy(
    dst_block: u64,
    plan: std::ops::Range<u64>,
    at: u64,
) -> (bool, Arc<Mirror>, Arc<Pool>, Arc<Pool>) {
    let src = pool(Arc::new(MemStorage::new(4 * BS)));
    let data = Arc::new(HeldWrite::new(MemStorage::new(4 * BS)));
    let dst = pool_of(data.clone(), dst_block);
    src.write(0, 0, &[7; 8192]).unwrap();
    let m = Arc::new(Mirror::new(dst.clone(), 0, BS, OnError::GiveUp));
    m.defer_to_copy(4, std::slice::from_ref(&plan));
    data.hold_next_write();
    let copier = {
        let (m, src) = (m.clone(), src.clone());
        std::thread::spawn(move || m.copy_region(&src, 0, 0, &mut Vec::new()).unwrap())
    };
    data.wait_until_holding();
    let (ended, guest) = {
        let (m, src) = (m.clone(), src.clone());
        ends_soon(move || {
            let w = [IoSlice::new(&[9; 512])];
            m.write_vectored(&src, 0, at, &w).unwrap();
        })
    };
    data.release();
    copier.join().unwrap();
    guest.join().unwrap();
    (ended, m, src, dst)
}

#[test]
fn a_guest_write_to_a_region_being_copied_does_not_wait_for_the_copys_write() {
    let (ended, m, src, dst) = guest_write_during_a_held_copy(BS, 0..4, 4096);
    assert!(ended, "the guest's write waited for the copy's write");
    let mut buf = Vec::new();
    for k in 1..4 {
        m.copy_region(&src, 0, k, &mut buf).unwrap();
    }
    // The copy wrote region 0 as it was before the guest's write: copied again.
    let again = m.end_deferral().unwrap();
    assert_eq!(again, [0]);
    m.copy_region(&src, 0, 0, &mut buf).unwrap();
    for k in 0..4 {
        assert!(region_of(&src, k) == region_of(&dst, k), "region {k}");
    }
}

#[test]
fn a_region_copied_and_written_back_is_mirrored_during_the_copy() {
    let blocks = STEP + 2;
    let src = stamped_source(blocks);
    let data = Arc::new(FaultyStorage::new(MemStorage::new(blocks * BS)));
    let dst = pool(data.clone());
    let m = Mirror::new(dst.clone(), 0, BS, OnError::GiveUp);
    m.defer_to_copy(blocks, std::slice::from_ref(&(0..blocks)));
    let mut buf = Vec::new();
    for k in 0..STEP {
        m.copy_region(&src, 0, k, &mut buf).unwrap();
    }
    assert_eq!(data.count(FaultOp::Writeback), 1);
    // Region 3 is settled: the guest's write goes to both sides at once. Region STEP,
    // not copied yet, to the primary alone.
    let w = [IoSlice::new(&[0xee; 4096])];
    m.write_vectored(&src, 0, 3 * BS + 4096, &w).unwrap();
    m.write_vectored(&src, 0, STEP * BS, &w).unwrap();
    assert!(region_of(&src, 3) == region_of(&dst, 3));
    assert_eq!(region_of(&dst, STEP)[..4096], [0; 4096]);
    for k in STEP..blocks {
        m.copy_region(&src, 0, k, &mut buf).unwrap();
    }
    assert_eq!(m.end_deferral().unwrap(), Vec::<u64>::new());
    for k in 0..blocks {
        assert!(region_of(&src, k) == region_of(&dst, k), "region {k}");
    }
}

#[test]
fn a_guest_write_sharing_a_block_of_the_secondary_with_a_region_being_copied_does_not_wait() {
    // The secondary's blocks are two regions; only region 0 is the copy's.
    let (ended, m, src, dst) = guest_write_during_a_held_copy(2 * BS, 0..1, BS + 4096);
    assert!(ended, "the guest's write waited for the copy's write");
    // Region 1, written to the primary alone, is copied after the deferral.
    let again = m.end_deferral().unwrap();
    assert_eq!(again, [1]);
    let mut buf = Vec::new();
    m.copy_region(&src, 0, 1, &mut buf).unwrap();
    for k in 0..4 {
        assert!(region_of(&src, k) == region_of(&dst, k), "region {k}");
    }
}

#[test]
fn a_failed_write_back_of_the_copy_fails_the_copy() {
    let src = pool(Arc::new(MemStorage::new(STEP * BS)));
    let data = Arc::new(FaultyStorage::new(MemStorage::new(STEP * BS)));
    let dst = pool(data.clone());
    for k in 0..STEP {
        src.write(0, k * BS, &[1; 512]).unwrap();
    }
    data.fail_nth(FaultOp::Writeback, 1, false);
    let m = Mirror::new(dst, 0, BS, OnError::GiveUp);
    let mut buf = Vec::new();
    for k in 0..STEP - 1 {
        m.copy_region(&src, 0, k, &mut buf).unwrap();
    }
    let e = m.copy_region(&src, 0, STEP - 1, &mut buf).unwrap_err();
    assert!(matches!(e, CopyError::WriteBack(_)), "{e}");
}
