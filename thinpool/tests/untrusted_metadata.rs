//! Metadata is untrusted input. A pool whose checksums are all valid but whose trees or
//! space maps are wrong (a writer's bug, or damage that a checksum happens to miss) must
//! give errors: never a panic, never zeroes or another block's bytes in place of the data.
//! Each case is made from a real pool by rewriting fields and sealing the block again.

mod common;
use common::{pattern, Rng};
use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;
use thinpool::pdata::block::{get_u32, get_u64, put_u32, put_u64, BlockKind, BLOCK_SIZE};
use thinpool::pdata::btree::node;
use thinpool::pool::{Pool, PoolMode, PoolOptions};
use thinpool::storage::MemStorage;
use thinpool::thin::image::{from_fuzz_input, to_fuzz_input, Image, FUZZ_DEVICE_BLOCKS};
use thinpool::thin::metadata::{MetadataOptions, ThinMetadata};

const BS: u64 = 64 << 10;
const PAGE: usize = 4096;
const META_BLOCKS: u64 = 512;
const DATA_BLOCKS: u64 = 1400;
/// Thin ids and sizes in blocks: 0 maps most of its first 600 blocks (a tree of two
/// levels), 1 is a snapshot of 0 with every tenth block rewritten, 2 maps five blocks (a
/// single leaf).
const DEVICES: [(u32, u64); 3] = [(0, 700), (1, 700), (2, 20)];

struct Original {
    meta: Vec<u8>,
    data: Arc<MemStorage>,
    /// The first page of every block of each device, read from the undamaged pool.
    contents: BTreeMap<u32, Vec<u8>>,
}

fn original() -> &'static Original {
    static O: OnceLock<Original> = OnceLock::new();
    O.get_or_init(build)
}

fn build() -> Original {
    let meta = Arc::new(MemStorage::new(META_BLOCKS * BLOCK_SIZE as u64));
    let data = Arc::new(MemStorage::new(DATA_BLOCKS * BS));
    let pool = Pool::create(
        meta.clone(),
        data.clone(),
        (BS / 512) as u32,
        PoolOptions::default(),
    )
    .unwrap();
    let page = |seed: u64| pattern(seed, PAGE);
    pool.create_thin(0).unwrap();
    for vb in (0..600).filter(|vb| vb % 7 != 3) {
        pool.write(0, vb * BS, &page(vb + 1)).unwrap();
    }
    pool.commit().unwrap();
    pool.create_snap(1, 0).unwrap();
    for vb in (0..600).step_by(10) {
        pool.write(1, vb * BS, &page(10_000 + vb)).unwrap();
    }
    pool.create_thin(2).unwrap();
    for vb in [0, 3, 4, 5, 19] {
        pool.write(2, vb * BS, &page(20_000 + vb)).unwrap();
    }
    pool.commit().unwrap();
    let contents = DEVICES
        .iter()
        .map(|&(id, n)| (id, read_device(&pool, id, n).unwrap()))
        .collect();
    drop(pool);
    Original {
        meta: meta.to_vec(),
        data,
        contents,
    }
}

/// The first page of every block of device `id`.
fn read_device(pool: &Pool, id: u32, blocks: u64) -> thinpool::Result<Vec<u8>> {
    let mut out = vec![0u8; blocks as usize * PAGE];
    for (vb, chunk) in out.chunks_mut(PAGE).enumerate() {
        pool.read(id, vb as u64 * BS, chunk)?;
    }
    Ok(out)
}

fn image() -> Image {
    Image(original().meta.clone())
}

fn open(img: &Image) -> thinpool::Result<Pool> {
    Pool::open(
        Arc::new(MemStorage::from_vec(img.0.clone())),
        original().data.clone(),
        PoolOptions::default(),
    )
}

/// Where the trees of the original pool are.
struct Map {
    top: u64,
    details: u64,
    data_index: u64,
    data_overflow: u64,
    meta_overflow: u64,
    meta_index: u64,
    dev_root: BTreeMap<u32, u64>,
}

