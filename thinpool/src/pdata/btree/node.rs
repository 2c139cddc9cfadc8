//! B-tree node layout.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | checksum (salt 121107) |
//! | 4 | 4 | flags: 1 = internal, 2 = leaf |
//! | 8 | 8 | own block number |
//! | 16 | 4 | nr_entries |
//! | 20 | 4 | max_entries = 3 * floor(floor(4064 / (8 + value_size)) / 3) |
//! | 24 | 4 | value_size (8 in internal nodes) |
//! | 28 | 4 | padding, zero |
//! | 32 | 8 * max_entries | keys (u64) |
//! | 32 + 8 * max_entries | value_size * max_entries | values |
//!
//! Keys are strictly increasing. In an internal node key `i` is a lower bound of every key
//! in child `i`. Every node except a tree's root holds at least max_entries / 3 entries.

use crate::pdata::block::{get_u32, get_u64, put_u32, put_u64, Block, BlockKind, BLOCK_SIZE};
use crate::{Error, Result};

pub const INTERNAL: u32 = 1;
pub const LEAF: u32 = 2;
pub const HEADER: usize = 32;

pub fn max_entries(value_size: usize) -> usize {
    let raw = (BLOCK_SIZE - HEADER) / (8 + value_size);
    3 * (raw / 3)
}

#[inline]
pub fn flags(b: &Block) -> u32 {
    get_u32(b, 4)
}
#[inline]
pub fn is_leaf(b: &Block) -> bool {
    flags(b) == LEAF
}
#[inline]
pub fn nr_entries(b: &Block) -> usize {
    get_u32(b, 16) as usize
}
#[inline]
pub fn max(b: &Block) -> usize {
    get_u32(b, 20) as usize
}
#[inline]
pub fn value_size(b: &Block) -> usize {
    get_u32(b, 24) as usize
}
#[inline]
pub fn key(b: &Block, i: usize) -> u64 {
    get_u64(b, HEADER + 8 * i)
}
#[inline]
fn value_off(b: &Block, i: usize) -> usize {
    HEADER + 8 * max(b) + value_size(b) * i
}
#[inline]
pub fn value(b: &Block, i: usize) -> &[u8] {
    let o = value_off(b, i);
    &b[o..o + value_size(b)]
}
#[inline]
pub fn value_u64(b: &Block, i: usize) -> u64 {
    get_u64(b, value_off(b, i))
}

pub fn set_nr_entries(b: &mut Block, n: usize) {
    put_u32(b, 16, n as u32);
}
pub fn set_key(b: &mut Block, i: usize, k: u64) {
    put_u64(b, HEADER + 8 * i, k);
}
pub fn set_value(b: &mut Block, i: usize, v: &[u8]) {
    let o = value_off(b, i);
    b[o..o + v.len()].copy_from_slice(v);
}
pub fn set_value_u64(b: &mut Block, i: usize, v: u64) {
    let o = value_off(b, i);
    put_u64(b, o, v);
}

/// Formats an empty node.
pub fn init(b: &mut Block, flags: u32, value_size: usize) {
    b.fill(0);
    put_u32(b, 4, flags);
    put_u32(b, 20, max_entries(value_size) as u32);
    put_u32(b, 24, value_size as u32);
}

