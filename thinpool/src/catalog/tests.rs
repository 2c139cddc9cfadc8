use super::*;
use crate::origin::{ExternalOrigin, OriginError};
use crate::pool::PoolOptions;
use crate::registry::DeviceEntry;
use crate::storage::MemStorage;
use std::path::PathBuf;

const SIZE: u64 = 1 << 20;

/// A pool on memory with its registry file in a temporary directory.
struct Fixture {
    meta: Arc<MemStorage>,
    data: Arc<MemStorage>,
    dir: tempfile::TempDir,
    cat: Catalog,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let meta = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(MemStorage::new(16 << 20));
    let pool = Pool::create(meta.clone(), data.clone(), 128, PoolOptions::default()).unwrap();
    let reg = Registry::new(dir.path().join("reg.json"), 0);
    let cat = Catalog::new(Arc::new(pool), reg, 7);
    Fixture {
        meta,
        data,
        dir,
        cat,
    }
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// What the next open finds: the pool and the registry as last committed, the registry
    /// gone back to the pool's transaction, external origins attached.
    fn reopen(&mut self) {
        let pool =
            Pool::open(self.meta.clone(), self.data.clone(), PoolOptions::default()).unwrap();
        let mut reg = Registry::load(self.path("reg.json")).unwrap().unwrap();
        reg.recover(pool.status().transaction_id);
        self.cat = Catalog::new(Arc::new(pool), reg, 7);
        assert!(self.cat.attach_origins().is_empty());
    }

    /// The pool's devices and the registry's entries agree, at the same transaction.
    fn assert_consistent(&self) {
        let reg = self.cat.registry();
        let ids: Vec<u32> = self
            .cat
            .pool()
            .devices()
            .iter()
            .map(|(id, _)| *id)
            .collect();
        let rec = reg.reconcile(self.cat.pool().status().transaction_id, &ids);
        assert!(rec.consistent, "{:?}", rec.messages);
    }

    /// A disk named `name` over `image`, if given.
    fn disk(&self, name: &str, image: Option<&PathBuf>) -> u32 {
        self.cat
            .change(|devices, reg| -> Result<u32, CatalogError> {
                let id = devices.next_id(reg);
                devices.create_thin(id)?;
                if let Some(p) = image {
                    let o = ExternalOrigin::open(p).unwrap();
                    devices.set_external_origin(id, Some(Arc::new(o)))?;
                }
                let entry = DeviceEntry {
                    name: Some(name.into()),
                    external_origin: image.map(|p| p.to_string_lossy().into_owned()),
                    ..self.cat.new_thin_entry(id, SIZE)
                };
                reg.insert(id, entry)?;
                Ok(id)
            })
            .unwrap()
    }

    fn snapshot(&self, origin: u32, kind: SnapshotKind) -> Result<u32, CatalogError> {
        self.cat.change(|devices, reg| {
            let id = devices.next_id(reg);
            devices.create_snap(id, origin)?;
            let entry = self.cat.new_snapshot_entry(reg, origin, id, kind);
            reg.insert(id, entry)?;
            Ok(id)
        })
    }

    fn delete(&self, id: u32) -> Result<(), CatalogError> {
        self.cat.change(|devices, reg| {
            devices.delete(id)?;
            reg.devices.remove(&id);
            Ok(())
        })
    }

    fn read(&self, id: u32) -> Vec<u8> {
        let mut b = vec![0u8; SIZE as usize];
        self.cat.pool().read(id, 0, &mut b).unwrap();
        b
    }
}

#[test]
fn a_snapshot_inherits_what_its_origin_reads_and_reads_it_after_a_reopen() {
    let mut f = fixture();
    let golden = f.path("golden.img");
    std::fs::write(&golden, vec![0xabu8; SIZE as usize]).unwrap();
    let disk = f.disk("d1", Some(&golden));
    let kept = f.snapshot(disk, SnapshotKind::Kept).unwrap();
    let clone = f.snapshot(disk, SnapshotKind::Clone).unwrap();
    {
        let reg = f.cat.registry();
        let (d, k, c) = (
            &reg.devices[&disk],
            &reg.devices[&kept],
            &reg.devices[&clone],
        );
        for e in [k, c] {
            assert_eq!(e.size, d.size);
            assert_eq!(e.external_origin, d.external_origin);
            assert_eq!(e.origin, Some(disk));
            assert_ne!(e.serial, d.serial);
            assert_eq!((&e.name, &e.guid), (&None, &None));
        }
        assert!(k.snapshot && k.read_only);
        assert!(!c.snapshot && !c.read_only);
    }
    f.reopen();
    f.assert_consistent();
    for id in [disk, kept, clone] {
        assert!(f.read(id).iter().all(|&b| b == 0xab), "thin device {id}");
    }
}

