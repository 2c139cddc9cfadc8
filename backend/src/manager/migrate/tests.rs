//! Active mirroring, with the manager's own disks and pools in memory and the guest's
//! requests made through the disk's target, as the I/O path makes them. The tests act
//! at the migration's steps (`Manager::migrate_hook`), never on time.

use super::*;
use crate::blk::disk::Disk;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use thinpool::pool::{Pool, PoolOptions};
use thinpool::storage::testing::{FaultOp, FaultyStorage};
use thinpool::storage::MemStorage;

const DISK: u64 = 8 << 20;
/// Pool a's blocks (the disk's first pool): 64 KiB; pool b's: 256 KiB, so that the
/// mirror's writes straddle blocks of the other size.
const A_BLOCK: u64 = 64 << 10;

struct Fixture {
    _dir: tempfile::TempDir,
    m: Arc<Manager>,
    disk: Arc<Disk>,
    /// Pool b's data store, to make it fail.
    b_data: Arc<FaultyStorage<MemStorage>>,
    /// What the guest should read: every write applied in the order the disk got it.
    model: Arc<Mutex<Vec<u8>>>,
    /// The disk's external origin's bytes, if it has one (what a discarded block reads).
    origin: Option<Vec<u8>>,
}

/// What the disk holds when it moves.
#[derive(Clone, Copy, Debug)]
enum History {
    /// Every block written, with a snapshot halfway.
    SnapshotHalfway,
    /// Every third block written, no snapshot.
    NoSnapshot,
    /// Over an external origin three quarters of the disk long: every fourth block
    /// written, no snapshot.
    Origin,
    /// Over the same origin: every fourth block written, a snapshot, every fifth.
    OriginAndSnapshot,
}

fn fixture() -> Fixture {
    fixture_of(History::SnapshotHalfway)
}

fn fixture_of(history: History) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let b_data = Arc::new(FaultyStorage::new(MemStorage::new(128 << 20)));
    let mk = |name: &str, sectors: u32, data: Arc<dyn thinpool::storage::Storage>| {
        let p = Pool::create(
            Arc::new(MemStorage::new(8 << 20)),
            data,
            sectors,
            PoolOptions::default(),
        )
        .unwrap();
        let reg = thinpool::registry::Registry::new(dir.path().join(format!("{name}.json")), 0);
        Arc::new(PoolHandle::new(
            name,
            thinpool::catalog::Catalog::new(Arc::new(p), reg, 1),
        ))
    };
    let a = mk("a", 128, Arc::new(MemStorage::new(128 << 20)));
    let b = mk("b", 512, b_data.clone());
    let m = Manager::new(vec![a, b], dir.path().to_path_buf());
    let origin = matches!(history, History::Origin | History::OriginAndSnapshot)
        .then(|| bytes(77, (DISK / 4 * 3) as usize));
    let origin_path = dir.path().join("origin.img");
    if let Some(o) = &origin {
        std::fs::write(&origin_path, o).unwrap();
    }
    m.disk_add(
        &super::super::NewDisk {
            name: "vm",
            pool: Some("a"),
            size: Some(DISK),
            clone_from: None,
            read_only: false,
            serial: None,
            external_origin: origin.as_ref().map(|_| origin_path.to_str().unwrap()),
        },
        None,
        None,
        None,
    )
    .unwrap();
    let disk = lock(&m.disks)["vm"].disk.clone();
    // As when a guest is connected: the migration is live (passes, then the mirror).
    disk.connected.store(true, Ordering::SeqCst);
    let mut model = vec![0; DISK as usize];
    if let Some(o) = &origin {
        model[..o.len()].copy_from_slice(o);
    }
    let f = Fixture {
        _dir: dir,
        m,
        disk,
        b_data,
        model: Arc::new(Mutex::new(model)),
        origin,
    };
    let blocks = DISK / A_BLOCK;
    let write_every = |n: u64, seed: u64| {
        for k in (0..blocks).step_by(n as usize) {
            f.write(k * A_BLOCK, &bytes(seed << 32 | k, A_BLOCK as usize));
        }
    };
    match history {
        History::SnapshotHalfway => {
            for k in 0..blocks {
                f.write(k * A_BLOCK, &bytes(k, A_BLOCK as usize));
                if k == blocks / 2 {
                    f.m.snapshot_create("vm", "@s1").unwrap();
                }
            }
        }
        History::NoSnapshot => write_every(3, 20),
        History::Origin => write_every(4, 21),
        History::OriginAndSnapshot => {
            write_every(4, 22);
            f.m.snapshot_create("vm", "@s1").unwrap();
            write_every(5, 23);
        }
    }
    f
}

