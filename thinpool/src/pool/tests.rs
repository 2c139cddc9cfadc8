use super::*;
use crate::storage::testing::{FaultOp, FaultyStorage};
use crate::storage::MemStorage;

const BS: u64 = 64 * 1024;

fn mem_pool(data_blocks: u64) -> Pool {
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let data: Arc<dyn Storage> = Arc::new(MemStorage::new(data_blocks * BS));
    Pool::create(meta, data, 128, PoolOptions::default()).unwrap()
}

/// A pool over a fresh (all holes) memory data device, which the test keeps to look at.
fn sparse_pool(data_blocks: u64, opts: PoolOptions) -> (Pool, Arc<MemStorage>) {
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(MemStorage::new(data_blocks * BS));
    let p = Pool::create(meta, data.clone(), 128, opts).unwrap();
    p.create_thin(0).unwrap();
    (p, data)
}

fn no_passdown() -> PoolOptions {
    PoolOptions {
        discard_passdown: false,
        ..Default::default()
    }
}

fn read_vec(p: &Pool, dev: u32, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0xEEu8; len];
    p.read(dev, off, &mut b).unwrap();
    b
}

#[test]
fn provisioning_zeroes_the_rest_of_a_block() {
    // A data device of unknown history, dirty where the first block will land.
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let data: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(vec![0xAB; 16 * BS as usize]));
    let p = Pool::create(meta, data, 128, PoolOptions::default()).unwrap();
    p.create_thin(0).unwrap();
    assert_eq!(read_vec(&p, 0, 0, 4096), vec![0; 4096]);
    p.write(0, 1000, &[7u8; 512]).unwrap();
    let b = read_vec(&p, 0, 0, BS as usize);
    assert!(b[..1000].iter().all(|&x| x == 0));
    assert!(b[1000..1512].iter().all(|&x| x == 7));
    assert!(b[1512..].iter().all(|&x| x == 0));
    assert_eq!(p.device(0).unwrap().mapped_blocks, 1);
    // A write spanning a block boundary provisions both.
    p.write(0, BS - 10, &[9u8; 20]).unwrap();
    assert_eq!(p.device(0).unwrap().mapped_blocks, 2);
    assert_eq!(
        read_vec(&p, 0, BS - 12, 24)[1..23],
        [0, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0]
    );
}

#[test]
fn snapshots_copy_on_write_both_ways() {
    let p = mem_pool(32);
    p.create_thin(0).unwrap();
    p.write(0, 0, &vec![1u8; 2 * BS as usize]).unwrap();
    p.create_snap(1, 0).unwrap();
    p.write(0, 100, &[2u8; 10]).unwrap();
    p.write(1, BS + 5, &[3u8; 10]).unwrap();
    assert_eq!(read_vec(&p, 1, 100, 10), vec![1; 10]);
    assert_eq!(read_vec(&p, 0, 100, 10), vec![2; 10]);
    assert_eq!(read_vec(&p, 0, BS + 5, 10), vec![1; 10]);
    assert_eq!(read_vec(&p, 1, BS + 5, 10), vec![3; 10]);
    assert_eq!(read_vec(&p, 1, 0, 100), vec![1; 100]);
    // 2 original + 2 copies.
    assert_eq!(p.status().usage.data_used, 4);
    // Snapshot of snapshot, then delete the middle one.
    p.create_snap(2, 1).unwrap();
    p.delete(1).unwrap();
    assert_eq!(read_vec(&p, 2, BS + 5, 10), vec![3; 10]);
    p.commit().unwrap();
    p.delete(0).unwrap();
    p.delete(2).unwrap();
    p.commit().unwrap();
    assert_eq!(p.status().usage.data_used, 0);
    let r = p
        .with_metadata(|md| crate::check::check(md.storage()))
        .unwrap();
    assert!(r.is_clean(), "{r:?}");
}

#[test]
fn discard_unmaps_only_whole_blocks() {
    let p = mem_pool(16);
    p.create_thin(0).unwrap();
    p.write(0, 0, &vec![5u8; 3 * BS as usize]).unwrap();
    // Covers the end of block 0, all of block 1, the start of block 2.
    assert_eq!(p.discard(0, 100, 2 * BS).unwrap(), 1);
    assert_eq!(read_vec(&p, 0, 0, 10), vec![5; 10]);
    assert_eq!(read_vec(&p, 0, BS, 10), vec![0; 10]);
    assert_eq!(read_vec(&p, 0, 2 * BS, 10), vec![5; 10]);
    // Covers no whole block: nothing changes.
    assert_eq!(p.discard(0, 10, 4096).unwrap(), 0);
    assert_eq!(p.device(0).unwrap().mapped_blocks, 2);
    // Discard on a snapshot leaves the origin's block mapped.
    p.create_snap(1, 0).unwrap();
    assert_eq!(p.discard(1, 0, BS).unwrap(), 1);
    assert_eq!(read_vec(&p, 0, 0, 10), vec![5; 10]);
    assert_eq!(read_vec(&p, 1, 0, 10), vec![0; 10]);
}

#[test]
fn write_zeroes_partial_and_whole() {
    let p = mem_pool(16);
    p.create_thin(0).unwrap();
    p.write(0, 0, &vec![5u8; 2 * BS as usize]).unwrap();
    p.write_zeroes(0, 10, 20, false).unwrap();
    assert_eq!(read_vec(&p, 0, 8, 24)[..4], [5, 5, 0, 0]);
    assert_eq!(read_vec(&p, 0, 28, 4), vec![0, 0, 5, 5]);
    p.write_zeroes(0, BS, BS, true).unwrap();
    assert_eq!(p.device(0).unwrap().mapped_blocks, 1);
    // Zeroing an unmapped range provisions nothing.
    p.write_zeroes(0, 10 * BS + 7, 100, false).unwrap();
    assert_eq!(p.device(0).unwrap().mapped_blocks, 1);
}

#[test]
fn out_of_data_space_is_typed_and_recovers_after_frees() {
    let p = mem_pool(4);
    p.create_thin(0).unwrap();
    p.write(0, 0, &vec![1u8; 4 * BS as usize]).unwrap();
    p.commit().unwrap();
    let e = p.write(0, 4 * BS, &[1]).unwrap_err();
    assert!(matches!(e, Error::OutOfDataSpace { .. }), "{e}");
    // Existing data is intact and still writable in place.
    p.write(0, 0, &[9]).unwrap();
    assert_eq!(read_vec(&p, 0, 0, 2), vec![9, 1]);
    // Free a block: the allocator commits to reuse it.
    p.discard(0, BS, BS).unwrap();
    p.write(0, 4 * BS, &[2]).unwrap();
    assert_eq!(p.status().mode, PoolMode::Write);
}

#[test]
fn racing_writers_provision_one_block_once() {
    let p = Arc::new(mem_pool(64));
    p.create_thin(0).unwrap();
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let p = p.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    p.write(0, (i % 8) * BS + t as u64 * 512, &[t + 1; 512])
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(p.device(0).unwrap().mapped_blocks, 8);
    assert_eq!(p.status().usage.data_used, 8);
    for b in 0..8 {
        let d = read_vec(&p, 0, b * BS, 2048);
        for t in 0..4 {
            assert!(d[t * 512..(t + 1) * 512].iter().all(|&x| x == t as u8 + 1));
        }
    }
}

/// A pool with block 0 of device 0 committed (1s) and block 1 written after the commit
/// (2s), whose next commit fails on the metadata device: returns the pool and the commit's
/// error.
fn pool_whose_commit_failed() -> (Pool, Error) {
    let meta = Arc::new(FaultyStorage::new(MemStorage::new(4 << 20)));
    let data: Arc<dyn Storage> = Arc::new(MemStorage::new(16 * BS));
    let p = Pool::create(meta.clone(), data, 128, PoolOptions::default()).unwrap();
    p.create_thin(0).unwrap();
    p.write(0, 0, &[1u8; 4096]).unwrap();
    p.commit().unwrap();
    p.write(0, BS, &[2u8; 4096]).unwrap();
    meta.fail_nth(FaultOp::Write, 1, false);
    let e = p.commit().unwrap_err();
    (p, e)
}

