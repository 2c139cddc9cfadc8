use super::*;
use crate::storage::{FileStorage, MemStorage};

fn mem(bytes: u64) -> Arc<dyn Storage> {
    Arc::new(MemStorage::new(bytes))
}

fn clean(md: &ThinMetadata) {
    let r = crate::check::check(md.storage()).unwrap();
    assert!(r.is_clean(), "{:?}", r.errors);
}

#[test]
fn oversized_metadata_device_is_capped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    // 17 GiB, sparse: more than 255 bitmaps' worth.
    let s: Arc<dyn Storage> =
        Arc::new(FileStorage::create(&dir.path().join("m"), 17 << 30).unwrap());
    let mut md = ThinMetadata::format(s.clone(), 128, 1000, MetadataOptions::default()).unwrap();
    assert_eq!(md.usage().metadata_blocks, MAX_METADATA_BLOCKS);
    assert_eq!(md.usage().metadata_blocks * 4096, 17_045_913_600);
    assert!(md.warnings[0].contains("can use only"), "{:?}", md.warnings);
    md.create_thin(0).unwrap();
    md.commit().unwrap();
    clean(&md);
    let md = ThinMetadata::open(s, MetadataOptions::default()).unwrap();
    assert_eq!(md.usage().metadata_blocks, MAX_METADATA_BLOCKS);
}

#[test]
fn too_small_or_bad_parameters_are_refused() {
    assert!(matches!(
        ThinMetadata::format(mem(1 << 20), 128, 10, MetadataOptions::default()),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        ThinMetadata::format(mem(512 * 4096), 128, 1 << 30, MetadataOptions::default()),
        Err(Error::InvalidArgument(m)) if m.contains("too small for")
    ));
    for bad in [64, 192, 4_194_304] {
        assert!(ThinMetadata::format(mem(2 << 20), bad, 10, MetadataOptions::default()).is_err());
    }
    assert!(matches!(
        ThinMetadata::open(mem(2 << 20), MetadataOptions::default()),
        Err(Error::NotThinMetadata(_))
    ));
}

#[test]
fn a_full_metadata_device_refuses_work_then_grows() {
    let s = Arc::new(MemStorage::new(512 * 4096));
    let s2: Arc<dyn Storage> = s.clone();
    let mut md =
        ThinMetadata::format(s2.clone(), 128, 1 << 16, MetadataOptions::default()).unwrap();
    md.create_thin(0).unwrap();
    let mut vb = 0u64;
    let err = loop {
        let d = md.alloc_data_block().unwrap();
        match md.insert_mapping(0, vb * 7, d) {
            Ok(()) => vb += 1,
            Err(e) => {
                md.release_data_block(d).unwrap();
                break e;
            }
        }
        if vb % 500 == 0 {
            md.commit().unwrap();
        }
    };
    assert!(matches!(err, Error::OutOfMetadataSpace { .. }), "{err}");
    // The reserve is enough to commit what was done.
    md.commit().unwrap();
    clean(&md);
    let mapped = md.device(0).unwrap().mapped_blocks;
    // Grow the device past one bitmap's worth (16320 blocks).
    s.set_len(17000 * 4096);
    let mut md = ThinMetadata::open(s2.clone(), MetadataOptions::default()).unwrap();
    assert_eq!(md.resize_metadata().unwrap(), 17000);
    for i in 0..5000u64 {
        let d = md.alloc_data_block().unwrap();
        md.insert_mapping(0, (vb + i) * 7, d).unwrap();
    }
    md.commit().unwrap();
    clean(&md);
    let md = ThinMetadata::open(s2, MetadataOptions::default()).unwrap();
    assert_eq!(md.usage().metadata_blocks, 17000);
    assert_eq!(md.device(0).unwrap().mapped_blocks, mapped + 5000);
}

#[test]
fn transaction_id_is_a_compare_and_swap() {
    let mut md = ThinMetadata::format(mem(2 << 20), 128, 10, MetadataOptions::default()).unwrap();
    md.set_transaction_id(0, 5).unwrap();
    assert!(matches!(
        md.set_transaction_id(0, 6),
        Err(Error::TransactionIdMismatch {
            expected: 0,
            actual: 5
        })
    ));
    md.commit().unwrap();
    let s = md.storage();
    let md = ThinMetadata::open(s, MetadataOptions::default()).unwrap();
    assert_eq!(md.transaction_id(), 5);
}

#[test]
fn snapshot_time_cannot_wrap() {
    let mut md = ThinMetadata::format(mem(2 << 20), 128, 10, MetadataOptions::default()).unwrap();
    md.create_thin(0).unwrap();
    md.restore_superblock_fields(MAX_TIME - 1, 0, 0, [0; 16])
        .unwrap();
    md.create_snap(1, 0).unwrap();
    assert!(matches!(md.create_snap(2, 0), Err(Error::TimeExhausted)));
}

#[test]
fn needs_check_survives_commits_until_cleared() {
    let s = mem(2 << 20);
    let mut md = ThinMetadata::format(s.clone(), 128, 10, MetadataOptions::default()).unwrap();
    md.write_needs_check(true).unwrap();
    md.create_thin(0).unwrap();
    md.commit().unwrap();
    let mut md = ThinMetadata::open(s.clone(), MetadataOptions::default()).unwrap();
    assert!(md.needs_check());
    md.write_needs_check(false).unwrap();
    let md = ThinMetadata::open(s, MetadataOptions::default()).unwrap();
    assert!(!md.needs_check());
    assert_eq!(md.devices().len(), 1);
}

#[test]
fn read_only_metadata_never_writes() {
    let s = mem(2 << 20);
    let mut md = ThinMetadata::format(s.clone(), 128, 10, MetadataOptions::default()).unwrap();
    md.create_thin(0).unwrap();
    md.commit().unwrap();
    let before = s.len();
    let mut ro = ThinMetadata::open(
        s.clone(),
        MetadataOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(ro.create_thin(1), Err(Error::ReadOnly(_))));
    assert!(matches!(
        ro.write_needs_check(true),
        Err(Error::ReadOnly(_))
    ));
    assert_eq!(s.len(), before);
    assert_eq!(ro.lookup(0, 0).unwrap(), None);
}
