//! The two mapping trees walked side by side, in key order, skipping what they share.
//!
//! A snapshot starts out sharing its origin's whole tree, and a write afterwards shadows
//! only the path from the root to the changed leaf; so two related devices reach the same
//! node block for most of their key space. A node block's contents are fixed within one
//! view of the metadata, so equal block numbers mean identical subtrees: every mapping
//! beneath is `same`, and in changed-only mode nothing beneath needs reading at all.
//!
//! Each side is a cursor whose head is either a leaf entry or a not-yet-read child with
//! the lower bound its parent's key gives. The merge keeps one invariant: everything
//! reported so far is below every key either side has still to give. Emitting a leaf
//! entry needs the other head to be provably above it; when it is not, the other side
//! reads (descends into) its child. Descending never emits, so which side descends is a
//! free choice, made to meet shared blocks: the lower bound first, then the taller
//! subtree (trees of different heights after a root split share children one level
//! apart), otherwise both.

use super::{DeltaKind, Runs};
use crate::pdata::block::Block;
use crate::pdata::btree::{self, node, KeyRange, ValueKind};
use crate::pdata::tm::Tm;
use crate::Result;
use std::sync::Arc;

/// What a walk reports besides the runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Mapping-tree nodes read (from the cache or the device), both sides together.
    pub nodes_read: u64,
}

struct Frame {
    node: Arc<Block>,
    /// The keys the node may hold (its children's ranges are cut from it).
    range: KeyRange,
    next: usize,
    /// Levels above the leaves (0 for a leaf); a guide for choosing the side to descend.
    height: usize,
}

#[derive(Clone, Copy)]
enum Head {
    /// A leaf entry: virtual block and data block (the time bits dropped, as thin_delta).
    Entry {
        key: u64,
        data: u64,
    },
    /// An unread child: its block, the range of its keys, its height.
    Child {
        block: u64,
        range: KeyRange,
        height: usize,
    },
    End,
}

struct Cursor {
    stack: Vec<Frame>,
}

struct Reader<'a> {
    tm: &'a mut Tm,
    stats: WalkStats,
}

impl Reader<'_> {
    fn node(&mut self, b: u64, range: KeyRange) -> Result<Arc<Block>> {
        self.stats.nodes_read += 1;
        btree::read_child(self.tm, b, ValueKind::Data, range)
    }

    /// The height of a tree whose root is `root`: its leftmost path's length below the root
    /// (all leaves sit at one depth).
    fn height(&mut self, root: Arc<Block>, at: u64) -> Result<usize> {
        let (mut n, mut range) = (root, KeyRange::ALL);
        for h in 0..btree::MAX_DEPTH {
            if node::is_leaf(&n) || node::nr_entries(&n) == 0 {
                return Ok(h);
            }
            range = range.child(&n, 0);
            n = self.node(node::value_u64(&n, 0), range)?;
        }
        Err(btree::depth_error(at))
    }

    /// Adds every key under `b` as `same` runs, reading only keys (the shared subtree's
    /// values are equal on both sides by construction).
    fn same_subtree(
        &mut self,
        b: u64,
        range: KeyRange,
        runs: &mut Runs,
        depth: usize,
    ) -> Result<()> {
        if depth > btree::MAX_DEPTH {
            return Err(btree::depth_error(b));
        }
        let n = self.node(b, range)?;
        let count = node::nr_entries(&n);
        if node::is_leaf(&n) {
            let mut i = 0;
            while i < count {
                let begin = node::key(&n, i);
                let mut j = i + 1;
                while j < count && node::key(&n, j) == begin + (j - i) as u64 {
                    j += 1;
                }
                runs.add(DeltaKind::Same, begin, (j - i) as u64);
                i = j;
            }
            return Ok(());
        }
        for i in 0..count {
            self.same_subtree(node::value_u64(&n, i), range.child(&n, i), runs, depth + 1)?;
        }
        Ok(())
    }
}

impl Cursor {
    fn new(r: &mut Reader, root: u64) -> Result<Self> {
        let mut c = Cursor { stack: Vec::new() };
        c.push(r, root, 0, KeyRange::ALL)?;
        let height = r.height(c.stack[0].node.clone(), root)?;
        c.stack[0].height = height;
        Ok(c)
    }

    fn push(&mut self, r: &mut Reader, b: u64, height: usize, range: KeyRange) -> Result<()> {
        if self.stack.len() >= btree::MAX_DEPTH {
            return Err(btree::depth_error(b));
        }
        let node = r.node(b, range)?;
        // A leaf is height 0 whatever its parent claims; the heights only guide choices.
        let height = if node::is_leaf(&node) {
            0
        } else {
            height.max(1)
        };
        self.stack.push(Frame {
            node,
            range,
            next: 0,
            height,
        });
        Ok(())
    }