/// Bytes that name the write they come from.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl Fixture {
    /// A guest write, through the disk's target as the I/O path makes it; it must
    /// succeed. The model follows under its lock, held across the write, so that its
    /// order is the disk's.
    fn write(&self, at: u64, data: &[u8]) {
        let mut model = lock(&self.model);
        let r = self.disk.target().write_vectored(at, &[IoSlice::new(data)]);
        assert!(r.is_ok(), "guest write at {at} failed: {r:?}");
        model[at as usize..at as usize + data.len()].copy_from_slice(data);
    }

    fn write_zeroes(&self, at: u64, len: u64, unmap: bool) {
        let mut model = lock(&self.model);
        let r = self.disk.target().write_zeroes(at, len, unmap);
        assert!(r.is_ok(), "guest write-zeroes at {at} failed: {r:?}");
        model[at as usize..(at + len) as usize].fill(0);
    }

    /// A guest discard of block `block` of pool a. Where that is a whole block of the
    /// target's pool, it is unmapped and reads as zeroes, or the external origin's bytes
    /// while the disk has one (in pool a); in pool b, of larger blocks, it changes nothing
    /// (discard unmaps whole blocks only, and promises nothing).
    fn discard(&self, block: u64) {
        let mut model = lock(&self.model);
        let t = self.disk.target();
        let r = t.discard(block * A_BLOCK, A_BLOCK);
        assert!(r.is_ok(), "guest discard of block {block} failed: {r:?}");
        if t.pool.block_bytes() <= A_BLOCK {
            let at = (block * A_BLOCK) as usize;
            let range = &mut model[at..at + A_BLOCK as usize];
            range.fill(0);
            if let Some(o) = self.origin.as_ref().filter(|o| at < o.len()) {
                let end = (at + A_BLOCK as usize).min(o.len());
                range[..end - at].copy_from_slice(&o[at..end]);
            }
        }
    }

    /// The disk as the guest reads it now, compared with the model.
    fn verify(&self, what: &str) {
        let model = lock(&self.model);
        let t = self.disk.target();
        let mut got = vec![0u8; DISK as usize];
        t.pool.read(t.thin_id, 0, &mut got).unwrap();
        if let Some(i) = (0..got.len()).find(|&i| got[i] != model[i]) {
            panic!(
                "{what}: byte {i} (pool-a block {}) reads {} where the guest wrote {}",
                i as u64 / A_BLOCK,
                got[i],
                model[i]
            );
        }
    }

    fn pool_of_disk(&self) -> String {
        self.m.find("vm").unwrap().pool.name.clone()
    }

    fn devices(&self, pool: &str) -> Vec<Option<String>> {
        let p = self.m.pool(Some(pool)).unwrap();
        let reg = p.registry();
        assert_eq!(
            p.pool().devices().len(),
            reg.devices.len(),
            "pool {pool}: devices without entries or entries without devices"
        );
        reg.devices.values().map(|e| e.name.clone()).collect()
    }

    fn set_hook(&self, h: impl Fn(MigrateStep) + Send + Sync + 'static) {
        *lock(&self.m.migrate_hook) = Some(Arc::new(h));
    }

    fn migrate(&self) -> Result<Value, String> {
        let r = self.m.disk_migrate(Some("mv".into()), "vm", "b").unwrap();
        self.m.jobs.wait(r["job-id"].as_str().unwrap()).unwrap()
    }
}

/// Gives the disk a replication schedule in its registry entry, with no thread to run it
/// (rounds, if any, are run by hand).
fn replicated_by_hand(f: &Fixture) {
    let found = f.m.find("vm").unwrap();
    found
        .pool
        .change(|_, reg| {
            let spec = super::super::device_state::ReplicationSpec {
                interval_secs: 3600,
                keep: 2,
                target: ReplicationTarget::Command {
                    argv: vec!["true".into()],
                },
                next_seq: 0,
                last: None,
            };
            reg.devices
                .get_mut(&found.id)
                .unwrap()
                .set_replication(Some(spec));
            Ok(())
        })
        .unwrap();
}

