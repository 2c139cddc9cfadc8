use std::sync::Arc;
use thinpool::storage::FileStorage;
use thinpool::thin::metadata::{MetadataOptions, ThinMetadata};

#[test]
fn scratch() {
    let p = std::path::Path::new("/tmp/scratch_meta.bin");
    let s = Arc::new(FileStorage::create(p, 4 << 20).unwrap());
    let mut md = ThinMetadata::format(s, 128, 1000, MetadataOptions::default()).unwrap();
    std::process::Command::new("cp").args(["/tmp/scratch_meta.bin", "/tmp/scratch_fresh.bin"]).status().unwrap();
    md.create_thin(0).unwrap();
    for v in 0..300u64 {
        let d = md.alloc_data_block().unwrap();
        md.insert_mapping(0, v * 3, d).unwrap();
    }
    md.commit().unwrap();
    md.create_snap(1, 0).unwrap();
    for v in 0..50u64 {
        let d = md.alloc_data_block().unwrap();
        md.insert_mapping(1, v * 2, d).unwrap();
    }
    md.commit().unwrap();
    md.reserve_metadata_snap().unwrap();
    md.create_snap(2, 1).unwrap();
    md.remove_range(0, 10, 500).unwrap();
    md.commit().unwrap();
}

#[test]
fn scratch_check() {
    for f in ["/tmp/scratch_meta.bin", "/tmp/fx_clean.bin", "/tmp/fx_held.bin"] {
        let s = Arc::new(FileStorage::open_read_only(std::path::Path::new(f)).unwrap());
        let r = thinpool::check::check(s).unwrap();
        eprintln!("{f}: {r:#?}");
        assert!(r.is_clean());
    }
}
