use super::*;
use crate::check;
use crate::storage::MemStorage;
use crate::xml::parse;

const CLEAN: &str = include_str!("../../../tests/fixtures/xml/dm-thin-kernel-clean.thin_dump.xml");
const HELD_SNAP: &str = include_str!(
    "../../../tests/fixtures/xml/dm-thin-kernel-held-snap.thin_dump-metadata-snap.xml"
);

fn mem(bytes: u64) -> Arc<dyn Storage> {
    Arc::new(MemStorage::new(bytes))
}

fn dump_string(md: &mut ThinMetadata, snap: bool) -> String {
    let mut out = Vec::new();
    dump(md, snap, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// Compares two dumps, reporting the first line that differs (dumps can be long).
fn assert_same(got: &str, want: &str) {
    if got == want {
        return;
    }
    for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
        assert_eq!(g, w, "line {} differs", i + 1);
    }
    panic!(
        "dumps differ in length: {} vs {} lines (or in the final newline)",
        got.lines().count(),
        want.lines().count()
    );
}

fn restore_str(xml: &str) -> Result<ThinMetadata, RestoreError> {
    restore(&parse(xml).unwrap(), mem(4 << 20), Default::default())
}

#[test]
fn clean_fixture_round_trips_byte_for_byte() {
    let meta = mem(4 << 20);
    let mut md = restore(&parse(CLEAN).unwrap(), meta.clone(), Default::default()).unwrap();
    assert_eq!(dump_string(&mut md, false), CLEAN);
    // Shared blocks got one reference per mapping, and the result checks clean.
    assert_eq!(md.data_block_count(0).unwrap(), 1);
    assert_eq!(md.data_block_count(4).unwrap(), 3);
    assert_eq!(md.data_block_count(8).unwrap(), 3);
    assert_eq!(md.data_block_count(13).unwrap(), 2);
    let report = check::check(meta.clone()).unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
    assert_eq!(report.mappings, 10 + 8 + 5 + 9);
    assert_eq!(report.data_blocks_used, 22);
    // The same from a fresh open of what was committed.
    let mut again = ThinMetadata::open(meta, Default::default()).unwrap();
    assert_eq!(dump_string(&mut again, false), CLEAN);
}

#[test]
fn held_snap_fixture_round_trips_through_a_metadata_snapshot() {
    // A `thin_dump -m` file says nr_data_blocks="0": its mappings are refused ...
    let e = restore_str(HELD_SNAP).err().unwrap();
    assert!(
        matches!(
            e,
            RestoreError::DataBlock {
                dev_id: 0,
                vblock: 0,
                data_block: 0,
                nr_data_blocks: 0
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "device 0, virtual block 0: data block 0 is beyond the pool's 0 data blocks"
    );
    // ... until the pool's real size (1024 blocks, see the fixture's README) is given.
    let mut parsed = parse(HELD_SNAP).unwrap();
    parsed.superblock.nr_data_blocks = 1024;
    let meta = mem(4 << 20);
    let mut md = restore(&parsed, meta.clone(), Default::default()).unwrap();
    let live = dump_string(&mut md, false);
    assert_eq!(
        live,
        HELD_SNAP.replacen("nr_data_blocks=\"0\"", "nr_data_blocks=\"1024\"", 1)
    );
    assert_eq!(live, parsed.to_xml_string().unwrap());
    // Dumped through a held metadata snapshot, it is the file exactly.
    md.reserve_metadata_snap().unwrap();
    assert_eq!(dump_string(&mut md, true), HELD_SNAP);
    let report = check::check(meta).unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
}

#[test]
fn dump_shows_uncommitted_state_and_the_held_snapshot_separately() {
    let meta = mem(4 << 20);
    let mut md = restore(&parse(CLEAN).unwrap(), meta, Default::default()).unwrap();
    assert!(matches!(
        dump(&mut md, true, Vec::new()),
        Err(DumpError::Metadata(crate::Error::NoMetadataSnap))
    ));
    md.reserve_metadata_snap().unwrap();
    md.delete(2).unwrap();
    md.set_transaction_id(42, 43).unwrap();
    let b = md.alloc_data_block().unwrap();
    md.insert_mapping(0, 5, b).unwrap();
    let live = dump_string(&mut md, false);
    assert!(live.starts_with("<superblock uuid=\"\" time=\"3\" transaction=\"43\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"1024\">\n"));
    assert!(!live.contains("dev_id=\"2\""));
    assert!(live.contains("<device dev_id=\"0\" mapped_blocks=\"11\""));
    assert!(live.contains(&format!(
        "    <single_mapping origin_block=\"5\" data_block=\"{b}\" time=\"3\"/>\n"
    )));
    // The snapshot is the pool as it was at the reserve, with nr_data_blocks 0.
    let snap = dump_string(&mut md, true);
    assert_eq!(
        snap,
        CLEAN.replacen("nr_data_blocks=\"1024\"", "nr_data_blocks=\"0\"", 1)
    );
}

#[test]
fn empty_pool_and_zero_data_blocks() {
    let xml = "<superblock uuid=\"\" time=\"0\" transaction=\"0\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"0\">\n</superblock>\n";
    let mut md = restore_str(xml).unwrap();
    assert_eq!(dump_string(&mut md, false), xml);
    let xml = "<superblock uuid=\"\" time=\"7\" transaction=\"9\" flags=\"0\" version=\"2\" data_block_size=\"256\" nr_data_blocks=\"0\">\n  <device dev_id=\"16777215\" mapped_blocks=\"0\" transaction=\"3\" creation_time=\"5\" snap_time=\"7\">\n  </device>\n</superblock>\n";
    let mut md = restore_str(xml).unwrap();
    assert_eq!(dump_string(&mut md, false), xml);
}

#[test]
fn multi_level_trees_and_shared_runs_round_trip() {
    // Enough mappings for internal nodes in every bottom-level tree, runs and
    // singles, and blocks shared by three devices.
    let mut xml = String::from("<superblock uuid=\"\" time=\"5\" transaction=\"77\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"100000\">\n");
    for dev in 0..3u32 {
        let n = 2000 + dev as u64 * 500;
        xml.push_str(&format!("  <device dev_id=\"{}\" mapped_blocks=\"{}\" transaction=\"{dev}\" creation_time=\"{dev}\" snap_time=\"{}\">\n", dev * 7, n, dev + 2));
        for i in 0..n {
            if i % 3 == 0 {
                // Shared between devices: same data block everywhere.
                xml.push_str(&format!(
                    "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"0\"/>\n",
                    i * 2,
                    i
                ));
            } else {
                xml.push_str(&format!(
                    "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"{}\"/>\n",
                    i * 2,
                    10_000 + dev as u64 * 10_000 + i,
                    dev + 1
                ));
            }
        }
        xml.push_str("  </device>\n");
    }
    xml.push_str("  <device dev_id=\"20\" mapped_blocks=\"3000\" transaction=\"0\" creation_time=\"4\" snap_time=\"4\">\n    <range_mapping origin_begin=\"1000000\" data_begin=\"50000\" length=\"3000\" time=\"4\"/>\n  </device>\n</superblock>\n");
    let meta = mem(8 << 20);
    let mut md = restore(&parse(&xml).unwrap(), meta.clone(), Default::default()).unwrap();
    assert_same(&dump_string(&mut md, false), &xml);
    assert_eq!(md.data_block_count(3).unwrap(), 3);
    assert_eq!(md.data_block_count(10_001).unwrap(), 1);
    let report = check::check(meta).unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
}

const HEAD: &str = "<superblock uuid=\"\" time=\"2\" transaction=\"1\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"100\">\n";

fn one_device(dev: &str, body: &str) -> String {
    format!("{HEAD}  <device {dev}>\n{body}  </device>\n</superblock>\n")
}

#[test]
fn restore_rejects_what_the_format_cannot_hold() {
    let map = |b: &str, t: u32| {
        format!("    <single_mapping origin_block=\"7\" data_block=\"{b}\" time=\"{t}\"/>\n")
    };
    let dev =
        "dev_id=\"3\" mapped_blocks=\"1\" transaction=\"0\" creation_time=\"1\" snap_time=\"2\"";
    restore_str(&one_device(dev, &map("99", 2))).unwrap();
    let e = restore_str(&one_device(dev, &map("100", 2))).err().unwrap();
    assert!(
        matches!(
            e,
            RestoreError::DataBlock {
                dev_id: 3,
                vblock: 7,
                data_block: 100,
                nr_data_blocks: 100
            }
        ),
        "{e}"
    );
    // A run crossing the end names its first block outside the pool.
    let e = restore_str(&one_device(
        &dev.replacen("mapped_blocks=\"1\"", "mapped_blocks=\"10\"", 1),
        "    <range_mapping origin_begin=\"10\" data_begin=\"95\" length=\"10\" time=\"0\"/>\n",
    ))
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            RestoreError::DataBlock {
                dev_id: 3,
                vblock: 15,
                data_block: 100,
                ..
            }
        ),
        "{e}"
    );
    let e = restore_str(&one_device(dev, &map("1", 1 << 24)))
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            RestoreError::MappingTime {
                dev_id: 3,
                vblock: 7,
                time: 16777216
            }
        ),
        "{e}"
    );
    let e = restore_str(&one_device(
        "dev_id=\"16777216\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"",
        "",
    ))
    .err()
    .unwrap();
    assert!(
        matches!(e, RestoreError::DeviceId { dev_id: 16777216 }),
        "{e}"
    );
    let e = restore_str(&one_device(
        "dev_id=\"4\" mapped_blocks=\"2\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"",
        &map("1", 0),
    ))
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            RestoreError::MappedBlocks {
                dev_id: 4,
                recorded: 2,
                actual: 1
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "device 4: mapped_blocks is 2 but the dump lists 1 mapped blocks"
    );
    // The same block twice (the XML parser refuses that; a dump built by a program
    // is checked too): refused before anything is written.
    let mut d = parse(&one_device(
        "dev_id=\"4\" mapped_blocks=\"2\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"",
        &format!("{}{}", map("1", 0), map("2", 0).replace("\"7\"", "\"8\"")),
    ))
    .unwrap();
    d.devices[0].runs[1].vbegin = 7;
    let e = restore(&d, mem(4 << 20), Default::default()).err().unwrap();
    assert!(
        matches!(
            e,
            RestoreError::Overlap {
                dev_id: 4,
                vblock: 7
            }
        ),
        "{e}"
    );
    let e = restore_str(&one_device(
        "dev_id=\"5\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"3\"",
        "",
    ))
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            RestoreError::DeviceTime {
                dev_id: 5,
                field: "snap_time",
                value: 3,
                pool_time: 2
            }
        ),
        "{e}"
    );
    for (from, to) in [
        ("time=\"2\"", "time=\"16777216\""),
        ("version=\"2\"", "version=\"3\""),
        ("data_block_size=\"128\"", "data_block_size=\"100\""),
        ("nr_data_blocks=\"100\"", "nr_data_blocks=\"1099511627777\""),
        ("uuid=\"\"", "uuid=\"0123456789abcdefX\""),
    ] {
        let xml = format!("{}</superblock>\n", HEAD.replacen(from, to, 1));
        let e = restore_str(&xml).err().unwrap();
        assert!(matches!(e, RestoreError::Superblock(_)), "{to}: {e}");
    }
    // Running out of metadata space is reported with the device and block.
    let n = 100_000u64;
    let mut xml = HEAD.replacen("nr_data_blocks=\"100\"", "nr_data_blocks=\"100000\"", 1);
    xml.push_str(&format!("  <device dev_id=\"1\" mapped_blocks=\"{n}\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n"));
    for i in 0..n {
        xml.push_str(&format!(
            "    <single_mapping origin_block=\"{}\" data_block=\"{i}\" time=\"0\"/>\n",
            i * 2
        ));
    }
    xml.push_str("  </device>\n</superblock>\n");
    let parsed = parse(&xml).unwrap();
    let e = restore(&parsed, mem(512 * 4096), Default::default())
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            RestoreError::Metadata {
                source: crate::Error::OutOfMetadataSpace { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().starts_with("device 1, virtual block "), "{e}");
    let e = restore(
        &parsed,
        mem(4 << 20),
        MetadataOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            RestoreError::Metadata {
                source: crate::Error::ReadOnly(_),
                ..
            }
        ),
        "read-only: {e}"
    );
}