/// A writer that runs until stopped: 4 KiB writes, partial writes across pool a's block
/// boundaries, write-zeroes and discards, at offsets a seed picks.
fn background_writer(f: &Arc<Fixture>, stop: &Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let (f, stop) = (f.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let r = thinpool_rand(n);
            let at = r % (DISK - (200 << 10));
            match n % 16 {
                0 => f.write_zeroes(at & !511, 70 << 10, n % 32 == 0),
                1 => f.discard(r % (DISK / A_BLOCK)),
                2..=5 => f.write(at, &bytes(1 << 32 | n, (r % (150 << 10)) as usize + 1)),
                _ => f.write(at & !4095, &bytes(1 << 32 | n, 4096)),
            }
            n += 1;
        }
        n
    })
}

fn thinpool_rand(n: u64) -> u64 {
    let mut x = n
        .wrapping_add(0x2545_f491_4f6c_dd1d)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    x.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (x >> 29)
}

/// (a) Everything the guest writes while the disk is mirrored and its last changes are
/// copied is in the new pool afterwards: writes before the copy reaches a block (here,
/// partial ones, made at the moment the copy is about to take the block), writes racing
/// with it (a thread started then), and a writer running all along.
#[test]
fn writes_during_mirroring_and_the_copy_are_all_in_the_new_pool() {
    let f = Arc::new(fixture());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = background_writer(&f, &stop);
    let copying = Arc::new(AtomicU64::new(0));
    let racers = Arc::new(Mutex::new(Vec::new()));
    {
        let (fw, copying, racers) = (Arc::downgrade(&f), copying.clone(), racers.clone());
        f.set_hook(move |step| {
            let Some(f) = fw.upgrade() else { return };
            match step {
                MigrateStep::BeforeMirror => {
                    // Changes the background copy must carry: after the snapshot's
                    // copy, before the mirror.
                    for k in (0..DISK / A_BLOCK).step_by(5) {
                        f.write(k * A_BLOCK + 1000, &bytes(2 << 32 | k, 3000));
                    }
                    for k in (2..DISK / A_BLOCK).step_by(9) {
                        f.discard(k);
                    }
                }
                MigrateStep::Mirroring { .. } => {}
                MigrateStep::Copying { block } => {
                    let i = copying.fetch_add(1, Ordering::SeqCst);
                    if i % 7 == 0 {
                        // Discarded while mirrored, before the copy reaches it: it
                        // must read as zeroes in the new pool too, then what follows.
                        f.discard(block);
                    }
                    // The guest writes part of the block first (mirrored: the new pool
                    // has these bytes over the block's old ones, and the copy must
                    // bring the rest), then a thread races the copy on the same block.
                    f.write(block * A_BLOCK + 512 * (i % 100), &bytes(3 << 32 | i, 777));
                    // 4.5 KiB from a 4 KiB boundary at most 56 KiB in: within the
                    // block (from 60 KiB it would cross into the next one, and past the
                    // disk's end at its last block).
                    let (f2, at) = (f.clone(), block * A_BLOCK + 4096 * (i % 15));
                    lock(&racers).push(std::thread::spawn(move || {
                        f2.write(at, &bytes(4 << 32 | i, 4096 + 512));
                    }));
                }
                MigrateStep::Copied => {}
            }
        });
    }
    let r = f.migrate().unwrap();
    stop.store(true, Ordering::SeqCst);
    let n = writer.join().unwrap();
    for t in std::mem::take(&mut *lock(&racers)) {
        t.join().unwrap();
    }
    assert_eq!(r["mirrored"], true, "{r}");
    assert!(copying.load(Ordering::SeqCst) >= DISK / A_BLOCK / 5, "{r}");
    assert_eq!(f.pool_of_disk(), "b");
    assert!(f.disk.target().mirror.is_none());
    assert!(Arc::ptr_eq(
        &f.disk.target().pool,
        f.m.pool(Some("b")).unwrap().pool()
    ));
    f.verify(&format!("after the move ({n} background writes, {r})"));
    // Nothing left of the migration in either pool.
    assert!(f.devices("a").is_empty(), "{:?}", f.devices("a"));
    let mut left = f.devices("b");
    left.sort();
    assert_eq!(left, [Some("vm".to_string()), Some("vm@s1".to_string())]);
    // The copy's snapshot kept its bytes: the disk's, then, must have moved too.
    *lock(&f.m.migrate_hook) = None;
    f.m.shutdown().unwrap();
}