fn map(img: &Image) -> Map {
    let sb = img.superblock().unwrap();
    let top = img.block(sb.mapping_root).unwrap();
    assert!(node::is_leaf(top), "three devices fit in one leaf");
    let dev_root = (0..node::nr_entries(top))
        .map(|i| (node::key(top, i) as u32, node::value_u64(top, i)))
        .collect();
    Map {
        top: sb.mapping_root,
        details: sb.details_root,
        data_index: sb.data_sm_root.bitmap_root,
        data_overflow: sb.data_sm_root.ref_count_root,
        meta_overflow: sb.metadata_sm_root.ref_count_root,
        meta_index: sb.metadata_sm_root.bitmap_root,
        dev_root,
    }
}

/// The root of device 0's mapping tree (an internal node) and its first leaf.
fn dev0_root_and_leaf(img: &Image) -> (u64, u64) {
    let root = map(img).dev_root[&0];
    let n = img.block(root).unwrap();
    assert!(!node::is_leaf(n), "device 0's tree has two levels");
    (root, node::value_u64(n, 0))
}

/// The damage must be refused: opening fails, or reading device `dev` fails with a
/// metadata error that turns the pool read-only, and goes on failing (no zeroes on a
/// second try). No device reads other bytes than it holds. Returns the error.
fn assert_refused(img: &Image, dev: u32) -> String {
    let pool = match open(img) {
        Err(e) => return e.to_string(),
        Ok(p) => p,
    };
    let blocks = |id: u32| DEVICES.iter().find(|d| d.0 == id).unwrap().1;
    let e = match read_device(&pool, dev, blocks(dev)) {
        Ok(got) => {
            assert!(
                got != original().contents[&dev],
                "the damage changed nothing device {dev} reads: a broken test"
            );
            panic!("device {dev} read other bytes than it holds, without an error");
        }
        Err(e) => e,
    };
    assert!(e.is_metadata_failure(), "not a metadata error: {e}");
    let st = pool.status();
    assert_eq!(st.mode, PoolMode::ReadOnly, "{st:?}");
    assert!(
        read_device(&pool, dev, blocks(dev)).is_err(),
        "device {dev} read without an error the second time"
    );
    for &(id, n) in &DEVICES {
        if let Ok(got) = read_device(&pool, id, n) {
            assert!(
                got == original().contents[&id],
                "device {id} read other bytes than it holds, without an error"
            );
        }
    }
    e.to_string()
}

