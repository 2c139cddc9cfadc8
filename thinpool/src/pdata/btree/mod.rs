//! Copy-on-write B+ trees in dm-thin's format.
//!
//! Every modification walks down from the root, shadowing each node before it changes
//! (see [`crate::pdata::tm`]), so a tree root returned by an operation is a new tree while
//! the old root still describes the old one. Inserts split full nodes on the way down
//! (so a parent always has room for a new sibling); removals rebalance an under-full
//! child with a sibling on the way down (so every non-root node keeps at least a third
//! of its capacity, the fill rule `thin_check` enforces).
//!
//! The meaning of leaf values matters for reference counting, and is given by
//! [`ValueKind`]: plain values reference nothing; mapping values reference a data block;
//! top-level mapping values reference a whole bottom-level tree.

pub mod node;

pub use node::KeyRange;

use super::block::{Block, BlockKind};
use super::tm::Tm;
use crate::{Error, Result};
use std::sync::Arc;

/// Bound on tree depth; deeper means a cycle in corrupt metadata.
pub(crate) const MAX_DEPTH: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// Values that reference nothing (device details, space-map index, ref counts).
    Plain(usize),
    /// Bottom-level mapping values: `data_block << 24 | time`.
    Data,
    /// Top-level mapping values: the root of a device's bottom-level tree.
    Subtree,
}

impl ValueKind {
    pub fn size(self) -> usize {
        match self {
            ValueKind::Plain(s) => s,
            ValueKind::Data | ValueKind::Subtree => 8,
        }
    }
}

fn u64_of(v: &[u8]) -> u64 {
    u64::from_le_bytes(v[..8].try_into().unwrap())
}

/// Reads node `b` of a tree whose leaves hold `vk` values. Every node any path reads
/// comes through here: its structure is checked once, when it is read from the device
/// ([`node::validate`]), and its fit with this tree on every read, cached or not
/// ([`node::check_value_size`], two loads and a compare).
pub fn read_node(tm: &mut Tm, b: u64, vk: ValueKind) -> Result<Arc<Block>> {
    let device_blocks = tm.bm.device_blocks();
    let n = tm.bm.read_checked(b, BlockKind::Node, |blk| {
        node::validate(blk, b, device_blocks)
    })?;
    node::check_value_size(&n, b, vk.size())?;
    Ok(n)
}

/// [`read_node`] for a node reached through a parent entry whose keys are `range`: its
/// keys must lie there. Walks that check this meet every node of a tree on one path at
/// most, so a damaged tree that names one node from many entries cannot make them
/// exponential.
pub fn read_child(tm: &mut Tm, b: u64, vk: ValueKind, range: KeyRange) -> Result<Arc<Block>> {
    let n = read_node(tm, b, vk)?;
    node::check_range(&n, b, range)?;
    Ok(n)
}

pub(crate) fn depth_error(root: u64) -> Error {
    Error::corrupt(format!(
        "btree rooted at block {root} is deeper than {MAX_DEPTH} levels (a cycle?)"
    ))
}

/// A new, empty tree (one empty leaf).
pub fn empty(tm: &mut Tm, vk: ValueKind) -> Result<u64> {
    let b = tm.new_block(BlockKind::Node)?;
    node::init(tm.get_mut(b, BlockKind::Node)?, node::LEAF, vk.size());
    Ok(b)
}

/// Takes a reference on everything a node points to (after copying a shared node).
fn inc_children(tm: &mut Tm, n: &Block, vk: ValueKind) -> Result<()> {
    let count = node::nr_entries(n);
    if !node::is_leaf(n) {
        for i in 0..count {
            tm.inc_meta(node::value_u64(n, i))?;
        }
        return Ok(());
    }
    match vk {
        ValueKind::Plain(_) => {}
        ValueKind::Data => {
            for i in 0..count {
                tm.inc_data(node::value_u64(n, i) >> 24)?;
            }
        }
        ValueKind::Subtree => {
            for i in 0..count {
                tm.inc_meta(node::value_u64(n, i))?;
            }
        }
    }
    Ok(())
}

/// Releases the reference a leaf value holds.
fn release_value(tm: &mut Tm, vk: ValueKind, v: &[u8]) -> Result<()> {
    match vk {
        ValueKind::Plain(_) => Ok(()),
        ValueKind::Data => tm.dec_data(u64_of(v) >> 24).map(|_| ()),
        ValueKind::Subtree => dec_tree(tm, u64_of(v), ValueKind::Data),
    }
}

