use super::*;
use crate::pdata::btree::node;
use crate::storage::MemStorage;
use crate::thin::metadata::MetadataOptions;
use proptest::prelude::*;
use std::collections::HashSet;
use std::sync::Arc;

#[test]
fn runs_break_at_kind_changes_and_gaps() {
    let mut md = ThinMetadata::format(
        Arc::new(MemStorage::new(4 << 20)),
        128,
        100,
        MetadataOptions::default(),
    )
    .unwrap();
    md.create_thin(0).unwrap();
    for vb in [0u64, 1, 2, 5, 6] {
        let d = md.alloc_data_block().unwrap();
        md.insert_mapping(0, vb, d).unwrap();
    }
    md.create_snap(1, 0).unwrap();
    for vb in [1u64, 2, 9] {
        let d = md.alloc_data_block().unwrap();
        md.insert_mapping(1, vb, d).unwrap();
    }
    md.remove_range(1, 6, 7).unwrap();
    let runs = delta(&mut md, 0, 1, false).unwrap();
    let k = |kind, begin, length| DeltaRun {
        kind,
        begin,
        length,
    };
    assert_eq!(
        runs,
        vec![
            k(DeltaKind::Same, 0, 1),
            k(DeltaKind::Different, 1, 2),
            k(DeltaKind::Same, 5, 1),
            k(DeltaKind::LeftOnly, 6, 1),
            k(DeltaKind::RightOnly, 9, 1),
        ]
    );
    assert!(matches!(
        delta(&mut md, 0, 7, false),
        Err(Error::NoSuchDevice(7))
    ));
}

/// The simple merge the walk replaced: every (virtual block, data block) of both devices,
/// merged in key order. The reference the walk must agree with.
fn reference(md: &mut ThinMetadata, left: u32, right: u32, metadata_snap: bool) -> Vec<DeltaRun> {
    let mut mappings = |dev: u32| {
        let root = device_root(md, dev, metadata_snap).unwrap();
        let mut out = Vec::new();
        btree::for_each_leaf(md.tm(), root, ValueKind::Data, &mut |n| {
            for i in 0..node::nr_entries(n) {
                out.push((node::key(n, i), node::value_u64(n, i) >> 24));
            }
            Ok(())
        })
        .unwrap();
        out
    };
    let (a, b) = (mappings(left), mappings(right));
    let mut runs = Runs::default();
    let (mut i, mut j) = (0, 0);
    loop {
        match (a.get(i), b.get(j)) {
            (Some(&(va, da)), Some(&(vb, db))) if va == vb => {
                let kind = if da == db {
                    DeltaKind::Same
                } else {
                    DeltaKind::Different
                };
                runs.add(kind, va, 1);
                i += 1;
                j += 1;
            }
            (Some(&(va, _)), Some(&(vb, _))) if va < vb => {
                runs.add(DeltaKind::LeftOnly, va, 1);
                i += 1;
            }
            (Some(&(va, _)), None) => {
                runs.add(DeltaKind::LeftOnly, va, 1);
                i += 1;
            }
            (_, Some(&(vb, _))) => {
                runs.add(DeltaKind::RightOnly, vb, 1);
                j += 1;
            }
            (None, None) => break,
        }
    }
    runs.0
}

/// Every node block of `dev`'s mapping tree.
fn tree_nodes(md: &mut ThinMetadata, dev: u32) -> HashSet<u64> {
    fn rec(tm: &mut crate::pdata::tm::Tm, b: u64, out: &mut HashSet<u64>) {
        out.insert(b);
        let n = btree::read_node(tm, b, ValueKind::Data).unwrap();
        if !node::is_leaf(&n) {
            for i in 0..node::nr_entries(&n) {
                rec(tm, node::value_u64(&n, i), out);
            }
        }
    }
    let root = device_root(md, dev, false).unwrap();
    let mut out = HashSet::new();
    rec(md.tm(), root, &mut out);
    out
}

/// Levels above the leaves of `dev`'s tree.
fn height(md: &mut ThinMetadata, dev: u32) -> usize {
    let mut b = device_root(md, dev, false).unwrap();
    let mut h = 0;
    loop {
        let n = btree::read_node(md.tm(), b, ValueKind::Data).unwrap();
        if node::is_leaf(&n) {
            return h;
        }
        b = node::value_u64(&n, 0);
        h += 1;
    }
}

