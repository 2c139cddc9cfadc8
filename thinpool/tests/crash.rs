//! Crash consistency: the metadata device records every write and flush, and for every
//! prefix of that log and every way the unflushed writes may have fared, the image a crash
//! would leave must open, check clean, and hold exactly the last committed state (or,
//! when the superblock of the commit in progress made it to the disk, that one).
//!
//! The data device is rebuilt for each crash point too: every data write is logged with
//! the number of metadata operations issued before it, and the crash image at point `p`
//! is opened with every data write issued before metadata operation `p` applied. (Using
//! the data device's final state instead would be wrong for a correct engine as soon as a
//! block freed and committed free is reused later; applying the writes issued up to the
//! crash is the adversarial choice: a block reused too early shows up as corruption.)
//!
//! A write to a block the device owns alone goes in place, so the data of a committed
//! mapping can legitimately change before the next commit; the workloads steer clear of
//! such writes (they would make "the state at the last commit" ill-defined for data) by
//! asking the metadata whether a write would land in place on a committed block.

mod common;
use common::{pattern, run_tool_on, tools_available, Rng, THIN_CHECK};
use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io;
use std::sync::{Arc, Mutex};
use thinpool::check;
use thinpool::pool::{Pool, PoolOptions};
use thinpool::storage::testing::{CrashMode, Recorded, RecordingStorage};
use thinpool::storage::{MemStorage, Punched, Storage};

const BS: u64 = 64 * 1024;

const MODES: [CrashMode; 4] = [
    CrashMode::DropUnsynced,
    CrashMode::KeepUnsynced,
    CrashMode::TearLast { bytes: 512 },
    CrashMode::TearLast { bytes: 2048 },
];

/// Data device that logs every write with the metadata log length at that moment.
struct DataLog {
    inner: MemStorage,
    meta: Arc<RecordingStorage>,
    log: Mutex<Vec<(usize, u64, Vec<u8>)>>,
    punches: std::sync::atomic::AtomicUsize,
}

impl Storage for DataLog {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)?;
        let pos = self.meta.log_len();
        self.log.lock().unwrap().push((pos, offset, buf.to_vec()));
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    /// Discard passdown: logged as the zeroes it leaves.
    fn punch(&self, offset: u64, len: u64) -> io::Result<Punched> {
        let r = self.inner.punch(offset, len)?;
        let pos = self.meta.log_len();
        self.log
            .lock()
            .unwrap()
            .push((pos, offset, vec![0; len as usize]));
        self.punches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(r)
    }
    fn holes(&self) -> io::Result<Option<Vec<(u64, u64)>>> {
        self.inner.holes()
    }
    /// FALLOC_FL_ZERO_RANGE: logged as the zeroes it leaves.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.inner.zero_range(offset, len)?;
        let pos = self.meta.log_len();
        self.log
            .lock()
            .unwrap()
            .push((pos, offset, vec![0; len as usize]));
        Ok(true)
    }
}

/// What a committed state holds: every device's bytes, and whether a metadata snapshot
/// is held.
#[derive(Clone, Debug, Default)]
struct State {
    devs: BTreeMap<u32, Vec<u8>>,
    held: bool,
}

fn is_sb_write(r: &Recorded) -> bool {
    matches!(r, Recorded::Write { offset: 0, .. })
}

/// A pool under test, with the bookkeeping needed to know the committed states.
struct Rig {
    rec: Arc<RecordingStorage>,
    data: Arc<DataLog>,
    pool: Pool,
    vblocks: u64,
    cur: State,
    /// `states[k]`: the state after the k-th superblock write of the log (0 = before any).
    states: Vec<State>,
    /// Writes (and write-zeroes) done, and skipped by the steering.
    writes: (u64, u64),
}

impl Rig {
    fn new(meta_bytes: u64, data_blocks: u64, vblocks: u64, opts: PoolOptions) -> Rig {
        // Format outside the recording: the log starts from a valid, empty pool.
        let base = Arc::new(MemStorage::new(meta_bytes));
        drop(
            Pool::create(
                base.clone(),
                Arc::new(MemStorage::new(data_blocks * BS)),
                128,
                PoolOptions::default(),
            )
            .unwrap(),
        );
        let rec = Arc::new(RecordingStorage::new(base.to_vec()));
        let data = Arc::new(DataLog {
            inner: MemStorage::new(data_blocks * BS),
            meta: rec.clone(),
            log: Mutex::new(Vec::new()),
            punches: Default::default(),
        });
        let pool = Pool::open(rec.clone(), data.clone(), opts).unwrap();
        Rig {
            rec,
            data,
            pool,
            vblocks,
            cur: State::default(),
            states: vec![State::default()],
            writes: (0, 0),
        }
    }