/// (b) The new pool fails while the disk is mirrored, during the copy (which then
/// fails) or after it (a guest write finds it failing, and the switch sees that): the
/// migration is undone, the disk stays in its old pool with every write, and no guest
/// request fails.
#[test]
fn a_failing_new_pool_undoes_the_migration_without_failing_a_guest_write() {
    for at in ["mirroring", "copied"] {
        let f = Arc::new(fixture());
        let stop = Arc::new(AtomicBool::new(false));
        let writer = background_writer(&f, &stop);
        {
            let fw = Arc::downgrade(&f);
            f.set_hook(move |step| {
                let Some(f) = fw.upgrade() else { return };
                let here = match step {
                    MigrateStep::BeforeMirror => {
                        for k in (0..DISK / A_BLOCK).step_by(3) {
                            f.write(k * A_BLOCK + 100, &bytes(5 << 32 | k, 5000));
                        }
                        "converged"
                    }
                    MigrateStep::Mirroring { .. } => "mirroring",
                    MigrateStep::Copying { block } => {
                        f.write(block * A_BLOCK + 7, &bytes(7 << 32 | block, 100));
                        "copying"
                    }
                    MigrateStep::Copied => {
                        assert_eq!(at, "copied", "the copy cannot have succeeded");
                        "copied"
                    }
                };
                if here == at {
                    // Every data write of pool b fails from now on: the guest's
                    // mirrored writes and the copy's.
                    f.b_data.fail_nth(FaultOp::Write, 1, true);
                    for k in 0..8 {
                        f.write(k * A_BLOCK * 3 + 10, &bytes(6 << 32 | k, 9000));
                    }
                }
            });
        }
        let e = f.migrate().unwrap_err();
        assert!(e.contains("pool b"), "{at}: {e}");
        // Not mirrored any more, and on pool a.
        assert!(f.disk.target().mirror.is_none(), "{at}");
        assert_eq!(f.pool_of_disk(), "a", "{at}");
        // The guest went on writing meanwhile; it stops.
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        f.verify(&format!("after the failed move ({at})"));
        f.b_data.heal();
        let mut left = f.devices("a");
        left.sort();
        assert_eq!(
            left,
            [Some("vm".to_string()), Some("vm@s1".to_string())],
            "{at}"
        );
        // What pool b could not delete while it failed is deleted at the next start.
        f.m.recover_migrations().unwrap();
        assert!(f.devices("b").is_empty(), "{at}: {:?}", f.devices("b"));
        *lock(&f.m.migrate_hook) = None;
        f.m.shutdown().unwrap();
    }
}

/// A guest FLUSH through the I/O path (`BlkBackend::run` does exactly this): the target's
/// pool and mirror, committed without the gate.
fn guest_flush(f: &Fixture) -> u8 {
    let (pool, mirror) = f.disk.target().flush_targets();
    crate::blk::execute::flush(&f.disk, &pool, mirror.as_deref()).status
}

/// The new pool failing while the disk is mirrored forward fails no guest request, a FLUSH
/// included: everything the FLUSH vouches for is durable in the old pool, where the disk
/// stays; the mirror is given up and the migration undone.
#[test]
fn a_failing_new_pool_does_not_fail_a_guest_flush_while_mirrored() {
    let mut seen = Vec::new();
    for fault in [FaultOp::Sync, FaultOp::Write] {
        let f = Arc::new(fixture());
        let statuses = Arc::new(Mutex::new(Vec::new()));
        {
            let (fw, statuses) = (Arc::downgrade(&f), statuses.clone());
            f.set_hook(move |step| {
                let Some(f) = fw.upgrade() else { return };
                if let MigrateStep::Mirroring { .. } = step {
                    // A mirrored write, so that pool b has something to commit.
                    f.write(3 * A_BLOCK + 10, &bytes(11 << 32, 9000));
                    f.b_data.fail_nth(fault, 1, true);
                    // With Write: this one gives the mirror up.
                    f.write(5 * A_BLOCK + 10, &bytes(12 << 32, 9000));
                    lock(&statuses).push(guest_flush(&f));
                    f.write(7 * A_BLOCK + 10, &bytes(13 << 32, 9000));
                    lock(&statuses).push(guest_flush(&f));
                }
            });
        }
        let e = f.migrate().unwrap_err();
        assert_eq!(f.pool_of_disk(), "a", "{fault:?}: {e}");
        f.verify(&format!("{fault:?}"));
        seen.push((fault, lock(&statuses).clone()));
        f.b_data.heal();
        *lock(&f.m.migrate_hook) = None;
        // Pool b stays failed after a failed sync: its final commit fails.
        let _ = f.m.shutdown();
    }
    let ok = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
    assert!(
        seen.iter().all(|(_, s)| *s == [ok, ok]),
        "guest FLUSH statuses while mirrored to a failing pool b (0 = OK, 1 = IOERR): {seen:?}"
    );
}