#[test]
fn metadata_write_error_rolls_back_and_goes_read_only() {
    let (p, e) = pool_whose_commit_failed();
    assert!(matches!(e, Error::MetadataIo { .. }), "{e}");
    let st = p.status();
    assert_eq!(st.mode, PoolMode::ReadOnly);
    assert!(st.needs_check);
    // Reads keep working, the uncommitted block is gone, writes needing metadata fail.
    assert_eq!(read_vec(&p, 0, 0, 4), vec![1; 4]);
    assert_eq!(read_vec(&p, 0, BS, 4), vec![0; 4]);
    assert!(matches!(p.write(0, 2 * BS, &[1]), Err(Error::NeedsCheck)));
    // In-place writes to owned blocks still work, as in dm-thin's read-only mode.
    p.write(0, 0, &[3]).unwrap();
}

#[test]
fn no_flush_succeeds_after_a_failed_commit_rolled_writes_back() {
    // The write to block 1 was acknowledged, then lost with the transaction.
    let (p, _) = pool_whose_commit_failed();
    assert!(p.status().rolled_back);
    // The device is healthy again, and an in-place write lands; still no FLUSH may vouch
    // for the write to block 1.
    p.write(0, 0, &[3]).unwrap();
    for _ in 0..2 {
        assert!(matches!(p.commit(), Err(Error::RolledBack(_))));
    }
}

#[test]
fn data_sync_error_fails_the_pool() {
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(FaultyStorage::new(MemStorage::new(16 * BS)));
    let p = Pool::create(meta, data.clone(), 128, PoolOptions::default()).unwrap();
    p.create_thin(0).unwrap();
    p.write(0, 0, &[1u8; 4096]).unwrap();
    data.fail_nth(FaultOp::Write, 1, false);
    assert!(matches!(
        p.write(0, BS, &[1u8; 10]),
        Err(Error::DataIo { .. })
    ));
    // The failed write's block went back to the pool.
    assert_eq!(p.status().usage.data_used, 1);
    data.fail_nth(FaultOp::Sync, 1, false);
    assert!(matches!(p.commit(), Err(Error::DataIo { .. })));
    assert_eq!(p.status().mode, PoolMode::Fail);
    assert!(matches!(p.read(0, 0, &mut [0u8; 4]), Err(Error::Failed(_))));
}

/// The periodic commit syncs the data device only when a mapping changed: an overwrite in
/// place waits for a FLUSH; a new mapping's data is synced before the mapping commits.
#[test]
fn the_periodic_commit_syncs_data_only_for_changed_mappings() {
    let (p, data) = pool_counting_syncs();
    let flushes = || (data.count(FaultOp::Sync), data.count(FaultOp::Writeback));
    let before = flushes();
    p.write(0, 0, &[2u8; 4096]).unwrap();
    p.commit_if_changed().unwrap();
    assert_eq!(
        flushes(),
        before,
        "an overwrite in place was synced on time"
    );
    p.write(0, BS, &[3u8; 4096]).unwrap();
    p.commit_if_changed().unwrap();
    assert_eq!(
        data.count(FaultOp::Sync),
        before.0 + 1,
        "a new mapping committed without its data synced"
    );
    // A FLUSH syncs an overwrite.
    p.write(0, 0, &[4u8; 4096]).unwrap();
    p.commit().unwrap();
    assert_eq!(data.count(FaultOp::Sync), before.0 + 2);
}

#[test]
fn read_only_on_request_keeps_reads_and_owned_writes() {
    let p = mem_pool(16);
    p.create_thin(0).unwrap();
    p.write(0, 0, &[1u8; 4096]).unwrap();
    p.set_read_only(true).unwrap();
    assert_eq!(p.status().mode, PoolMode::ReadOnly);
    assert!(matches!(
        p.write(0, BS, &[1]),
        Err(Error::ReadOnly("set read-only on request"))
    ));
    assert!(matches!(p.create_thin(1), Err(Error::ReadOnly(_))));
    p.write(0, 0, &[2]).unwrap();
    assert_eq!(read_vec(&p, 0, 0, 2), vec![2, 1]);
    p.set_read_only(false).unwrap();
    p.write(0, BS, &[1]).unwrap();
}

/// A pool whose data device counts its syncs, with block 0 of device 0 written and
/// committed.
fn pool_counting_syncs() -> (Pool, Arc<FaultyStorage<MemStorage>>) {
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(FaultyStorage::new(MemStorage::new(16 * BS)));
    let p = Pool::create(meta, data.clone(), 128, PoolOptions::default()).unwrap();
    p.create_thin(0).unwrap();
    p.write(0, 0, &[1u8; 4096]).unwrap();
    p.commit().unwrap();
    (p, data)
}

#[test]
fn flush_syncs_overwrites_that_change_no_metadata() {
    let (p, data) = pool_counting_syncs();
    let syncs = data.count(FaultOp::Sync);
    p.commit().unwrap();
    assert_eq!(
        data.count(FaultOp::Sync),
        syncs,
        "nothing written: no flush"
    );
    p.write(0, 0, &[2u8; 4096]).unwrap(); // in place: no metadata change
    assert!(!p.status().uncommitted_changes);
    p.commit().unwrap();
    assert_eq!(
        data.count(FaultOp::Sync),
        syncs + 1,
        "the overwrite must be flushed"
    );
}

