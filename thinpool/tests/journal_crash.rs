//! A process killed at any moment loses no acknowledged write: the pool's journal carries
//! the mappings made since the last commit to the next open.
//!
//! Every write to the metadata, data and journal devices goes into one log, in the order
//! issued. A process crash keeps everything written before it (the host's page cache
//! survives the process; nothing unsynced is dropped), and may cut the write under way at
//! a page boundary. For every prefix of the log (and the cut write), the devices as the
//! crash leaves them must open, replaying the journal, and hold:
//! - every operation completed before the crash point exactly;
//! - for the operation under way, each block either as before it or as after it (a
//!   snapshot or device change either there, whole, or absent);
//! - metadata that both checkers pass, after the replay's commit.
//!
//! The workload is the daemon's: guest writes (provisioning, breaking sharing, in place),
//! discards and write-zeroes between commits, and device changes each followed
//! by a commit (the daemon commits before it answers a management command).

mod common;
use common::{pattern, run_tool_on, tools_available, Rng, THIN_CHECK};
use std::collections::{BTreeMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use thinpool::check;
use thinpool::journal::Journal;
use thinpool::pool::{Pool, PoolOptions};
use thinpool::storage::{MemStorage, Punched, Storage};

const BS: u64 = 64 * 1024;
const BOOT: [u8; 16] = [0x5a; 16];
const PAGE: usize = 4096;
const META: usize = 0;
const DATA: usize = 1;
const JOURNAL: usize = 2;

type Log = Arc<Mutex<Vec<(usize, u64, Vec<u8>)>>>;

/// A device whose writes go into the shared log; a punch (discard passdown) goes in as a
/// write of zeroes, which is what it leaves.
struct Logged {
    inner: MemStorage,
    which: usize,
    log: Log,
    punches: Arc<AtomicUsize>,
}

impl Storage for Logged {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)?;
        self.log
            .lock()
            .unwrap()
            .push((self.which, offset, buf.to_vec()));
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<Punched> {
        let r = self.inner.punch(offset, len)?;
        self.punches.fetch_add(1, Ordering::SeqCst);
        self.log
            .lock()
            .unwrap()
            .push((self.which, offset, vec![0; len as usize]));
        Ok(r)
    }
    fn holes(&self) -> io::Result<Option<Vec<(u64, u64)>>> {
        self.inner.holes()
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.inner.zero_range(offset, len)?;
        self.log
            .lock()
            .unwrap()
            .push((self.which, offset, vec![0; len as usize]));
        Ok(true)
    }
}

/// Every device's bytes (by thin id).
type State = BTreeMap<u32, Vec<u8>>;

/// One operation of the workload: where it lies in the log and the states around it.
struct Op {
    what: String,
    log_before: usize,
    log_after: usize,
    before: State,
    after: State,
}

struct Rig {
    base: [Vec<u8>; 3],
    log: Log,
    punches: Arc<AtomicUsize>,
    pool: Pool,
    vblocks: u64,
    cur: State,
    ops: Vec<Op>,
}

impl Rig {
    fn new(data_blocks: u64, vblocks: u64) -> Rig {
        let meta = Arc::new(MemStorage::new(4 << 20));
        let data = Arc::new(MemStorage::new(data_blocks * BS));
        {
            let pool =
                Pool::create(meta.clone(), data.clone(), 128, PoolOptions::default()).unwrap();
            pool.create_thin(0).unwrap();
            pool.commit().unwrap();
        }
        let journal_len = 4096 + 32 * 4096;
        let base = [meta.to_vec(), data.to_vec(), vec![0u8; journal_len]];
        let log: Log = Arc::default();
        let punches = Arc::new(AtomicUsize::new(0));
        // The data device was never written: a sparse file, all holes.
        assert!(base[DATA].iter().all(|&b| b == 0));
        let dev = |which: usize| {
            Arc::new(Logged {
                inner: if which == DATA {
                    MemStorage::new(base[which].len() as u64)
                } else {
                    MemStorage::from_vec(base[which].clone())
                },
                which,
                log: log.clone(),
                punches: punches.clone(),
            })
        };
        let journal = Journal::open(dev(JOURNAL), BOOT).unwrap();
        let pool =
            Pool::open_with_journal(dev(META), dev(DATA), Some(journal), PoolOptions::default())
                .unwrap();
        let mut cur = State::new();
        cur.insert(0, vec![0; (vblocks * BS) as usize]);
        Rig {
            base,
            log,
            punches,
            pool,
            vblocks,
            cur,
            ops: Vec::new(),
        }
    }