/// (c) A crash while the disk is mirrored (the job's thread dies at each step before
/// the switch, leaving the registries as they are): the next start's recovery leaves
/// the disk, whole, in its old pool, and nothing of the migration anywhere.
#[test]
fn a_crash_while_mirroring_leaves_the_disk_in_its_old_pool() {
    for at in ["mirroring", "copying", "copied"] {
        let f = Arc::new(fixture());
        {
            let fw = Arc::downgrade(&f);
            f.set_hook(move |step| {
                let Some(f) = fw.upgrade() else { return };
                let here = match step {
                    MigrateStep::BeforeMirror => {
                        for k in (0..DISK / A_BLOCK).step_by(7) {
                            f.write(k * A_BLOCK, &bytes(8 << 32 | k, 4096));
                        }
                        ""
                    }
                    MigrateStep::Mirroring { .. } => "mirroring",
                    MigrateStep::Copying { .. } => "copying",
                    MigrateStep::Copied => "copied",
                };
                if here == at {
                    f.write(3 * A_BLOCK + 5, &bytes(9 << 32, 3333));
                    panic!("crash at {at}");
                }
            });
        }
        let e = f.migrate().unwrap_err();
        assert!(e.contains("panic") || e.contains(at), "{at}: {e}");
        // The marks are what a crash leaves: the snapshot's copy and the disk's
        // device-to-be in pool b.
        assert!(f.devices("b").len() > 1, "{at}: {:?}", f.devices("b"));
        f.write(9 * A_BLOCK + 5, &bytes(10 << 32, 3333));
        let done = f.m.recover_migrations().unwrap();
        assert!(!done.is_empty(), "{at}");
        assert_eq!(f.pool_of_disk(), "a", "{at}");
        assert!(f.devices("b").is_empty(), "{at}: {:?}", f.devices("b"));
        let mut left = f.devices("a");
        left.sort();
        assert_eq!(
            left,
            [Some("vm".to_string()), Some("vm@s1".to_string())],
            "{at}"
        );
        f.verify(&format!("after a crash at {at}"));
        *lock(&f.m.migrate_hook) = None;
        f.m.shutdown().unwrap();
    }
}

/// A disk moves whole whatever its device-to-be starts from: the copy of its last
/// snapshot, nothing (no snapshot), or nothing over an external origin, which the copy
/// carries (in the new pool the disk stands alone), with a writer running all along and
/// changes made just before the mirror starts.
#[test]
fn a_disk_moves_whole_from_its_last_snapshot_its_external_origin_or_nothing() {
    for history in [
        History::NoSnapshot,
        History::Origin,
        History::OriginAndSnapshot,
    ] {
        let f = Arc::new(fixture_of(history));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = background_writer(&f, &stop);
        {
            let fw = Arc::downgrade(&f);
            f.set_hook(move |step| {
                let Some(f) = fw.upgrade() else { return };
                if step == MigrateStep::BeforeMirror {
                    for k in (1..DISK / A_BLOCK).step_by(6) {
                        f.write(k * A_BLOCK + 300, &bytes(30 << 32 | k, 5000));
                    }
                    for k in (2..DISK / A_BLOCK).step_by(7) {
                        f.discard(k);
                    }
                }
            });
        }
        let r = f.migrate().unwrap();
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        assert_eq!(r["mirrored"], true, "{history:?}: {r}");
        assert_eq!(f.pool_of_disk(), "b", "{history:?}");
        f.verify(&format!("{history:?}: after the move ({r})"));
        assert!(
            f.devices("a").is_empty(),
            "{history:?}: {:?}",
            f.devices("a")
        );
        *lock(&f.m.migrate_hook) = None;
        f.m.shutdown().unwrap();
    }
}

