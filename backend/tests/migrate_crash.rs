//! A crash in the middle of `disk-migrate`: the daemon (two pools, disk `vm` with three
//! snapshots, a guest writing and flushing) is killed with SIGKILL at a random moment after
//! a migration to the other pool started, before, during or after the switch. After each
//! kill both pools must check clean (ours and `thin_check`); after a restart the disk and
//! its snapshots must be in exactly one pool (the old one or the new one, never parts of
//! both), no copy or helper of the migration may be left, every write the guest saw flushed
//! must read back, and the snapshots' bytes must be those they had when they were taken.
//!
//! The seed is printed; `VHOST_THIN_MIGRATE_CRASH_SEED=N` replays a run's choices (delays,
//! the guest's writes; where exactly the kill lands still depends on timing), and
//! `VHOST_THIN_MIGRATE_CRASH_ROUNDS` changes its length.

mod common;
use common::two_pools::{self, TwoPools};
use common::{bin, cli, export, thin_check_ok, Guest, Rng, D};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};

const DISK_MIB: u64 = 16;
/// The guest writes 4 KiB slots over the first 4 MiB.
const SLOTS: u64 = 1024;
const SNAPSHOTS: [&str; 3] = ["s0", "s1", "s2"];

// The daemon (common::two_pools) creates `vm` in pool `a` the first time and serves it
// from wherever it is afterwards.

fn other(pool: &str) -> &'static str {
    if pool == "a" {
        "b"
    } else {
        "a"
    }
}

/// The slot write number `seq` goes to: fixed, so that a slot's content names its write.
fn slot_of(seq: u64) -> u64 {
    seq.wrapping_mul(7919) % SLOTS
}

/// Write `seq`'s bytes: its number and slot in the clear, then a pattern of both, so that
/// what a slot holds says which write it is and that it is whole.
fn slot_data(seq: u64, slot: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[0..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&(slot | 0x5a5a << 48).to_le_bytes());
    for (i, c) in b[16..].chunks_mut(8).enumerate() {
        c.copy_from_slice(&(seq.wrapping_mul(0x9e37_79b9) ^ slot << 40 ^ i as u64).to_le_bytes());
    }
    b
}

/// What the guest has written over the whole run.
#[derive(Clone)]
struct Writes {
    /// Per slot, the last write acknowledged before an acknowledged FLUSH.
    durable: Vec<Option<u64>>,
    /// Writes numbered below this were submitted (some perhaps never acknowledged).
    next_seq: u64,
}

/// Writes slots in order of `seq`, with a FLUSH every few writes, until `stop`; never waits
/// for a reply past `stop` (the daemon may be dead). Every reply must be a success.
fn guest_writes(
    sock: PathBuf,
    mut w: Writes,
    seed: u64,
    stop: Arc<AtomicBool>,
    connected: mpsc::Sender<()>,
) -> Writes {
    let mut g = Guest::connect(&sock, 1);
    let _ = connected.send(());
    let mut rng = Rng(seed);
    let wait = |g: &Guest, seq: u16| g.wait_used_or_stop(0, seq, &stop);
    let (wb, fb) = (Guest::buf(1), Guest::buf(2));
    // Acknowledged since the last acknowledged FLUSH: durable once the next one is.
    let mut unflushed: Vec<(u64, u64)> = Vec::new();
    loop {
        let n = 1 + rng.below(8);
        for _ in 0..n {
            let seq = w.next_seq;
            let slot = slot_of(seq);
            g.header(wb, VIRTIO_BLK_T_OUT, slot * 8);
            g.mem
                .write_slice(&slot_data(seq, slot), GuestAddress(wb + 0x1000))
                .unwrap();
            g.mem
                .write_obj(0xffu8, GuestAddress(wb + 0x10_0800))
                .unwrap();
            w.next_seq += 1;
            let q = g.submit(
                0,
                &[
                    D(wb, 16, false),
                    D(wb + 0x1000, 4096, false),
                    D(wb + 0x10_0800, 1, true),
                ],
            );
            if !wait(&g, q) {
                return w;
            }
            assert_eq!(g.status(wb + 0x10_0800), 0, "write {seq} failed");
            unflushed.push((slot, seq));
        }
        g.header(fb, VIRTIO_BLK_T_FLUSH, 0);
        g.mem.write_obj(0xffu8, GuestAddress(fb + 0x800)).unwrap();
        let q = g.submit(0, &[D(fb, 16, false), D(fb + 0x800, 1, true)]);
        if !wait(&g, q) {
            return w;
        }
        assert_eq!(g.status(fb + 0x800), 0, "a FLUSH failed");
        for (slot, seq) in unflushed.drain(..) {
            w.durable[slot as usize] = Some(seq);
        }
    }
}

