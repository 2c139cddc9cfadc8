use super::*;

#[test]
fn devices_made_from_a_removed_one_keep_its_name_as_their_deleted_origin() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Registry::new(dir.path().join("r.json"), 0);
    let entry = |name: &str, snapshot, origin| DeviceEntry {
        name: Some(name.into()),
        snapshot,
        origin,
        ..Default::default()
    };
    r.insert(0, entry("vm1", false, None)).unwrap();
    r.insert(1, entry("vm1@gold", true, Some(0))).unwrap();
    r.insert(2, entry("c1", false, Some(1))).unwrap();
    r.insert(3, entry("c2", false, Some(1))).unwrap();
    r.insert(4, entry("flat", true, Some(0))).unwrap();
    assert_eq!(r.resolve("vm1@flat"), Some(4));
    assert_eq!(r.resolve("c1@flat"), None);
    assert_eq!(r.resolve("vm1@gold"), Some(1));
    let (gone, dependents) = r.remove(1).unwrap();
    assert_eq!(gone.name.as_deref(), Some("vm1@gold"));
    assert_eq!(dependents, ["c1", "c2"]);
    assert_eq!(r.devices[&2].origin, None);
    assert_eq!(r.devices[&2].deleted_origin.as_deref(), Some("vm1@gold"));
    r.save().unwrap();
    let back = Registry::load(dir.path().join("r.json")).unwrap().unwrap();
    assert_eq!(back.devices, r.devices);
}

#[test]
fn next_id_reuses_a_free_id_once_the_highest_is_the_largest_dm_thin_allows() {
    let mut r = Registry::new("/nonexistent/r.json", 0);
    r.devices.insert(MAX_THIN_ID, DeviceEntry::default());
    assert_eq!(r.next_id(&[MAX_THIN_ID]), 0);
    r.devices.insert(0, DeviceEntry::default());
    assert_eq!(r.next_id(&[0, 1, 2, MAX_THIN_ID]), 3);
    assert_eq!(r.next_id(&[5]), 1);
    let mut r = Registry::new("/nonexistent/r.json", 0);
    r.devices.insert(7, DeviceEntry::default());
    assert_eq!(
        r.next_id(&[3]),
        8,
        "ids follow creation order while they can"
    );
}

#[test]
fn next_id_does_not_overflow_at_the_largest_id() {
    let mut r = Registry::new("/nonexistent/r.json", 0);
    r.devices.insert(u32::MAX, DeviceEntry::default());
    r.devices.insert(0, DeviceEntry::default());
    assert_eq!(r.next_id(&[1]), 2);
    let rec = r.reconcile(u64::MAX, &[0, u32::MAX]);
    assert!(
        rec.messages[0].contains("does not match"),
        "{:?}",
        rec.messages
    );
}

#[test]
fn save_load_round_trip_and_reconcile() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.registry.json");
    assert!(Registry::load(&path).unwrap().is_none());
    let mut r = Registry::new(&path, 3);
    r.insert(
        0,
        DeviceEntry {
            name: Some("vm1".into()),
            size: 1 << 30,
            serial: make_serial(0, 1, 2),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(
        r.insert(
            1,
            DeviceEntry {
                name: Some("vm1".into()),
                ..Default::default()
            }
        ),
        Err(RegistryError::NameTaken(_))
    ));
    r.save().unwrap();
    let l = Registry::load(&path).unwrap().unwrap();
    assert_eq!(l.devices, r.devices);
    assert_eq!(l.find("vm1"), Some(0));
    assert!(l.reconcile(3, &[0]).consistent);
    let ahead = l.reconcile(2, &[0, 5]);
    assert!(!ahead.consistent);
    assert_eq!(ahead.unregistered, vec![5]);
    assert!(ahead.messages[0].contains("one transaction ahead"));
    assert_eq!(l.reconcile(3, &[]).missing, vec![0]);
    std::fs::write(&path, "{").unwrap();
    assert!(matches!(
        Registry::load(&path),
        Err(RegistryError::Invalid { .. })
    ));
    assert_eq!(make_serial(1, 2, 3).len(), 19);
    assert_ne!(make_serial(1, 2, 3), make_serial(2, 2, 3));
}