/// While the background copy runs (as long as the disk is big), the rest of the daemon
/// is managed as usual: another disk is snapshotted and resized at once, not after the
/// move. What would change the moving disk's own entry (a resize, read-only, a
/// replication started), make a clone of it in the pool it leaves, or reach the
/// migration's own devices (its copy-to-be in the new pool, the snapshots' copies) is
/// refused at once, not left waiting for the move. A replication round's step of the
/// schedule, taken before its snapshot is refused, moves with the disk.
#[test]
fn management_calls_go_on_while_a_migration_copies() {
    let f = Arc::new(fixture());
    f.m.disk_add(
        &super::super::NewDisk {
            name: "other",
            pool: Some("a"),
            size: Some(DISK),
            clone_from: None,
            read_only: false,
            serial: None,
            external_origin: None,
        },
        None,
        None,
        None,
    )
    .unwrap();
    // Replicated by a schedule (no thread here: its rounds are run by hand below).
    replicated_by_hand(&f);
    let answers = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let (m, answers) = (Arc::downgrade(&f.m), answers.clone());
        let asked = AtomicBool::new(false);
        f.set_hook(move |step| {
            let MigrateStep::Copying { .. } = step else {
                return;
            };
            if asked.swap(true, Ordering::SeqCst) {
                return;
            }
            let Some(m) = m.upgrade() else { return };
            // Asked from another thread, as a management client would, while the copy
            // waits here: each must answer while the copy is still under way.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let show = |r: Result<String, Error>| r.unwrap_or_else(|e| format!("error: {e}"));
                let calls = [
                    show(
                        m.snapshot_create("other", "@s")
                            .map(|_| "snapshot made".into()),
                    ),
                    show(
                        m.disk_resize("other", 2 * DISK)
                            .map(|_| "other resized".into()),
                    ),
                    show(m.disk_resize("vm", 2 * DISK).map(|_| "vm resized".into())),
                    show(
                        m.disk_set_read_only("vm", true)
                            .map(|_| "vm read-only".into()),
                    ),
                    show(
                        m.disk_create(&super::super::NewDisk {
                            name: "c",
                            pool: None,
                            size: None,
                            clone_from: Some("vm@s1"),
                            read_only: false,
                            serial: None,
                            external_origin: None,
                        })
                        .map(|_| "vm@s1 cloned".into()),
                    ),
                    show(
                        m.disk_remove(".mv.disk", false)
                            .map(|_| "helper removed".into()),
                    ),
                    show(
                        m.snapshot_delete(".mv.in0", false)
                            .map(|_| "copy deleted".into()),
                    ),
                    show(
                        m.replication_round("vm", false)
                            .map(|_| "round made".into()),
                    ),
                    show(
                        m.replication_start(
                            "vm",
                            3600,
                            2,
                            ReplicationTarget::Pool {
                                pool: "b".into(),
                                prefix: "vm-replica".into(),
                            },
                        )
                        .map(|_| "vm replicated".into()),
                    ),
                ];
                let _ = tx.send(calls);
            });
            let got = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .map_or_else(
                    |_| vec!["no answer while the migration copied".to_string()],
                    |c| c.to_vec(),
                );
            *lock(&answers) = got;
        });
    }
    let r = f.migrate().unwrap();
    let answers = lock(&answers).clone();
    assert_eq!(answers.len(), 9, "{answers:?}");
    assert_eq!(answers[0], "snapshot made", "{answers:?}");
    assert_eq!(answers[1], "other resized", "{answers:?}");
    for a in &answers[2..] {
        assert!(
            a.starts_with("error: ") && a.contains("migrat"),
            "a change of the moving disk's entry: {a} ({answers:?})"
        );
    }
    assert_eq!(f.pool_of_disk(), "b", "{r}");
    assert_eq!(f.m.find("vm").unwrap().entry.size, DISK);
    assert!(!f.m.find("vm").unwrap().entry.read_only);
    assert_eq!(f.m.find("other").unwrap().entry.size, 2 * DISK);
    assert!(f.m.find("other@s").is_ok());
    assert!(
        f.m.find("c").is_err(),
        "a clone was made of a moving snapshot"
    );
    // The round's step of the schedule (taken before its snapshot was refused) moved
    // with the disk.
    let spec = f.m.find("vm").unwrap().entry.replication().unwrap();
    assert_eq!(spec.next_seq, 1, "{spec:?}");
    f.verify(&format!("after the move ({r})"));
    *lock(&f.m.migrate_hook) = None;
    f.m.shutdown().unwrap();
}

