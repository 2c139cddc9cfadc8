//! Fault injection: EIO on the Nth read, write or flush of the metadata device or of the
//! data device, for N across a whole workload.
//!
//! What the pool promises (the doc comment of `pool.rs`): a metadata failure rolls back to
//! the last commit, sets NEEDS_CHECK and leaves the pool read-only; if the rollback fails
//! too the pool fails. A data read or write error fails only that request; a failed data
//! flush fails the pool. Whatever happens: a typed error, never a panic; and after healing
//! the device and reopening, the metadata checks clean and holds the last commit.
//!
//! The workload is generated once on a fault-free pool (which steers it clear of writes
//! that would go in place into blocks of the last commit: those would make "the state of
//! the last commit" ill-defined for data, see crash.rs) and then replayed for each fault.
//! Set `FAULTS_STRIDE=1` to try every N (the default samples N evenly, the first ones
//! always).

mod common;
use common::{pattern, Rng};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use thinpool::check;
use thinpool::pool::{Pool, PoolMode, PoolOptions};
use thinpool::storage::testing::{FaultOp, FaultyStorage};
use thinpool::storage::MemStorage;
use thinpool::Error;

const BS: u64 = 64 * 1024;
const META_BYTES: u64 = 2 << 20;
const DATA_BLOCKS: u64 = 96;
/// Virtual size of the devices that hold data.
const VBLOCKS: u64 = 4;
/// Devices 100.. hold (almost) nothing: they make the metadata bigger than the cache.
const EMPTY_BASE: u32 = 100;
const EMPTY_DEVICES: u32 = 90;

fn opts() -> PoolOptions {
    // The block manager's minimum: reads really reach the device.
    PoolOptions {
        cache_blocks: 64,
        ..Default::default()
    }
}

#[derive(Clone, Debug)]
enum Op {
    CreateThin(u32),
    CreateSnap(u32, u32),
    Delete(u32),
    Write(u32, u64, u64, u64),
    Discard(u32, u64, u64),
    WriteZeroes(u32, u64, u64, bool),
    /// Reads a whole device and compares it with the model.
    Read(u32),
    /// Reads one sector of every block of every device.
    Scan,
    Commit,
    Abort,
    Reserve,
    Release,
}

impl Op {
    fn commits(&self) -> bool {
        matches!(self, Op::Commit | Op::Reserve | Op::Release)
    }
}

fn vsize(id: u32) -> u64 {
    if id >= EMPTY_BASE {
        BS
    } else {
        VBLOCKS * BS
    }
}

/// Device contents and whether a metadata snapshot is held.
#[derive(Clone, Debug, Default, PartialEq)]
struct State {
    devs: BTreeMap<u32, Vec<u8>>,
    held: bool,
}

#[derive(Clone, Default)]
struct Model {
    cur: State,
    committed: State,
}

impl Model {
    /// The contents `op` gives the range it writes (None: it writes nothing).
    fn written(&self, op: &Op) -> Option<(u32, u64, Vec<u8>)> {
        match *op {
            Op::Write(id, off, len, seed) => Some((id, off, pattern(seed, len as usize))),
            Op::WriteZeroes(id, off, len, _) => Some((id, off, vec![0; len as usize])),
            _ => None,
        }
    }

    fn apply(&mut self, op: &Op) {
        if let Some((id, off, bytes)) = self.written(op) {
            self.cur.devs.get_mut(&id).unwrap()[off as usize..off as usize + bytes.len()]
                .copy_from_slice(&bytes);
            return;
        }
        match *op {
            Op::CreateThin(id) => {
                self.cur.devs.insert(id, vec![0; vsize(id) as usize]);
            }
            Op::CreateSnap(id, origin) => {
                let c = self.cur.devs[&origin].clone();
                self.cur.devs.insert(id, c);
            }
            Op::Delete(id) => {
                self.cur.devs.remove(&id);
            }
            Op::Discard(id, off, len) => {
                let (first, end) = (off.div_ceil(BS), (off + len) / BS);
                if first < end {
                    self.cur.devs.get_mut(&id).unwrap()[(first * BS) as usize..(end * BS) as usize]
                        .fill(0);
                }
            }
            Op::Commit => self.committed = self.cur.clone(),
            Op::Abort => self.cur = self.committed.clone(),
            Op::Reserve => {
                self.cur.held = true;
                self.committed = self.cur.clone();
            }
            Op::Release => {
                self.cur.held = false;
                self.committed = self.cur.clone();
            }
            _ => {}
        }
    }