#[test]
fn undamaged_pool_reads_back_what_was_written() {
    let pool = open(&image()).unwrap();
    for &(id, n) in &DEVICES {
        assert!(read_device(&pool, id, n).unwrap() == original().contents[&id]);
    }
    let report = thinpool::check::check(Arc::new(MemStorage::from_vec(image().0))).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn details_root_naming_a_space_map_node_is_refused() {
    let m = map(&image());
    for target in [m.data_index, m.meta_overflow, m.data_overflow] {
        let mut img = image();
        let mut sb = img.superblock().unwrap();
        sb.details_root = target;
        img.set_superblock(&sb).unwrap();
        let e = open(&img)
            .err()
            .expect("opened a pool whose details are a space map");
        assert!(e.is_metadata_failure(), "{e}");
        assert!(e.to_string().contains(&target.to_string()), "{e}");
    }
}

#[test]
fn mapping_tree_naming_a_details_node_is_refused() {
    let mut img = image();
    let m = map(&img);
    img.edit(m.top, |b| {
        let i = node::find(b, 0).unwrap();
        node::set_value_u64(b, i, m.details);
    })
    .unwrap();
    let e = assert_refused(&img, 0);
    assert!(e.contains(&m.details.to_string()), "{e}");
}

#[test]
fn device_with_details_but_no_mapping_tree_is_refused() {
    let mut img = image();
    let m = map(&img);
    img.edit(m.top, |b| {
        let i = node::find(b, 2).unwrap();
        node::remove_at(b, i);
    })
    .unwrap();
    assert_refused(&img, 2);
}

#[test]
fn internal_node_without_entries_is_refused() {
    let mut img = image();
    let (root, _) = dev0_root_and_leaf(&img);
    img.edit(root, |b| node::set_nr_entries(b, 0)).unwrap();
    let e = assert_refused(&img, 0);
    assert!(e.contains(&root.to_string()), "{e}");
}

#[test]
fn leaf_with_more_entries_than_it_holds_is_refused() {
    for n in [253, u32::MAX as usize] {
        let mut img = image();
        let (_, leaf) = dev0_root_and_leaf(&img);
        img.edit(leaf, |b| node::set_nr_entries(b, n)).unwrap();
        assert_refused(&img, 0);
    }
}

#[test]
fn keys_out_of_order_are_refused() {
    let mut img = image();
    let (_, leaf) = dev0_root_and_leaf(&img);
    img.edit(leaf, |b| {
        let (k0, k1) = (node::key(b, 0), node::key(b, 1));
        node::set_key(b, 0, k1);
        node::set_key(b, 1, k0);
    })
    .unwrap();
    assert_refused(&img, 0);
}

#[test]
fn child_outside_its_parents_key_range_is_refused() {
    // Keys stay in order; the first two children change places, so each holds keys that
    // its parent's entry says it cannot.
    let mut img = image();
    let (root, _) = dev0_root_and_leaf(&img);
    img.edit(root, |b| {
        let (c0, c1) = (node::value_u64(b, 0), node::value_u64(b, 1));
        node::set_value_u64(b, 0, c1);
        node::set_value_u64(b, 1, c0);
    })
    .unwrap();
    assert_refused(&img, 0);
}

#[test]
fn child_pointer_beyond_the_device_is_refused() {
    for target in [META_BLOCKS, META_BLOCKS + 5, u64::MAX] {
        let mut img = image();
        let (root, _) = dev0_root_and_leaf(&img);
        img.edit(root, |b| node::set_value_u64(b, 1, target))
            .unwrap();
        assert_refused(&img, 0);
    }
}

#[test]
fn node_pointing_to_itself_or_its_ancestor_is_refused() {
    for entry in [0, 1] {
        let mut img = image();
        let (root, _) = dev0_root_and_leaf(&img);
        img.edit(root, |b| node::set_value_u64(b, entry, root))
            .unwrap();
        assert_refused(&img, 0);
    }
}

#[test]
fn leaf_with_another_trees_value_size_is_refused() {
    // A well-formed node of another tree: its max_entries fits its value size.
    for vs in [4u32, 16, 24] {
        let mut img = image();
        let (_, leaf) = dev0_root_and_leaf(&img);
        img.edit(leaf, |b| {
            let max = node::max_entries(vs as usize);
            let n = node::nr_entries(b).min(max);
            node::set_nr_entries(b, n);
            put_u32(b, 20, max as u32);
            put_u32(b, 24, vs);
        })
        .unwrap();
        assert_refused(&img, 0);
    }
}

#[test]
fn mapping_beyond_the_data_device_is_refused() {
    for data_block in [DATA_BLOCKS, DATA_BLOCKS + 10, (1 << 40) - 1] {
        let mut img = image();
        let (_, leaf) = dev0_root_and_leaf(&img);
        img.edit(leaf, |b| node::set_value_u64(b, 0, data_block << 24))
            .unwrap();
        assert_refused(&img, 0);
    }
}

#[test]
fn unknown_superblock_version_is_refused() {
    for version in [0, 3, u32::MAX] {
        let mut img = image();
        let mut sb = img.superblock().unwrap();
        sb.version = version;
        img.set_superblock(&sb).unwrap();
        let e = open(&img).err().expect("opened an unknown version");
        assert!(e.to_string().contains("version"), "{e}");
    }
    // Version 1 differs from 2 only in the meaning of the needs_check flag: accepted.
    let mut img = image();
    let mut sb = img.superblock().unwrap();
    sb.version = 1;
    img.set_superblock(&sb).unwrap();
    open(&img).unwrap();
}

#[test]
fn unknown_incompatible_feature_is_refused() {
    let mut img = image();
    let mut sb = img.superblock().unwrap();
    sb.incompat_flags = 1;
    img.set_superblock(&sb).unwrap();
    let e = open(&img)
        .err()
        .expect("opened with an unknown incompatible feature");
    assert!(e.to_string().contains("incompatible"), "{e}");
}

#[test]
fn unknown_read_only_feature_allows_only_read_only_use() {
    let mut img = image();
    let mut sb = img.superblock().unwrap();
    sb.compat_ro_flags = 4;
    img.set_superblock(&sb).unwrap();
    let e = open(&img).err().expect("opened read-write");
    assert!(e.to_string().contains("read-only"), "{e}");
    let ro = Pool::open(
        Arc::new(MemStorage::from_vec(img.0.clone())),
        original().data.clone(),
        PoolOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(read_device(&ro, 0, 700).unwrap() == original().contents[&0]);
    // A compatible feature is no reason to refuse anything.
    let mut img = image();
    let mut sb = img.superblock().unwrap();
    sb.compat_flags = 4;
    img.set_superblock(&sb).unwrap();
    open(&img).unwrap();
}

#[test]
fn space_map_index_with_impossible_counts_is_refused() {
    let m = map(&image());
    // Metadata space map: index entry 0 (nr_free at 24, none_free_before at 28).
    // Data space map: the index tree's leaf value 0.
    for (block, at) in [
        (m.meta_index, 24),
        (m.meta_index, 28),
        (m.data_index, 8),
        (m.data_index, 12),
    ] {
        let mut img = image();
        img.edit(block, |b| {
            let off = if block == m.data_index {
                32 + 8 * node::max(b) + at
            } else {
                at
            };
            put_u32(b, off, 16321);
        })
        .unwrap();
        let e = open(&img)
            .err()
            .expect("opened a space map with impossible counts");
        assert!(e.is_metadata_failure(), "{e}");
    }
}

/// Nodes in free blocks 480…: a chain of internal nodes, each of whose 252 entries names
/// the next node, ending in an empty leaf. Every node is well formed; walked without
/// regard to key ranges it has 252^6 paths.
fn reused_node_chain(img: &mut Image) -> u64 {
    const FIRST: u64 = 480;
    const LEVELS: u64 = 6;
    for l in 0..=LEVELS {
        let at = FIRST + l;
        let b = img.block_mut(at).unwrap();
        if l == LEVELS {
            node::init(b, node::LEAF, 8);
        } else {
            node::init(b, node::INTERNAL, 8);
            for i in 0..252 {
                node::insert_at(b, i, i as u64, &(at + 1).to_le_bytes());
            }
        }
        img.seal(at, BlockKind::Node).unwrap();
    }
    FIRST
}

#[test]
fn tree_reusing_its_own_nodes_is_refused_without_walking_every_path() {
    let mut img = image();
    let m = map(&img);
    let chain = reused_node_chain(&mut img);
    img.edit(m.top, |b| {
        let i = node::find(b, 2).unwrap();
        node::set_value_u64(b, i, chain);
    })
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let walker = img.clone();
    std::thread::spawn(move || {
        let mut md = ThinMetadata::open(
            Arc::new(MemStorage::from_vec(walker.0)),
            MetadataOptions::default(),
        )
        .unwrap();
        let usage = thinpool::thin::usage::device_usage(&mut md).map(|_| ());
        let dump = thinpool::dump::dump(&mut md, false, std::io::sink()).map(|_| ());
        let _ = tx.send((usage.is_err(), dump.is_err()));
    });
    let (usage_failed, dump_failed) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("walking the tree did not end within a minute");
    assert!(usage_failed && dump_failed);
    assert_refused(&img, 2);
}

// ----- random damage -----

/// The tree a node belongs to, and so the size of its leaves' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tree {
    Top,
    Bottom,
    Details,
    DataIndex,
    RefCounts,
}

impl Tree {
    fn value_size(self) -> usize {
        match self {
            Tree::Top | Tree::Bottom => 8,
            Tree::Details => 24,
            Tree::DataIndex => 16,
            Tree::RefCounts => 4,
        }
    }
}

/// Every block the original pool reaches (superblock, trees, space-map blocks), and the
/// tree of each node.
fn reachable(img: &Image) -> (Vec<u64>, BTreeMap<u64, Tree>) {
    let sb = img.superblock().unwrap();
    let mut blocks = BTreeSet::from([0, sb.metadata_sm_root.bitmap_root]);
    let idx = img.block(sb.metadata_sm_root.bitmap_root).unwrap();
    for i in 0..sb.metadata_sm_root.nr_blocks.div_ceil(16320) as usize {
        blocks.insert(get_u64(idx, 16 + 16 * i));
    }
    let mut trees = BTreeMap::new();
    let mut todo = vec![
        (sb.mapping_root, Tree::Top),
        (sb.details_root, Tree::Details),
        (sb.data_sm_root.bitmap_root, Tree::DataIndex),
        (sb.data_sm_root.ref_count_root, Tree::RefCounts),
        (sb.metadata_sm_root.ref_count_root, Tree::RefCounts),
    ];
    while let Some((b, tree)) = todo.pop() {
        if trees.insert(b, tree).is_some() {
            continue;
        }
        blocks.insert(b);
        let n = img.block(b).unwrap();
        for i in 0..node::nr_entries(n) {
            let v = node::value_u64(n, i);
            match (node::is_leaf(n), tree) {
                (false, _) => todo.push((v, tree)),
                (true, Tree::Top) => todo.push((v, Tree::Bottom)),
                (true, Tree::DataIndex) => {
                    blocks.insert(v);
                }
                _ => {}
            }
        }
    }
    (blocks.into_iter().collect(), trees)
}

/// Whether block `b` of `img` is a node that a tree with `value_size` leaves could hold:
/// an internal node, or a leaf of that value size.
fn fits(img: &Image, b: u64, value_size: usize) -> bool {
    img.kind(b) == Some(BlockKind::Node)
        && img.block(b).is_some_and(|n| match node::flags(n) {
            node::INTERNAL => true,
            node::LEAF => node::value_size(n) == value_size,
            _ => false,
        })
}

/// Fields are read through Debug, in failure messages.
#[derive(Debug)]
#[allow(dead_code)]
struct Damage {
    block: u64,
    kind: BlockKind,
    field: &'static str,
    offset: usize,
    width: usize,
    old: u64,
    new: u64,
    /// True when no well-formed pool has this field so: the reads must then give the
    /// original bytes or an error. False for a change that may describe another, valid
    /// pool (a key, a leaf value, an entry count, a pointer to another node): no check of
    /// the nodes a read passes can tell, only a walk of everything (`pool check`) can.
    strict: bool,
}

const SB_FIELDS: [(&str, usize, usize); 21] = [
    ("flags", 4, 4),
    ("version", 40, 4),
    ("time", 44, 4),
    ("trans_id", 48, 8),
    ("held_root", 56, 8),
    ("data sm nr_blocks", 64, 8),
    ("data sm nr_allocated", 72, 8),
    ("data sm bitmap_root", 80, 8),
    ("data sm ref_count_root", 88, 8),
    ("metadata sm nr_blocks", 192, 8),
    ("metadata sm nr_allocated", 200, 8),
    ("metadata sm bitmap_root", 208, 8),
    ("metadata sm ref_count_root", 216, 8),
    ("mapping_root", 320, 8),
    ("details_root", 328, 8),
    ("data_block_size", 336, 4),
    ("metadata_block_size", 340, 4),
    ("metadata_nr_blocks", 344, 8),
    ("compat_flags", 352, 4),
    ("compat_ro_flags", 356, 4),
    ("incompat_flags", 360, 4),
];

fn read_field(b: &[u8], off: usize, width: usize) -> u64 {
    match width {
        1 => b[off] as u64,
        4 => get_u32(b, off) as u64,
        _ => get_u64(b, off),
    }
}

fn write_field(b: &mut [u8], off: usize, width: usize, v: u64) {
    match width {
        1 => b[off] = v as u8,
        4 => put_u32(b, off, v as u32),
        _ => put_u64(b, off, v),
    }
}

fn damage(
    rng: &mut Rng,
    img: &mut Image,
    blocks: &[u64],
    nodes: &[u64],
    trees: &BTreeMap<u64, Tree>,
) -> Damage {
    let block = blocks[rng.below(blocks.len() as u64) as usize];
    let kind = img.kind(block).unwrap();
    let blk = *img.block(block).unwrap();
    let (field, offset, width) = match kind {
        BlockKind::Superblock => SB_FIELDS[rng.below(SB_FIELDS.len() as u64) as usize],
        BlockKind::Node => {
            let (nr, max, vs) = (
                node::nr_entries(&blk),
                node::max(&blk),
                node::value_size(&blk),
            );
            match rng.below(5) {
                0 | 1 => [
                    ("flags", 4, 4),
                    ("nr_entries", 16, 4),
                    ("max_entries", 20, 4),
                    ("value_size", 24, 4),
                    ("padding", 28, 4),
                ][rng.below(5) as usize],
                2 if nr > 0 => ("key", 32 + 8 * rng.below(nr as u64) as usize, 8),
                3 if nr > 0 => {
                    let at = 32 + 8 * max + vs * rng.below(nr as u64) as usize;
                    if vs >= 8 {
                        ("value", at + 8 * rng.below(vs as u64 / 8) as usize, 8)
                    } else {
                        ("value", at, 4)
                    }
                }
                _ => ("byte", 16 + rng.below(BLOCK_SIZE as u64 - 16) as usize, 1),
            }
        }
        BlockKind::Bitmap => ("bitmap word", 16 + 8 * rng.below(510) as usize, 8),
        BlockKind::Index => {
            let e = 16 + 16 * rng.below(3) as usize;
            [
                ("index blocknr", e, 8),
                ("index nr_free", e + 8, 4),
                ("index none_free_before", e + 12, 4),
            ][rng.below(3) as usize]
        }
    };
    let old = read_field(&blk, offset, width);
    let mask = if width == 8 {
        u64::MAX
    } else {
        (1u64 << (8 * width)) - 1
    };
    let new = match rng.below(8) {
        0 | 1 => old ^ (1 << rng.below(8 * width as u64)),
        2 => rng.next(),
        3 => 0,
        4 => old.wrapping_add(1),
        5 => old.wrapping_sub(1),
        6 => u64::MAX,
        _ => nodes[rng.below(nodes.len() as u64) as usize],
    } & mask;
    img.edit(block, |b| write_field(b, offset, width, new))
        .unwrap();
    let strict = match kind {
        BlockKind::Superblock => match field {
            "mapping_root" => !fits(img, new, 8),
            "details_root" => !fits(img, new, 24),
            // Another valid size reads other bytes at each offset.
            "data_block_size" => false,
            _ => true,
        },
        BlockKind::Node => {
            node_field_is_strict(img, &blk, trees.get(&block).copied(), offset, width, new)
        }
        BlockKind::Bitmap | BlockKind::Index => true,
    };
    Damage {
        block,
        kind,
        field,
        offset,
        width,
        old,
        new,
        strict,
    }
}

/// Whether rewriting `width` bytes at `offset` of the (original) node `blk` of `tree`
/// (None: a stale node, of no tree) with `new` leaves a node that the reads must find
/// wrong, rather than one that only a whole-pool check could (see [`Damage::strict`]).
/// `img` is the damaged image.
fn node_field_is_strict(
    img: &Image,
    blk: &[u8; BLOCK_SIZE],
    tree: Option<Tree>,
    offset: usize,
    width: usize,
    new: u64,
) -> bool {
    let (nr, max, vs) = (node::nr_entries(blk), node::max(blk), node::value_size(blk));
    let leaf = node::is_leaf(blk);
    let mut after = *blk;
    write_field(&mut after, offset, width, new);
    let keys = 32..32 + 8 * nr;
    let values = 32 + 8 * max..32 + 8 * max + vs * nr;
    match offset {
        4..8 => !matches!(node::flags(&after), node::INTERNAL | node::LEAF),
        16..20 => {
            let n = node::nr_entries(&after);
            n > max || (!leaf && n == 0)
        }
        20..32 => true,
        o if keys.contains(&o) => {
            // A key: caught when it breaks the order of the node's keys.
            let i = (o - 32) / 8;
            let k = node::key(&after, i);
            (i > 0 && k <= node::key(&after, i - 1))
                || (i + 1 < nr && k >= node::key(&after, i + 1))
        }
        o if values.contains(&o) => {
            let v = node::value_u64(&after, (o - values.start) / vs);
            match (leaf, tree) {
                // A child, or a device's tree: it must be a node of the right kind.
                (false, Some(t)) => !fits(img, v, t.value_size()),
                (true, Some(Tree::Top)) => !fits(img, v, 8),
                (false, None) => img.kind(v) != Some(BlockKind::Node),
                (true, _) => false,
            }
        }
        // Checksum and location (sealed again), unused slots.
        _ => true,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Refused,
    Same,
    Different,
}

/// Opens the damaged pool and reads every device; also lists, dumps, diffs and checks it
/// (those must only not panic). One outcome per device.
fn exercise(img: &Image) -> Vec<Outcome> {
    let report = thinpool::check::check(Arc::new(MemStorage::from_vec(img.0.clone())));
    drop(report);
    if let Ok(mut md) = ThinMetadata::open(
        Arc::new(MemStorage::from_vec(img.0.clone())),
        MetadataOptions {
            read_only: true,
            ..Default::default()
        },
    ) {
        let _ = thinpool::thin::usage::device_usage(&mut md);
        let _ = thinpool::dump::dump(&mut md, false, std::io::sink());
        let _ = thinpool::delta::delta(&mut md, 1, 0, false);
    }
    let pool = match open(img) {
        Ok(p) => p,
        Err(_) => return DEVICES.iter().map(|_| Outcome::Refused).collect(),
    };
    DEVICES
        .iter()
        .map(|&(id, n)| match read_device(&pool, id, n) {
            Err(_) => Outcome::Refused,
            Ok(got) if got == original().contents[&id] => Outcome::Same,
            Ok(_) => Outcome::Different,
        })
        .collect()
}

#[test]
fn resealed_random_damage_gives_an_error_or_the_original_bytes() {
    let cases: u64 = std::env::var("DAMAGE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let seed: u64 = std::env::var("DAMAGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let base = image();
    let (live, trees) = reachable(&base);
    let sealed: Vec<u64> = (0..base.nr_blocks())
        .filter(|&b| base.kind(b).is_some())
        .collect();
    let nodes: Vec<u64> = sealed
        .iter()
        .copied()
        .filter(|&b| base.kind(b) == Some(BlockKind::Node))
        .collect();
    let mut tally = BTreeMap::new();
    for case in 0..cases {
        let mut rng = Rng((seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ case.wrapping_mul(0xBF58_476D_1CE4_E5B9))
            | 1);
        for _ in 0..4 {
            rng.next();
        }
        let mut img = base.clone();
        // Mostly blocks the pool reaches; now and then a stale one from an older transaction.
        let pool_of = if rng.below(10) == 0 { &sealed } else { &live };
        let d = damage(&mut rng, &mut img, pool_of, &nodes, &trees);
        let outcomes = catch_unwind(AssertUnwindSafe(|| exercise(&img)))
            .unwrap_or_else(|_| panic!("case {case} (DAMAGE_SEED={seed}): panicked on {d:?}"));
        for o in &outcomes {
            assert!(
                !(d.strict && *o == Outcome::Different),
                "case {case} (DAMAGE_SEED={seed}): reads gave other bytes without an error after {d:?}: {outcomes:?}"
            );
        }
        if std::env::var("DAMAGE_VERBOSE").is_ok() && outcomes.contains(&Outcome::Different) {
            eprintln!("{d:?} {outcomes:?}");
        }
        let key = if outcomes.contains(&Outcome::Refused) {
            "refused"
        } else if outcomes.contains(&Outcome::Different) {
            "different (another well-formed pool)"
        } else {
            "same"
        };
        *tally.entry(key).or_insert(0u64) += 1;
    }
    eprintln!("{cases} damaged pools: {tally:?}");
}

// ----- the fuzzer's seeds -----

/// Small pools made by the engine, as fuzz inputs ([`to_fuzz_input`]): the seed corpus of
/// fuzz/fuzz_targets/metadata.rs.
fn fuzz_seeds() -> Vec<(&'static str, Vec<u8>)> {
    type Make = fn(&mut ThinMetadata);
    fn map(md: &mut ThinMetadata, id: u32, blocks: std::ops::Range<u64>) {
        for vb in blocks {
            let b = md.alloc_data_block().unwrap();
            md.insert_mapping(id, vb, b).unwrap();
        }
    }
    let pools: [(&str, Make); 6] = [
        ("empty", |_| {}),
        ("one-device", |md| {
            md.create_thin(0).unwrap();
        }),
        ("snapshots", |md| {
            md.create_thin(0).unwrap();
            map(md, 0, 0..20);
            md.commit().unwrap();
            md.create_snap(1, 0).unwrap();
            map(md, 1, 5..10);
            md.create_thin(2).unwrap();
            map(md, 2, 100..103);
            md.create_snap(3, 1).unwrap();
        }),
        ("two-levels", |md| {
            md.create_thin(0).unwrap();
            map(md, 0, 0..300);
            md.commit().unwrap();
            md.create_snap(1, 0).unwrap();
            map(md, 1, 250..260);
        }),
        ("held-snapshot", |md| {
            md.create_thin(0).unwrap();
            map(md, 0, 0..8);
            md.reserve_metadata_snap().unwrap();
            map(md, 0, 4..12);
            md.create_snap(1, 0).unwrap();
        }),
        ("shared-three-times", |md| {
            // Each write to a snapshot copies the shared leaf, so its data blocks gain a
            // reference per snapshot: counts of 3 and more, in the reference-count trees.
            md.create_thin(0).unwrap();
            map(md, 0, 0..10);
            for id in 1..4 {
                md.commit().unwrap();
                md.create_snap(id, 0).unwrap();
                map(md, id, 0..1);
            }
        }),
    ];
    pools
        .into_iter()
        .map(|(name, make)| {
            let meta = Arc::new(MemStorage::new(
                thinpool::thin::metadata::MIN_METADATA_BLOCKS * BLOCK_SIZE as u64,
            ));
            let mut md =
                ThinMetadata::format(meta.clone(), 128, 1000, MetadataOptions::default()).unwrap();
            make(&mut md);
            md.commit().unwrap();
            // Blocks the pool does not use (older copies) zeroed: smaller seeds, and all
            // that the fuzzer changes matters.
            let mut img = Image(meta.to_vec());
            for b in 0..img.nr_blocks() {
                if md.tm().meta_sm.get(b).unwrap() == 0 {
                    img.block_mut(b).unwrap().fill(0);
                }
            }
            drop(md);
            // Cut to the fuzzer's device: the same pool with a smaller metadata space map.
            let blocks = FUZZ_DEVICE_BLOCKS as u64;
            assert!(
                img.0[blocks as usize * BLOCK_SIZE..]
                    .iter()
                    .all(|&b| b == 0),
                "seed {name} uses blocks past the fuzzer's {blocks}"
            );
            img.0.truncate(blocks as usize * BLOCK_SIZE);
            let mut sb = img.superblock().unwrap();
            sb.metadata_sm_root.nr_blocks = blocks;
            sb.metadata_nr_blocks = blocks;
            img.set_superblock(&sb).unwrap();
            (name, to_fuzz_input(&img).unwrap())
        })
        .collect()
}

/// Every seed in fuzz/corpus/metadata (and every one the engine makes now) is a valid
/// pool: it opens, and checks clean. WRITE_FUZZ_SEEDS=1 writes the seeds again.
#[test]
fn fuzz_seeds_are_valid_pools() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/metadata");
    let made = fuzz_seeds();
    if std::env::var("WRITE_FUZZ_SEEDS").as_deref() == Ok("1") {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &made {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let mut on_disk: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (WRITE_FUZZ_SEEDS=1 makes it)", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    assert!(
        on_disk.len() >= made.len(),
        "seeds missing in {}",
        dir.display()
    );
    on_disk.extend(made.into_iter().map(|(n, b)| (format!("made: {n}"), b)));
    for (name, input) in on_disk {
        let img = from_fuzz_input(&input);
        let report = thinpool::check::check(Arc::new(MemStorage::from_vec(img.0.clone()))).unwrap();
        assert!(report.is_clean(), "{name}: {report:?}");
        let mut md = ThinMetadata::open(
            Arc::new(MemStorage::from_vec(img.0)),
            MetadataOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        for id in md.devices().keys().copied().collect::<Vec<_>>() {
            md.for_each_mapping(id, 0, u64::MAX, &mut |_, _| Ok(()))
                .unwrap();
        }
    }
}

/// The data space map's bitmap moved into a block the metadata space map counts as free
/// (found by the metadata fuzz target): the pool must refuse it, not treat the block as
/// one of this transaction and overwrite a block in place at the next commit.
#[test]
fn data_bitmap_in_a_free_metadata_block_is_refused() {
    const FREE: u64 = 480;
    let mut img = image();
    let m = map(&img);
    let old = img.block(m.data_index).map(|b| {
        let off = 32 + 8 * node::max(b);
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    });
    let old = old.unwrap();
    let bitmap = *img.block(old).unwrap();
    *img.block_mut(FREE).unwrap() = bitmap;
    img.seal(FREE, BlockKind::Bitmap).unwrap();
    img.edit(m.data_index, |b| {
        let off = 32 + 8 * node::max(b);
        b[off..off + 8].copy_from_slice(&FREE.to_le_bytes());
    })
    .unwrap();
    match open(&img) {
        Err(e) => assert!(e.is_metadata_failure(), "{e}"),
        Ok(pool) => {
            // Opened: changing and committing must fail, never write a free block in place.
            let r = pool.write(0, 0, &[7u8; 4096]).and_then(|()| pool.commit());
            assert!(
                r.is_err(),
                "a commit wrote over a block the pool counts as free"
            );
        }
    }
}
