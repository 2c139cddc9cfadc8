//! Metadata is untrusted input: a metadata device image (the format of
//! `thinpool::thin::image::from_fuzz_input`: a table of block kinds, then blocks, each
//! named block sealed again so that mutations get past its checksum) is opened, every
//! device's mappings are read, walked, dumped, diffed and checked, and a few changes are
//! made and committed. Nothing may panic or hang; errors are the expected outcome.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use thinpool::delta::{self, DeltaMode};
use thinpool::storage::MemStorage;
use thinpool::thin::image::{from_fuzz_input, Image};
use thinpool::thin::metadata::{MetadataOptions, ThinMetadata};

fn storage(img: &Image) -> Arc<MemStorage> {
    Arc::new(MemStorage::from_vec(img.0.clone()))
}

/// Small cache: the whole image fits, and eviction gets exercised too.
const CACHE: usize = 64;

fn read_everything(md: &mut ThinMetadata) {
    let ids: Vec<u32> = md.devices().keys().copied().collect();
    for &id in &ids {
        let _ = md.for_each_mapping(id, 0, u64::MAX, &mut |_, _| Ok(()));
        let mut next = 0;
        // Point lookups at the first mapped keys and around them, as a guest's reads do.
        for _ in 0..8 {
            match md.next_mapped(id, next, u64::MAX) {
                Ok(Some(k)) => {
                    let _ = md.lookup(id, k);
                    let _ = md.lookup(id, k.wrapping_add(1));
                    next = k.saturating_add(1);
                }
                _ => break,
            }
        }
    }
    let _ = thinpool::thin::usage::device_usage(md);
    let _ = thinpool::dump::dump(md, false, std::io::sink());
    let _ = thinpool::dump::dump(md, true, std::io::sink());
    for pair in ids.windows(2) {
        for mode in [DeltaMode::Exact, DeltaMode::ChangedOnly] {
            let _ = delta::runs(md, pair[0], pair[1], false, mode);
        }
    }
}

/// Shadowing, insertion, removal, rebalancing, snapshot, deletion and commit on whatever
/// the trees hold.
fn change(md: &mut ThinMetadata) {
    let ids: Vec<u32> = md.devices().keys().copied().take(4).collect();
    for &id in &ids {
        if let Ok(b) = md.alloc_data_block() {
            if md.insert_mapping(id, 3, b).is_err() {
                let _ = md.release_data_block(b);
            }
        }
        let _ = md.remove_range(id, 0, 16);
    }
    if let Some(&id) = ids.first() {
        let _ = md.create_snap(1 << 20, id);
        let _ = md.delete(id);
    }
    let _ = md.create_thin((1 << 20) + 1);
    let _ = md.commit();
}

fuzz_target!(|data: &[u8]| {
    let img = from_fuzz_input(data);
    let _ = thinpool::check::check(storage(&img));
    let ro = MetadataOptions {
        cache_blocks: CACHE,
        read_only: true,
    };
    if let Ok(mut md) = ThinMetadata::open(storage(&img), ro.clone()) {
        read_everything(&mut md);
    }
    let rw = MetadataOptions {
        cache_blocks: CACHE,
        read_only: false,
    };
    let after = storage(&img);
    if let Ok(mut md) = ThinMetadata::open(after.clone(), rw) {
        change(&mut md);
        drop(md);
        // What the changes committed is metadata too.
        if let Ok(mut md) = ThinMetadata::open(after, ro) {
            read_everything(&mut md);
        }
    }
});