#[test]
fn a_commit_hold_keeps_other_commits_out_until_it_is_dropped() {
    let p = Arc::new(mem_pool(16));
    let hold = p.hold_commits();
    // The first step of a change: no commit from elsewhere may make it durable alone.
    p.create_thin(1).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let other = {
        let (p, done) = (p.clone(), done.clone());
        std::thread::spawn(move || {
            p.commit().unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(!done.load(Ordering::SeqCst), "a commit ran during the hold");
    // The rest of the change, committed under the hold.
    hold.pool().set_transaction_id(0, 1).unwrap();
    hold.commit().unwrap();
    assert!(!p.status().uncommitted_changes);
    drop(hold);
    other.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    assert_eq!(p.status().transaction_id, 1);
}

#[test]
fn running_out_of_space_does_not_commit_a_held_change() {
    let p = mem_pool(4);
    p.create_thin(0).unwrap();
    p.create_thin(1).unwrap();
    p.write(0, 0, &vec![1u8; 3 * BS as usize]).unwrap();
    p.write(1, 0, &vec![1u8; BS as usize]).unwrap();
    p.commit().unwrap();
    let before = p.status().transaction_id;
    // A change in progress frees device 1's block; the pool is full.
    let hold = p.hold_commits();
    p.delete(1).unwrap();
    // A write needing a block would commit to reuse it: not while the change is held.
    let e = p.write(0, 3 * BS, &[2]).unwrap_err();
    assert!(matches!(e, Error::OutOfDataSpace { .. }), "{e}");
    assert!(p.status().uncommitted_changes);
    assert_eq!(p.status().transaction_id, before);
    hold.commit().unwrap();
    drop(hold);
    // Once the change is committed the block is free again.
    p.write(0, 3 * BS, &[2]).unwrap();
    assert_eq!(read_vec(&p, 0, 3 * BS, 1), vec![2]);
}

#[test]
fn a_failed_write_back_before_a_commit_fails_the_pool_as_a_failed_flush_does() {
    use crate::storage::testing::{FaultOp, FaultyStorage};
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(FaultyStorage::new(MemStorage::new(16 * BS)));
    let p = Pool::create(meta, data.clone(), 128, PoolOptions::default()).unwrap();
    p.create_thin(0).unwrap();
    p.commit().unwrap();
    p.write(0, 0, &[1u8; 4096]).unwrap();
    data.fail_nth(FaultOp::Writeback, 1, false);
    // The page cache may have dropped what it could not write: nothing since the last
    // commit can be trusted, so the pool fails rather than commit a mapping to it.
    assert!(matches!(p.commit(), Err(Error::DataIo { op: "sync", .. })));
    assert_eq!(p.status().mode, PoolMode::Fail);
    assert!(data.count(FaultOp::Writeback) >= 1);
}

/// Data storage whose sync, once armed, signals that it started and then waits until
/// released: a commit's data sync held in progress.
struct HeldSync {
    inner: MemStorage,
    armed: std::sync::atomic::AtomicBool,
    started: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    /// A `writeback` fails, taking the error as the kernel's one-time report of a
    /// write-back error does (errseq): a `sync` after it succeeds.
    fail_writeback: std::sync::atomic::AtomicBool,
    /// When each flush returned.
    log: Mutex<Vec<&'static str>>,
}

impl HeldSync {
    fn new(
        blocks: u64,
    ) -> (
        Self,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let data = HeldSync {
            inner: MemStorage::new(blocks * BS),
            armed: false.into(),
            started: Mutex::new(Some(started_tx)),
            release: Mutex::new(Some(release_rx)),
            fail_writeback: false.into(),
            log: Mutex::new(Vec::new()),
        };
        (data, started, release)
    }
}

impl Storage for HeldSync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        if self.armed.swap(false, Ordering::SeqCst) {
            if let Some(tx) = self.started.lock().unwrap().take() {
                tx.send(()).unwrap();
            }
            if let Some(rx) = self.release.lock().unwrap().take() {
                rx.recv().unwrap();
            }
        }
        self.log.lock().unwrap().push("sync ok");
        self.inner.sync()
    }
    fn writeback(&self) -> std::io::Result<()> {
        if self.fail_writeback.load(Ordering::SeqCst) {
            self.log.lock().unwrap().push("write-back failed");
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.sync()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
}

/// A pool with a thin device 0, a journal of `records` records per half and a data
/// device of `blocks` blocks whose next sync, once armed, waits for `release`.
struct HeldSyncPool {
    p: Pool,
    meta: Arc<MemStorage>,
    journal_file: Arc<MemStorage>,
    data: Arc<HeldSync>,
    started: std::sync::mpsc::Receiver<()>,
    release: std::sync::mpsc::Sender<()>,
}

fn held_sync_pool(records: u64, blocks: u64, boot: [u8; 16]) -> HeldSyncPool {
    let meta = Arc::new(MemStorage::new(4 << 20));
    let journal_file = Arc::new(MemStorage::new(2 * (4096 + 32 * records)));
    let (data, started, release) = HeldSync::new(blocks);
    let data = Arc::new(data);
    {
        let p = Pool::create(meta.clone(), data.clone(), 128, PoolOptions::default()).unwrap();
        p.create_thin(0).unwrap();
        p.commit().unwrap();
    }
    let journal = Journal::open(journal_file.clone(), boot).unwrap();
    let p = Pool::open_with_journal(
        meta.clone(),
        data.clone(),
        Some(journal),
        PoolOptions::default(),
    )
    .unwrap();
    HeldSyncPool {
        p,
        meta,
        journal_file,
        data,
        started,
        release,
    }
}

#[test]
fn writes_and_new_mappings_complete_while_a_commit_syncs_the_data_device() {
    let boot = [3u8; 16];
    let HeldSyncPool {
        p,
        meta,
        journal_file,
        data,
        started,
        release,
    } = held_sync_pool(64, 16, boot);
    p.write(0, 0, &[1u8; 4096]).unwrap();
    data.armed.store(true, Ordering::SeqCst);
    std::thread::scope(|s| {
        let committer = s.spawn(|| p.commit());
        started.recv().unwrap();
        // The commit is syncing the data device and cannot finish until released: a new
        // mapping, an overwrite and a read all complete meanwhile.
        p.write(0, 5 * BS, &[2u8; 4096]).unwrap();
        p.write(0, 100, &[3u8; 10]).unwrap();
        assert_eq!(read_vec(&p, 0, 5 * BS, 4), vec![2; 4]);
        // A crash now, with the frozen superblock not written: the old one and the
        // journal's two halves give back every acknowledged write.
        let crashed = [meta.to_vec(), data.inner.to_vec(), journal_file.to_vec()];
        release.send(()).unwrap();
        committer.join().unwrap().unwrap();
        let reopen = |[m, d, j]: [Vec<u8>; 3]| {
            let journal = Journal::open(Arc::new(MemStorage::from_vec(j)), boot).unwrap();
            Pool::open_with_journal(
                Arc::new(MemStorage::from_vec(m)),
                Arc::new(MemStorage::from_vec(d)),
                Some(journal),
                PoolOptions::default(),
            )
            .unwrap()
        };
        let before = reopen(crashed);
        assert_eq!(read_vec(&before, 0, 0, 4), vec![1; 4]);
        assert_eq!(read_vec(&before, 0, 100, 10), vec![3; 10]);
        assert_eq!(read_vec(&before, 0, 5 * BS, 4), vec![2; 4]);
    });
    // The commit covered what was written before it, not the mapping made during it: that
    // one is in the next transaction (and the journal).
    let committed = Pool::open(
        Arc::new(MemStorage::from_vec(meta.to_vec())),
        Arc::new(MemStorage::from_vec(data.inner.to_vec())),
        PoolOptions::default(),
    )
    .unwrap();
    assert_eq!(committed.device(0).unwrap().mapped_blocks, 1);
    assert_eq!(p.device(0).unwrap().mapped_blocks, 2);
    // A crash after the commit: the journal's second half gives back the rest.
    let journal =
        Journal::open(Arc::new(MemStorage::from_vec(journal_file.to_vec())), boot).unwrap();
    let after = Pool::open_with_journal(
        Arc::new(MemStorage::from_vec(meta.to_vec())),
        Arc::new(MemStorage::from_vec(data.inner.to_vec())),
        Some(journal),
        PoolOptions::default(),
    )
    .unwrap();
    assert_eq!(after.device(0).unwrap().mapped_blocks, 2);
    assert_eq!(read_vec(&after, 0, 5 * BS, 4), vec![2; 4]);
    assert_eq!(read_vec(&after, 0, 0, 4), vec![1; 4]);
    p.commit().unwrap();
}

#[test]
fn a_new_mapping_waits_for_the_commit_under_way_when_the_journal_is_full() {
    const RECORDS: u64 = 8;
    let boot = [4u8; 16];
    let HeldSyncPool {
        p,
        meta,
        journal_file,
        data,
        started,
        release,
    } = held_sync_pool(RECORDS, 32, boot);
    p.write(0, 0, &[1u8; 4096]).unwrap();
    data.armed.store(true, Ordering::SeqCst);
    std::thread::scope(|s| {
        let committer = s.spawn(|| p.commit());
        started.recv().unwrap();
        // The commit is syncing the data device: its half of the journal is kept, and the
        // next transaction's half fills up.
        for vb in 1..=RECORDS {
            p.write(0, vb * BS, &[vb as u8; 4096]).unwrap();
        }
        let one_more = s.spawn(|| p.write(0, (RECORDS + 1) * BS, &[0xee; 4096]));
        while p.lock().waiting_for_commit == 0 && !one_more.is_finished() {
            std::thread::yield_now();
        }
        release.send(()).unwrap();
        committer.join().unwrap().unwrap();
        one_more
            .join()
            .unwrap()
            .expect("a write that found the journal full succeeds once the commit ends");
    });
    for vb in 1..=RECORDS {
        assert_eq!(read_vec(&p, 0, vb * BS, 4), vec![vb as u8; 4]);
    }
    assert_eq!(read_vec(&p, 0, (RECORDS + 1) * BS, 4), vec![0xee; 4]);
    // Nothing was lost: a crash now gives back every write from the commit and the journal.
    let journal =
        Journal::open(Arc::new(MemStorage::from_vec(journal_file.to_vec())), boot).unwrap();
    let after = Pool::open_with_journal(
        Arc::new(MemStorage::from_vec(meta.to_vec())),
        Arc::new(MemStorage::from_vec(data.inner.to_vec())),
        Some(journal),
        PoolOptions::default(),
    )
    .unwrap();
    assert_eq!(after.device(0).unwrap().mapped_blocks, RECORDS + 2);
    assert_eq!(read_vec(&after, 0, (RECORDS + 1) * BS, 4), vec![0xee; 4]);
}

/// A change that holds commits (a snapshot being made, a migration's switch) while the
/// data path fills the journal's half: the write that finds no room waits for the change
/// to let go and commit, instead of failing the guest's write.
#[test]
fn a_new_mapping_waits_for_a_change_that_holds_commits_when_the_journal_is_full() {
    const RECORDS: u64 = 8;
    let HeldSyncPool { p, .. } = held_sync_pool(RECORDS, 32, [6u8; 16]);
    std::thread::scope(|s| {
        let hold = p.hold_commits();
        let filler = s.spawn(|| {
            for vb in 0..RECORDS {
                p.write(0, vb * BS, &[vb as u8 + 1; 4096])?;
            }
            p.write(0, RECORDS * BS, &[0xee; 4096])
        });
        while p.lock().waiting_for_commit == 0 && !filler.is_finished() {
            std::thread::yield_now();
        }
        let finished_early = filler.is_finished();
        hold.commit().unwrap();
        drop(hold);
        filler
            .join()
            .unwrap()
            .expect("a write that found the journal full succeeds once the change lets go");
        assert!(!finished_early, "the write did not wait for the change");
    });
    for vb in 0..RECORDS {
        assert_eq!(read_vec(&p, 0, vb * BS, 4), vec![vb as u8 + 1; 4]);
    }
    assert_eq!(read_vec(&p, 0, RECORDS * BS, 4), vec![0xee; 4]);
}

/// The holder of commits itself filling the journal cannot wait for itself: its write
/// fails (as any change that outgrows the journal while it must stay whole) and nothing
/// hangs.
#[test]
fn a_holder_of_commits_that_fills_the_journal_itself_gets_an_error_not_a_hang() {
    const RECORDS: u64 = 8;
    let HeldSyncPool { p, .. } = held_sync_pool(RECORDS, 32, [7u8; 16]);
    let hold = p.hold_commits();
    for vb in 0..RECORDS {
        p.write(0, vb * BS, &[1; 4096]).unwrap();
    }
    assert!(matches!(
        p.write(0, RECORDS * BS, &[2; 4096]),
        Err(Error::JournalFull { .. })
    ));
    drop(hold);
    p.write(0, RECORDS * BS, &[2; 4096]).unwrap();
    assert_eq!(read_vec(&p, 0, RECORDS * BS, 4), vec![2; 4]);
}

/// Runs `f` with a handle on pool `p` on a thread of its own.
fn spawn_on<T: Send + 'static>(
    p: &Arc<Pool>,
    f: impl FnOnce(Arc<Pool>) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let p = p.clone();
    std::thread::spawn(move || f(p))
}

/// Runs `f` on a thread of its own and fails the test if it has not returned within a
/// minute: for tests whose failure is a deadlock.
fn within_a_minute<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("deadlock: {what} did not end within a minute"))
}