/// Shadows a node, pushing its references down if it was shared.
fn shadow_node(tm: &mut Tm, b: u64, vk: ValueKind) -> Result<u64> {
    read_node(tm, b, vk)?;
    let s = tm.shadow(b, BlockKind::Node)?;
    if s.was_shared {
        let n = tm.read(s.location, BlockKind::Node)?;
        inc_children(tm, &n, vk)?;
    }
    Ok(s.location)
}

fn node_mut(tm: &mut Tm, b: u64) -> Result<&mut Block> {
    tm.get_mut(b, BlockKind::Node)
}

pub fn lookup(tm: &mut Tm, root: u64, key: u64, vk: ValueKind) -> Result<Option<Vec<u8>>> {
    lookup_with(tm, root, key, vk, |v| v.to_vec())
}

/// [`lookup`] for 8-byte values, without copying the value into a new `Vec`: the data
/// path looks up two of them (the device's subtree, then the mapping) for every request.
pub fn lookup_u64(tm: &mut Tm, root: u64, key: u64, vk: ValueKind) -> Result<Option<u64>> {
    lookup_with(tm, root, key, vk, u64_of)
}

/// Looks up `key` and hands its value, in the leaf, to `f`.
fn lookup_with<T>(
    tm: &mut Tm,
    root: u64,
    key: u64,
    vk: ValueKind,
    f: impl FnOnce(&[u8]) -> T,
) -> Result<Option<T>> {
    let (mut b, mut range) = (root, KeyRange::ALL);
    for _ in 0..MAX_DEPTH {
        let n = read_child(tm, b, vk, range)?;
        if node::is_leaf(&n) {
            return Ok(node::find(&n, key).map(|i| f(node::value(&n, i))));
        }
        match node::lower_bound(&n, key) {
            Some(i) => (b, range) = (node::value_u64(&n, i), range.child(&n, i)),
            None => return Ok(None),
        }
    }
    Err(depth_error(root))
}

/// The first entry with a key >= `key`.
pub fn lookup_ge(
    tm: &mut Tm,
    root: u64,
    key: u64,
    vk: ValueKind,
) -> Result<Option<(u64, Vec<u8>)>> {
    lookup_ge_rec(tm, root, key, vk, KeyRange::ALL, 0)
}