#[test]
fn a_received_snapshot_keeps_its_senders_identity() {
    let f = fixture();
    let golden = f.path("golden.img");
    std::fs::write(&golden, vec![1u8; 4096]).unwrap();
    let base = f.disk("base", Some(&golden));
    let reg = f.cat.registry();
    let guid = "0123456789abcdef0123456789abcdef";
    let on_base = f
        .cat
        .new_received_entry(&reg, 5, Some(base), 3 * SIZE, 42, guid);
    assert_eq!(on_base.guid.as_deref(), Some(guid));
    assert_eq!((on_base.size, on_base.created), (3 * SIZE, 42));
    assert_eq!(on_base.origin, Some(base));
    assert_eq!(on_base.external_origin, reg.devices[&base].external_origin);
    assert!(on_base.snapshot && on_base.read_only);
    let full = f.cat.new_received_entry(&reg, 5, None, SIZE, 42, guid);
    assert_eq!(full.external_origin, None);
    assert_eq!(
        full.serial, on_base.serial,
        "the serial comes from the sender"
    );
}

#[test]
fn a_change_that_fails_takes_back_what_it_did() {
    let f = fixture();
    let golden = f.path("golden.img");
    std::fs::write(&golden, vec![1u8; 4096]).unwrap();
    let disk = f.disk("d1", None);
    let before = f.cat.registry().clone();
    let tid = f.cat.pool().status().transaction_id;
    let r: Result<(), CatalogError> = f.cat.change(|devices, reg| {
        devices.create_thin(9)?;
        let o = ExternalOrigin::open(&golden).unwrap();
        devices.set_external_origin(disk, Some(Arc::new(o)))?;
        devices.delete(disk)?;
        // A name taken: the change fails after changing both.
        reg.insert(9, f.cat.new_thin_entry(9, SIZE))?;
        reg.insert(
            10,
            DeviceEntry {
                name: Some("d1".into()),
                ..Default::default()
            },
        )?;
        Ok(())
    });
    assert!(
        matches!(r, Err(CatalogError::Registry(RegistryError::NameTaken(_)))),
        "{r:?}"
    );
    assert!(f.cat.pool().device(9).is_err());
    assert!(f.cat.pool().device(disk).is_ok());
    assert!(f.cat.pool().external_origin(disk).is_none());
    assert_eq!(f.cat.registry().devices, before.devices);
    assert_eq!(f.cat.registry().transaction_id, tid);
    assert_eq!(f.cat.pool().status().transaction_id, tid);
}

#[test]
fn a_change_whose_registry_cannot_be_written_leaves_nothing_behind() {
    let mut f = fixture();
    let disk = f.disk("d1", None);
    let kept = f.snapshot(disk, SnapshotKind::Kept).unwrap();
    let before = f.cat.registry().devices.clone();
    // The registry is written to a temporary file renamed over it: a directory there stops
    // the write (for root too).
    let tmp = f.path("reg.json.tmp");
    std::fs::create_dir(&tmp).unwrap();
    let e = f.snapshot(disk, SnapshotKind::Kept).unwrap_err();
    assert!(
        matches!(e, CatalogError::Registry(RegistryError::Io { .. })),
        "{e}"
    );
    f.delete(kept).unwrap_err();
    f.cat
        .change(|devices, _| -> Result<(), CatalogError> {
            Ok(devices.replace_with_snapshot(disk, kept)?)
        })
        .unwrap_err();
    assert_eq!(f.cat.registry().devices, before);
    let mut ids: Vec<u32> = before.keys().copied().collect();
    ids.sort();
    let pool_ids: Vec<u32> = f.cat.pool().devices().iter().map(|(id, _)| *id).collect();
    assert_eq!(pool_ids, ids);
    // Whatever a later commit makes durable agrees with the registry.
    f.cat.pool().commit().unwrap();
    f.reopen();
    f.assert_consistent();
    assert_eq!(f.cat.registry().devices, before);
    // Writable again: the same changes succeed.
    std::fs::remove_dir(&tmp).unwrap();
    let s = f.snapshot(disk, SnapshotKind::Kept).unwrap();
    f.delete(kept).unwrap();
    f.reopen();
    f.assert_consistent();
    assert!(f.cat.pool().device(kept).is_err());
    assert!(f.cat.registry().devices.contains_key(&s));
}