/// Largest `i` with `key[i] <= k`, or None when `k` is below every key.
pub fn lower_bound(b: &Block, k: u64) -> Option<usize> {
    let n = nr_entries(b);
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if key(b, mid) <= k {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo.checked_sub(1)
}

/// Index of `k` in a leaf, if present.
pub fn find(b: &Block, k: u64) -> Option<usize> {
    lower_bound(b, k).filter(|&i| key(b, i) == k)
}

/// Inserts an entry at `i`, moving the rest right. The node must not be full.
pub fn insert_at(b: &mut Block, i: usize, k: u64, v: &[u8]) {
    let n = nr_entries(b);
    let vs = value_size(b);
    let m = max(b);
    debug_assert!(n < m && i <= n && v.len() == vs);
    let ko = HEADER + 8 * i;
    b.copy_within(ko..HEADER + 8 * n, ko + 8);
    let vbase = HEADER + 8 * m;
    let vo = vbase + vs * i;
    b.copy_within(vo..vbase + vs * n, vo + vs);
    set_nr_entries(b, n + 1);
    set_key(b, i, k);
    set_value(b, i, v);
}

/// Removes entry `i`, moving the rest left and zeroing the freed slot.
pub fn remove_at(b: &mut Block, i: usize) {
    let n = nr_entries(b);
    let vs = value_size(b);
    let m = max(b);
    let ko = HEADER + 8 * i;
    b.copy_within(ko + 8..HEADER + 8 * n, ko);
    b[HEADER + 8 * (n - 1)..HEADER + 8 * n].fill(0);
    let vbase = HEADER + 8 * m;
    let vo = vbase + vs * i;
    b.copy_within(vo + vs..vbase + vs * n, vo);
    b[vbase + vs * (n - 1)..vbase + vs * n].fill(0);
    set_nr_entries(b, n - 1);
}

/// All entries as (keys, packed values).
pub fn entries(b: &Block) -> (Vec<u64>, Vec<u8>) {
    let n = nr_entries(b);
    let vs = value_size(b);
    let keys = (0..n).map(|i| key(b, i)).collect();
    let o = HEADER + 8 * max(b);
    (keys, b[o..o + vs * n].to_vec())
}

/// Replaces all entries (keeps flags, max_entries, value_size, zeroes unused slots).
pub fn set_entries(b: &mut Block, keys: &[u64], values: &[u8]) {
    let f = flags(b);
    let vs = value_size(b);
    init(b, f, vs);
    debug_assert!(keys.len() <= max(b));
    for (i, &k) in keys.iter().enumerate() {
        set_key(b, i, k);
    }
    let o = HEADER + 8 * max(b);
    b[o..o + values.len()].copy_from_slice(values);
    set_nr_entries(b, keys.len());
}

fn corrupt(location: u64, problem: String) -> Error {
    Error::corrupt_block(location, BlockKind::Node, problem)
}

/// What a node must be whatever tree it is in, checked once, when it is read from the
/// device (before anything indexes into it; see [`crate::pdata::btree::read_node`]):
/// exactly one of internal or leaf; a value size whose capacity is dm-thin's formula
/// (so that every key and value slot lies inside the block); no more entries than that;
/// keys strictly increasing; an internal node has entries (lookups in an empty one would
/// find nothing rather than fail), 8-byte values, and children on the device other than
/// itself. `device_blocks` is the metadata device's size in blocks.
pub fn validate(b: &Block, location: u64, device_blocks: u64) -> Result<()> {
    let f = flags(b);
    let vs = value_size(b);
    let m = max(b);
    let n = nr_entries(b);
    if f != INTERNAL && f != LEAF {
        return Err(corrupt(
            location,
            format!("flags {f} are neither internal ({INTERNAL}) nor leaf ({LEAF})"),
        ));
    }
    // Bounded first, so that the capacity formula cannot underflow or overflow.
    if vs > BLOCK_SIZE - HEADER - 8 {
        return Err(corrupt(
            location,
            format!("value size {vs} does not fit a block"),
        ));
    }
    let want = max_entries(vs);
    if m != want || m == 0 {
        return Err(corrupt(
            location,
            format!("max_entries {m}, but {vs}-byte values give {want}"),
        ));
    }
    if n > m {
        return Err(corrupt(
            location,
            format!("{n} entries, more than the maximum {m}"),
        ));
    }
    if let Some(i) = (1..n).find(|&i| key(b, i - 1) >= key(b, i)) {
        return Err(corrupt(
            location,
            format!(
                "keys not strictly increasing: {} then {} at entry {i}",
                key(b, i - 1),
                key(b, i)
            ),
        ));
    }
    if f == INTERNAL {
        if vs != 8 {
            return Err(corrupt(
                location,
                format!("internal node with {vs}-byte values, not 8"),
            ));
        }
        if n == 0 {
            return Err(corrupt(location, "internal node without entries".into()));
        }
        for i in 0..n {
            let c = value_u64(b, i);
            if c >= device_blocks || c == location {
                return Err(corrupt(
                    location,
                    format!(
                        "child {i} is block {c}, {}",
                        if c == location {
                            "the node itself".to_string()
                        } else {
                            format!("beyond the device ({device_blocks} blocks)")
                        }
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Whether a node (already [`validate`]d) can be one of a tree whose leaves hold
/// `value_size`-byte values. Checked on every read, cached or not: a block's place in the
/// metadata, not its contents, says which tree it belongs to, and a damaged pointer can
/// name a block that another tree has already brought into the cache.
#[inline]
pub fn check_value_size(b: &Block, location: u64, value_size: usize) -> Result<()> {
    let vs = self::value_size(b);
    if is_leaf(b) && vs != value_size {
        return Err(corrupt(
            location,
            format!(
                "a leaf of {vs}-byte values where this tree's leaves hold {value_size}-byte values"
            ),
        ));
    }
    Ok(())
}

/// The keys a node may hold, given the parent entry that leads to it: `[lo, hi)`, with
/// `hi` None for no upper bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub lo: u64,
    pub hi: Option<u64>,
}

impl KeyRange {
    /// A tree's root may hold any key.
    pub const ALL: KeyRange = KeyRange { lo: 0, hi: None };

    /// The range of child `i` of the internal node `b` (which holds keys in `self`): from
    /// its key to the next one.
    #[inline]
    pub fn child(self, b: &Block, i: usize) -> KeyRange {
        KeyRange {
            lo: key(b, i),
            hi: if i + 1 < nr_entries(b) {
                Some(key(b, i + 1))
            } else {
                self.hi
            },
        }
    }
}

/// Checks that node `b`'s keys lie in `range`. A parent key is a lower bound of its child's
/// keys (not always equal to the first: a removal leaves it), and the next parent key an
/// upper bound; a child outside that is in the wrong place, and a walk that allowed it
/// could meet one node on many paths. Constant time: the keys are in order.
#[inline]
pub fn check_range(b: &Block, location: u64, range: KeyRange) -> Result<()> {
    let n = nr_entries(b);
    if n == 0 {
        return Ok(());
    }
    let (first, last) = (key(b, 0), key(b, n - 1));
    if first < range.lo || range.hi.is_some_and(|hi| last >= hi) {
        return Err(corrupt(
            location,
            format!(
                "keys {first}..={last} outside the range its parent gives it ({}..{})",
                range.lo,
                range.hi.map_or(String::new(), |h| h.to_string())
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities() {
        assert_eq!(max_entries(4), 336);
        assert_eq!(max_entries(8), 252);
        assert_eq!(max_entries(16), 168);
        assert_eq!(max_entries(24), 126);
    }

    #[test]
    fn validator_names_each_kind_of_damage() {
        let mut leaf = [0u8; 4096];
        init(&mut leaf, LEAF, 8);
        for i in 0..3 {
            insert_at(&mut leaf, i, 2 * i as u64, &7u64.to_le_bytes());
        }
        validate(&leaf, 5, 10).unwrap();
        let damaged = |base: &Block, f: &dyn Fn(&mut Block)| {
            let mut b = *base;
            f(&mut b);
            validate(&b, 5, 10).unwrap_err().to_string()
        };
        assert!(damaged(&leaf, &|b| put_u32(b, 4, 3)).contains("flags 3"));
        assert!(damaged(&leaf, &|b| put_u32(b, 20, 251)).contains("max_entries 251"));
        assert!(damaged(&leaf, &|b| put_u32(b, 24, 5000)).contains("value size 5000"));
        assert!(damaged(&leaf, &|b| set_nr_entries(b, 253)).contains("253 entries"));
        assert!(damaged(&leaf, &|b| set_key(b, 2, 2)).contains("not strictly increasing"));
        let mut internal = [0u8; 4096];
        init(&mut internal, INTERNAL, 8);
        assert!(damaged(&internal, &|_| {}).contains("without entries"));
        insert_at(&mut internal, 0, 0, &9u64.to_le_bytes());
        validate(&internal, 5, 10).unwrap();
        assert!(damaged(&internal, &|b| set_value_u64(b, 0, 10)).contains("beyond the device"));
        assert!(damaged(&internal, &|b| set_value_u64(b, 0, 5)).contains("itself"));
        let e = damaged(&internal, &|b| {
            init(b, INTERNAL, 16);
            insert_at(b, 0, 0, &[0u8; 16]);
        });
        assert!(e.contains("16-byte values"), "{e}");
        assert!(e.contains("block 5 (btree node)"), "{e}");
    }

    #[test]
    fn insert_remove_search() {
        let mut b = [0u8; 4096];
        init(&mut b, LEAF, 8);
        for k in [5u64, 1, 9, 3] {
            let i = lower_bound(&b, k).map(|i| i + 1).unwrap_or(0);
            insert_at(&mut b, i, k, &(k * 10).to_le_bytes());
        }
        assert_eq!(entries(&b).0, vec![1, 3, 5, 9]);
        assert_eq!(find(&b, 5), Some(2));
        assert_eq!(value_u64(&b, 2), 50);
        assert_eq!(lower_bound(&b, 0), None);
        assert_eq!(lower_bound(&b, 4), Some(1));
        remove_at(&mut b, 1);
        assert_eq!(entries(&b).0, vec![1, 5, 9]);
        assert_eq!(value_u64(&b, 1), 50);
        validate(&b, 0, 1).unwrap();
        check_value_size(&b, 0, 8).unwrap();
        assert!(check_value_size(&b, 0, 24).is_err());
        check_range(
            &b,
            0,
            KeyRange {
                lo: 1,
                hi: Some(10),
            },
        )
        .unwrap();
        assert!(check_range(&b, 0, KeyRange { lo: 2, hi: None }).is_err());
        assert!(check_range(&b, 0, KeyRange { lo: 0, hi: Some(9) }).is_err());
    }
}