/// Reads every slot through a fresh connection: each holds its durable write or a later
/// write to it (one acknowledged but not flushed may have survived too), whole; a slot
/// with no durable write may also still be zeroes.
fn verify_writes(sock: &Path, w: &Writes, round: usize, seed: u64) {
    let mut g = Guest::connect(sock, 1);
    const CHUNK: u64 = 128; // slots per read: 512 KiB
    for first in (0..SLOTS).step_by(CHUNK as usize) {
        let (st, data) = g.read(0, first * 8, (CHUNK * 4096) as u32);
        assert_eq!(st, 0, "round {round} (seed {seed}): read failed");
        for (i, got) in data.chunks(4096).enumerate() {
            let slot = first + i as u64;
            let seq = u64::from_le_bytes(got[0..8].try_into().unwrap());
            let zero = got.iter().all(|&b| b == 0);
            let ok = match w.durable[slot as usize] {
                None if zero => true,
                d => {
                    seq < w.next_seq
                        && slot_of(seq) == slot
                        && d.is_none_or(|d| seq >= d)
                        && got == slot_data(seq, slot)
                }
            };
            assert!(
                ok,
                "round {round} (seed {seed}): slot {slot} holds {} but its last durable write is {:?}",
                if zero { "zeroes".to_string() } else { format!("write {seq} (or garbage)") },
                w.durable[slot as usize]
            );
        }
    }
    g.stop();
}

fn listed(c: &mut vhost_thin::ctl::Client, q: &str) -> Vec<Value> {
    c.execute(q, json!({})).unwrap().as_array().unwrap().clone()
}

/// After a restart: `vm` once, with every snapshot, all in one pool, nothing else in either
/// pool. Returns that pool and the snapshots' thin ids.
fn check_layout(
    c: &mut vhost_thin::ctl::Client,
    round: usize,
    seed: u64,
) -> (String, BTreeMap<String, u64>) {
    let ctx = format!("round {round} (seed {seed})");
    let disks = listed(c, "query-disks");
    let snaps = listed(c, "query-snapshots");
    assert_eq!(disks.len(), 1, "{ctx}: disks {disks:?}");
    assert_eq!(disks[0]["name"], "vm", "{ctx}: disks {disks:?}");
    let pool = disks[0]["pool"].as_str().unwrap().to_string();
    let mut names: Vec<&str> = snaps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, SNAPSHOTS, "{ctx}: snapshots {snaps:?}");
    let mut ids = BTreeMap::new();
    for s in &snaps {
        assert_eq!(
            s["pool"],
            pool.as_str(),
            "{ctx}: {s} not with vm in pool {pool}"
        );
        assert_eq!(s["origin"], "vm", "{ctx}: {s}");
        ids.insert(
            s["name"].as_str().unwrap().to_string(),
            s["thin-id"].as_u64().unwrap(),
        );
    }
    for p in listed(c, "query-pools") {
        let want = if p["name"] == pool.as_str() {
            1 + SNAPSHOTS.len()
        } else {
            0
        };
        assert_eq!(p["devices"], want, "{ctx}: leftover devices: {p}");
    }
    (pool, ids)
}