#[test]
fn version_1_and_flags_and_uuid_are_restored() {
    let xml = HEAD
        .replacen("version=\"2\"", "version=\"1\"", 1)
        .replacen("flags=\"0\"", "flags=\"1\"", 1)
        .replacen("uuid=\"\"", "uuid=\"abc\"", 1)
        + "</superblock>\n";
    let mut md = restore_str(&xml).unwrap();
    assert!(md.needs_check());
    assert_eq!(&md.superblock().uuid[..4], b"abc\0");
    // Written as version 2; the uuid is not printed (thin_dump 0.9.0 never does).
    assert_eq!(
        dump_string(&mut md, false),
        HEAD.replacen("flags=\"0\"", "flags=\"1\"", 1) + "</superblock>\n"
    );
}

#[test]
fn insert_mapping_ref_counts_references() {
    let mut md = restore_str(&format!("{HEAD}</superblock>\n")).unwrap();
    md.create_thin(0).unwrap();
    md.create_thin(1).unwrap();
    let m = Mapping {
        data_block: 5,
        time: 1,
    };
    md.insert_mapping_ref(0, 0, m).unwrap();
    md.insert_mapping_ref(1, 0, m).unwrap();
    assert_eq!(md.data_block_count(5).unwrap(), 2);
    // Same block again: no new reference; another block: the old one is released.
    md.insert_mapping_ref(1, 0, m).unwrap();
    assert_eq!(md.data_block_count(5).unwrap(), 2);
    md.insert_mapping_ref(
        1,
        0,
        Mapping {
            data_block: 6,
            time: 2,
        },
    )
    .unwrap();
    assert_eq!(md.data_block_count(5).unwrap(), 1);
    assert_eq!(md.data_block_count(6).unwrap(), 1);
    assert_eq!(md.device(1).unwrap().mapped_blocks, 1);
    assert!(md
        .insert_mapping_ref(
            1,
            1,
            Mapping {
                data_block: 100,
                time: 0
            }
        )
        .is_err());
    assert!(md.insert_mapping_ref(2, 1, m).is_err());
    md.commit().unwrap();
    let report = check::check(md.storage()).unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
}