    /// The committed states a crash or failure during `op` may leave.
    fn committed_candidates(&self, op: &Op) -> Vec<State> {
        let mut v = vec![self.committed.clone()];
        if op.commits() {
            let mut after = self.clone();
            after.apply(op);
            // Reserve first commits what is pending, without the snapshot.
            let mut pending = self.cur.clone();
            pending.held = self.committed.held;
            v.push(pending);
            v.push(after.committed);
        }
        v
    }
}

fn read_state(pool: &Pool, full: bool) -> thinpool::Result<State> {
    let mut s = State {
        held: pool.status().held_metadata_root.is_some(),
        ..Default::default()
    };
    for (id, _) in pool.devices() {
        let mut buf = vec![0u8; vsize(id) as usize];
        if full || id < EMPTY_BASE {
            pool.read(id, 0, &mut buf)?;
        }
        s.devs.insert(id, buf);
    }
    Ok(s)
}

/// Runs one operation; checks reads against the model. `Err` is the pool's error.
fn run_op(pool: &Pool, op: &Op, m: &Model) -> thinpool::Result<()> {
    match *op {
        Op::CreateThin(id) => pool.create_thin(id),
        Op::CreateSnap(id, o) => pool.create_snap(id, o).map(|_| ()),
        Op::Delete(id) => pool.delete(id),
        Op::Write(id, off, len, seed) => pool.write(id, off, &pattern(seed, len as usize)),
        Op::Discard(id, off, len) => pool.discard(id, off, len).map(|_| ()),
        Op::WriteZeroes(id, off, len, unmap) => pool.write_zeroes(id, off, len, unmap),
        Op::Read(id) => {
            let mut buf = vec![0u8; vsize(id) as usize];
            pool.read(id, 0, &mut buf)?;
            assert!(buf == m.cur.devs[&id], "device {id} differs from the model");
            Ok(())
        }
        Op::Scan => {
            let mut buf = [0u8; 512];
            for (id, want) in &m.cur.devs {
                for vb in 0..vsize(*id) / BS {
                    let off = vb * BS + (*id as u64 * 7 % 128) * 512;
                    pool.read(*id, off, &mut buf)?;
                    assert!(
                        buf[..] == want[off as usize..off as usize + 512],
                        "device {id} differs from the model"
                    );
                }
            }
            Ok(())
        }
        Op::Commit => pool.commit(),
        Op::Abort => pool.abort(),
        Op::Reserve => pool.reserve_metadata_snap().map(|_| ()),
        Op::Release => pool.release_metadata_snap(),
    }
}