/// Checks both modes against the reference for one pair; returns the two walks' stats.
fn check_pair(
    md: &mut ThinMetadata,
    a: u32,
    b: u32,
    metadata_snap: bool,
) -> (WalkStats, WalkStats) {
    let want = reference(md, a, b, metadata_snap);
    let (exact, se) = delta_with_stats(md, a, b, metadata_snap, DeltaMode::Exact).unwrap();
    assert_eq!(
        exact, want,
        "exact {a} {b} (metadata snap: {metadata_snap})"
    );
    let (changed, sc) = delta_with_stats(md, a, b, metadata_snap, DeltaMode::ChangedOnly).unwrap();
    let want_changed: Vec<DeltaRun> = want
        .into_iter()
        .filter(|r| r.kind != DeltaKind::Same)
        .collect();
    assert_eq!(
        changed, want_changed,
        "changed {a} {b} (metadata snap: {metadata_snap})"
    );
    // The two modes make the same choices; only exact reads the shared subtrees.
    assert!(sc.nodes_read <= se.nodes_read);
    (se, sc)
}

fn big_pool(mappings: u64) -> ThinMetadata {
    let mut md = ThinMetadata::format(
        Arc::new(MemStorage::new(64 << 20)),
        128,
        4 * mappings,
        MetadataOptions::default(),
    )
    .unwrap();
    md.create_thin(0).unwrap();
    for vb in 0..mappings {
        let d = md.alloc_data_block().unwrap();
        md.insert_mapping(0, vb, d).unwrap();
    }
    md
}

#[test]
fn a_device_against_itself_reads_nothing_when_changed_only() {
    let mut md = big_pool(3000);
    let (_, sc) = check_pair(&mut md, 0, 0, false);
    assert_eq!(sc.nodes_read, 0);
}

/// A snapshot of a 100,000-block device whose origin then changes 1% of its blocks: the
/// changed-only walk reads about the nodes the two trees do not share, not the trees.
#[test]
fn changed_only_skips_shared_subtrees() {
    const N: u64 = 100_000;
    let mut md = big_pool(N);
    md.create_snap(1, 0).unwrap();
    md.create_snap(2, 0).unwrap();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Device 1: 1% of its blocks overwritten, scattered. Device 2: 1% in ten extents.
    for _ in 0..N / 100 {
        let d = md.alloc_data_block().unwrap();
        md.insert_mapping(1, next() % N, d).unwrap();
    }
    for _ in 0..10 {
        let start = next() % (N - 100);
        for vb in start..start + N / 1000 {
            let d = md.alloc_data_block().unwrap();
            md.insert_mapping(2, vb, d).unwrap();
        }
    }
    md.commit().unwrap();
    let whole = tree_nodes(&mut md, 0);
    for dev in [1, 2] {
        let other = tree_nodes(&mut md, dev);
        let unshared = whole.symmetric_difference(&other).count() as u64;
        let (se, sc) = check_pair(&mut md, 0, dev, false);
        eprintln!(
            "device {dev}: tree {} nodes, unshared {unshared} (both sides), \
             changed-only read {}, exact read {}",
            whole.len(),
            sc.nodes_read,
            se.nodes_read
        );
        // Each unshared node once, plus the two roots' leftmost paths for the heights.
        assert!(
            sc.nodes_read <= unshared + 2 * 4,
            "changed-only read {} nodes, {unshared} unshared",
            sc.nodes_read
        );
        // Exact mode reads the shared subtrees from one side only.
        assert!(se.nodes_read <= unshared + whole.len() as u64 + 2 * 4);
    }
    let (_, sc) = check_pair(&mut md, 0, 2, false);
    assert!(
        sc.nodes_read * 10 < whole.len() as u64,
        "clustered changes: {} of {} nodes read",
        sc.nodes_read,
        whole.len()
    );
}