    fn sb_writes(&self) -> usize {
        self.rec.log().iter().filter(|r| is_sb_write(r)).count()
    }

    /// Runs a committing operation; records the state of each superblock it wrote.
    /// `held_after` is the held flag the last superblock carries; any earlier one (the
    /// commit of pending changes by reserve) carries the flag from before.
    fn committing(&mut self, f: impl FnOnce(&Pool), held_after: bool) {
        let before = self.sb_writes();
        f(&self.pool);
        let n = self.sb_writes() - before;
        for i in 0..n {
            let mut s = self.cur.clone();
            if i + 1 == n {
                s.held = held_after;
            }
            self.states.push(s);
        }
        self.cur.held = held_after;
    }

    /// Runs a non-committing operation: it must not write a superblock.
    fn plain<T>(&mut self, what: &str, f: impl FnOnce(&Pool) -> T) -> T {
        let before = self.sb_writes();
        let r = f(&self.pool);
        assert_eq!(
            self.sb_writes(),
            before,
            "{what} committed on its own (the workload must leave enough free space)"
        );
        r
    }

    fn commit(&mut self) {
        let held = self.cur.held;
        self.committing(|p| p.commit().unwrap(), held);
    }

    /// Would writing `vb` of `dev` go in place into a block of the last commit?
    fn in_place_on_committed(&self, dev: u32, vb: u64) -> bool {
        self.pool.with_metadata(|md| {
            let d = md.device(dev).unwrap();
            match md.lookup(dev, vb).unwrap() {
                Some(m) if !m.maybe_shared(&d) => md.tm().data_sm.committed_in_use(m.data_block),
                _ => false,
            }
        })
    }

    /// Data blocks that can be allocated without a commit.
    fn allocatable(&self) -> u64 {
        self.pool.with_metadata(|md| {
            let u = md.usage();
            u.data_blocks - u.data_used - md.pending_data_frees()
        })
    }

    /// Can `[offset, offset + len)` of `dev` be written without touching committed data
    /// in place and without running out of space?
    fn writable(&mut self, dev: u32, offset: u64, len: u64) -> bool {
        let (first, end) = (offset / BS, (offset + len).div_ceil(BS));
        let ok = (first..end).all(|vb| !self.in_place_on_committed(dev, vb))
            && self.allocatable() >= end - first;
        if ok {
            self.writes.0 += 1;
        } else {
            self.writes.1 += 1;
        }
        ok
    }

    fn write(&mut self, dev: u32, offset: u64, len: u64, seed: u64) -> bool {
        if !self.writable(dev, offset, len) {
            return false;
        }
        let buf = pattern(seed, len as usize);
        self.plain("write", |p| p.write(dev, offset, &buf).unwrap());
        self.cur.devs.get_mut(&dev).unwrap()[offset as usize..(offset + len) as usize]
            .copy_from_slice(&buf);
        true
    }

    fn discard(&mut self, dev: u32, offset: u64, len: u64) {
        self.plain("discard", |p| p.discard(dev, offset, len).unwrap());
        let (first, end) = (offset.div_ceil(BS), (offset + len) / BS);
        if first < end {
            self.cur.devs.get_mut(&dev).unwrap()[(first * BS) as usize..(end * BS) as usize]
                .fill(0);
        }
    }

    fn write_zeroes(&mut self, dev: u32, offset: u64, len: u64, unmap: bool) -> bool {
        if !self.writable(dev, offset, len) {
            return false;
        }
        self.plain("write_zeroes", |p| {
            p.write_zeroes(dev, offset, len, unmap).unwrap()
        });
        self.cur.devs.get_mut(&dev).unwrap()[offset as usize..(offset + len) as usize].fill(0);
        true
    }

    fn create_thin(&mut self, id: u32) {
        self.plain("create_thin", |p| p.create_thin(id).unwrap());
        self.cur
            .devs
            .insert(id, vec![0; (self.vblocks * BS) as usize]);
    }