/// Generates the workload on a fault-free pool.
fn workload(seed: u64) -> Vec<Op> {
    let pool = Pool::create(
        Arc::new(MemStorage::new(META_BYTES)),
        Arc::new(MemStorage::new(DATA_BLOCKS * BS)),
        128,
        opts(),
    )
    .unwrap();
    let mut m = Model::default();
    let mut ops = Vec::new();
    let push = |op: Op, m: &mut Model, ops: &mut Vec<Op>| {
        run_op(&pool, &op, m).unwrap_or_else(|e| panic!("workload op {op:?}: {e}"));
        m.apply(&op);
        ops.push(op);
    };
    for i in 0..EMPTY_DEVICES {
        let id = EMPTY_BASE + i;
        push(Op::CreateThin(id), &mut m, &mut ops);
        if i % 10 == 0 {
            push(
                Op::Write(id, 512 * i as u64, 512, i as u64),
                &mut m,
                &mut ops,
            );
        }
        if i % 30 == 29 {
            push(Op::Commit, &mut m, &mut ops);
        }
    }
    push(Op::Scan, &mut m, &mut ops);
    let mut rng = Rng(seed);
    let mut next_id = 0u32;
    let steer = |pool: &Pool, id: u32, off: u64, len: u64| -> bool {
        // No in-place write into a block of the last commit, no running out of space.
        let (first, end) = (off / BS, (off + len).div_ceil(BS));
        pool.with_metadata(|md| {
            let d = md.device(id).unwrap();
            let u = md.usage();
            let free = u.data_blocks - u.data_used - md.pending_data_frees();
            free >= end - first
                && (first..end).all(|vb| match md.lookup(id, vb).unwrap() {
                    Some(mp) if !mp.maybe_shared(&d) => {
                        !md.tm().data_sm.committed_in_use(mp.data_block)
                    }
                    _ => true,
                })
        })
    };
    while ops.len() < 260 {
        let ids: Vec<u32> = m
            .cur
            .devs
            .keys()
            .copied()
            .filter(|&i| i < EMPTY_BASE)
            .collect();
        let pick = |rng: &mut Rng| ids[rng.below(ids.len() as u64) as usize];
        let range = |rng: &mut Rng| {
            let off = if rng.below(2) == 0 {
                rng.below(VBLOCKS) * BS
            } else {
                rng.below(VBLOCKS * BS)
            };
            let len = match rng.below(3) {
                0 => BS,
                1 => 1 + rng.below(4096),
                _ => 1 + rng.below(2 * BS),
            };
            (off, len.min(VBLOCKS * BS - off))
        };
        let op = match rng.below(24) {
            0..=1 if ids.len() < 5 => {
                next_id += 1;
                Op::CreateThin(next_id - 1)
            }
            2..=3 if !ids.is_empty() && ids.len() < 5 => {
                next_id += 1;
                Op::CreateSnap(next_id - 1, pick(&mut rng))
            }
            4 if ids.len() > 2 => Op::Delete(pick(&mut rng)),
            5..=10 if !ids.is_empty() => {
                let id = pick(&mut rng);
                let (off, len) = range(&mut rng);
                if !steer(&pool, id, off, len) {
                    continue;
                }
                Op::Write(id, off, len, rng.next())
            }
            11 if !ids.is_empty() => {
                let id = pick(&mut rng);
                let (off, len) = range(&mut rng);
                Op::Discard(id, off, len)
            }
            12 if !ids.is_empty() => {
                let id = pick(&mut rng);
                let (off, len) = range(&mut rng);
                if !steer(&pool, id, off, len) {
                    continue;
                }
                Op::WriteZeroes(id, off, len, rng.below(2) == 0)
            }
            13..=14 if !ids.is_empty() => Op::Read(pick(&mut rng)),
            15 => Op::Scan,
            16..=18 => Op::Commit,
            19 => Op::Abort,
            20 => {
                if m.cur.held {
                    Op::Release
                } else {
                    Op::Reserve
                }
            }
            _ => continue,
        };
        push(op, &mut m, &mut ops);
    }
    push(Op::Commit, &mut m, &mut ops);
    ops
}

type Meta = Arc<FaultyStorage<Arc<MemStorage>>>;

struct Rig {
    meta: Meta,
    data: Arc<FaultyStorage<Arc<MemStorage>>>,
    pool: Option<Pool>,
}

impl Rig {
    fn new() -> Rig {
        let meta = Arc::new(FaultyStorage::new(Arc::new(MemStorage::new(META_BYTES))));
        let data = Arc::new(FaultyStorage::new(Arc::new(MemStorage::new(
            DATA_BLOCKS * BS,
        ))));
        let pool = Pool::create(meta.clone(), data.clone(), 128, opts()).unwrap();
        Rig {
            meta,
            data,
            pool: Some(pool),
        }
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().unwrap()
    }