/// Offline, after a kill: both pools check clean.
fn check_pools(d: &TwoPools, round: usize, seed: u64) {
    for p in ["a", "b"] {
        let (m, data) = d.pool_files(p);
        let out = cli(&["pool", "check", "-m", &m, "-d", &data]);
        assert!(
            out.contains("clean"),
            "round {round} (seed {seed}): pool {p}: pool check: {out}"
        );
        thin_check_ok(&m);
    }
}

/// Offline, after a clean stop: the pools hold `vm` and its snapshots in `pool` and nothing
/// else anywhere (every device named, none left by the migration), and each snapshot reads
/// as it did when it was taken.
fn check_offline(
    d: &TwoPools,
    pool: &str,
    snaps: &BTreeMap<String, Vec<u8>>,
    round: usize,
    seed: u64,
) {
    for p in ["a", "b"] {
        let (m, data) = d.pool_files(p);
        let out = Command::new(bin())
            .args(["thin", "ls", "-m", &m, "-d", &data, "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "round {round}: thin ls failed");
        let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut names: Vec<String> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap_or("(unnamed)").to_string())
            .collect();
        names.sort();
        let want: Vec<String> = if p == pool {
            SNAPSHOTS
                .iter()
                .map(|s| s.to_string())
                .chain(["vm".into()])
                .collect()
        } else {
            Vec::new()
        };
        assert_eq!(names, want, "round {round} (seed {seed}): pool {p}: {rows}");
        if p != pool {
            continue;
        }
        for r in rows.as_array().unwrap() {
            let name = r["name"].as_str().unwrap();
            if let Some(want) = snaps.get(name) {
                let got = export(&m, &data, &r["id"].to_string(), None);
                assert!(
                    &got == want,
                    "round {round} (seed {seed}): snapshot {name} changed (pool {p})"
                );
            }
        }
    }
}

fn wait_job(c: &mut vhost_thin::ctl::Client, id: &str) -> Value {
    two_pools::wait_job(c, id, Duration::from_secs(120))
}

/// Runs the guest and a migration of `vm` to `to`; kills the daemon `kill_after` after the
/// migration started, or (None) waits for the migration to end. Returns the guest's writes
/// how long the migration took (when waited for), and whether the job had concluded by the
/// kill.
fn migrate_under_writes(
    d: &mut TwoPools,
    w: Writes,
    seed: u64,
    to: &str,
    job: &str,
    kill_after: Option<Duration>,
) -> (Writes, Duration, bool) {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let guest = {
        let (sock, stop) = (d.path("vm.sock"), stop.clone());
        thread::spawn(move || guest_writes(sock, w, seed, stop, tx))
    };
    rx.recv().expect("the guest connects");
    // Some writes before the migration, so that the copy has something to move.
    thread::sleep(Duration::from_millis(50));
    let mut c = d.client();
    let t0 = Instant::now();
    c.execute(
        "disk-migrate",
        json!({"disk": "vm", "pool": to, "job-id": job}),
    )
    .unwrap();
    let mut ended = false;
    let took = match kill_after {
        Some(delay) => {
            thread::sleep(delay);
            // For the summary only: a kill after the job concluded tests the restart of a
            // finished migration, not recovery.
            let jobs = c.execute("query-jobs", json!({})).unwrap();
            ended = jobs
                .as_array()
                .unwrap()
                .iter()
                .any(|j| j["id"] == job && j["status"] == "concluded");
            d.kill();
            t0.elapsed()
        }
        None => {
            let j = wait_job(&mut c, job);
            let took = t0.elapsed();
            assert!(j.get("error").is_none(), "{j}");
            // Writes into the new pool too, then a clean stop.
            thread::sleep(Duration::from_millis(50));
            took
        }
    };
    stop.store(true, Ordering::SeqCst);
    let w = guest.join().unwrap();
    (w, took, ended)
}

#[test]
fn sigkill_during_disk_migrate_leaves_the_disk_whole_in_one_pool() {
    let seed = std::env::var("VHOST_THIN_MIGRATE_CRASH_SEED")
        .ok()
        .map(|s| {
            s.parse()
                .expect("VHOST_THIN_MIGRATE_CRASH_SEED is a number")
        })
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let rounds: usize = std::env::var("VHOST_THIN_MIGRATE_CRASH_ROUNDS")
        .ok()
        .map(|s| {
            s.parse()
                .expect("VHOST_THIN_MIGRATE_CRASH_ROUNDS is a number")
        })
        .unwrap_or(40);
    println!("migrate crash: seed {seed} (VHOST_THIN_MIGRATE_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let mut d = TwoPools::new(DISK_MIB, 1);
    d.spawn();

    // History: three snapshots, with writes between them (through the same slots the
    // guest uses later, so that the guest's writes break sharing with them).
    let mut w = Writes {
        durable: vec![None; SLOTS as usize],
        next_seq: 0,
    };
    {
        let mut c = d.client();
        let mut g = Guest::connect(&d.path("vm.sock"), 1);
        for s in SNAPSHOTS {
            for _ in 0..64 {
                let (seq, slot) = (w.next_seq, slot_of(w.next_seq));
                assert_eq!(g.write(0, slot * 8, &slot_data(seq, slot), 1), 0);
                w.next_seq += 1;
                w.durable[slot as usize] = Some(seq);
            }
            assert_eq!(g.simple(0, VIRTIO_BLK_T_FLUSH), 0);
            c.execute("snapshot-create", json!({"disk": "vm", "name": s}))
                .unwrap();
        }
        g.stop();
    }
    d.stop();
    let mut snaps = BTreeMap::new();
    {
        let (m, data) = d.pool_files("a");
        let rows: Value =
            serde_json::from_str(&cli(&["thin", "ls", "-m", &m, "-d", &data, "--json"])).unwrap();
        for r in rows.as_array().unwrap() {
            let name = r["name"].as_str().unwrap();
            if SNAPSHOTS.contains(&name) {
                snaps.insert(
                    name.to_string(),
                    export(&m, &data, &r["id"].to_string(), None),
                );
            }
        }
    }
    assert_eq!(snaps.len(), SNAPSHOTS.len());

    // A migration that is not interrupted, timed: the kills spread over 0 to 1.5 times it.
    d.spawn();
    let (w2, took, _) = migrate_under_writes(&mut d, w, rng.next(), "b", "m0", None);
    w = w2;
    d.stop();
    check_pools(&d, 0, seed);
    check_offline(&d, "b", &snaps, 0, seed);
    println!("migrate crash: an uninterrupted migration took {took:?}");
    let span = (took.as_micros() as u64 * 3 / 2).max(1);

    let mut pool = "b".to_string();
    let (mut stayed, mut moved, mut finished) = (0, 0, 0);
    for round in 1..=rounds {
        d.spawn();
        let delay = Duration::from_micros(rng.below(span));
        let to = other(&pool);
        let (w2, _, ended) =
            migrate_under_writes(&mut d, w, rng.next(), to, &format!("m{round}"), Some(delay));
        w = w2;
        check_pools(&d, round, seed);

        // The restart finishes or undoes the migration before serving vm.
        d.spawn();
        let mut c = d.client();
        let (now, _) = check_layout(&mut c, round, seed);
        verify_writes(&d.path("vm.sock"), &w, round, seed);
        drop(c);
        d.stop();
        check_offline(&d, &now, &snaps, round, seed);
        let what = if now == pool {
            stayed += 1;
            "stayed in"
        } else {
            assert_eq!(now, to);
            moved += 1;
            finished += ended as usize;
            "moved to"
        };
        assert!(
            !ended || now == to,
            "round {round} (seed {seed}): the migration had concluded, yet vm is in pool {now}"
        );
        println!(
            "round {round}: killed {delay:?} after disk-migrate to pool {to} began{}; vm {what} pool {now}; {} writes so far",
            if ended { " (the job had concluded)" } else { "" },
            w.next_seq
        );
        pool = now;
    }
    println!(
        "migrate crash summary: seed {seed}, {rounds} rounds (kills over 0..{:?}): {stayed} before the switch (disk stayed), {moved} after (disk moved; in {finished} of them the job had concluded)",
        Duration::from_micros(span)
    );
}