    fn create_snap(&mut self, id: u32, origin: u32) {
        self.plain("create_snap", |p| p.create_snap(id, origin).unwrap());
        let c = self.cur.devs[&origin].clone();
        self.cur.devs.insert(id, c);
    }

    fn delete(&mut self, id: u32) {
        self.plain("delete", |p| p.delete(id).unwrap());
        self.cur.devs.remove(&id);
    }

    fn reserve(&mut self) {
        self.committing(
            |p| {
                p.reserve_metadata_snap().unwrap();
            },
            true,
        );
    }

    fn release(&mut self) {
        self.committing(|p| p.release_metadata_snap().unwrap(), false);
    }

    fn random_range(&self, rng: &mut Rng) -> (u64, u64) {
        let vsize = self.vblocks * BS;
        let offset = match rng.below(3) {
            0 => rng.below(self.vblocks) * BS,
            _ => rng.below(vsize),
        };
        let len = match rng.below(3) {
            0 => BS,
            1 => 1 + rng.below(8192),
            _ => 1 + rng.below(3 * BS),
        };
        (offset, len.min(vsize - offset))
    }

    /// The random workload of the main test.
    fn random_workload(&mut self, seed: u64, steps: usize) {
        let mut rng = Rng(seed);
        let mut next_id = 0u32;
        for _ in 0..steps {
            let ids: Vec<u32> = self.cur.devs.keys().copied().collect();
            let pick = |rng: &mut Rng| ids[rng.below(ids.len() as u64) as usize];
            match rng.below(20) {
                0..=1 if ids.len() < 5 => {
                    self.create_thin(next_id);
                    next_id += 1;
                }
                2..=3 if !ids.is_empty() && ids.len() < 5 => {
                    let o = pick(&mut rng);
                    self.create_snap(next_id, o);
                    next_id += 1;
                }
                4 if ids.len() > 1 => self.delete(pick(&mut rng)),
                5..=10 if !ids.is_empty() => {
                    let dev = pick(&mut rng);
                    let (offset, len) = self.random_range(&mut rng);
                    let seed = rng.next();
                    self.write(dev, offset, len, seed);
                }
                11 if !ids.is_empty() => {
                    let dev = pick(&mut rng);
                    let (offset, len) = self.random_range(&mut rng);
                    self.discard(dev, offset, len);
                }
                12 if !ids.is_empty() => {
                    let dev = pick(&mut rng);
                    let (offset, len) = self.random_range(&mut rng);
                    let unmap = rng.below(2) == 0;
                    self.write_zeroes(dev, offset, len, unmap);
                }
                13..=16 => self.commit(),
                17 => {
                    if self.cur.held {
                        self.release()
                    } else {
                        self.reserve()
                    }
                }
                _ => {}
            }
        }
        self.commit();
    }
}

fn thin_check_available() -> bool {
    tools_available("the thin_check part of the crash test")
}

