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

use crate::pdata::block::{get_u32, get_u64, put_u32, put_u64, Block, BLOCK_SIZE};
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

/// Structural checks of a node read from disk, before anything indexes into it.
pub fn validate(b: &Block, location: u64, expect_value_size: usize) -> Result<()> {
    let f = flags(b);
    let vs = value_size(b);
    let m = max(b);
    let n = nr_entries(b);
    let bad = |what: String| Err(Error::corrupt(format!("btree node {location}: {what}")));
    if f != INTERNAL && f != LEAF {
        return bad(format!("flags {f} are neither internal nor leaf"));
    }
    let want = if f == INTERNAL { 8 } else { expect_value_size };
    if vs != want {
        return bad(format!("value size {vs}, expected {want}"));
    }
    if m != max_entries(vs) {
        return bad(format!("max_entries {m}, expected {}", max_entries(vs)));
    }
    if n > m {
        return bad(format!("{n} entries, more than the maximum {m}"));
    }
    for i in 1..n {
        if key(b, i - 1) >= key(b, i) {
            return bad(format!("keys not strictly increasing at entry {i}"));
        }
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
        validate(&b, 0, 8).unwrap();
        assert!(validate(&b, 0, 24).is_err());
    }
}