#[test]
fn a_device_is_deleted_only_once_the_registry_no_longer_names_it() {
    let f = fixture();
    let disk = f.disk("d1", None);
    f.cat.pool().write(disk, 0, &[3u8; 4096]).unwrap();
    let kept = f.snapshot(disk, SnapshotKind::Kept).unwrap();
    f.cat.pool().write(disk, 0, &[4u8; 4096]).unwrap();
    f.cat
        .change(|devices, _| -> Result<(), CatalogError> {
            devices.replace_with_snapshot(disk, kept)?;
            let mut b = [0u8; 4096];
            f.cat.pool().read(disk, 0, &mut b).unwrap();
            assert_eq!(b, [4u8; 4096], "replaced before the registry was written");
            Ok(())
        })
        .unwrap();
    assert_eq!(f.read(disk)[..4096], [3u8; 4096]);
    f.cat
        .change(|devices, reg| -> Result<(), CatalogError> {
            devices.delete(kept)?;
            reg.devices.remove(&kept);
            assert!(
                f.cat.pool().device(kept).is_ok(),
                "deleted before the registry was written"
            );
            Ok(())
        })
        .unwrap();
    assert!(f.cat.pool().device(kept).is_err());
    f.assert_consistent();
}

#[test]
fn without_a_registry_file_a_change_commits_the_pool_alone() {
    let f = fixture();
    let cat = Catalog::without_registry(f.cat.pool().clone(), 7);
    let tid = cat.pool().status().transaction_id;
    cat.change(|devices, reg| -> Result<(), CatalogError> {
        devices.create_thin(3)?;
        reg.insert(3, cat.new_thin_entry(3, SIZE))?;
        Ok(())
    })
    .unwrap();
    assert!(!cat.has_registry_file());
    assert_eq!(cat.pool().status().transaction_id, tid);
    assert!(!cat.pool().status().uncommitted_changes);
    assert!(!f.path("reg.json").exists());
}

#[test]
fn attach_origins_opens_each_path_once_and_reports_the_missing() {
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
    let cat = Catalog::new(Arc::new(pool), reg, 0);
    let pool = cat.pool();

    let failures = cat.attach_origins();
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

/// dm-thin's set_transaction_id: a compare-and-swap of the pool's transaction id, which the
/// registry follows, kept across a reopen; a crash between the registry write and the pool
/// commit is undone at the next open, however far the id jumped.
#[test]
fn the_transaction_id_is_set_only_from_the_value_given() {
    let mut f = fixture();
    f.disk("vm1", None);
    let tid = f.cat.pool().status().transaction_id;
    let e = f.cat.set_transaction_id(tid + 5, 100).unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("is {tid}, not {}", tid + 5)),
        "{e}"
    );
    f.cat.set_transaction_id(tid, 100).unwrap();
    f.assert_consistent();
    f.reopen();
    assert_eq!(f.cat.pool().status().transaction_id, 100);
    f.assert_consistent();
    // Changes go on from there.
    f.disk("vm2", None);
    assert_eq!(f.cat.pool().status().transaction_id, 101);
    // The registry written with a jump, the pool not committed (a crash between): back.
    {
        let mut reg = f.cat.registry().clone();
        reg.transaction_id = 500;
        reg.save().unwrap();
    }
    f.reopen();
    assert_eq!(f.cat.registry().transaction_id, 101);
    f.assert_consistent();
}

/// A try_change while another thread holds the pool's commits, or the registry (a change
/// waiting for those commits), does nothing: its function is not called (and what it owns,
/// dropped); once they are let go, it changes as usual.
#[test]
fn a_try_change_does_nothing_while_commits_are_held_elsewhere() {
    let f = fixture();
    std::thread::scope(|s| {
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (let_go_tx, let_go_rx) = std::sync::mpsc::channel::<()>();
        let cat = &f.cat;
        s.spawn(move || {
            let _registry = cat.lock_registry();
            held_tx.send(()).unwrap();
            let _ = let_go_rx.recv();
        });
        held_rx.recv().unwrap();
        let r = f.cat.try_change(|devices, _| -> Result<(), CatalogError> {
            devices.create_thin(1)?;
            Ok(())
        });
        assert!(r.is_none(), "changed while the registry was held elsewhere");
        let_go_tx.send(()).unwrap();
    });
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (let_go_tx, let_go_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let pool = f.cat.pool();
        s.spawn(move || {
            let _hold = pool.hold_commits();
            held_tx.send(()).unwrap();
            let _ = let_go_rx.recv();
        });
        held_rx.recv().unwrap();
        let owned = Arc::new(());
        let moved = owned.clone();
        let r = f
            .cat
            .try_change(move |devices, _| -> Result<(), CatalogError> {
                let _moved = moved;
                devices.create_thin(1)?;
                Ok(())
            });
        assert!(r.is_none(), "changed while commits were held elsewhere");
        assert_eq!(Arc::strong_count(&owned), 1, "the function was not dropped");
        assert!(f.cat.pool().device(1).is_err());
        let_go_tx.send(()).unwrap();
    });
    let r = f.cat.try_change(|devices, _| -> Result<(), CatalogError> {
        devices.create_thin(1)?;
        Ok(())
    });
    assert!(matches!(r, Some(Ok(()))));
    assert!(
        !f.cat.pool().status().uncommitted_changes,
        "the change was committed"
    );
    f.cat.pool().device(1).unwrap();
}