#[test]
fn recover_goes_back_to_the_state_the_pool_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.registry.json");
    let entry = |n: &str| DeviceEntry {
        name: Some(n.into()),
        size: 1 << 20,
        ..Default::default()
    };
    let mut r = Registry::new(&path, 3);
    r.insert(0, entry("vm1")).unwrap();
    r.save().unwrap();
    // A change written to the registry (transaction 4), then a crash before the pool
    // committed it: the pool is still at 3.
    let mut r = Registry::load(&path).unwrap().unwrap();
    r.devices.remove(&0);
    r.insert(1, entry("vm2")).unwrap();
    r.transaction_id = 4;
    r.save().unwrap();
    let mut l = Registry::load(&path).unwrap().unwrap();
    assert_eq!(
        l.recover(4),
        None,
        "nothing to do when the pool committed it"
    );
    let msg = l.recover(3).expect("one transaction ahead");
    assert!(msg.contains("undone"), "{msg}");
    assert_eq!(l.transaction_id, 3);
    assert_eq!(l.devices.keys().collect::<Vec<_>>(), [&0]);
    assert!(l.reconcile(3, &[0]).consistent);
    // The next change is written over the state gone back to, which it keeps as its
    // previous one.
    l.insert(2, entry("vm3")).unwrap();
    l.transaction_id = 4;
    l.save().unwrap();
    let mut again = Registry::load(&path).unwrap().unwrap();
    assert_eq!(again.find("vm3"), Some(2));
    assert_eq!(again.find("vm2"), None);
    again.recover(3).unwrap();
    assert_eq!(again.devices.keys().collect::<Vec<_>>(), [&0]);
    // Saving the same transaction again keeps the previous state it had.
    let mut same = Registry::load(&path).unwrap().unwrap();
    same.save().unwrap();
    let mut same = Registry::load(&path).unwrap().unwrap();
    assert!(same.recover(3).is_some());
}

#[test]
fn version_1_files_load_and_cannot_be_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.registry.json");
    std::fs::write(
        &path,
        r#"{"format": "vhost-thin-registry", "version": 1, "transaction_id": 5,
            "devices": {"0": {"name": "vm1", "size": 512, "serial": "x"}}}"#,
    )
    .unwrap();
    let mut r = Registry::load(&path).unwrap().unwrap();
    assert_eq!(r.find("vm1"), Some(0));
    // It does not say what came before: reported by reconcile, not undone.
    assert_eq!(r.recover(4), None);
    assert!(!r.reconcile(4, &[0]).consistent);
}