/// A pool of `blocks` data blocks with device 0, on a data device whose writes a test can
/// hold.
fn held_pool(blocks: u64) -> (Arc<Pool>, Arc<crate::storage::held::HeldWrite<MemStorage>>) {
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(crate::storage::held::HeldWrite::new(MemStorage::new(
        blocks * BS,
    )));
    let p = Arc::new(Pool::create(meta, data.clone(), 128, PoolOptions::default()).unwrap());
    p.create_thin(0).unwrap();
    (p, data)
}

/// A pool whose device 0 has written blocks 0..`records`, filling the journal's half (one
/// more mapping needs a commit), on a data device whose writes a test can hold.
fn pool_with_a_full_journal_half(
    records: u64,
) -> (Arc<Pool>, Arc<crate::storage::held::HeldWrite<MemStorage>>) {
    let meta = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(crate::storage::held::HeldWrite::new(MemStorage::new(
        32 * BS,
    )));
    {
        let p = Pool::create(meta.clone(), data.clone(), 128, PoolOptions::default()).unwrap();
        p.create_thin(0).unwrap();
        p.commit().unwrap();
    }
    let journal = Journal::open(
        Arc::new(MemStorage::new(2 * (4096 + 32 * records))),
        [8u8; 16],
    )
    .unwrap();
    let p = Arc::new(
        Pool::open_with_journal(meta, data.clone(), Some(journal), PoolOptions::default()).unwrap(),
    );
    for vb in 0..records {
        p.write(0, vb * BS, &[1u8; 4096]).unwrap();
    }
    (p, data)
}

/// A device's gate closed by a thread that holds no commits (after a merge every device's
/// external origin is set again) waits for the writes in flight, and one of them waiting for
/// commits held elsewhere (the journal full) may wait on: nobody waits for the closer. It
/// must not fail (only a closer holding commits makes it give up).
#[test]
fn a_gate_closed_without_commits_held_lets_a_write_wait_for_a_commit() {
    const RECORDS: u64 = 4;
    let (p, data) = pool_with_a_full_journal_half(RECORDS);
    data.hold_next_write();
    let (finished_early, written, closed) = within_a_minute("a closer without a hold", {
        let p = p.clone();
        move || {
            let hold = p.hold_commits();
            let writer = spawn_on(&p, move |p| p.write(0, RECORDS * BS, &[2u8; 4096]));
            data.wait_until_holding();
            let closer = spawn_on(&p, move |p| p.set_external_origin(0, None));
            while p.lock().closing.is_empty() {
                std::thread::yield_now();
            }
            // The write now finds the journal full with commits held by this thread and
            // the gate closing.
            data.release();
            while p.lock().waiting_for_commit == 0 && !writer.is_finished() {
                std::thread::yield_now();
            }
            let finished_early = writer.is_finished();
            hold.commit().unwrap();
            drop(hold);
            (
                finished_early,
                writer.join().unwrap(),
                closer.join().unwrap(),
            )
        }
    });
    closed.unwrap();
    written.expect("the write failed because a gate closed");
    assert!(!finished_early, "the write did not wait for the commits");
    assert_eq!(read_vec(&p, 0, RECORDS * BS, 4), vec![2; 4]);
}

/// An abort waits for the commits held by a change, and the change's own block I/O goes
/// on meanwhile (the abort waits for I/O only once it holds commits itself).
#[test]
fn a_holder_of_commits_reads_and_writes_while_an_abort_waits_for_it() {
    let p = Arc::new(mem_pool(16));
    p.create_thin(0).unwrap();
    p.write(0, 0, &[1u8; 4096]).unwrap();
    p.commit().unwrap();
    let aborted = within_a_minute("a holder's I/O with an abort waiting", {
        let p = p.clone();
        move || {
            let hold = p.hold_commits();
            let aborter = spawn_on(&p, move |p| p.abort());
            while p.lock().aborting == 0 {
                std::thread::yield_now();
            }
            assert_eq!(read_vec(&p, 0, 0, 4), vec![1; 4]);
            p.write(0, BS, &[2u8; 4096]).unwrap();
            drop(hold);
            aborter.join().unwrap()
        }
    });
    aborted.unwrap();
    assert_eq!(
        p.device(0).unwrap().mapped_blocks,
        1,
        "the abort dropped the write"
    );
}

/// A write in flight when an abort begins, which then finds the journal full, fails (its
/// transaction is being dropped) instead of waiting for the abort's hold of commits while
/// the abort waits for it.
#[test]
fn a_write_that_finds_the_journal_full_during_an_abort_fails_instead_of_waiting() {
    const RECORDS: u64 = 4;
    let (p, data) = pool_with_a_full_journal_half(RECORDS);
    data.hold_next_write();
    let (written, aborted) = within_a_minute("an abort with a write in flight", {
        let p = p.clone();
        move || {
            let writer = spawn_on(&p, move |p| p.write(0, RECORDS * BS, &[2u8; 4096]));
            data.wait_until_holding();
            let aborter = spawn_on(&p, move |p| p.abort());
            // The abort holds commits and waits for the write in flight.
            while p.lock().commits_held_by.is_none() {
                std::thread::yield_now();
            }
            data.release();
            (writer.join().unwrap(), aborter.join().unwrap())
        }
    });
    aborted.unwrap();
    assert!(
        written.is_err(),
        "the write survived the abort: {written:?}"
    );
    assert_eq!(p.device(0).unwrap().mapped_blocks, 0);
}

/// A change that holds commits and deletes a device (the catalog deletes under its hold)
/// waits for the writes in flight to the device; one of them waiting for those commits to
/// be let go (the journal full) gives up instead of waiting for ever.
#[test]
fn a_delete_under_a_hold_of_commits_does_not_wait_for_ever_for_a_write_waiting_for_it() {
    const RECORDS: u64 = 8;
    let HeldSyncPool { p, .. } = held_sync_pool(RECORDS, 32, [9u8; 16]);
    let p = Arc::new(p);
    p.create_thin(1).unwrap();
    p.commit().unwrap();
    let (deleted, written) = within_a_minute("a delete under a hold with a write waiting", {
        let p = p.clone();
        move || {
            let hold = p.hold_commits();
            let filler = std::thread::spawn({
                let p = p.clone();
                move || {
                    for vb in 0..=RECORDS {
                        p.write(1, vb * BS, &[1u8; 4096])?;
                    }
                    Ok::<(), Error>(())
                }
            });
            while p.lock().waiting_for_commit == 0 && !filler.is_finished() {
                std::thread::yield_now();
            }
            let deleted = p.delete(1);
            hold.commit().unwrap();
            drop(hold);
            (deleted, filler.join().unwrap())
        }
    });
    deleted.unwrap();
    assert!(
        written.is_err(),
        "the write to the deleted device succeeded"
    );
    assert!(p.device(1).is_err());
}

