//! Crash safety of merging a thin device into its external origin: the origin records
//! every write and sync, and for a crash after every prefix of that log, with every way
//! the unsynced writes may have fared, running the merge again from the last checkpoint
//! the callback was told of (or from the start) leaves the origin equal to the device,
//! and bytes the device does not map equal to the old image.

mod common;
use common::{pattern, Rng};
use std::sync::Arc;
use thinpool::merge::{merge_into_storage, MergeOptions};
use thinpool::origin::ExternalOrigin;
use thinpool::pool::{Pool, PoolOptions};
use thinpool::storage::testing::{CrashMode, RecordingStorage};
use thinpool::storage::{MemStorage, Storage};

const BS: u64 = 64 * 1024;
const SIZE: u64 = 24 * BS;

const MODES: [CrashMode; 4] = [
    CrashMode::DropUnsynced,
    CrashMode::KeepUnsynced,
    CrashMode::TearLast { bytes: 512 },
    CrashMode::TearLast { bytes: 2048 },
];

/// A pool whose device 0 reads `golden` where unmapped, written here and there at random,
/// snapshotted as device 1, then written some more (which the merge of 1 must not see).
fn scenario(seed: u64, golden: &[u8]) -> Pool {
    let pool = Pool::create(
        Arc::new(MemStorage::new(4 << 20)),
        Arc::new(MemStorage::new(64 * BS)),
        128,
        PoolOptions::default(),
    )
    .unwrap();
    pool.create_thin(0).unwrap();
    let origin: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(golden.to_vec()));
    let origin = ExternalOrigin::from_storage(origin, "golden").unwrap();
    pool.set_external_origin(0, Some(Arc::new(origin))).unwrap();
    let mut rng = Rng(seed | 1);
    let write = |rng: &mut Rng, dev: u32| {
        let len = 1 + rng.below(2 * BS);
        let off = rng.below(SIZE - len);
        pool.write(dev, off, &pattern(rng.next(), len as usize))
            .unwrap();
    };
    for _ in 0..12 {
        write(&mut rng, 0);
    }
    pool.create_snap(1, 0).unwrap();
    for _ in 0..6 {
        write(&mut rng, 0);
    }
    pool
}

#[test]
fn a_merge_cut_anywhere_completes_when_run_again_from_its_last_checkpoint() {
    for seed in [1u64, 2, 3] {
        // The image ends inside a block, short of the device; as the file version does,
        // the target was extended (with zeroes) to the device's size before the merge.
        let golden = pattern(seed * 77, (SIZE - 3 * BS + 4096) as usize);
        let pool = scenario(seed, &golden);
        let mut want = vec![0u8; SIZE as usize];
        pool.read(1, 0, &mut want).unwrap();
        let mut base = golden.clone();
        base.resize(SIZE as usize, 0);
        let mapped: Vec<bool> = (0..SIZE / BS)
            .map(|vb| pool.with_metadata(|md| md.lookup(1, vb).unwrap().is_some()))
            .collect();
        assert!(mapped.iter().any(|&m| m) && mapped.iter().any(|&m| !m));

        let rec = RecordingStorage::new(base.clone());
        let opts = MergeOptions {
            start_offset: 0,
            checkpoint_bytes: 2 * BS,
        };
        // (log length when told, offset): the caller records the offset after this.
        let mut checkpoints: Vec<(usize, u64)> = Vec::new();
        let out = merge_into_storage(&pool, 1, SIZE, &rec, &opts, &mut |done, _| {
            checkpoints.push((rec.log_len(), done));
            true
        })
        .unwrap();
        assert!(out.complete);
        assert!(rec.image_at(rec.log_len(), CrashMode::DropUnsynced) == want);
        assert!(checkpoints.len() > 3, "{checkpoints:?}");

        for point in 0..=rec.log_len() {
            // The last checkpoint the caller can have recorded before the crash.
            let resume = checkpoints
                .iter()
                .filter(|c| c.0 <= point)
                .map(|c| c.1)
                .next_back()
                .unwrap_or(0);
            for mode in MODES {
                let img = rec.image_at(point, mode);
                let ctx = format!("seed {seed}, point {point}, {mode:?}, resume {resume}");
                assert!(img[..resume as usize] == want[..resume as usize], "{ctx}");
                for (vb, &m) in mapped.iter().enumerate() {
                    let r = vb * BS as usize..(vb + 1) * BS as usize;
                    if !m {
                        assert!(img[r.clone()] == base[r], "{ctx}: block {vb}");
                    }
                }
                for start in [resume, 0] {
                    let again = MemStorage::from_vec(img.clone());
                    let opts = MergeOptions {
                        start_offset: start,
                        ..opts.clone()
                    };
                    let out = merge_into_storage(&pool, 1, SIZE, &again, &opts, &mut |_, _| true)
                        .unwrap();
                    assert!(out.complete, "{ctx}");
                    assert!(again.to_vec() == want, "{ctx}: rerun from {start}");
                }
            }
        }
    }
}