#[test]
fn a_device_is_not_replaced_with_a_snapshot_of_itself() {
    let mut f = fixture();
    let disk = f.disk("d1", None);
    f.cat.pool().write(disk, 0, &[3u8; 4096]).unwrap();
    let e = f
        .cat
        .change(|devices, _| -> Result<(), CatalogError> {
            Ok(devices.replace_with_snapshot(disk, disk)?)
        })
        .unwrap_err();
    assert!(e.to_string().contains("a snapshot of itself"), "{e}");
    assert_eq!(f.read(disk)[..4096], [3u8; 4096]);
    f.cat.pool().commit().unwrap();
    f.reopen();
    f.assert_consistent();
    assert_eq!(f.read(disk)[..4096], [3u8; 4096]);
}

/// While a change's snapshot waits for a write in flight to its origin, the origin's later
/// writes go on even when they fill the journal (they need a commit, which the change no
/// longer holds back); the change returns once the write in flight has landed.
#[test]
fn writes_go_on_while_a_snapshot_waits_for_one_in_flight_even_with_the_journal_full() {
    use crate::journal::Journal;
    use crate::storage::held::HeldWrite;
    const BS: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let meta = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(HeldWrite::new(MemStorage::new(128 * BS)));
    {
        let p = Pool::create(meta.clone(), data.clone(), 128, PoolOptions::default()).unwrap();
        p.create_thin(0).unwrap();
        for b in 0..40 {
            p.write(0, b * BS, &[1u8; 4096]).unwrap();
        }
        p.commit().unwrap();
    }
    // Room for 8 mapping changes per half.
    let journal = Journal::open(Arc::new(MemStorage::new(2 * (4096 + 32 * 8))), [5; 16]).unwrap();
    let pool =
        Pool::open_with_journal(meta, data.clone(), Some(journal), PoolOptions::default()).unwrap();
    let cat = Catalog::new(
        Arc::new(pool),
        Registry::new(dir.path().join("reg.json"), 0),
        7,
    );
    let p = cat.pool().clone();
    data.hold_next_write();
    std::thread::scope(|s| {
        let in_flight = s.spawn(|| p.write(0, 0, &[2u8; 4096]));
        data.wait_until_holding();
        let change = s.spawn(|| {
            cat.change(|devices, _| -> Result<(), CatalogError> {
                devices.create_snap(1, 0)?;
                Ok(())
            })
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while p.device(1).is_err() {
            assert!(std::time::Instant::now() < deadline, "no snapshot made");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The change holds commits from before the snapshot until its commit, then lets go
        // and waits for the write in flight: taking the hold here waits for that moment.
        // (A write that fills the journal half before it waits for the hold to end: see
        // the pool's tests.)
        drop(p.hold_commits());
        // Each breaks sharing with the snapshot: one journal record each, past a half.
        let failed = (1..40)
            .map(|b| (b, p.write(0, b * BS, &[3u8; 4096])))
            .find(|(_, r)| r.is_err());
        let finished_early = change.is_finished();
        // Let go before asserting: the scope would wait for the held write forever.
        data.release();
        in_flight.join().unwrap().unwrap();
        change.join().unwrap().unwrap();
        assert!(
            failed.is_none(),
            "a write failed while the snapshot waited: {failed:?}"
        );
        assert!(
            !finished_early,
            "the change returned before the write in flight landed"
        );
    });
    let mut b = [0u8; 4096];
    p.read(1, 0, &mut b).unwrap();
    assert_eq!(
        b[0], 2,
        "the write in flight, landed in the shared block, is in the snapshot"
    );
    p.read(1, BS, &mut b).unwrap();
    assert_eq!(b[0], 1);
}