/// The switch writes the moving disk's entry as it is at the switch, not as the migration
/// read it before its copy: a change made meanwhile (here straight in the registry, as a
/// replication round advancing the schedule would) moves with the disk. A resize that
/// slipped past the refusals fails the migration before the switch instead (the copy
/// moved the old size): the disk stays in its old pool, with every write.
#[test]
fn the_disks_entry_moves_as_it_is_at_the_switch_and_a_resize_meanwhile_fails_the_move() {
    for resize in [false, true] {
        let f = Arc::new(fixture());
        {
            let fw = Arc::downgrade(&f);
            let changed = AtomicBool::new(false);
            f.set_hook(move |step| {
                let Some(f) = fw.upgrade() else { return };
                if let MigrateStep::Copying { block } = step {
                    f.write(block * A_BLOCK, &bytes(5 << 32 | block, 4096));
                    if !changed.swap(true, Ordering::SeqCst) {
                        let found = f.m.find("vm").unwrap();
                        found
                            .pool
                            .change(|_, reg| {
                                let e = reg.devices.get_mut(&found.id).unwrap();
                                if resize {
                                    e.size = 2 * DISK;
                                } else {
                                    e.serial = "changed".into();
                                }
                                Ok(())
                            })
                            .unwrap();
                    }
                }
            });
        }
        let r = f.migrate();
        let e = f.m.find("vm").unwrap().entry;
        if resize {
            let e = r.unwrap_err();
            assert!(e.contains("resized or removed in pool a"), "{e}");
            assert_eq!(f.pool_of_disk(), "a");
        } else {
            let r = r.unwrap();
            assert_eq!(f.pool_of_disk(), "b", "{r}");
            assert_eq!(e.serial, "changed");
        }
        assert!(f.disk.target().mirror.is_none());
        f.verify(&format!("after the move (resize: {resize})"));
        *lock(&f.m.migrate_hook) = None;
        f.m.shutdown().unwrap();
    }
}

/// A replication-stop that comes once the migration has read the disk's entry for its
/// switch waits for the switch, and then ends the schedule of the moved disk (not of the
/// entry the switch leaves behind in the old pool).
#[test]
fn a_replication_stop_during_the_switch_ends_the_moved_disks_schedule() {
    let f = Arc::new(fixture());
    replicated_by_hand(&f);
    let stopper = Arc::new(Mutex::new(None));
    {
        let (m, stopper) = (Arc::downgrade(&f.m), stopper.clone());
        f.set_hook(move |step| {
            if step != MigrateStep::Copied {
                return;
            }
            let Some(m) = m.upgrade() else { return };
            let (tx, rx) = std::sync::mpsc::channel();
            *lock(&stopper) = Some(std::thread::spawn(move || {
                let r = m.replication_stop("vm").map_err(|e| e.to_string());
                let _ = tx.send(());
                r
            }));
            // Given the time to land in the old pool's entry, if nothing makes it wait
            // (a stop that waits, as it should, is not seen here and goes on after the
            // migration).
            let _ = rx.recv_timeout(std::time::Duration::from_secs(2));
        });
    }
    let r = f.migrate().unwrap();
    let stopped = lock(&stopper).take().unwrap().join().unwrap();
    assert!(stopped.is_ok(), "{stopped:?}");
    let moved = f.m.find("vm").unwrap();
    assert_eq!(moved.pool.name, "b", "{r}");
    assert!(
        moved.entry.replication().is_none(),
        "the moved disk is still replicated: {:?}",
        moved.entry.replication()
    );
    *lock(&f.m.migrate_hook) = None;
    f.m.shutdown().unwrap();
}

/// What a failed migration could not delete (its marks say whose it was) is no longer
/// the job's once the job has ended: it can be removed by name.
#[test]
fn a_finished_migrations_leftovers_can_be_removed_by_name() {
    let f = fixture();
    f.m.snapshot_create("vm", "@left").unwrap();
    let found = f.m.find("vm@left").unwrap();
    found
        .pool
        .change(|_, reg| {
            reg.devices
                .get_mut(&found.id)
                .unwrap()
                .set_migration(Some(Migration::Outgoing {
                    job: "long-gone".into(),
                }));
            Ok(())
        })
        .unwrap();
    f.m.snapshot_delete("vm@left", false).unwrap();
    assert!(f.m.find("vm@left").is_err());
    f.m.shutdown().unwrap();
}