    fn reopen(&mut self) -> thinpool::Result<()> {
        self.pool = None;
        self.pool = Some(Pool::open(self.meta.clone(), self.data.clone(), opts())?);
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Device {
    Metadata,
    Data,
}

/// How many operations of kind `op` the whole workload issues on `dev`.
fn count_ops(ops: &[Op], dev: Device, op: FaultOp) -> u64 {
    let rig = Rig::new();
    let s = match dev {
        Device::Metadata => rig.meta.count(op),
        Device::Data => rig.data.count(op),
    };
    let mut m = Model::default();
    for o in ops {
        run_op(rig.pool(), o, &m).unwrap();
        m.apply(o);
    }
    match dev {
        Device::Metadata => rig.meta.count(op) - s,
        Device::Data => rig.data.count(op) - s,
    }
}

fn stride(total: u64, runs: u64) -> u64 {
    std::env::var("FAULTS_STRIDE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| total.div_ceil(runs).max(1))
}

/// The values of N to try: every one up to 20, then every `stride`th, and the last.
fn ns(total: u64, runs: u64) -> Vec<u64> {
    let st = stride(total, runs);
    let mut v: Vec<u64> = (1..=total.min(20)).collect();
    v.extend((21..=total).step_by(st as usize));
    v.push(total);
    v.push(total + 1);
    v.dedup();
    v
}

/// After a failed write: which blocks of the range took the new data. They must form a
/// prefix (the pool writes block by block in ascending order) and the rest must be as
/// before. Updates the model.
fn settle_partial_write(pool: &Pool, m: &mut Model, op: &Op, ctx: &str) {
    let Some((id, off, bytes)) = m.written(op) else {
        return;
    };
    let (first, end) = (off / BS, (off + bytes.len() as u64).div_ceil(BS));
    let mut after = m.cur.devs[&id].clone();
    after[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
    let before = m.cur.devs[&id].clone();
    let mut buf = vec![0u8; BS as usize];
    let mut old_seen = false;
    for vb in first..end {
        pool.read(id, vb * BS, &mut buf)
            .unwrap_or_else(|e| panic!("{ctx}: read after a failed write: {e}"));
        let r = (vb * BS) as usize..((vb + 1) * BS) as usize;
        let is_new = buf[..] == after[r.clone()];
        let is_old = buf[..] == before[r.clone()];
        assert!(
            is_new || is_old,
            "{ctx}: block {vb} of device {id} is neither as before nor as written"
        );
        if !is_new {
            old_seen = true;
        }
        assert!(
            !(is_new && !is_old && old_seen),
            "{ctx}: block {vb} of device {id} took a failed write's data after an earlier \
             block did not"
        );
        m.cur.devs.get_mut(&id).unwrap()[r].copy_from_slice(&buf);
    }
}

fn describe(got: &State, candidates: &[State]) -> String {
    let mut out = format!(
        "it shows held={} devices {:?}",
        got.held,
        got.devs.keys().collect::<Vec<_>>()
    );
    for (k, c) in candidates.iter().enumerate() {
        out += &format!(
            "; candidate {k}: held={} devices {:?}",
            c.held,
            c.devs.keys().collect::<Vec<_>>()
        );
        for (id, g) in &got.devs {
            if let Some(w) = c.devs.get(id) {
                if let Some(i) = g.iter().zip(w).position(|(a, b)| a != b) {
                    out += &format!(" device {id} differs at byte {i};");
                }
            }
        }
    }
    out
}

/// Heals the devices, reopens the pool, checks the metadata and returns the pool's state.
/// `needs_check`: what the flag on disk must be (None: either).
fn reopen_and_check(rig: &mut Rig, ctx: &str, needs_check: Option<bool>) -> State {
    rig.meta.heal();
    rig.data.heal();
    rig.reopen()
        .unwrap_or_else(|e| panic!("{ctx}: reopen after healing: {e}"));
    let r = check::check(rig.meta.clone()).expect("check");
    assert!(
        r.is_clean(),
        "{ctx}: check after reopening: {:#?}",
        r.errors
    );
    if let Some(nc) = needs_check {
        assert_eq!(r.needs_check, nc, "{ctx}: needs_check on disk");
    }
    let st = rig.pool().status();
    assert_eq!(
        st.mode,
        if r.needs_check {
            PoolMode::ReadOnly
        } else {
            PoolMode::Write
        },
        "{ctx}: mode after reopening"
    );
    assert_eq!(r.data_blocks_used, st.usage.data_used, "{ctx}: data used");
    read_state(rig.pool(), true).unwrap_or_else(|e| panic!("{ctx}: read after reopening: {e}"))
}

/// After recovery (clearing NEEDS_CHECK once the check passed) the pool works again:
/// provisioning, snapshots, commit, and a clean check.
fn back_to_work(rig: &Rig, ctx: &str) {
    let p = rig.pool();
    if p.status().needs_check {
        p.clear_needs_check()
            .unwrap_or_else(|e| panic!("{ctx}: clear_needs_check: {e}"));
    }
    assert_eq!(
        p.status().mode,
        PoolMode::Write,
        "{ctx}: mode after recovery"
    );
    let id = 5000;
    p.create_thin(id).unwrap();
    p.write(id, 100, &[0x5A; 3 * BS as usize]).unwrap();
    p.create_snap(id + 1, id).unwrap();
    p.write(id, 0, &[0xA5; 512]).unwrap();
    p.commit()
        .unwrap_or_else(|e| panic!("{ctx}: commit after recovery: {e}"));
    let r = check::check(rig.meta.clone()).expect("check");
    assert!(r.is_clean(), "{ctx}: check after recovery: {:#?}", r.errors);
    let mut b = vec![0u8; 612];
    p.read(id + 1, 0, &mut b).unwrap();
    assert!(b[..100].iter().all(|&x| x == 0) && b[100..].iter().all(|&x| x == 0x5A));
}

/// One run: the `n`th `op` of `dev` fails (every later one too when `sticky`).
/// Returns whether the fault fired.
fn fault_run(ops: &[Op], dev: Device, fop: FaultOp, n: u64, sticky: bool) -> bool {
    let ctx = format!(
        "{dev:?} {fop:?} #{n}{}",
        if sticky { " (sticky)" } else { "" }
    );
    let mut rig = Rig::new();
    let faulty = match dev {
        Device::Metadata => rig.meta.clone(),
        Device::Data => rig.data.clone(),
    };
    let armed = faulty.count(fop);
    faulty.fail_nth(fop, n, sticky);
    let fired = |f: &Meta| f.count(fop) >= armed + n;
    let mut m = Model::default();
    let mut failed: Option<(usize, Error)> = None;
    for (i, op) in ops.iter().enumerate() {
        let before = fired(&faulty);
        let r = catch_unwind(AssertUnwindSafe(|| run_op(rig.pool(), op, &m)))
            .unwrap_or_else(|_| panic!("{ctx}: op {i} {op:?} panicked"));
        let fired_now = !before && fired(&faulty);
        match r {
            Ok(()) => {
                assert!(
                    !fired_now,
                    "{ctx}: op {i} {op:?} succeeded although the fault fired during it"
                );
                m.apply(op);
            }
            Err(e) => {
                assert!(
                    fired_now,
                    "{ctx}: op {i} {op:?} failed, but not because of the fault: {e}"
                );
                if dev == Device::Data && fop != FaultOp::Sync {
                    // Only this request fails; the pool goes on.
                    assert!(
                        matches!(e, Error::DataIo { .. }),
                        "{ctx}: op {i} {op:?}: {e}"
                    );
                    let st = rig.pool().status();
                    assert_eq!(st.mode, PoolMode::Write, "{ctx}: mode after {e}");
                    assert!(!st.needs_check, "{ctx}: needs_check after {e}");
                    settle_partial_write(rig.pool(), &mut m, op, &ctx);
                    continue;
                }
                failed = Some((i, e));
                break;
            }
        }
    }
    let Some((i, e)) = failed else {
        if !fired(&faulty) {
            return false;
        }
        // A data read or write fault that only failed its request: the rest went on.
        let ctx = format!("{ctx} (after the workload)");
        assert_eq!(m.cur, m.committed, "{ctx}: the workload ends with a commit");
        let got = read_state(rig.pool(), true).unwrap();
        assert!(got == m.cur, "{ctx}: contents differ from the model");
        let got = reopen_and_check(&mut rig, &ctx, Some(false));
        assert!(got == m.committed, "{ctx}: contents differ after reopening");
        back_to_work(&rig, &ctx);
        return true;
    };
    let op = &ops[i];
    let ctx = format!("{ctx}: op {i} {op:?} failed with \"{e}\"");
    let candidates = m.committed_candidates(op);
    let st = rig.pool().status();
    // The state the pool itself shows after the failure, if it can still be read.
    let mut shown: Option<State> = None;
    let expect_needs_check;
    match dev {
        Device::Data => {
            assert_eq!(fop, FaultOp::Sync);
            assert!(matches!(e, Error::DataIo { .. }), "{ctx}: error type");
            assert_eq!(
                st.mode,
                PoolMode::Fail,
                "{ctx}: a failed data flush fails the pool"
            );
            expect_needs_check = Some(false);
        }
        Device::Metadata => {
            assert!(matches!(e, Error::MetadataIo { .. }), "{ctx}: error type");
            let rollback_fails = matches!(op, Op::Abort) || (sticky && fop == FaultOp::Read);
            if rollback_fails {
                assert_eq!(st.mode, PoolMode::Fail, "{ctx}: mode");
                expect_needs_check = Some(false);
            } else {
                assert_eq!(st.mode, PoolMode::ReadOnly, "{ctx}: mode");
                assert!(st.needs_check, "{ctx}: needs_check in core");
                // Committed data stays readable; changes are refused.
                let s = read_state(rig.pool(), true)
                    .unwrap_or_else(|e| panic!("{ctx}: read after the rollback: {e}"));
                assert!(
                    candidates.contains(&s),
                    "{ctx}: after the rollback the pool does not show the last commit: {}",
                    describe(&s, &candidates)
                );
                shown = Some(s);
                let r = rig.pool().create_thin(9999);
                assert!(
                    matches!(r, Err(Error::NeedsCheck)),
                    "{ctx}: create_thin in read-only mode: {r:?}"
                );
                // The flag reaches the disk unless writes are dead; if flushes are, it
                // may or may not have.
                expect_needs_check = match (sticky, fop) {
                    (true, FaultOp::Write) => Some(false),
                    (true, FaultOp::Sync) => None,
                    _ => Some(true),
                };
            }
        }
    }
    if st.mode == PoolMode::Fail {
        let mut b = [0u8; 16];
        let r = rig.pool().read(0, 0, &mut b);
        assert!(
            matches!(r, Err(Error::Failed(_))),
            "{ctx}: read in fail mode: {r:?}"
        );
        let r = rig.pool().commit();
        assert!(
            matches!(r, Err(Error::Failed(_))) || !st.uncommitted_changes,
            "{ctx}: commit in fail mode: {r:?}"
        );
    }
    let got = reopen_and_check(&mut rig, &ctx, expect_needs_check);
    back_to_work(&rig, &ctx);
    match shown {
        Some(s) => assert!(
            got.devs.len() == s.devs.len() && got == s,
            "{ctx}: after reopening the pool differs from what it showed after the rollback"
        ),
        None => assert!(
            candidates.contains(&got),
            "{ctx}: after reopening the pool does not hold the last commit"
        ),
    }
    true
}

fn sweep(dev: Device, fop: FaultOp, sticky: bool, runs: u64) {
    let t = std::time::Instant::now();
    let ops = workload(0x5EED);
    let total = count_ops(&ops, dev, fop);
    assert!(total > 0);
    let mut fired = 0;
    for n in ns(total, runs) {
        if fault_run(&ops, dev, fop, n, sticky) {
            fired += 1;
        } else {
            assert!(n > total, "{dev:?} {fop:?} #{n} of {total} never fired");
        }
    }
    eprintln!(
        "{dev:?} {fop:?}{}: {total} in the workload, {fired} faults injected, {:?}",
        if sticky { " sticky" } else { "" },
        t.elapsed()
    );
}

#[test]
fn metadata_read_errors() {
    sweep(Device::Metadata, FaultOp::Read, false, 60);
    sweep(Device::Metadata, FaultOp::Read, true, 20);
}

#[test]
fn metadata_write_errors() {
    sweep(Device::Metadata, FaultOp::Write, false, 60);
    sweep(Device::Metadata, FaultOp::Write, true, 20);
}

#[test]
fn metadata_sync_errors() {
    sweep(Device::Metadata, FaultOp::Sync, false, 60);
    sweep(Device::Metadata, FaultOp::Sync, true, 20);
}

#[test]
fn data_read_errors() {
    sweep(Device::Data, FaultOp::Read, false, 60);
}

#[test]
fn data_write_errors() {
    sweep(Device::Data, FaultOp::Write, false, 60);
}

#[test]
fn data_sync_errors() {
    sweep(Device::Data, FaultOp::Sync, false, 60);
    sweep(Device::Data, FaultOp::Sync, true, 20);
}

/// The workload really goes through the metadata cache to the device.
#[test]
fn workload_reads_metadata_from_the_device() {
    let ops = workload(0x5EED);
    let rig = Rig::new();
    let mut m = Model::default();
    let before = rig.meta.count(FaultOp::Read);
    let mut reads_after_open = 0;
    for o in &ops {
        let r0 = rig.meta.count(FaultOp::Read);
        run_op(rig.pool(), o, &m).unwrap();
        if !matches!(o, Op::Abort) {
            reads_after_open += rig.meta.count(FaultOp::Read) - r0;
        }
        m.apply(o);
    }
    let total = rig.meta.count(FaultOp::Read) - before;
    eprintln!("{total} metadata reads, {reads_after_open} outside aborts");
    assert!(reads_after_open > 50, "the cache absorbs every read");
}

// ----- regressions -----

/// A failed data flush in reserve/release of the metadata snapshot must fail the pool like
/// one in commit: after a failed flush the page cache may have dropped the data, so a
/// later commit whose flush happens to succeed would publish mappings to lost data.
#[test]
fn data_flush_failure_in_metadata_snapshot_ops_fails_the_pool() {
    for release in [false, true] {
        let rig = Rig::new();
        let p = rig.pool();
        p.create_thin(0).unwrap();
        if release {
            p.reserve_metadata_snap().unwrap();
        }
        p.write(0, 0, &[7u8; 4096]).unwrap();
        rig.data.fail_nth(FaultOp::Sync, 1, false);
        let r = if release {
            p.release_metadata_snap()
        } else {
            p.reserve_metadata_snap().map(|_| ())
        };
        assert!(matches!(r, Err(Error::DataIo { .. })), "{r:?}");
        assert_eq!(p.status().mode, PoolMode::Fail, "release={release}");
        assert!(matches!(p.commit(), Err(Error::Failed(_))));
    }
}

/// A write whose mapping cannot be inserted for want of metadata space must give its
/// data block back: neither the pool nor its committed metadata may keep it allocated.
#[test]
fn out_of_metadata_space_on_write_leaks_no_data_block() {
    let rig = Rig::new();
    let p = rig.pool();
    p.create_thin(0).unwrap();
    p.write(0, 0, &[1u8; 512]).unwrap();
    let mut id = 1;
    loop {
        match p.create_thin(id) {
            Ok(()) => id += 1,
            Err(Error::OutOfMetadataSpace { .. }) => break,
            Err(e) => panic!("create_thin {id}: {e}"),
        }
        if id % 50 == 0 {
            p.commit().unwrap();
        }
    }
    p.commit().unwrap();
    let used = p.status().usage.data_used;
    let r = p.write(0, BS, &[2u8; 512]);
    assert!(matches!(r, Err(Error::OutOfMetadataSpace { .. })), "{r:?}");
    assert_eq!(
        p.status().usage.data_used,
        used,
        "data block kept by a failed write"
    );
    p.commit().unwrap();
    let r = check::check(rig.meta.clone()).unwrap();
    assert!(r.is_clean(), "{:#?}", r.errors);
    assert_eq!(r.data_blocks_used, used);
}

/// A metadata write error during a commit while writers are busy: every request fails
/// with a typed error or succeeds, nothing panics, the pool ends read-only with
/// NEEDS_CHECK, and after healing and reopening the metadata checks clean and every
/// device holds only its own data.
#[test]
fn metadata_failure_under_concurrent_writers() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const SLOT: usize = 4096;
    let slot = |dev: u32, s: u64, v: u64| -> Vec<u8> {
        let mut rec = [0u8; 16];
        rec[..8].copy_from_slice(&(((dev as u64) << 32) | s).to_le_bytes());
        rec[8..].copy_from_slice(&v.to_le_bytes());
        rec.iter().copied().cycle().take(SLOT).collect()
    };
    for round in 0..6u64 {
        let mut rig = Rig::new();
        let pool = Arc::new(rig.pool.take().unwrap());
        for d in 0..3 {
            pool.create_thin(d).unwrap();
            pool.write(d, 0, &slot(d, 0, 1)).unwrap();
        }
        pool.commit().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..3u32)
            .map(|dev| {
                let (pool, stop) = (pool.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng(round * 100 + dev as u64 + 1);
                    let mut v = 1;
                    while !stop.load(Ordering::SeqCst) {
                        v += 1;
                        if rng.below(8) == 0 {
                            match pool.discard(dev, rng.below(VBLOCKS) * BS, BS) {
                                Ok(_)
                                | Err(Error::NeedsCheck)
                                | Err(Error::ReadOnly(_))
                                | Err(Error::MetadataIo { .. }) => {}
                                Err(e) => panic!("discard: {e}"),
                            }
                        }
                        let s = rng.below(VBLOCKS * BS / SLOT as u64);
                        match pool.write(dev, s * SLOT as u64, &slot(dev, s, v)) {
                            Ok(())
                            | Err(Error::NeedsCheck)
                            | Err(Error::ReadOnly(_))
                            | Err(Error::MetadataIo { .. }) => {}
                            Err(e) => panic!("write: {e}"),
                        }
                        let mut b = vec![0u8; SLOT];
                        match pool.read(dev, s * SLOT as u64, &mut b) {
                            Ok(()) | Err(Error::MetadataIo { .. }) => {}
                            Err(e) => panic!("read: {e}"),
                        }
                    }
                })
            })
            .collect();
        for i in 0.. {
            if i == 3 {
                rig.meta.fail_nth(FaultOp::Write, 1 + round, false);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            match pool.commit() {
                Ok(()) => {}
                Err(Error::MetadataIo { .. }) | Err(Error::NeedsCheck) => break,
                Err(e) => panic!("commit: {e}"),
            }
            assert!(i < 10_000, "the fault never fired");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().expect("a writer panicked");
        }
        let st = pool.status();
        assert_eq!(st.mode, PoolMode::ReadOnly);
        assert!(st.needs_check);
        drop(pool);
        let got = reopen_and_check(&mut rig, &format!("round {round}"), Some(true));
        for (dev, bytes) in &got.devs {
            for (s, b) in bytes.chunks(SLOT).enumerate() {
                let v = u64::from_le_bytes(b[8..16].try_into().unwrap());
                assert!(
                    b.iter().all(|&x| x == 0) || b == &slot(*dev, s as u64, v)[..],
                    "round {round}: device {dev} slot {s} holds foreign or torn data"
                );
            }
        }
        back_to_work(&rig, &format!("round {round}"));
    }
}