/// The registry is a file people and tools may edit: a name in it that is not a name
/// (a path, a NUL, too long) is refused when the file is opened, with the entry named,
/// rather than served (a disk's socket is `<dir>/<name>.sock`).
#[test]
fn a_file_with_a_bad_name_is_refused_at_load_naming_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.registry.json");
    let write = |devices: &str, previous: &str| {
        std::fs::write(
            &path,
            format!(
                r#"{{"format": "vhost-thin-registry", "version": 2, "transaction_id": 5,
                    "devices": {devices}{previous}}}"#
            ),
        )
        .unwrap()
    };
    let cases = [
        (
            r#"{"7": {"name": "../../x", "size": 512, "serial": "x"}}"#,
            "",
            "thin device 7",
            "\"../../x\"",
        ),
        (
            r#"{"0": {"name": "a\u0000b", "size": 512, "serial": "x"}}"#,
            "",
            "thin device 0",
            "control character",
        ),
        (
            r#"{"0": {"name": "..", "size": 512, "serial": "x"}}"#,
            "",
            "thin device 0",
            "'.' or '..'",
        ),
        (
            r#"{"3": {"size": 512, "serial": "x", "receiving": {"name": "-r", "next_offset": 0, "resumable": true}}}"#,
            "",
            "thin device 3",
            "'-'",
        ),
        (
            r#"{"1": {"name": "ok", "size": 512, "serial": "x"}}"#,
            r#", "previous": {"transaction_id": 4, "devices": {"2": {"name": "a/b", "size": 512, "serial": "x"}}}"#,
            "thin device 2",
            "'/'",
        ),
    ];
    for (devices, previous, entry, why) in cases {
        write(devices, previous);
        let e = Registry::load(&path).unwrap_err();
        assert!(matches!(e, RegistryError::Invalid { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(entry) && msg.contains(why),
            "{msg}"
        );
    }
    // A good name loads; and a bad one cannot be put in to begin with.
    write(
        r#"{"1": {"name": "vm 1@r2", "size": 512, "serial": "x"}}"#,
        "",
    );
    let mut r = Registry::load(&path).unwrap().unwrap();
    let bad = DeviceEntry {
        name: Some("../x".into()),
        ..Default::default()
    };
    let e = r.insert(2, bad).unwrap_err().to_string();
    assert!(e.contains("\"../x\"") && e.contains("'/'"), "{e}");
    assert_eq!(r.devices.len(), 1);
}

/// Version 2 kept the daemon's migration mark and replication schedule at the top of
/// an entry; version 3 keeps them, untouched, in `daemon_state`, which the engine
/// does not look into. An old file reads; it is written in the new form and reads
/// back the same.
#[test]
fn a_version_2_file_reads_with_the_daemons_fields_in_daemon_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.registry.json");
    let migration = r#"{"role": "switched", "job": "m1", "from_pool": "old"}"#;
    let replication = r#"{"interval-secs": 60, "keep": 3, "target": {"kind": "pool", "pool": "dr", "prefix": "vm1"}, "next-seq": 4}"#;
    std::fs::write(
        &path,
        format!(
            r#"{{"format": "vhost-thin-registry", "version": 2, "transaction_id": 5,
                "devices": {{"0": {{"name": "vm1", "size": 512, "serial": "x",
                                    "migration": {migration}, "replication": {replication}}},
                             "1": {{"name": "vm2", "size": 512, "serial": "y"}}}},
                "previous": {{"transaction_id": 4, "devices": {{"0": {{"name": "vm1",
                              "size": 512, "serial": "x", "replication": {replication}}}}}}}}}"#
        ),
    )
    .unwrap();
    let mut r = Registry::load(&path).unwrap().unwrap();
    let parse = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap();
    assert_eq!(
        r.devices[&0].daemon_state,
        Some(serde_json::json!({"migration": parse(migration), "replication": parse(replication)}))
    );
    assert_eq!(r.devices[&1].daemon_state, None);
    // The state before the last change is read the same way: going back to it keeps
    // the schedule.
    assert!(r.recover(4).is_some());
    assert_eq!(
        r.devices[&0].daemon_state,
        Some(serde_json::json!({"replication": parse(replication)}))
    );
    let read = r.devices.clone();
    r.save().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("\"version\": 3") || text.contains("\"version\":3"),
        "{text}"
    );
    assert!(
        text.contains("daemon_state") && !text.contains("\"migration\""),
        "{text}"
    );
    assert_eq!(Registry::load(&path).unwrap().unwrap().devices, read);
}

/// A snapshot may be in a pool twice (received again under another name), one copy
/// perhaps still being received: looked up by guid (an incremental stream's base), the
/// complete snapshot is found, whichever thin id it has.
#[test]
fn find_guid_prefers_a_complete_snapshot_to_a_copy_being_received() {
    let mut r = Registry::new("/nonexistent/r.json", 0);
    let guid = "0123456789abcdef0123456789abcdef";
    let snap = |name: &str| DeviceEntry {
        name: Some(name.into()),
        snapshot: true,
        read_only: true,
        guid: Some(guid.into()),
        ..Default::default()
    };
    let receiving = DeviceEntry {
        name: None,
        receiving: Some(PartialReceive {
            name: "copy".into(),
            ..Default::default()
        }),
        ..snap("x")
    };
    r.insert(1, receiving).unwrap();
    assert_eq!(r.find_guid(guid), Some(1), "only the one being received");
    r.insert(4, snap("s1")).unwrap();
    assert_eq!(r.find_guid(guid), Some(4));
    r.insert(2, snap("s1-again")).unwrap();
    assert!([Some(2), Some(4)].contains(&r.find_guid(guid)));
    assert_eq!(r.find_guid("ffffffffffffffffffffffffffffffff"), None);
}

#[test]
fn external_origin_is_written_only_when_set_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.registry.json");
    let mut r = Registry::new(&path, 1);
    let plain = DeviceEntry {
        size: 512,
        serial: "a".into(),
        ..Default::default()
    };
    let backed = DeviceEntry {
        external_origin: Some("/images/golden.img".into()),
        ..plain.clone()
    };
    r.insert(0, plain).unwrap();
    r.insert(1, backed.clone()).unwrap();
    r.save().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.matches("external_origin").count(), 1, "{text}");
    let back = Registry::load(&path).unwrap().unwrap();
    assert_eq!(back.devices[&1], backed);
    assert_eq!(back.devices[&0].external_origin, None);
}