    /// The next thing this side gives, dropping finished nodes.
    fn head(&mut self) -> Head {
        while let Some(f) = self.stack.last() {
            if f.next < node::nr_entries(&f.node) {
                let (n, i) = (&f.node, f.next);
                return if node::is_leaf(n) {
                    Head::Entry {
                        key: node::key(n, i),
                        data: node::value_u64(n, i) >> 24,
                    }
                } else {
                    Head::Child {
                        block: node::value_u64(n, i),
                        range: f.range.child(n, i),
                        height: f.height.saturating_sub(1),
                    }
                };
            }
            self.stack.pop();
        }
        Head::End
    }

    /// Consumes the head (an entry, or a child left unread).
    fn skip(&mut self) {
        if let Some(f) = self.stack.last_mut() {
            f.next += 1;
        }
    }

    /// Replaces the head child by its entries.
    fn descend(
        &mut self,
        r: &mut Reader,
        block: u64,
        height: usize,
        range: KeyRange,
    ) -> Result<()> {
        self.skip();
        self.push(r, block, height, range)
    }
}

/// Merges the trees rooted at `left` and `right` into `runs`; `same` runs only when
/// `with_same` (they need the keys of shared subtrees, so those leaves are read).
pub(super) fn walk(
    tm: &mut Tm,
    left: u64,
    right: u64,
    with_same: bool,
    runs: &mut Runs,
) -> Result<WalkStats> {
    let mut r = Reader {
        tm,
        stats: WalkStats::default(),
    };
    if left == right {
        if with_same {
            r.same_subtree(left, KeyRange::ALL, runs, 0)?;
        }
        return Ok(r.stats);
    }
    let mut a = Cursor::new(&mut r, left)?;
    let mut b = Cursor::new(&mut r, right)?;
    loop {
        match (a.head(), b.head()) {
            (Head::End, Head::End) => break,
            (
                Head::Child {
                    block: x, range, ..
                },
                Head::Child { block: y, .. },
            ) if x == y => {
                a.skip();
                b.skip();
                if with_same {
                    r.same_subtree(x, range, runs, a.stack.len())?;
                }
            }
            (Head::Entry { key: ka, data: da }, Head::Entry { key: kb, data: db }) => {
                if ka == kb {
                    let kind = if da == db {
                        DeltaKind::Same
                    } else {
                        DeltaKind::Different
                    };
                    if with_same || kind != DeltaKind::Same {
                        runs.add(kind, ka, 1);
                    }
                    a.skip();
                    b.skip();
                } else if ka < kb {
                    runs.add(DeltaKind::LeftOnly, ka, 1);
                    a.skip();
                } else {
                    runs.add(DeltaKind::RightOnly, kb, 1);
                    b.skip();
                }
            }
            (Head::Entry { key, .. }, Head::End) => {
                runs.add(DeltaKind::LeftOnly, key, 1);
                a.skip();
            }
            (Head::End, Head::Entry { key, .. }) => {
                runs.add(DeltaKind::RightOnly, key, 1);
                b.skip();
            }
            (
                Head::Child {
                    block,
                    range,
                    height,
                },
                Head::End,
            ) => a.descend(&mut r, block, height, range)?,
            (
                Head::End,
                Head::Child {
                    block,
                    range,
                    height,
                },
            ) => b.descend(&mut r, block, height, range)?,
            (
                Head::Entry { key, .. },
                Head::Child {
                    block,
                    range,
                    height,
                },
            ) => {
                if key < range.lo {
                    runs.add(DeltaKind::LeftOnly, key, 1);
                    a.skip();
                } else {
                    b.descend(&mut r, block, height, range)?;
                }
            }
            (
                Head::Child {
                    block,
                    range,
                    height,
                },
                Head::Entry { key, .. },
            ) => {
                if key < range.lo {
                    runs.add(DeltaKind::RightOnly, key, 1);
                    b.skip();
                } else {
                    a.descend(&mut r, block, height, range)?;
                }
            }
            (
                Head::Child {
                    block: x,
                    range: rx,
                    height: hx,
                },
                Head::Child {
                    block: y,
                    range: ry,
                    height: hy,
                },
            ) => {
                let (lx, ly) = (rx.lo, ry.lo);
                let (left_first, right_first) = (
                    (lx, std::cmp::Reverse(hx)) < (ly, std::cmp::Reverse(hy)),
                    (ly, std::cmp::Reverse(hy)) < (lx, std::cmp::Reverse(hx)),
                );
                if !right_first {
                    a.descend(&mut r, x, hx, rx)?;
                }
                if !left_first {
                    b.descend(&mut r, y, hy, ry)?;
                }
            }
        }
    }
    Ok(r.stats)
}