/// A write that found the pool full waits for the blocks a commit under way frees (their
/// passdown); an abort beginning meanwhile does not stop that wait short (it would spin with
/// the metadata lock held, and the commit could never end).
#[test]
fn a_write_waiting_for_a_commits_freed_blocks_lets_an_abort_in() {
    let (p, data) = held_pool(2);
    p.write(0, 0, &[1u8; 4096]).unwrap();
    p.write(0, BS, &[2u8; 4096]).unwrap();
    p.commit().unwrap();
    p.discard(0, 0, BS).unwrap();
    data.hold_next_punch();
    let aborted = within_a_minute("an abort while a write waits for freed blocks", {
        let p = p.clone();
        move || {
            // The commit makes the discard durable, then punches the freed block: held.
            let committer = spawn_on(&p, move |p| p.commit());
            data.wait_until_holding();
            let writer = spawn_on(&p, move |p| p.write(0, 0, &[3u8; 4096]));
            while p.lock().waiting_for_commit == 0 {
                std::thread::yield_now();
            }
            let aborter = spawn_on(&p, move |p| p.abort());
            while p.lock().aborting == 0 {
                std::thread::yield_now();
            }
            data.release();
            committer.join().unwrap().unwrap();
            writer.join().unwrap().unwrap();
            aborter.join().unwrap()
        }
    });
    aborted.unwrap();
}

/// Runs `op`, which flushes the data device once, on its own thread while a passdown of
/// two punches holds its first; the first punch then ends and the second is held: `op`
/// must end meanwhile, having waited for the punch under way only. Returns the pool.
fn between_two_punches(
    what: &str,
    op: impl FnOnce(Arc<Pool>) -> Result<()> + Send + 'static,
) -> Arc<Pool> {
    let (p, data) = held_pool(8);
    // Blocks 0 and 2 freed, 1 kept: two runs, so two punches.
    p.write(0, 0, &vec![1u8; 3 * BS as usize]).unwrap();
    p.commit().unwrap();
    p.discard(0, 0, BS).unwrap();
    p.discard(0, 2 * BS, BS).unwrap();
    data.hold_next_punch();
    let giver = spawn_on(&p, |p| p.commit());
    data.wait_until_holding();
    let op = spawn_on(&p, op);
    while p.flushes_waiting.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    data.hold_next_punch();
    data.wait_until_holding();
    within_a_minute(what, move || op.join().unwrap()).unwrap();
    data.release();
    giver.join().unwrap().unwrap();
    assert_eq!(p.lock().md.withheld_data_blocks(), 0);
    p
}

/// Giving back the space a commit freed takes a while (a punch per MiB of a file, so a
/// deleted snapshot of 100 GiB takes minutes): a FLUSH meanwhile waits for the piece being
/// punched at most (no punch runs during a flush of the data device), not for the rest.
#[test]
fn a_flush_waits_for_one_piece_of_a_passdown_at_most() {
    let p = between_two_punches("a FLUSH during a passdown", |p| {
        // A metadata change only: its FLUSH flushes the data device once, for the commit.
        p.discard(0, BS, BS)?;
        p.flush()
    });
    assert_eq!(
        read_vec(&p, 0, 0, 3 * BS as usize),
        vec![0u8; 3 * BS as usize]
    );
    assert_eq!(p.status().usage.data_used, 0);
}

/// So does a change that holds commits (a snapshot being made).
#[test]
fn a_snapshot_waits_for_one_piece_of_a_passdown_at_most() {
    let p = between_two_punches("a snapshot during a passdown", |p| {
        let hold = p.hold_commits();
        p.create_snap(1, 0)?;
        hold.commit()
    });
    assert_eq!(read_vec(&p, 1, BS, 4096), vec![1u8; 4096]);
    assert!(!p.status().uncommitted_changes);
}

/// The blocks being given back stay out of allocation until their punch is over, across
/// an abort too, which reloads the space map from the disk, where they are free: a write
/// landing in one would be punched away.
#[test]
fn blocks_being_given_back_stay_out_of_reach_across_an_abort() {
    let (p, data) = held_pool(2);
    p.write(0, 0, &[1u8; 4096]).unwrap();
    p.write(0, BS, &[2u8; 4096]).unwrap();
    p.commit().unwrap();
    p.discard(0, 0, BS).unwrap();
    data.hold_next_punch();
    let giver = spawn_on(&p, |p| p.commit());
    data.wait_until_holding();
    within_a_minute("an abort while a punch is held", {
        let p = p.clone();
        move || p.abort()
    })
    .unwrap();
    // The one free block is the one being punched: a write that needs a block waits.
    let writer = spawn_on(&p, |p| p.write(0, 2 * BS, &[3u8; 4096]));
    while !writer.is_finished() && p.lock().waiting_for_commit == 0 {
        std::thread::yield_now();
    }
    data.release();
    giver.join().unwrap().unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(read_vec(&p, 0, 2 * BS, 4096), vec![3u8; 4096]);
    assert_eq!(read_vec(&p, 0, BS, 4096), vec![2u8; 4096]);
}

/// The daemon's passdown thread waits for freed space no other thread is giving back:
/// while a commit's caller punches, space listed meanwhile is left to that caller, and the
/// thread goes on waiting instead of finding work it cannot do, over and over.
#[test]
fn freed_space_another_thread_is_giving_back_is_not_waited_for_again() {
    // Every block of the data device holds bytes: the free ones are not holes.
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(crate::storage::held::HeldWrite::new(MemStorage::from_vec(
        vec![9u8; 8 * BS as usize],
    )));
    let p = Arc::new(Pool::create(meta, data.clone(), 128, PoolOptions::default()).unwrap());
    p.create_thin(0).unwrap();
    p.write(0, 0, &vec![1u8; 2 * BS as usize]).unwrap();
    p.commit().unwrap();
    p.discard(0, 0, BS).unwrap();
    data.hold_next_punch();
    let giver = spawn_on(&p, |p| p.commit());
    data.wait_until_holding();
    // More to give back (as a FLUSH that freed blocks would list).
    assert_eq!(p.reclaim_free_space(0), (6, None));
    assert!(
        !p.wait_for_freed_space(std::time::Duration::from_millis(20)),
        "work another thread is at"
    );
    data.release();
    giver.join().unwrap().unwrap();
    // The giver took it all before it stopped.
    assert!(!p.wait_for_freed_space(std::time::Duration::ZERO));
    assert_eq!(p.lock().md.withheld_data_blocks(), 0);
    assert_eq!(p.status().usage.data_used, 1);
}

/// A write in a full pool takes back one block freed and not given back yet, unpunched;
/// the rest of the freed space still goes back to the host.
#[test]
fn a_full_pool_takes_back_one_freed_block_and_gives_the_rest_back() {
    let (p, data) = sparse_pool(16, PoolOptions::default());
    p.create_thin(1).unwrap();
    p.write(0, 0, &vec![1u8; 8 * BS as usize]).unwrap();
    p.write(1, 0, &vec![2u8; 8 * BS as usize]).unwrap();
    p.commit().unwrap();
    p.delete(1).unwrap();
    // A FLUSH: the space is left to whoever passes down.
    p.flush().unwrap();
    p.write(0, 8 * BS, &vec![3u8; BS as usize]).unwrap();
    p.commit().unwrap();
    assert_eq!(p.status().usage.data_used, 9);
    assert_eq!(data.allocated_bytes(), 9 * BS, "the rest was given back");
    assert_eq!(read_vec(&p, 0, 8 * BS, 4096), vec![3u8; 4096]);
}

/// A write that waited for a block being punched and lost it to another write commits,
/// when that frees a block, rather than fail out of space.
#[test]
fn a_write_that_loses_a_punched_block_commits_to_free_another() {
    let (p, data) = held_pool(3);
    p.write(0, 0, &vec![1u8; 3 * BS as usize]).unwrap();
    p.commit().unwrap();
    p.discard(0, 0, BS).unwrap();
    data.hold_next_punch();
    let giver = spawn_on(&p, |p| p.commit());
    data.wait_until_holding();
    let w1 = spawn_on(&p, |p| p.write(0, 10 * BS, &[3u8; 4096]));
    let w2 = spawn_on(&p, |p| p.write(0, 11 * BS, &[4u8; 4096]));
    while p.lock().waiting_for_commit < 2 {
        std::thread::yield_now();
    }
    p.discard(0, BS, BS).unwrap();
    assert_eq!(p.with_metadata(|m| m.pending_data_frees()), 1);
    data.release();
    giver.join().unwrap().unwrap();
    let (r1, r2) = (w1.join().unwrap(), w2.join().unwrap());
    assert!(r1.is_ok() && r2.is_ok(), "{r1:?} {r2:?}");
    assert_eq!(read_vec(&p, 0, 10 * BS, 4096), vec![3u8; 4096]);
    assert_eq!(read_vec(&p, 0, 11 * BS, 4096), vec![4u8; 4096]);
}