    fn log_len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Runs `f` as one operation whose effect on the state is `apply`.
    fn op(&mut self, what: String, f: impl FnOnce(&Pool), apply: impl FnOnce(&mut State)) {
        let log_before = self.log_len();
        let before = self.cur.clone();
        f(&self.pool);
        apply(&mut self.cur);
        self.ops.push(Op {
            what,
            log_before,
            log_after: self.log_len(),
            before,
            after: self.cur.clone(),
        });
    }

    fn room(&self) -> u64 {
        self.pool.with_metadata(|md| {
            let u = md.usage();
            u.data_blocks - u.data_used - md.pending_data_frees()
        })
    }

    fn run(&mut self, seed: u64, steps: usize) {
        let mut rng = Rng(seed);
        let mut next_id = 1u32;
        let size = self.vblocks * BS;
        for step in 0..steps {
            let ids: Vec<u32> = self.cur.keys().copied().collect();
            let dev = ids[rng.below(ids.len() as u64) as usize];
            match rng.below(16) {
                0..=7 => {
                    if self.room() < 3 {
                        self.op("commit".into(), |p| p.commit().unwrap(), |_| {});
                        continue;
                    }
                    let len = match rng.below(3) {
                        0 => BS,
                        1 => 4096 * (1 + rng.below(4)),
                        _ => BS + 8192,
                    };
                    let offset = (rng.below(size - len) / 512) * 512;
                    let buf = pattern(seed ^ step as u64, len as usize);
                    self.op(
                        format!("write {len} at {offset} of {dev}"),
                        |p| p.write(dev, offset, &buf).unwrap(),
                        |s| {
                            s.get_mut(&dev).unwrap()[offset as usize..(offset + len) as usize]
                                .copy_from_slice(&buf)
                        },
                    );
                }
                8 | 9 => {
                    let offset = rng.below(size / 2) / 512 * 512;
                    let len = rng.below(4 * BS) / 512 * 512 + 512;
                    let len = len.min(size - offset);
                    let (first, end) = (offset.div_ceil(BS), (offset + len) / BS);
                    self.op(
                        format!("discard {len} at {offset} of {dev}"),
                        |p| {
                            p.discard(dev, offset, len).unwrap();
                        },
                        |s| {
                            if first < end {
                                s.get_mut(&dev).unwrap()[(first * BS) as usize..(end * BS) as usize]
                                    .fill(0)
                            }
                        },
                    );
                }
                10 => {
                    if self.room() < 3 {
                        continue;
                    }
                    let offset = rng.below(size - 2 * BS) / 512 * 512;
                    let len = rng.below(2 * BS) / 512 * 512 + 512;
                    self.op(
                        format!("write-zeroes {len} at {offset} of {dev}"),
                        |p| p.write_zeroes(dev, offset, len, true).unwrap(),
                        |s| {
                            s.get_mut(&dev).unwrap()[offset as usize..(offset + len) as usize]
                                .fill(0)
                        },
                    );
                }
                11 | 12 => self.op("commit".into(), |p| p.commit().unwrap(), |_| {}),
                13 if self.cur.len() < 3 => {
                    let id = next_id;
                    next_id += 1;
                    self.op(
                        format!("snapshot {id} of {dev}"),
                        |p| {
                            p.create_snap(id, dev).unwrap();
                            p.commit().unwrap();
                        },
                        |s| {
                            let c = s[&dev].clone();
                            s.insert(id, c);
                        },
                    );
                }
                14 if self.cur.len() < 3 => {
                    let id = next_id;
                    next_id += 1;
                    let blank = vec![0u8; size as usize];
                    self.op(
                        format!("create {id}"),
                        |p| {
                            p.create_thin(id).unwrap();
                            p.commit().unwrap();
                        },
                        |s| {
                            s.insert(id, blank);
                        },
                    );
                }
                15 if self.cur.len() > 1 && dev != 0 => self.op(
                    format!("delete {dev}"),
                    |p| {
                        p.delete(dev).unwrap();
                        p.commit().unwrap();
                    },
                    |s| {
                        s.remove(&dev);
                    },
                ),
                _ => {}
            }
        }
    }

