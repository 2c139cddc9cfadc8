//! Per-block locks ("cells", after dm-thin's bio prison).
//!
//! Operations that change or depend on one virtual block's mapping take that block's
//! cell: readers share it, a write that provisions, breaks sharing or writes in place
//! takes it alone, as does a discard. So two writers racing on one unprovisioned block
//! provision it once, and a reader sees either the old or the new data, never a block
//! that has been released under it. Other blocks and other devices are not held up.
//! A thread holds at most one exclusive cell at a time, so cells cannot deadlock.

use crate::hash::IntHashBuilder;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

const SHARDS: usize = 64;

#[derive(Default)]
struct Cell {
    readers: u32,
    writer: bool,
}

#[derive(Default)]
struct ShardState {
    cells: HashMap<(u32, u64), Cell, IntHashBuilder>,
    /// Threads waiting on `cv`: a release wakes them only when there are some (a wake
    /// without waiters still costs a system call, on every block of every request).
    waiters: u32,
}

struct Shard {
    state: Mutex<ShardState>,
    cv: Condvar,
}

pub struct CellTable {
    shards: Vec<Shard>,
}

impl Default for CellTable {
    fn default() -> Self {
        CellTable {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    state: Mutex::default(),
                    cv: Condvar::new(),
                })
                .collect(),
        }
    }
}

pub struct CellGuard<'a> {
    table: &'a CellTable,
    key: (u32, u64),
    exclusive: bool,
}

impl CellTable {
    fn shard(&self, key: (u32, u64)) -> &Shard {
        let h = (key.1 ^ (key.0 as u64).rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.shards[(h >> 58) as usize % SHARDS]
    }

    pub fn lock(&self, dev: u32, block: u64, exclusive: bool) -> CellGuard<'_> {
        let key = (dev, block);
        let shard = self.shard(key);
        let mut st = shard.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let c = st.cells.entry(key).or_default();
            let free = if exclusive {
                !c.writer && c.readers == 0
            } else {
                !c.writer
            };
            if free {
                if exclusive {
                    c.writer = true;
                } else {
                    c.readers += 1;
                }
                break;
            }
            st.waiters += 1;
            st = shard.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            st.waiters -= 1;
        }
        CellGuard {
            table: self,
            key,
            exclusive,
        }
    }
}

impl Drop for CellGuard<'_> {
    fn drop(&mut self) {
        let shard = self.table.shard(self.key);
        let mut st = shard.state.lock().unwrap_or_else(|p| p.into_inner());
        // One hash for the lookup and the removal (a read of a mapped block did three).
        if let Entry::Occupied(mut o) = st.cells.entry(self.key) {
            let c = o.get_mut();
            if self.exclusive {
                c.writer = false;
            } else {
                c.readers -= 1;
            }
            if !c.writer && c.readers == 0 {
                o.remove();
            }
        }
        let wake = st.waiters > 0;
        drop(st);
        if wake {
            shard.cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn exclusive_cells_serialise_and_shared_ones_do_not() {
        let t = Arc::new(CellTable::default());
        let inside = Arc::new(AtomicU32::new(0));
        let max_seen = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (t, inside, max_seen) = (t.clone(), inside.clone(), max_seen.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _g = t.lock(1, 7, true);
                        let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        max_seen.fetch_max(n, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(max_seen.load(Ordering::SeqCst), 1);
        let a = t.lock(1, 7, false);
        let b = t.lock(1, 7, false);
        drop((a, b));
        assert!(t
            .shards
            .iter()
            .all(|s| s.state.lock().unwrap().cells.is_empty()));
    }
}
