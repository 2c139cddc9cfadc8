use super::*;
use serde_json::Value;

#[test]
fn a_poisoned_lock_is_taken_anyway() {
    let m = Arc::new(Mutex::new(1));
    let m2 = m.clone();
    let _ = std::thread::spawn(move || {
        let _g = m2.lock().unwrap();
        panic!("poison it");
    })
    .join();
    assert!(m.is_poisoned());
    *lock(&m) += 1;
    assert_eq!(*lock(&m), 2);
}

/// A manager over one pool in memory whose events are collected, as a management
/// client would see them (names and data).
fn manager_with_events() -> (
    tempfile::TempDir,
    Arc<Manager>,
    std::sync::mpsc::Receiver<(String, Value)>,
) {
    manager_over(Arc::new(thinpool::storage::MemStorage::new(64 << 20)))
}

/// [`manager_with_events`] with the pool's data on `data`.
fn manager_over(
    data: Arc<dyn thinpool::storage::Storage>,
) -> (
    tempfile::TempDir,
    Arc<Manager>,
    std::sync::mpsc::Receiver<(String, Value)>,
) {
    use thinpool::pool::PoolOptions;
    use thinpool::storage::MemStorage;
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(
        Arc::new(MemStorage::new(4 << 20)),
        data,
        128,
        PoolOptions::default(),
    )
    .unwrap();
    let reg = thinpool::registry::Registry::new(dir.path().join("reg.json"), 0);
    let catalog = Catalog::new(Arc::new(pool), reg, 1);
    let m = Manager::new(
        vec![Arc::new(PoolHandle::new("p", catalog))],
        dir.path().to_path_buf(),
    );
    let (tx, rx) = std::sync::mpsc::sync_channel(1024);
    m.events.subscribe(1, move |ev| {
        match tx.try_send((ev.name.to_string(), ev.data.clone())) {
            Ok(()) => crate::events::Delivery::Taken,
            Err(_) => crate::events::Delivery::Gone,
        }
    });
    (dir, m, rx)
}

fn new_disk<'a>(name: &'a str, clone_from: Option<&'a str>) -> NewDisk<'a> {
    NewDisk {
        name,
        pool: None,
        size: clone_from.is_none().then_some(8 << 20),
        clone_from,
        read_only: false,
        serial: None,
        external_origin: None,
    }
}

/// An orchestrator follows every change through events alone, without polling.
#[test]
fn every_change_is_announced_by_an_event() {
    let (_dir, m, rx) = manager_with_events();
    m.disk_add(&new_disk("vm1", None), None, None, None)
        .unwrap();
    m.snapshot_create("vm1", "s1").unwrap();
    m.disk_add(&new_disk("c1", Some("s1")), None, None, None)
        .unwrap();
    m.disk_set_read_only("c1", true).unwrap();
    m.snapshot_revert("vm1", "s1").unwrap();
    m.disk_remove("c1", false).unwrap();
    m.snapshot_delete("s1", false).unwrap();
    m.pool_grow(None).unwrap();
    let got: Vec<(String, Value)> = rx.try_iter().collect();
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "DISK_ADDED",
            "SNAPSHOT_CREATED",
            "DISK_ADDED",
            "DISK_READ_ONLY_CHANGED",
            "DISK_REVERTED",
            "DISK_REMOVED",
            "SNAPSHOT_DELETED",
            "POOL_GROWN",
        ],
        "{got:#?}"
    );
    let data = |i: usize| &got[i].1;
    assert_eq!(data(0)["disk"], "vm1");
    assert_eq!(data(0)["pool"], "p");
    assert_eq!(data(0)["size"], 8 << 20);
    assert_eq!(data(1)["disk"], "vm1");
    assert_eq!(data(1)["snapshot"], "s1");
    assert_eq!(data(2)["origin"], "s1");
    assert_eq!(data(3)["read-only"], true);
    assert_eq!(data(4)["snapshot"], "s1");
    assert_eq!(data(5)["disk"], "c1");
    assert_eq!(data(6)["snapshot"], "s1");
    assert_eq!(data(7)["data-blocks"], 1024);
    m.shutdown().unwrap();
}

fn names(v: &[DeviceInfo]) -> Vec<String> {
    let mut n: Vec<String> = v.iter().map(|e| e.name.clone()).collect();
    n.sort();
    n
}