/// After the snapshot the origin's tree grows a level (its root splits): the children
/// the two trees share sit one level apart and are still met.
#[test]
fn trees_of_different_heights_share_children() {
    let mut md = big_pool(20_000);
    md.create_snap(1, 0).unwrap();
    for vb in 20_000..80_000 {
        let d = md.alloc_data_block().unwrap();
        md.insert_mapping(0, vb, d).unwrap();
    }
    md.commit().unwrap();
    assert!(
        height(&mut md, 1) < height(&mut md, 0),
        "the origin's root did not split"
    );
    let snap = tree_nodes(&mut md, 1);
    let origin = tree_nodes(&mut md, 0);
    let unshared = snap.symmetric_difference(&origin).count() as u64;
    let (_, sc) = check_pair(&mut md, 1, 0, false);
    let (_, sc2) = check_pair(&mut md, 0, 1, false);
    eprintln!(
        "root split: unshared {unshared}, changed-only read {} and {}",
        sc.nodes_read, sc2.nodes_read
    );
    assert!(
        sc.nodes_read <= unshared + 8,
        "{} > {unshared}",
        sc.nodes_read
    );
    assert!(
        sc2.nodes_read <= unshared + 8,
        "{} > {unshared}",
        sc2.nodes_read
    );
}

#[derive(Clone, Debug)]
enum Op {
    Write { dev: usize, start: u64, len: u64 },
    Discard { dev: usize, start: u64, len: u64 },
    Snap { dev: usize },
    Delete { dev: usize },
    ReserveMetadataSnap,
    Commit,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..8usize, 0..3000u64, 1..400u64).prop_map(|(dev, start, len)| Op::Write { dev, start, len }),
        2 => (0..8usize, 0..3000u64, 1..300u64).prop_map(|(dev, start, len)| Op::Discard { dev, start, len }),
        3 => (0..8usize).prop_map(|dev| Op::Snap { dev }),
        1 => (0..8usize).prop_map(|dev| Op::Delete { dev }),
        1 => Just(Op::ReserveMetadataSnap),
        1 => Just(Op::Commit),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// On random pools (snapshots of snapshots, writes, discards, deletes, a metadata
    /// snapshot) the walk equals the simple merge, live and on the metadata snapshot.
    #[test]
    fn walk_equals_simple_merge(ops in proptest::collection::vec(op(), 1..40)) {
        let mut md = ThinMetadata::format(
            Arc::new(MemStorage::new(32 << 20)),
            128,
            200_000,
            MetadataOptions::default(),
        )
        .unwrap();
        md.create_thin(0).unwrap();
        let mut ids = vec![0u32];
        let mut next_id = 1;
        let mut held = false;
        for op in ops {
            let pick = |i: usize| ids[i % ids.len()];
            match op {
                Op::Write { dev, start, len } => {
                    let id = pick(dev);
                    for vb in start..start + len {
                        let d = md.alloc_data_block().unwrap();
                        md.insert_mapping(id, vb, d).unwrap();
                    }
                }
                Op::Discard { dev, start, len } => {
                    md.remove_range(pick(dev), start, start + len).unwrap();
                }
                Op::Snap { dev } => {
                    md.create_snap(next_id, pick(dev)).unwrap();
                    ids.push(next_id);
                    next_id += 1;
                }
                Op::Delete { dev } if ids.len() > 2 => {
                    let id = pick(dev);
                    md.delete(id).unwrap();
                    ids.retain(|&x| x != id);
                }
                Op::Delete { .. } => {}
                Op::ReserveMetadataSnap if !held => {
                    md.reserve_metadata_snap().unwrap();
                    held = true;
                }
                Op::ReserveMetadataSnap => {}
                Op::Commit => md.commit().unwrap(),
            }
        }
        md.commit().unwrap();
        for &a in &ids {
            for &b in &ids {
                check_pair(&mut md, a, b, false);
            }
        }
        if held {
            let top = md.metadata_snap().unwrap().mapping_root;
            let in_snap: Vec<u32> = (0..next_id)
                .filter(|&id| {
                    btree::lookup_u64(md.tm(), top, id as u64, ValueKind::Subtree)
                        .unwrap()
                        .is_some()
                })
                .collect();
            for &a in &in_snap {
                for &b in &in_snap {
                    check_pair(&mut md, a, b, true);
                }
            }
        }
    }
}