    /// Discard passdown at work: few data blocks, reused over and over, each freed by
    /// discards (whole blocks, sometimes with partial ones at the ends) and punched after
    /// the commit that freed it; first writes of a few pages land on punched blocks.
    fn run_discards(&mut self, seed: u64, steps: usize) {
        let mut rng = Rng(seed);
        let size = self.vblocks * BS;
        for step in 0..steps {
            match rng.below(8) {
                0..=3 => {
                    if self.room() < 3 {
                        self.op("commit".into(), |p| p.commit().unwrap(), |_| {});
                        continue;
                    }
                    let len = if rng.below(2) == 0 { BS } else { 4096 };
                    let offset = rng.below(size - len) / 4096 * 4096;
                    let buf = pattern(seed ^ step as u64, len as usize);
                    self.op(
                        format!("write {len} at {offset}"),
                        |p| p.write(0, offset, &buf).unwrap(),
                        |s| {
                            s.get_mut(&0).unwrap()[offset as usize..(offset + len) as usize]
                                .copy_from_slice(&buf)
                        },
                    );
                }
                4 | 5 => {
                    let offset = rng.below(size) / 512 * 512;
                    let len = (rng.below(3 * BS) / 512 * 512 + 512).min(size - offset);
                    let (first, end) = (offset.div_ceil(BS), (offset + len) / BS);
                    self.op(
                        format!("discard {len} at {offset}"),
                        |p| {
                            p.discard(0, offset, len).unwrap();
                        },
                        |s| {
                            if first < end {
                                s.get_mut(&0).unwrap()[(first * BS) as usize..(end * BS) as usize]
                                    .fill(0)
                            }
                        },
                    );
                }
                _ => self.op("commit".into(), |p| p.commit().unwrap(), |_| {}),
            }
        }
    }