/// As in ZFS, `disk@name` is a snapshot in its disk's namespace: two disks may each
/// have `@nightly`. Flat names keep working, and `disk@name` also finds a flat-named
/// snapshot taken of that disk.
#[test]
fn snapshots_are_named_in_their_disks_namespace() {
    let (_dir, m, _rx) = manager_with_events();
    for d in ["vm1", "vm2"] {
        m.disk_add(&new_disk(d, None), None, None, None).unwrap();
    }
    m.snapshot_create("vm1", "@nightly").unwrap();
    m.snapshot_create("vm2", "vm2@nightly").unwrap();
    assert_eq!(
        names(&m.query_snapshots().unwrap()),
        ["vm1@nightly", "vm2@nightly"]
    );
    // Not in another disk's namespace.
    let e = m.snapshot_create("vm1", "vm2@x").unwrap_err().to_string();
    assert!(
        e.contains("'vm2@x' names a snapshot of vm2, not of vm1"),
        "{e}"
    );
    // Nor a disk in a disk's namespace, nor a flat name another could take for vm2@nightly.
    let e = m
        .disk_add(&new_disk("vm2@x", None), None, None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("'@' separates"), "{e}");
    let e = m.snapshot_create("vm2", "nightly").unwrap_err().to_string();
    assert!(e.contains("'vm2@nightly', which is already in use"), "{e}");
    for bad in ["@", "@a@b"] {
        let e = m.snapshot_create("vm1", bad).unwrap_err().to_string();
        assert!(e.contains("is not a snapshot name"), "{e}");
    }
    // A flat name, reached as vm1@before too; the qualified name is then taken.
    m.snapshot_create("vm1", "before").unwrap();
    let e = m.snapshot_create("vm1", "@before").unwrap_err().to_string();
    assert!(e.contains("already in use"), "{e}");
    m.disk_add(&new_disk("c1", Some("vm1@before")), None, None, None)
        .unwrap();
    m.disk_add(&new_disk("c2", Some("vm2@nightly")), None, None, None)
        .unwrap();
    let origin = |d: &str| {
        let id = m.entry(d).unwrap().origin.unwrap();
        let p = m.pool(None).unwrap();
        let reg = p.registry();
        reg.devices[&id].name.clone().unwrap()
    };
    assert_eq!(origin("c1"), "before");
    assert_eq!(origin("c2"), "vm2@nightly");
    let e = m
        .snapshot_delete("vm2@before", false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no disk or snapshot named 'vm2@before'"), "{e}");
    m.snapshot_delete("vm1@before", false).unwrap();
    m.shutdown().unwrap();
}

/// dm-thin needs nothing of a snapshot its clones came from, so deleting it needs no
/// force; the clones then say where they came from, and the reply names them.
#[test]
fn deleting_a_snapshot_clones_came_from_keeps_their_lineage() {
    let (_dir, m, _rx) = manager_with_events();
    m.disk_add(&new_disk("vm1", None), None, None, None)
        .unwrap();
    m.snapshot_create("vm1", "@gold").unwrap();
    for c in ["c1", "c2"] {
        m.disk_add(&new_disk(c, Some("vm1@gold")), None, None, None)
            .unwrap();
    }
    m.snapshot_create("c1", "@s").unwrap();
    let r = m.snapshot_delete("vm1@gold", false).unwrap();
    assert_eq!(r.dependents, ["c1", "c2"]);
    let disks = m.query_disks().unwrap();
    let c1 = disks.iter().find(|d| d.name == "c1").unwrap().clone();
    assert_eq!(c1.origin, None);
    assert_eq!(c1.deleted_origin.as_deref(), Some("vm1@gold"));
    assert_eq!(c1.lineage, ["vm1@gold (deleted)"]);
    let snaps = m.query_snapshots().unwrap();
    assert_eq!(snaps[0].lineage, ["c1", "vm1@gold (deleted)"]);
    m.shutdown().unwrap();
}

/// A disk added at run time with more queues than the default is served with them again
/// after a restart (a frontend asks for as many as before and is refused with fewer).
#[test]
fn a_disk_added_at_run_time_keeps_its_queues_across_a_restart() {
    let (_dir, m, _rx) = manager_with_events();
    m.disk_add(&new_disk("vm1", None), None, Some(2), Some(128))
        .unwrap();
    let queues = |m: &Manager| {
        m.served_disks()
            .iter()
            .find(|d| d.name == "vm1")
            .map(|d| d.num_queues)
    };
    assert_eq!(queues(&m), Some(2));
    // A restart: the disk is served again from the registry, nothing said of queues.
    m.unserve("vm1").unwrap();
    assert_eq!(queues(&m), None);
    m.serve("vm1", None, None, None).unwrap();
    assert_eq!(queues(&m), Some(2));
    assert_eq!(lock(&m.disks)["vm1"].disk.queue_size, 128);
    m.shutdown().unwrap();
}

#[test]
fn queue_options_are_checked_not_clamped() {
    assert_eq!(queue_options(None, None).unwrap(), (1, 256));
    assert_eq!(queue_options(Some(64), Some(32768)).unwrap(), (64, 32768));
    for (n, q) in [
        (Some(0), None),
        (Some(65), None),
        (None, Some(100)),
        (None, Some(1)),
    ] {
        let e = queue_options(n, q).unwrap_err();
        assert!(matches!(e, Error::Failed(_)));
        assert!(e.to_string().contains("must be"), "{}", e.to_string());
    }
    assert!(queue_options(None, Some(65536))
        .unwrap_err()
        .to_string()
        .contains("'queue-size' must be a power of two, 2 to 32768"));
}

/// A snapshot of a running disk holds no guest write behind a request in flight: while
/// one write is held in the data device the snapshot is made and another write
/// completes; the reply comes once the held write has landed. (A request in flight when
/// a snapshot is taken may be in it or not, as after a power loss.)
#[test]
fn a_snapshot_holds_no_guest_write_behind_a_request_in_flight() {
    use std::io::IoSlice;
    use thinpool::storage::held::HeldWrite;
    use thinpool::storage::MemStorage;
    const BS: u64 = 64 << 10;
    let data = Arc::new(HeldWrite::new(MemStorage::new(64 << 20)));
    let (_dir, m, _rx) = manager_over(data.clone());
    m.disk_add(&new_disk("vm1", None), None, None, None)
        .unwrap();
    let disk = lock(&m.disks)["vm1"].disk.clone();
    let write = |disk: &Disk, at: u64, byte: u8| {
        disk.target()
            .write_vectored(at, &[IoSlice::new(&[byte; 4096])])
            .unwrap()
    };
    write(&disk, 0, 1);
    write(&disk, BS, 1);
    let pool = m.pool(None).unwrap().pool().clone();
    let devices_before = pool.devices().len();

    data.hold_next_write();
    let in_flight = {
        let disk = disk.clone();
        std::thread::spawn(move || write(&disk, 0, 2))
    };
    data.wait_until_holding();
    let snap = {
        let m = m.clone();
        std::thread::spawn(move || m.snapshot_create("vm1", "@s1"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while pool.devices().len() == devices_before {
        assert!(
            Instant::now() < deadline,
            "the snapshot was not made while a guest write was in flight"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    write(&disk, BS, 3);
    assert!(
        !snap.is_finished(),
        "snapshot-create replied before the write in flight had landed"
    );
    data.release();
    in_flight.join().unwrap();
    let made = snap.join().unwrap().unwrap();
    let read = |id: u32, at: u64| {
        let mut b = vec![0u8; 4096];
        pool.read(id, at, &mut b).unwrap();
        b[0]
    };
    let vm1 = disk.target().thin_id;
    assert_eq!((read(made.thin_id, BS), read(vm1, BS)), (1, 3));
    assert_eq!(read(vm1, 0), 2);
    m.shutdown().unwrap();
}

/// A disk is reverted only to a snapshot: its own, the one a clone came from, or another
/// of the pool (re-imaged from it); naming itself or another disk is refused, and the disk
/// keeps its contents.
#[test]
fn a_disk_reverts_only_to_a_snapshot() {
    let (_dir, m, _rx) = manager_with_events();
    for d in ["vm1", "vm2"] {
        m.disk_add(&new_disk(d, None), None, None, None).unwrap();
    }
    let pool = m.pool(None).unwrap().pool().clone();
    let id = |d: &str| lock(&m.disks)[d].disk.target().thin_id;
    let first_byte = |d: &str| {
        let mut b = [0u8; 512];
        pool.read(id(d), 0, &mut b).unwrap();
        b[0]
    };
    pool.write(id("vm1"), 0, &[1u8; 4096]).unwrap();
    pool.write(id("vm2"), 0, &[2u8; 4096]).unwrap();
    m.snapshot_create("vm1", "@a").unwrap();
    m.snapshot_create("vm2", "@b").unwrap();
    for target in ["vm1", "vm2"] {
        let e = m.snapshot_revert("vm1", target).unwrap_err().to_string();
        assert!(
            e.contains("is a disk, not a snapshot"),
            "revert vm1 to {target}: {e}"
        );
        assert_eq!(
            first_byte("vm1"),
            1,
            "vm1 changed by a refused revert to {target}"
        );
    }
    // Its own snapshot; another disk's; a clone back to the snapshot it came from.
    pool.write(id("vm1"), 0, &[3u8; 4096]).unwrap();
    m.snapshot_revert("vm1", "vm1@a").unwrap();
    assert_eq!(first_byte("vm1"), 1);
    m.snapshot_revert("vm1", "vm2@b").unwrap();
    assert_eq!(first_byte("vm1"), 2);
    m.disk_add(&new_disk("c1", Some("vm1@a")), None, None, None)
        .unwrap();
    pool.write(id("c1"), 0, &[4u8; 4096]).unwrap();
    m.snapshot_revert("c1", "vm1@a").unwrap();
    assert_eq!(first_byte("c1"), 1);
    m.shutdown().unwrap();
}