fn digest(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// Opens a crash image and returns what it holds (after checking it).
fn examine(img: &[u8], data: &Arc<MemStorage>, vblocks: u64, what: &str) -> State {
    let meta = Arc::new(MemStorage::from_vec(img.to_vec()));
    let r = check::check(meta.clone()).unwrap_or_else(|e| panic!("{what}: check: {e}"));
    assert!(r.is_clean(), "{what}: check: {:#?}", r.errors);
    assert!(!r.needs_check, "{what}: needs_check set");
    let pool = Pool::open(meta, data.clone(), PoolOptions::default())
        .unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let st = pool.status();
    assert_eq!(r.data_blocks_used, st.usage.data_used, "{what}: data used");
    let mapped: u64 = pool.devices().iter().map(|(_, d)| d.mapped_blocks).sum();
    assert_eq!(r.mappings, mapped, "{what}: mappings");
    let mut s = State {
        held: st.held_metadata_root.is_some(),
        ..Default::default()
    };
    for (id, _) in pool.devices() {
        let mut buf = vec![0u8; (vblocks * BS) as usize];
        pool.read(id, 0, &mut buf)
            .unwrap_or_else(|e| panic!("{what}: read device {id}: {e}"));
        s.devs.insert(id, buf);
    }
    s
}

/// The image of a crash at `p` in which only the unsynced writes `keep` selects reached
/// the disk, in any order (a disk may reorder writes between flushes).
fn subset_image(rig: &Rig, log: &[Recorded], p: usize, keep: impl Fn(usize) -> bool) -> Vec<u8> {
    let mut img = rig.rec.image_at(p, CrashMode::DropUnsynced);
    let last_sync = log[..p]
        .iter()
        .rposition(|r| matches!(r, Recorded::Sync))
        .map(|i| i + 1)
        .unwrap_or(0);
    for (i, r) in log.iter().enumerate().take(p).skip(last_sync) {
        if let (true, Recorded::Write { offset, data }) = (keep(i), r) {
            let o = *offset as usize;
            img[o..o + data.len()].copy_from_slice(data);
        }
    }
    img
}

fn same(a: &State, b: &State) -> bool {
    a.held == b.held && a.devs == b.devs
}

fn describe(got: &State, want: &State) -> String {
    let mut out = format!(
        "held {} (want {}), devices {:?} (want {:?})",
        got.held,
        want.held,
        got.devs.keys().collect::<Vec<_>>(),
        want.devs.keys().collect::<Vec<_>>()
    );
    for (id, g) in &got.devs {
        if let Some(w) = want.devs.get(id) {
            if let Some(i) = g.iter().zip(w).position(|(a, b)| a != b) {
                out += &format!(
                    "; device {id} differs first at byte {i} (block {})",
                    i as u64 / BS
                );
            }
        }
    }
    out
}

/// Checks every crash point of the rig's log in every mode. Returns (images examined,
/// thin_check runs).
fn verify_crash_points(rig: &Rig) -> (usize, usize) {
    let log = rig.rec.log();
    let sb_total = log.iter().filter(|r| is_sb_write(r)).count();
    assert_eq!(
        sb_total + 1,
        rig.states.len(),
        "superblock writes in the log vs commits the workload saw"
    );
    let tools = thin_check_available();
    let data_log = rig.data.log.lock().unwrap();
    let data = Arc::new(MemStorage::new(rig.data.len()));
    let mut next_data = 0usize;
    let mut prev: Vec<Option<(Vec<u8>, State)>> = vec![None; MODES.len()];
    let mut checked_by_tool: HashSet<u64> = HashSet::new();
    let (mut examined, mut tool_runs) = (0, 0);
    for p in 0..=log.len() {
        // Data: every write issued before metadata operation p.
        let mut data_changed = false;
        while next_data < data_log.len() && data_log[next_data].0 <= p {
            let (_, off, ref bytes) = data_log[next_data];
            data.write_at(bytes, off).unwrap();
            next_data += 1;
            data_changed = true;
        }
        let last_sync = log[..p]
            .iter()
            .rposition(|r| matches!(r, Recorded::Sync))
            .map(|i| i + 1)
            .unwrap_or(0);
        let k_lo = log[..last_sync].iter().filter(|r| is_sb_write(r)).count();
        let k_hi = log[..p].iter().filter(|r| is_sb_write(r)).count();
        assert!(k_hi <= k_lo + 1);
        let boundary = p > 0 && (matches!(log[p - 1], Recorded::Sync) || is_sb_write(&log[p - 1]));
        for (mi, &mode) in MODES.iter().enumerate() {
            let img = rig.rec.image_at(p, mode);
            let what = format!("crash at {p}/{} ({mode:?})", log.len());
            let got = match &prev[mi] {
                // Same metadata image, same data: same outcome.
                Some((pimg, pstate)) if !data_changed && *pimg == img => pstate.clone(),
                _ => {
                    examined += 1;
                    examine(&img, &data, rig.vblocks, &what)
                }
            };
            let ok = if mode == CrashMode::DropUnsynced {
                same(&got, &rig.states[k_lo])
            } else {
                same(&got, &rig.states[k_lo]) || same(&got, &rig.states[k_hi])
            };
            assert!(
                ok,
                "{what}: the image holds neither the state of commit {k_lo} nor of commit \
                 {k_hi}: {}",
                describe(&got, &rig.states[k_lo])
            );
            if tools
                && (p % 10 == 0 || boundary || p == log.len())
                && checked_by_tool.insert(digest(&img))
            {
                run_tool_on(THIN_CHECK, &[], &img, &what);
                tool_runs += 1;
            }
            prev[mi] = Some((img, got));
        }
        // Reordered writes: random subsets of the unsynced ones, and the last one alone.
        let unsynced = p - last_sync;
        if unsynced >= 2 {
            let mut rng = Rng((p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) + 1);
            let masks: Vec<u64> = vec![rng.next(), rng.next()];
            for (si, mask) in masks.into_iter().enumerate() {
                let img = subset_image(rig, &log, p, |i| (mask >> ((i - last_sync) % 64)) & 1 == 1);
                let what = format!("crash at {p}/{} (unsynced subset {si})", log.len());
                examined += 1;
                let got = examine(&img, &data, rig.vblocks, &what);
                assert!(
                    same(&got, &rig.states[k_lo]) || same(&got, &rig.states[k_hi]),
                    "{what}: the image holds neither the state of commit {k_lo} nor of \
                     commit {k_hi}: {}",
                    describe(&got, &rig.states[k_lo])
                );
            }
            let img = subset_image(rig, &log, p, |i| i + 1 == p);
            let what = format!("crash at {p}/{} (only the last unsynced write)", log.len());
            examined += 1;
            let got = examine(&img, &data, rig.vblocks, &what);
            assert!(
                same(&got, &rig.states[k_lo]) || same(&got, &rig.states[k_hi]),
                "{what}: the image holds neither the state of commit {k_lo} nor of commit \
                 {k_hi}: {}",
                describe(&got, &rig.states[k_lo])
            );
        }
    }
    (examined, tool_runs)
}

#[test]
fn every_crash_point_recovers_a_committed_state() {
    let t = std::time::Instant::now();
    let mut rig = Rig::new(
        2 << 20,
        40,
        6,
        PoolOptions {
            cache_blocks: 64,
            ..Default::default()
        },
    );
    // CRASH_SEED and CRASH_STEPS vary the workload for longer local runs.
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    rig.random_workload(
        env("CRASH_SEED", 0xC0FFEE),
        env("CRASH_STEPS", 400) as usize,
    );
    let commits = rig.states.len() - 1;
    let held_states = rig.states.iter().filter(|s| s.held).count();
    let log_len = rig.rec.log_len();
    let (examined, tool_runs) = verify_crash_points(&rig);
    eprintln!(
        "{commits} commits ({held_states} with a held metadata snapshot), {} writes done, {} \
         skipped, log of {log_len} operations, {examined} images examined, {tool_runs} \
         thin_check runs, {:?}",
        rig.writes.0,
        rig.writes.1,
        t.elapsed()
    );
    assert!(commits >= 20 && held_states >= 3 && rig.writes.0 >= 50);
    // Discard passdown was part of it: a punch is logged where a crash would find it.
    let punches = rig.data.punches.load(std::sync::atomic::Ordering::SeqCst);
    assert!(punches >= 5, "{punches} punches");
}

/// One transaction dirties more metadata blocks than the cache holds, so blocks are
/// written back before the commit (into free space the committed superblock cannot
/// reach); crashes during it and during the commits that undo it.
#[test]
fn crash_during_a_transaction_larger_than_the_cache() {
    let mut rig = Rig::new(
        2 << 20,
        40,
        2,
        PoolOptions {
            cache_blocks: 64,
            ..Default::default()
        },
    );
    rig.create_thin(0);
    assert!(rig.write(0, 0, 2 * BS, 1));
    rig.commit();
    let before = rig.rec.log_len();
    for id in 1..=300 {
        if id % 5 == 0 {
            rig.create_snap(id, 0);
        } else {
            rig.create_thin(id);
        }
    }
    assert!(
        rig.rec.log_len() > before + 64,
        "no early write-back happened ({} writes)",
        rig.rec.log_len() - before
    );
    rig.commit();
    assert!(rig.write(3, BS, 100, 2));
    for id in (1..=300).step_by(2) {
        rig.delete(id);
    }
    rig.reserve();
    for id in (2..=300).step_by(4) {
        rig.delete(id);
    }
    rig.commit();
    rig.release();
    let (examined, tool_runs) = verify_crash_points(&rig);
    eprintln!(
        "log of {} operations, {examined} images examined, {tool_runs} thin_check runs",
        rig.rec.log_len()
    );
}