    /// The three devices after a crash at log point `p`; `torn`: the write at `p` got
    /// its first page through.
    fn images(&self, p: usize, torn: bool) -> [Vec<u8>; 3] {
        let log = self.log.lock().unwrap();
        let mut img = self.base.clone();
        for (which, off, bytes) in &log[..p] {
            img[*which][*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
        }
        if torn {
            let (which, off, bytes) = &log[p];
            let n = PAGE - (*off as usize % PAGE);
            let n = n.min(bytes.len());
            img[*which][*off as usize..*off as usize + n].copy_from_slice(&bytes[..n]);
        }
        img
    }
}

/// Opens the crash image (replaying the journal) and returns what it holds, after both
/// checks of the metadata the replay committed.
fn examine(img: [Vec<u8>; 3], vblocks: u64, what: &str, thin_check: bool) -> State {
    let [m, d, j] = img;
    let meta = Arc::new(MemStorage::from_vec(m));
    let journal = Journal::open(Arc::new(MemStorage::from_vec(j)), BOOT).unwrap();
    let pool = Pool::open_with_journal(
        meta.clone(),
        Arc::new(MemStorage::from_vec(d)),
        Some(journal),
        PoolOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let mut s = State::new();
    for (id, _) in pool.devices() {
        let mut buf = vec![0u8; (vblocks * BS) as usize];
        pool.read(id, 0, &mut buf)
            .unwrap_or_else(|e| panic!("{what}: read {id}: {e}"));
        s.insert(id, buf);
    }
    drop(pool);
    let r = check::check(meta.clone()).unwrap_or_else(|e| panic!("{what}: check: {e}"));
    assert!(r.is_clean(), "{what}: check: {:#?}", r.errors);
    if thin_check {
        run_tool_on(THIN_CHECK, &[], &meta.to_vec(), what);
    }
    s
}

/// Whether `got` is `before` or `after` page by page (a write under way may be cut at a
/// page boundary, as a disk may tear a write in flight), each device either as in one of
/// them or present in one and absent in the other.
fn between(got: &State, before: &State, after: &State) -> Result<(), String> {
    let ids: std::collections::BTreeSet<u32> = got
        .keys()
        .chain(before.keys())
        .chain(after.keys())
        .copied()
        .collect();
    for id in ids {
        let (g, b, a) = (got.get(&id), before.get(&id), after.get(&id));
        let Some(g) = g else {
            if b.is_some() && a.is_some() {
                return Err(format!("device {id} is gone"));
            }
            continue;
        };
        for (i, page) in g.chunks(PAGE).enumerate() {
            let r = i * PAGE..(i + 1) * PAGE;
            let ok = b.is_some_and(|b| b[r.clone()] == *page) || a.is_some_and(|a| a[r] == *page);
            if !ok {
                return Err(format!(
                    "device {id} bytes {} to {} are neither as before nor as after",
                    i * PAGE,
                    (i + 1) * PAGE
                ));
            }
        }
    }
    Ok(())
}

fn enumerate(seed: u64, steps: usize) {
    let mut rig = Rig::new(48, 8);
    rig.run(seed, steps);
    verify(rig, seed);
}

fn verify(mut rig: Rig, seed: u64) {
    let tools = tools_available("the thin_check part of the journal crash test");
    let n = rig.log_len();
    let ops = std::mem::take(&mut rig.ops);
    let mut checked = HashSet::new();
    let mut examined = 0;
    for p in 0..=n {
        // The operation under way at p: the last one that began at or before it and had
        // not finished by it; before and after it, the states it moves between.
        let (before, after, what) = match ops.iter().find(|o| o.log_before <= p && p < o.log_after)
        {
            Some(o) => (&o.before, &o.after, o.what.as_str()),
            None => {
                let done = ops.iter().rev().find(|o| o.log_after <= p);
                let s = done.map_or(&ops[0].before, |o| &o.after);
                (s, s, "between operations")
            }
        };
        for torn in [false, true] {
            if torn && (p == n || rig.log.lock().unwrap()[p].2.len() <= PAGE) {
                continue;
            }
            let label = format!("seed {seed}: crash at {p}/{n} (torn {torn}) during {what}");
            let thin_check = tools && (p % 25 == 0) && checked.insert(p);
            let got = examine(rig.images(p, torn), rig.vblocks, &label, thin_check);
            examined += 1;
            if let Err(e) = between(&got, before, after) {
                panic!("{label}: {e}");
            }
        }
    }
    eprintln!(
        "seed {seed}: {} operations, {n} logged writes, {examined} crash images examined",
        ops.len()
    );
}

#[test]
fn a_crash_at_any_write_keeps_every_acknowledged_write() {
    for seed in [0x1234_5678_9abc_def1, 77, 4242] {
        enumerate(seed, 70);
    }
}

#[test]
fn a_crash_at_any_write_during_discard_passdown_keeps_every_acknowledged_write() {
    for seed in [5, 0xfeed_beef] {
        let mut rig = Rig::new(10, 8);
        rig.run_discards(seed, 80);
        let punches = rig.punches.load(Ordering::SeqCst);
        assert!(punches > 5, "seed {seed}: only {punches} punches");
        verify(rig, seed);
    }
}

#[test]
fn a_reboot_drops_the_journal_and_leaves_the_last_commit() {
    let rig = Rig::new(48, 8);
    let committed = rig.cur.clone();
    let buf = pattern(5, BS as usize);
    rig.pool.write(0, 0, &buf).unwrap();
    let [m, d, j] = rig.images(rig.log_len(), false);
    let journal = Journal::open(Arc::new(MemStorage::from_vec(j)), [0x11; 16]).unwrap();
    let pool = Pool::open_with_journal(
        Arc::new(MemStorage::from_vec(m)),
        Arc::new(MemStorage::from_vec(d)),
        Some(journal),
        PoolOptions::default(),
    )
    .unwrap();
    let mut got = vec![0u8; BS as usize];
    pool.read(0, 0, &mut got).unwrap();
    assert_eq!(got, committed[&0][..BS as usize]);
    assert_eq!(pool.replayed_at_open(), 0);
}