/// The list of freed blocks to give back is in memory only: a process that ends before
/// its passdown (a daemon's stop does not wait for it) leaves their space allocated, and
/// the next open knows nothing of it. Asked to, the pool finds it again: free blocks that
/// are not holes.
#[test]
fn space_a_passdown_left_allocated_is_found_and_given_back_after_the_next_open() {
    let meta = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(MemStorage::new(16 * BS));
    let p = Pool::create(meta.clone(), data.clone(), 128, PoolOptions::default()).unwrap();
    p.create_thin(0).unwrap();
    p.create_thin(1).unwrap();
    p.write(0, 0, &vec![1u8; 2 * BS as usize]).unwrap();
    p.write(1, 0, &vec![2u8; 4 * BS as usize]).unwrap();
    p.commit().unwrap();
    p.delete(1).unwrap();
    p.flush().unwrap();
    // As a daemon stops.
    p.leave_passdown_to_next_start();
    drop(p);
    assert_eq!(data.allocated_bytes(), 6 * BS);
    for opts in [no_passdown(), PoolOptions::default()] {
        let p = Pool::open(meta.clone(), data.clone(), opts.clone()).unwrap();
        assert_eq!(data.allocated_bytes(), 6 * BS, "the open knew nothing");
        if !opts.discard_passdown {
            assert_eq!(p.reclaim_free_space(0), (0, None), "passdown is off");
            continue;
        }
        assert_eq!(p.reclaim_free_space(0), (4, None));
        p.pass_down();
        assert_eq!(data.allocated_bytes(), 2 * BS);
        assert_eq!(p.reclaim_free_space(0), (0, None), "nothing left");
        assert_eq!(
            read_vec(&p, 0, 0, 2 * BS as usize),
            vec![1u8; 2 * BS as usize]
        );
        assert_eq!(p.status().usage.data_used, 2);
    }
}

#[test]
fn a_first_write_to_a_block_that_is_a_hole_writes_only_its_own_bytes() {
    let (p, data) = sparse_pool(16, PoolOptions::default());
    p.write(0, BS + 8192, &[7u8; 4096]).unwrap();
    assert_eq!(
        data.allocated_bytes(),
        4096,
        "the rest of the block was written"
    );
    let b = read_vec(&p, 0, BS, BS as usize);
    assert!(b[..8192].iter().all(|&x| x == 0));
    assert!(b[8192..12288].iter().all(|&x| x == 7));
    assert!(b[12288..].iter().all(|&x| x == 0));
}

#[test]
fn a_reused_block_is_zeroed_when_its_space_was_not_given_back() {
    // One data block: the second write must reuse the first's, freed but not punched.
    let (p, data) = sparse_pool(1, no_passdown());
    p.write(0, 0, &vec![0xAB; BS as usize]).unwrap();
    p.commit().unwrap();
    assert_eq!(p.discard(0, 0, BS).unwrap(), 1);
    p.commit().unwrap();
    assert_eq!(data.allocated_bytes(), BS, "punched with passdown off");
    p.write(0, BS + 100, &[5u8; 10]).unwrap();
    let b = read_vec(&p, 0, BS, BS as usize);
    assert!(b[..100].iter().all(|&x| x == 0), "stale data shown");
    assert!(b[110..].iter().all(|&x| x == 0), "stale data shown");
}

#[test]
fn discarded_blocks_are_punched_once_the_commit_that_freed_them_is_durable() {
    let (p, data) = sparse_pool(16, PoolOptions::default());
    p.write(0, 0, &vec![1u8; 4 * BS as usize]).unwrap();
    p.commit().unwrap();
    assert_eq!(data.allocated_bytes(), 4 * BS);
    // Partial blocks at either end are left alone, as dm-thin does.
    assert_eq!(p.discard(0, BS - 512, 2 * BS + 1024).unwrap(), 2);
    assert_eq!(data.allocated_bytes(), 4 * BS, "punched before the commit");
    p.commit().unwrap();
    assert_eq!(data.allocated_bytes(), 2 * BS);
    assert_eq!(read_vec(&p, 0, 0, BS as usize), vec![1u8; BS as usize]);
    assert_eq!(
        read_vec(&p, 0, BS, 2 * BS as usize),
        vec![0; 2 * BS as usize]
    );
    assert_eq!(read_vec(&p, 0, 3 * BS, BS as usize), vec![1u8; BS as usize]);
}

#[test]
fn write_zeroes_with_unmap_gives_whole_blocks_back() {
    let (p, data) = sparse_pool(16, PoolOptions::default());
    p.write(0, 0, &vec![1u8; 3 * BS as usize]).unwrap();
    p.commit().unwrap();
    p.write_zeroes(0, 512, 3 * BS - 512, true).unwrap();
    p.commit().unwrap();
    // The first block is zeroed (partly covered), the other two are punched.
    assert_eq!(data.allocated_bytes(), BS);
    let b = read_vec(&p, 0, 0, 3 * BS as usize);
    assert!(b[..512].iter().all(|&x| x == 1));
    assert!(b[512..].iter().all(|&x| x == 0));
}

#[test]
fn a_punched_block_is_reused_as_a_hole() {
    let (p, data) = sparse_pool(1, PoolOptions::default());
    p.write(0, 0, &vec![0xAB; BS as usize]).unwrap();
    p.commit().unwrap();
    p.discard(0, 0, BS).unwrap();
    p.commit().unwrap();
    assert_eq!(data.allocated_bytes(), 0);
    p.write(0, BS + 100, &[5u8; 10]).unwrap();
    assert_eq!(data.allocated_bytes(), 4096);
    let b = read_vec(&p, 0, BS, BS as usize);
    assert!(b[..100].iter().all(|&x| x == 0));
    assert_eq!(b[100..110], [5u8; 10]);
    assert!(b[110..].iter().all(|&x| x == 0));
}

#[test]
fn deleting_a_device_punches_the_blocks_no_other_device_shares() {
    let (p, data) = sparse_pool(16, PoolOptions::default());
    p.write(0, 0, &vec![1u8; 2 * BS as usize]).unwrap();
    p.create_snap(1, 0).unwrap();
    // Device 0 moves to a copy of its first block; the snapshot alone has the old one.
    p.write(0, 0, &[2u8; 512]).unwrap();
    p.commit().unwrap();
    assert_eq!(data.allocated_bytes(), 3 * BS);
    p.delete(1).unwrap();
    p.commit().unwrap();
    assert_eq!(data.allocated_bytes(), 2 * BS);
    let b = read_vec(&p, 0, 0, 2 * BS as usize);
    assert_eq!(b[..512], [2u8; 512]);
    assert!(b[512..].iter().all(|&x| x == 1));
}

/// A data device that records the length of every punch, and can make each take a while
/// (so that the writes racing them find the moment between a commit's flip and the end of
/// its punches).
struct WatchedPunches {
    store: MemStorage,
    delay: Option<std::time::Duration>,
    lengths: Mutex<Vec<u64>>,
    /// Whether it is a file (a punch holds the lock its writes take) or a block device.
    file: bool,
}

impl WatchedPunches {
    fn new(store: MemStorage, delay: Option<std::time::Duration>) -> Self {
        WatchedPunches {
            store,
            delay,
            lengths: Mutex::default(),
            file: true,
        }
    }

    fn lengths(&self) -> Vec<u64> {
        self.lengths.lock().unwrap().clone()
    }
}

impl Storage for WatchedPunches {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.store.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.store.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.store.sync()
    }
    fn len(&self) -> u64 {
        self.store.len()
    }
    fn punch(&self, offset: u64, len: u64) -> std::io::Result<crate::storage::Punched> {
        if let Some(d) = self.delay {
            std::thread::sleep(d);
        }
        self.lengths.lock().unwrap().push(len);
        self.store.punch(offset, len)
    }
    fn punch_blocks_writes(&self) -> bool {
        self.file
    }
    fn holes(&self) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        self.store.holes()
    }
}