fn lookup_ge_rec(
    tm: &mut Tm,
    b: u64,
    key: u64,
    vk: ValueKind,
    range: KeyRange,
    depth: usize,
) -> Result<Option<(u64, Vec<u8>)>> {
    if depth > MAX_DEPTH {
        return Err(depth_error(b));
    }
    let n = read_child(tm, b, vk, range)?;
    let count = node::nr_entries(&n);
    if node::is_leaf(&n) {
        let i = match node::lower_bound(&n, key) {
            Some(i) if node::key(&n, i) == key => i,
            Some(i) => i + 1,
            None => 0,
        };
        return Ok((i < count).then(|| (node::key(&n, i), node::value(&n, i).to_vec())));
    }
    let start = node::lower_bound(&n, key).unwrap_or(0);
    for i in start..count {
        let (c, cr) = (node::value_u64(&n, i), range.child(&n, i));
        if let Some(r) = lookup_ge_rec(tm, c, key, vk, cr, depth + 1)? {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// Inserts or overwrites `key`. Returns the new root and whether the key is new.
/// A new value's reference is the caller's (nothing is incremented); an overwritten
/// value is released unless it references the same thing.
pub fn insert(
    tm: &mut Tm,
    root: u64,
    key: u64,
    value: &[u8],
    vk: ValueKind,
) -> Result<(u64, bool)> {
    let root = shadow_node(tm, root, vk)?;
    {
        let n = tm.read(root, BlockKind::Node)?;
        if needs_split(&n, key) {
            drop(n);
            split_beneath(tm, root)?;
        }
    }
    let mut cur = root;
    for _ in 0..MAX_DEPTH {
        let n = tm.read(cur, BlockKind::Node)?;
        if node::is_leaf(&n) {
            let lb = node::lower_bound(&n, key);
            let existing = lb
                .filter(|&i| node::key(&n, i) == key)
                .map(|i| (i, node::value(&n, i).to_vec()));
            drop(n);
            if let Some((i, old)) = existing {
                node::set_value(node_mut(tm, cur)?, i, value);
                let same = match vk {
                    ValueKind::Plain(_) => true,
                    ValueKind::Data => u64_of(&old) >> 24 == u64_of(value) >> 24,
                    ValueKind::Subtree => u64_of(&old) == u64_of(value),
                };
                if !same {
                    release_value(tm, vk, &old)?;
                }
                return Ok((root, false));
            }
            let i = lb.map(|i| i + 1).unwrap_or(0);
            node::insert_at(node_mut(tm, cur)?, i, key, value);
            return Ok((root, true));
        }
        let lb = node::lower_bound(&n, key);
        let i = lb.unwrap_or(0);
        let child = node::value_u64(&n, i);
        drop(n);
        if lb.is_none() {
            // Below every key: lower the first key so it stays a lower bound.
            node::set_key(node_mut(tm, cur)?, 0, key);
        }
        let c = shadow_node(tm, child, vk)?;
        if c != child {
            node::set_value_u64(node_mut(tm, cur)?, i, c);
        }
        let cn = tm.read(c, BlockKind::Node)?;
        if needs_split(&cn, key) {
            drop(cn);
            let (right, right_key) = split_child(tm, cur, i, c)?;
            cur = if key >= right_key { right } else { c };
        } else {
            cur = c;
        }
    }
    Err(depth_error(root))
}

/// A full node must be split before descending, unless it is a leaf that already holds
/// the key (an overwrite needs no room).
fn needs_split(n: &Block, key: u64) -> bool {
    node::nr_entries(n) == node::max(n) && !(node::is_leaf(n) && node::find(n, key).is_some())
}

/// Splits a full root into two children; the root keeps its location and becomes an
/// internal node with two entries.
fn split_beneath(tm: &mut Tm, root: u64) -> Result<()> {
    let n = tm.read(root, BlockKind::Node)?;
    let (keys, values) = node::entries(&n);
    let flags = node::flags(&n);
    let vs = node::value_size(&n);
    drop(n);
    let mid = keys.len() / 2;
    let left = tm.new_block(BlockKind::Node)?;
    {
        let l = node_mut(tm, left)?;
        node::init(l, flags, vs);
        node::set_entries(l, &keys[..mid], &values[..mid * vs]);
    }
    let right = tm.new_block(BlockKind::Node)?;
    {
        let r = node_mut(tm, right)?;
        node::init(r, flags, vs);
        node::set_entries(r, &keys[mid..], &values[mid * vs..]);
    }
    let r = node_mut(tm, root)?;
    node::init(r, node::INTERNAL, 8);
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&left.to_le_bytes());
    v.extend_from_slice(&right.to_le_bytes());
    node::set_entries(r, &[keys[0], keys[mid]], &v);
    Ok(())
}

/// Splits child `i` (at `c`) of `parent` in two; returns the new right node and its first key.
fn split_child(tm: &mut Tm, parent: u64, i: usize, c: u64) -> Result<(u64, u64)> {
    let n = tm.read(c, BlockKind::Node)?;
    let (keys, values) = node::entries(&n);
    let flags = node::flags(&n);
    let vs = node::value_size(&n);
    drop(n);
    let mid = keys.len() / 2;
    node::set_entries(node_mut(tm, c)?, &keys[..mid], &values[..mid * vs]);
    let right = tm.new_block(BlockKind::Node)?;
    {
        let r = node_mut(tm, right)?;
        node::init(r, flags, vs);
        node::set_entries(r, &keys[mid..], &values[mid * vs..]);
    }
    node::insert_at(
        node_mut(tm, parent)?,
        i + 1,
        keys[mid],
        &right.to_le_bytes(),
    );
    Ok((right, keys[mid]))
}

/// Removes `key` if present, releasing its value. Returns the new root and whether the
/// key was there.
pub fn remove(tm: &mut Tm, root: u64, key: u64, vk: ValueKind) -> Result<(u64, bool)> {
    if lookup(tm, root, key, vk)?.is_none() {
        return Ok((root, false));
    }
    let root = shadow_node(tm, root, vk)?;
    let mut cur = root;
    for _ in 0..MAX_DEPTH * 2 {
        let n = tm.read(cur, BlockKind::Node)?;
        if node::is_leaf(&n) {
            let i = node::find(&n, key).ok_or_else(|| {
                Error::corrupt(format!("key {key} vanished from btree leaf {cur}"))
            })?;
            let old = node::value(&n, i).to_vec();
            drop(n);
            node::remove_at(node_mut(tm, cur)?, i);
            release_value(tm, vk, &old)?;
            return Ok((root, true));
        }
        if cur == root && node::nr_entries(&n) == 1 {
            // An internal root with one child: pull the child up into the root.
            let child = node::value_u64(&n, 0);
            drop(n);
            let cn = read_node(tm, child, vk)?;
            if tm.meta_count(child)? > 1 {
                inc_children(tm, &cn, vk)?;
            }
            let copy: Block = *cn;
            drop(cn);
            *node_mut(tm, cur)? = copy;
            tm.dec_meta(child)?;
            continue;
        }
        let i = node::lower_bound(&n, key)
            .ok_or_else(|| Error::corrupt(format!("key {key} below btree node {cur}")))?;
        let child = node::value_u64(&n, i);
        drop(n);
        let c = shadow_node(tm, child, vk)?;
        if c != child {
            node::set_value_u64(node_mut(tm, cur)?, i, c);
        }
        let cn = tm.read(c, BlockKind::Node)?;
        let underfull = node::nr_entries(&cn) <= node::max(&cn) / 3;
        drop(cn);
        if underfull {
            rebalance(tm, cur, i, vk)?;
        }
        let n = tm.read(cur, BlockKind::Node)?;
        let i = node::lower_bound(&n, key)
            .ok_or_else(|| Error::corrupt(format!("key {key} below btree node {cur}")))?;
        cur = node::value_u64(&n, i);
    }
    Err(depth_error(root))
}

/// Merges child `i` of `parent` with a sibling, or evens them out, so that both keep
/// more than a third of their capacity after one removal.
fn rebalance(tm: &mut Tm, parent: u64, i: usize, vk: ValueKind) -> Result<()> {
    let p = tm.read(parent, BlockKind::Node)?;
    let count = node::nr_entries(&p);
    if count < 2 {
        return Ok(());
    }
    let s = if i > 0 { i - 1 } else { i + 1 };
    let sib = node::value_u64(&p, s);
    drop(p);
    let sc = shadow_node(tm, sib, vk)?;
    if sc != sib {
        node::set_value_u64(node_mut(tm, parent)?, s, sc);
    }
    let p = tm.read(parent, BlockKind::Node)?;
    let (li, ri) = (i.min(s), i.max(s));
    let (l, r) = (node::value_u64(&p, li), node::value_u64(&p, ri));
    drop(p);
    let ln = tm.read(l, BlockKind::Node)?;
    let rn = tm.read(r, BlockKind::Node)?;
    if node::flags(&ln) != node::flags(&rn) || node::value_size(&ln) != node::value_size(&rn) {
        return Err(Error::corrupt(format!(
            "btree siblings {l} and {r} differ in kind"
        )));
    }
    let vs = node::value_size(&ln);
    let max = node::max(&ln);
    let (mut keys, mut values) = node::entries(&ln);
    let (rk, rv) = node::entries(&rn);
    drop((ln, rn));
    keys.extend_from_slice(&rk);
    values.extend_from_slice(&rv);
    let total = keys.len();
    if total < 2 * (max / 3 + 1) {
        node::set_entries(node_mut(tm, l)?, &keys, &values);
        node::remove_at(node_mut(tm, parent)?, ri);
        tm.dec_meta(r)?;
    } else {
        let mid = total / 2;
        node::set_entries(node_mut(tm, l)?, &keys[..mid], &values[..mid * vs]);
        node::set_entries(node_mut(tm, r)?, &keys[mid..], &values[mid * vs..]);
        node::set_key(node_mut(tm, parent)?, ri, keys[mid]);
    }
    Ok(())
}

/// Shadows the path to an existing `key`, hands its current value to `f`, and stores what
/// `f` returns in its place without touching reference counts: `f` is responsible for
/// them (used to replace a device's bottom-level root after changing that tree).
pub fn update_in_place(
    tm: &mut Tm,
    root: u64,
    key: u64,
    vk: ValueKind,
    f: impl FnOnce(&mut Tm, u64) -> Result<u64>,
) -> Result<u64> {
    let root = shadow_node(tm, root, vk)?;
    let mut cur = root;
    for _ in 0..MAX_DEPTH {
        let n = tm.read(cur, BlockKind::Node)?;
        if node::is_leaf(&n) {
            let i = node::find(&n, key).ok_or_else(|| {
                Error::corrupt(format!("key {key} missing from btree leaf {cur}"))
            })?;
            let old = node::value_u64(&n, i);
            drop(n);
            let new = f(tm, old)?;
            if new != old {
                node::set_value_u64(node_mut(tm, cur)?, i, new);
            }
            return Ok(root);
        }
        let i = node::lower_bound(&n, key)
            .ok_or_else(|| Error::corrupt(format!("key {key} below btree node {cur}")))?;
        let child = node::value_u64(&n, i);
        drop(n);
        let c = shadow_node(tm, child, vk)?;
        if c != child {
            node::set_value_u64(node_mut(tm, cur)?, i, c);
        }
        cur = c;
    }
    Err(depth_error(root))
}

/// Visits every leaf in key order.
pub fn for_each_leaf(
    tm: &mut Tm,
    root: u64,
    vk: ValueKind,
    f: &mut dyn FnMut(&Block) -> Result<()>,
) -> Result<()> {
    walk(tm, root, vk, 0, u64::MAX, f, KeyRange::ALL, 0)
}

/// Visits the leaves that may hold keys in `[begin, end)`, in key order.
pub fn for_each_leaf_in(
    tm: &mut Tm,
    root: u64,
    vk: ValueKind,
    begin: u64,
    end: u64,
    f: &mut dyn FnMut(&Block) -> Result<()>,
) -> Result<()> {
    walk(tm, root, vk, begin, end, f, KeyRange::ALL, 0)
}

#[allow(clippy::too_many_arguments)]
fn walk(
    tm: &mut Tm,
    b: u64,
    vk: ValueKind,
    begin: u64,
    end: u64,
    f: &mut dyn FnMut(&Block) -> Result<()>,
    range: KeyRange,
    depth: usize,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(depth_error(b));
    }
    let n = read_child(tm, b, vk, range)?;
    if node::is_leaf(&n) {
        return f(&n);
    }
    let count = node::nr_entries(&n);
    let start = node::lower_bound(&n, begin).unwrap_or(0);
    for i in start..count {
        if node::key(&n, i) >= end {
            break;
        }
        let (c, cr) = (node::value_u64(&n, i), range.child(&n, i));
        walk(tm, c, vk, begin, end, f, cr, depth + 1)?;
    }
    Ok(())
}

/// Every (key, value) in key order.
pub fn entries(tm: &mut Tm, root: u64, vk: ValueKind) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    for_each_leaf(tm, root, vk, &mut |n| {
        for i in 0..node::nr_entries(n) {
            out.push((node::key(n, i), node::value(n, i).to_vec()));
        }
        Ok(())
    })?;
    Ok(out)
}

/// Drops one reference to a tree; when it was the last, releases everything below.
pub fn dec_tree(tm: &mut Tm, root: u64, vk: ValueKind) -> Result<()> {
    dec_tree_rec(tm, root, vk, 0)
}

fn dec_tree_rec(tm: &mut Tm, b: u64, vk: ValueKind, depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(depth_error(b));
    }
    if tm.meta_count(b)? > 1 {
        tm.dec_meta(b)?;
        return Ok(());
    }
    let n = read_node(tm, b, vk)?;
    let count = node::nr_entries(&n);
    if node::is_leaf(&n) {
        match vk {
            ValueKind::Plain(_) => {}
            ValueKind::Data => {
                for i in 0..count {
                    tm.dec_data(node::value_u64(&n, i) >> 24)?;
                }
            }
            ValueKind::Subtree => {
                for i in 0..count {
                    dec_tree_rec(tm, node::value_u64(&n, i), ValueKind::Data, depth + 1)?;
                }
            }
        }
    } else {
        for i in 0..count {
            dec_tree_rec(tm, node::value_u64(&n, i), vk, depth + 1)?;
        }
    }
    tm.dec_meta(b)?;
    Ok(())
}

#[cfg(test)]
mod tests;