#[test]
fn a_large_free_is_given_back_in_pieces_that_each_hold_the_file_briefly() {
    // A file's hole punch holds its inode lock throughout, and the guests' writes into the
    // same file wait for it: a deleted device of many contiguous blocks must not be one
    // punch. A block device's discard holds no such lock and goes whole.
    for file in [true, false] {
        let blocks = 3 * PUNCH_PIECE_BYTES / BS + 5;
        let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
        let mut watched = WatchedPunches::new(MemStorage::new(blocks * BS), None);
        watched.file = file;
        let data = Arc::new(watched);
        let p = Pool::create(meta, data.clone(), 128, PoolOptions::default()).unwrap();
        p.create_thin(0).unwrap();
        p.write(0, 0, &vec![7u8; (blocks * BS) as usize]).unwrap();
        p.commit().unwrap();
        assert_eq!(data.store.allocated_bytes(), blocks * BS);
        p.delete(0).unwrap();
        p.commit().unwrap();
        let punches = data.lengths();
        assert_eq!(
            data.store.allocated_bytes(),
            0,
            "all given back: {punches:?}"
        );
        assert_eq!(punches.iter().sum::<u64>(), blocks * BS);
        if file {
            assert!(
                punches.iter().all(|&n| n <= PUNCH_PIECE_BYTES),
                "punches of at most {PUNCH_PIECE_BYTES} bytes each: {punches:?}"
            );
        } else {
            assert_eq!(punches, [blocks * BS], "one discard");
        }
    }
}

#[test]
fn a_failed_punch_keeps_the_pool_working_and_the_block_counts_as_written() {
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(FaultyStorage::new(MemStorage::new(BS)));
    let p = Pool::create(meta, data.clone(), 128, PoolOptions::default()).unwrap();
    p.create_thin(0).unwrap();
    p.write(0, 0, &vec![0xAB; BS as usize]).unwrap();
    p.commit().unwrap();
    data.fail_nth(FaultOp::Punch, 1, true);
    p.discard(0, 0, BS).unwrap();
    p.commit().unwrap();
    assert_eq!(data.count(FaultOp::Punch), 1);
    assert_eq!(p.status().mode, PoolMode::Write);
    // The one block is reused, zeroed: the punch did not happen.
    p.write(0, BS + 100, &[5u8; 10]).unwrap();
    let b = read_vec(&p, 0, BS, BS as usize);
    assert!(b[..100].iter().all(|&x| x == 0) && b[110..].iter().all(|&x| x == 0));
}

#[test]
fn the_holes_of_the_data_device_are_learned_at_open() {
    let meta = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(MemStorage::new(16 * BS));
    {
        let p = Pool::create(meta.clone(), data.clone(), 128, PoolOptions::default()).unwrap();
        p.create_thin(0).unwrap();
        p.write(0, 0, &vec![3u8; BS as usize]).unwrap();
        p.commit().unwrap();
    }
    let p = Pool::open(meta.clone(), data.clone(), PoolOptions::default()).unwrap();
    p.write(0, BS, &[4u8; 4096]).unwrap();
    assert_eq!(data.allocated_bytes(), BS + 4096);
    // A data device that cannot tell its holes: every new block is zeroed.
    let copy = Arc::new(MemStorage::from_vec(data.to_vec()));
    let p = Pool::open(meta, copy.clone(), PoolOptions::default()).unwrap();
    p.write(0, 2 * BS, &[4u8; 4096]).unwrap();
    let b = read_vec(&p, 0, 2 * BS, BS as usize);
    assert!(b[4096..].iter().all(|&x| x == 0));
}

#[test]
fn with_passdown_off_freed_blocks_keep_their_space() {
    let (p, data) = sparse_pool(4, no_passdown());
    p.write(0, 0, &vec![1u8; 2 * BS as usize]).unwrap();
    p.commit().unwrap();
    p.delete(0).unwrap();
    p.commit().unwrap();
    assert_eq!(data.allocated_bytes(), 2 * BS);
}

#[test]
fn a_punch_never_hits_a_block_reused_while_it_runs() {
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(WatchedPunches::new(
        MemStorage::new(12 * BS),
        Some(std::time::Duration::from_millis(1)),
    ));
    let p = Arc::new(Pool::create(meta, data.clone(), 128, PoolOptions::default()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let committer = {
        let (p, stop) = (p.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                p.commit().unwrap();
            }
        })
    };
    // Until 100 punches have raced the writes (or far more rounds than that takes).
    const PUNCHES: usize = 100;
    let writers: Vec<_> = (0..3u32)
        .map(|dev| {
            p.create_thin(dev).unwrap();
            let (p, data) = (p.clone(), data.clone());
            std::thread::spawn(move || {
                for round in 0..100_000u32 {
                    if data.lengths.lock().unwrap().len() >= PUNCHES {
                        break;
                    }
                    let vb = (round % 2) as u64;
                    let byte = (dev * 100 + round % 97 + 1) as u8;
                    let len = if round % 3 == 0 { BS as usize } else { 4096 };
                    loop {
                        match p.write(dev, vb * BS, &vec![byte; len]) {
                            Ok(()) => break,
                            // Every block freed waits for a commit: try again after it.
                            Err(Error::OutOfDataSpace { .. }) => std::thread::yield_now(),
                            Err(e) => panic!("{e}"),
                        }
                    }
                    // A guest's FLUSH: the block is committed, its discard frees it for
                    // the committer to punch after its next commit (or for a write that
                    // finds the pool full to take back unpunched).
                    p.flush().unwrap();
                    let got = read_vec(&p, dev, vb * BS, BS as usize);
                    assert!(
                        got[..len].iter().all(|&x| x == byte),
                        "device {dev} round {round}: lost"
                    );
                    assert!(
                        got[len..].iter().all(|&x| x == 0),
                        "device {dev} round {round}: stale"
                    );
                    p.discard(dev, vb * BS, BS).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    committer.join().unwrap();
    let punches = data.lengths().len();
    assert!(punches >= PUNCHES, "{punches} punches");
}

/// A data device whose punches wait for the test's word.
struct HeldPunch {
    inner: MemStorage,
    started: Mutex<std::sync::mpsc::Sender<()>>,
    go: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Storage for HeldPunch {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn punch(&self, offset: u64, len: u64) -> std::io::Result<crate::storage::Punched> {
        self.started.lock().unwrap().send(()).unwrap();
        self.go.lock().unwrap().recv().unwrap();
        self.inner.punch(offset, len)
    }
}

#[test]
fn a_write_needing_a_block_being_punched_waits_for_the_punch() {
    let (started_tx, started) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let data = Arc::new(HeldPunch {
        inner: MemStorage::new(BS),
        started: Mutex::new(started_tx),
        go: Mutex::new(go_rx),
    });
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
    let p = Arc::new(Pool::create(meta, data, 128, PoolOptions::default()).unwrap());
    p.create_thin(0).unwrap();
    p.write(0, 0, &vec![1u8; BS as usize]).unwrap();
    p.commit().unwrap();
    p.discard(0, 0, BS).unwrap();
    // The commit frees the pool's one block and punches it, held there.
    let committer = {
        let p = p.clone();
        std::thread::spawn(move || p.commit().unwrap())
    };
    started.recv().unwrap();
    let writer = {
        let p = p.clone();
        std::thread::spawn(move || p.write(0, BS, &[2u8; 4096]))
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        !writer.is_finished(),
        "the write did not wait for the punch"
    );
    go.send(()).unwrap();
    committer.join().unwrap();
    writer.join().unwrap().unwrap();
    let b = read_vec(&p, 0, BS, BS as usize);
    assert_eq!(b[..4096], [2u8; 4096], "the punch hit the reused block");
    assert!(b[4096..].iter().all(|&x| x == 0));
}

#[test]
fn a_block_freed_by_a_metadata_snapshots_release_is_reused_without_another_commit() {
    let (p, _data) = sparse_pool(2, PoolOptions::default());
    p.write(0, 0, &vec![1u8; 2 * BS as usize]).unwrap();
    p.commit().unwrap();
    p.reserve_metadata_snap().unwrap();
    p.discard(0, 0, BS).unwrap();
    // Commits: the first block, which the metadata snapshot kept, is free from now on.
    p.release_metadata_snap().unwrap();
    p.discard(0, BS, BS).unwrap();
    assert_eq!(p.with_metadata(|m| m.pending_data_frees()), 1);
    // Needs a block: the first one, without the commit that would free the second.
    p.write(0, 2 * BS, &[2u8; 512]).unwrap();
    assert_eq!(
        p.with_metadata(|m| m.pending_data_frees()),
        1,
        "the write committed"
    );
    assert_eq!(read_vec(&p, 0, 2 * BS, 512), vec![2u8; 512]);
}

/// Memory storage that counts its zero-range calls, or refuses them.
struct CountingZeroRange(MemStorage, std::sync::atomic::AtomicUsize, bool);

impl Storage for CountingZeroRange {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync()
    }
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        self.1.fetch_add(1, Ordering::SeqCst);
        if !self.2 {
            return Ok(false);
        }
        self.0.zero_range(offset, len)
    }
}

#[test]
fn a_first_write_to_a_block_that_is_not_a_hole_zeroes_it_with_zero_range_where_supported() {
    for supported in [true, false] {
        let meta: Arc<dyn Storage> = Arc::new(MemStorage::new(4 << 20));
        let data = Arc::new(CountingZeroRange(
            MemStorage::from_vec(vec![0xAB; 4 * BS as usize]),
            Default::default(),
            supported,
        ));
        let p = Pool::create(meta, data.clone(), 128, PoolOptions::default()).unwrap();
        p.create_thin(0).unwrap();
        p.write(0, 1000, &[7u8; 512]).unwrap();
        p.write(0, BS + 1000, &[8u8; 512]).unwrap();
        let b = read_vec(&p, 0, 0, 2 * BS as usize);
        for (i, byte) in [(0, 7u8), (1, 8u8)] {
            let blk = &b[i * BS as usize..(i + 1) * BS as usize];
            assert!(blk[..1000].iter().all(|&x| x == 0), "stale data shown");
            assert!(blk[1000..1512].iter().all(|&x| x == byte));
            assert!(blk[1512..].iter().all(|&x| x == 0), "stale data shown");
        }
        // Unsupported: tried once, then the vectored write of zeroes.
        let want = if supported { 2 } else { 1 };
        assert_eq!(data.1.load(Ordering::SeqCst), want, "supported {supported}");
    }
}

#[test]
fn a_longer_data_device_is_put_to_use_only_by_an_explicit_grow() {
    let meta = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(MemStorage::new(16 * BS));
    {
        let p = Pool::create(meta.clone(), data.clone(), 128, PoolOptions::default()).unwrap();
        p.create_thin(0).unwrap();
        p.write(0, 0, &[5u8; 512]).unwrap();
        p.commit().unwrap();
    }
    let mut bytes = data.to_vec();
    bytes.resize(64 * BS as usize, 0);
    let longer = Arc::new(MemStorage::from_vec(bytes));
    let p = Pool::open(meta.clone(), longer.clone(), PoolOptions::default()).unwrap();
    assert_eq!(
        p.status().usage.data_blocks,
        16,
        "opening does not grow the pool"
    );
    p.commit().unwrap();
    assert_eq!(p.grow_data().unwrap(), 64);
    p.commit().unwrap();
    drop(p);
    let p = Pool::open(meta, longer, PoolOptions::default()).unwrap();
    assert_eq!(p.status().usage.data_blocks, 64);
    assert_eq!(read_vec(&p, 0, 0, 4), vec![5; 4]);
}

/// A commit whose data sync returns after another flush of the data device failed must
/// not make its mappings durable: that sync's success may only mean the error was taken
/// by the other flush.
#[test]
fn no_commit_vouches_for_data_after_a_failed_write_back_took_the_error() {
    let (data, started, release) = HeldSync::new(16);
    let data = Arc::new(data);
    let meta = Arc::new(MemStorage::new(4 << 20));
    let p = Pool::create(meta.clone(), data.clone(), 128, PoolOptions::default()).unwrap();
    p.create_thin(0).unwrap();
    p.commit().unwrap();
    p.write(0, 0, &[1u8; 4096]).unwrap();
    data.log.lock().unwrap().clear();
    data.armed.store(true, Ordering::SeqCst);
    std::thread::scope(|s| {
        let committer = s.spawn(|| p.commit());
        started.recv().unwrap();
        data.fail_writeback.store(true, Ordering::SeqCst);
        p.write(0, 100, &[2u8; 10]).unwrap();
        let other = s.spawn(|| p.write_back());
        // Give the other flush every chance to run before the held sync returns.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !other.is_finished() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        release.send(()).unwrap();
        let committed = committer.join().unwrap();
        assert!(other.join().unwrap().is_err());
        let log = data.log.lock().unwrap().clone();
        let failed_first = log.first() == Some(&"write-back failed");
        assert!(
            !(failed_first && committed.is_ok()),
            "the commit vouched for data after a failed write-back: {log:?}"
        );
    });
    assert_eq!(p.status().mode, PoolMode::Fail);
    assert!(p.commit().is_err());
}

/// Waits, up to a deadline, until device `id` exists (made by another thread).
fn wait_for_device(p: &Pool, id: u32, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while p.device(id).is_err() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A snapshot is made while a write to its origin is in flight, without holding the
/// origin's later writes behind that one; once settled, the write in flight has landed
/// (the snapshot no longer changes), and the origin keeps every write.
#[test]
fn a_snapshot_does_not_hold_writes_behind_one_in_flight() {
    let (p, data) = held_pool(64);
    p.write(0, 0, &[1u8; 8192]).unwrap();
    p.write(0, BS, &[1u8; 4096]).unwrap();
    p.commit().unwrap();

    data.hold_next_write();
    let in_flight = {
        let p = p.clone();
        std::thread::spawn(move || p.write(0, 0, &[2u8; 4096]))
    };
    data.wait_until_holding();
    let snap = {
        let p = p.clone();
        std::thread::spawn(move || p.create_snap(1, 0).map(NewSnapshot::settle))
    };
    wait_for_device(
        &p,
        1,
        "the snapshot was not made while a write to its origin was in flight",
    );
    // A later write to another block (shared now: it copies) completes meanwhile.
    p.write(0, BS, &[3u8; 4096]).unwrap();
    assert!(
        !snap.is_finished(),
        "the snapshot settled before the write in flight had landed"
    );
    data.release();
    in_flight.join().unwrap().unwrap();
    snap.join().unwrap().unwrap();

    let snapshot_block0 = read_vec(&p, 1, 0, 8192);
    // An overwrite of the origin's block 0 after the snapshot copies it whole, the write
    // that was in flight included.
    p.write(0, 4096, &[4u8; 4096]).unwrap();
    assert_eq!(
        read_vec(&p, 1, 0, 8192),
        snapshot_block0,
        "the snapshot changed"
    );
    assert_eq!(read_vec(&p, 0, 0, 4096), vec![2u8; 4096]);
    assert_eq!(read_vec(&p, 0, 4096, 4096), vec![4u8; 4096]);
    assert_eq!(read_vec(&p, 0, BS, 4096), vec![3u8; 4096]);
    assert_eq!(read_vec(&p, 1, BS, 4096), vec![1u8; 4096]);
    p.commit().unwrap();
}

/// A write that waits for a device's gate while the device is deleted fails: it does not go
/// on, once the gate opens, into a device created again with the same id.
#[test]
fn a_write_waiting_on_a_deleted_device_fails_instead_of_landing_in_its_successor() {
    let (p, data) = held_pool(16);
    let gate = p.gate(0);
    // The late write's block, held so that a write past the gate stops there.
    let cell = p.cells.lock(0, 1, true);
    data.hold_next_write();
    let in_flight = spawn_on(&p, |p| p.write(0, 0, &[1u8; 4096]));
    data.wait_until_holding();
    let deleter = spawn_on(&p, |p| p.delete(0));
    while gate.waiters() < 1 {
        std::thread::yield_now();
    }
    let late = spawn_on(&p, |p| p.write(0, BS, &[2u8; 4096]));
    while gate.waiters() < 2 {
        std::thread::yield_now();
    }
    data.release();
    in_flight.join().unwrap().unwrap();
    deleter.join().unwrap().unwrap();
    p.create_thin(0).unwrap();
    drop(cell);
    let r = late.join().unwrap();
    assert!(
        matches!(r, Err(Error::NoSuchDevice(0))),
        "the late write: {r:?}"
    );
    assert_eq!(read_vec(&p, 0, BS, 4), [0; 4], "the new device is empty");
}
