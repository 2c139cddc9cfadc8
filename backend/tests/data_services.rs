//! Data services on the management socket, against a daemon serving two pools (64 KiB and
//! 256 KiB blocks) with the test frontend as the guest: send and receive as jobs (to a file,
//! into a command, into the other pool), cancelling them, and moving a disk that is being
//! written to the other pool. Figures are printed, not asserted.

mod common;
use common::two_pools::{self, TwoPools};
use common::{bin, cli, export, pattern, thin_check_ok, wait_for, Guest};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DISK_MIB: u64 = 32;

/// The two-pool daemon, started, with `vm` on 2 queues.
fn start() -> TwoPools {
    let mut d = TwoPools::new(DISK_MIB, 2);
    d.spawn();
    d
}

/// Waits for job `id` to conclude; its query-jobs entry.
fn wait_job(c: &mut vhost_thin::ctl::Client, id: &str) -> Value {
    two_pools::wait_job(c, id, Duration::from_secs(300))
}

/// Sends snapshot `snap` to a new stream file, and waits for the job, which must succeed.
fn send_to_file(c: &mut vhost_thin::ctl::Client, snap: &str, file: &Path) {
    let r = c
        .execute("snapshot-send", json!({"snapshot": snap, "file": file}))
        .unwrap();
    let j = wait_job(c, r["job-id"].as_str().unwrap());
    assert!(j.get("error").is_none(), "{j}");
}

fn entry(c: &mut vhost_thin::ctl::Client, q: &str, name: &str) -> Option<Value> {
    c.execute(q, json!({}))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .cloned()
}

/// The bytes of `name` (a disk or snapshot), read offline from its pool after a stop.
fn offline_bytes(d: &TwoPools, pool: &str, thin_id: u64) -> Vec<u8> {
    let (m, data) = d.pool_files(pool);
    export(
        &m,
        &data,
        &thin_id.to_string(),
        Some(&format!("{DISK_MIB}MiB")),
    )
}

fn write_pattern(sock: &Path, seed: u8, at_mib: &[u64]) {
    let mut g = Guest::connect(sock, 2);
    for &m in at_mib {
        assert_eq!(
            g.write(0, m * 2048, &pattern(256 << 10, seed ^ m as u8), 2),
            0
        );
    }
    g.stop();
}

#[test]
fn send_and_receive_run_as_jobs_between_files_commands_and_pools() {
    let mut d = start();
    let mut c = d.client();
    write_pattern(&d.path("vm.sock"), 1, &[0, 3, 17, 31]);
    c.execute("snapshot-create", json!({"disk": "vm", "name": "s1"}))
        .unwrap();
    write_pattern(&d.path("vm.sock"), 2, &[3, 9]);
    c.execute("snapshot-create", json!({"disk": "vm", "name": "s2"}))
        .unwrap();

    // Refusals come back from the command itself, before any job exists.
    let file = d.path("s1.vts");
    std::fs::write(&file, b"x").unwrap();
    let e = c
        .execute("snapshot-send", json!({"snapshot": "s1", "file": file}))
        .unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
    std::fs::remove_file(&file).unwrap();
    let e = c
        .execute("snapshot-send", json!({"snapshot": "vm", "file": file}))
        .unwrap_err();
    assert!(e.to_string().contains("is a disk"), "{e}");
    let e = c
        .execute(
            "snapshot-send",
            json!({"snapshot": "s1", "file": file, "pool": "b"}),
        )
        .unwrap_err();
    assert!(e.to_string().contains("exactly one"), "{e}");
    let e = c
        .execute(
            "snapshot-send",
            json!({"snapshot": "s1", "pool": "b", "name": "s2"}),
        )
        .unwrap_err();
    assert!(e.to_string().contains("already in use"), "{e}");

    // To a file, then received into pool b; s2 incrementally into pool b, straight.
    let r = c
        .execute(
            "snapshot-send",
            json!({"snapshot": "s1", "file": file, "job-id": "f1"}),
        )
        .unwrap();
    assert_eq!(r["job-id"], "f1");
    let j = wait_job(&mut c, "f1");
    assert!(j.get("error").is_none(), "{j}");
    assert_eq!(j["current-progress"], j["total-progress"]);
    let full_bytes = j["result"]["sent"]["stream-bytes"].as_u64().unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), full_bytes);
    c.execute("job-dismiss", json!({"id": "f1"})).unwrap();
    let r = c
        .execute(
            "snapshot-receive",
            json!({"file": file, "pool": "b", "name": "s1-in-b"}),
        )
        .unwrap();
    let j = wait_job(&mut c, r["job-id"].as_str().unwrap());
    assert!(j.get("error").is_none(), "{j}");
    let r = c
        .execute(
            "snapshot-send",
            json!({"snapshot": "s2", "base": "s1", "pool": "b", "name": "s2-in-b"}),
        )
        .unwrap();
    let j = wait_job(&mut c, r["job-id"].as_str().unwrap());
    assert!(j.get("error").is_none(), "{j}");
    let inc = &j["result"]["sent"];
    println!(
        "snapshot-send jobs: full stream {full_bytes} bytes, incremental {} bytes ({} data) for 512 KiB written",
        inc["stream-bytes"], inc["data-bytes"]
    );
    assert_eq!(inc["data-bytes"], 512 << 10);
    // Into a command: the offline receive of a pool of its own.
    let (pm, pd) = (d.path("c.meta"), d.path("c.data"));
    cli(&[
        "pool",
        "create",
        "-m",
        pm.to_str().unwrap(),
        "-d",
        pd.to_str().unwrap(),
        "--data-size",
        "128MiB",
        "--block-size",
        "128KiB",
    ]);
    let r = c
        .execute(
            "snapshot-send",
            json!({"snapshot": "s1", "command": [bin(), "receive", "-m", pm, "-d", pd, "--json"]}),
        )
        .unwrap();
    let j = wait_job(&mut c, r["job-id"].as_str().unwrap());
    assert!(j.get("error").is_none(), "{j}");
    let got: Value = serde_json::from_str(j["result"]["output"].as_str().unwrap()).unwrap();
    assert_eq!(got["name"], "s1");
    // A command that fails fails the job, with its words.
    let r = c
        .execute(
            "snapshot-send",
            json!({"snapshot": "s1", "command": ["sh", "-c", "echo no room >&2; exit 3"]}),
        )
        .unwrap();
    let j = wait_job(&mut c, r["job-id"].as_str().unwrap());
    let err = j["error"].as_str().unwrap();
    assert!(err.contains("no room"), "{err}");

    // Cancelling a send blocked on a command that does not read: the command is killed
    // and the job concludes "cancelled".
    let up = d.path("stuck.up");
    let r = c
        .execute(
            "snapshot-send",
            json!({"snapshot": "s1", "job-id": "stuck",
                   "command": ["sh", "-c", format!("touch '{}'; exec sleep 600", up.display())]}),
        )
        .unwrap();
    assert_eq!(r["job-id"], "stuck");
    wait_for(&up);
    let e = c
        .execute("snapshot-delete", json!({"name": "s1"}))
        .unwrap_err();
    assert!(e.to_string().contains("in use by a send job"), "{e}");
    c.execute("job-cancel", json!({"id": "stuck"})).unwrap();
    let j = wait_job(&mut c, "stuck");
    assert_eq!(j["error"], "cancelled", "{j}");

    // Cancelling a receive fed slowly through a FIFO leaves no device behind.
    // A snapshot pool b has not received.
    c.execute("snapshot-create", json!({"disk": "vm", "name": "s3"}))
        .unwrap();
    let s3 = d.path("s3.vts");
    send_to_file(&mut c, "s3", &s3);
    let fifo = d.path("slow.fifo");
    mkfifo(&fifo);
    let devices_b = |c: &mut vhost_thin::ctl::Client| {
        c.execute("query-pools", json!({})).unwrap()[1]["devices"].clone()
    };
    let before = devices_b(&mut c);
    let r = c
        .execute(
            "snapshot-receive",
            json!({"file": fifo, "pool": "b", "name": "slow", "job-id": "slow"}),
        )
        .unwrap();
    assert_eq!(r["job-id"], "slow");
    let stream = std::fs::read(&s3).unwrap();
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    use std::io::Write;
    w.write_all(&stream[..stream.len() / 2]).unwrap();
    // Running: it opened the FIFO (the open above waited for it) and waits for the rest.
    assert_eq!(job_status(&mut c, "slow"), "running");
    c.execute("job-cancel", json!({"id": "slow"})).unwrap();
    // The next bytes wake the reader, which then sees the cancel.
    let _ = w.write_all(&stream[stream.len() / 2..]);
    drop(w);
    let j = wait_job(&mut c, "slow");
    assert_eq!(j["error"], "cancelled", "{j}");
    assert_eq!(devices_b(&mut c), before);
    assert!(entry(&mut c, "query-snapshots", "slow").is_none());

    // Every copy equals its original, byte for byte.
    let ids: Vec<(String, String, u64)> = ["s1", "s2", "s1-in-b", "s2-in-b"]
        .iter()
        .map(|n| {
            let e = entry(&mut c, "query-snapshots", n).unwrap();
            (
                n.to_string(),
                e["pool"].as_str().unwrap().to_string(),
                e["thin-id"].as_u64().unwrap(),
            )
        })
        .collect();
    drop(c);
    d.stop();
    let bytes: Vec<Vec<u8>> = ids
        .iter()
        .map(|(_, p, id)| offline_bytes(&d, p, *id))
        .collect();
    assert!(bytes[0] == bytes[2], "s1 and its copy in pool b differ");
    assert!(bytes[1] == bytes[3], "s2 and its copy in pool b differ");
    assert!(bytes[0] != bytes[1]);
    let c_out = export(
        pm.to_str().unwrap(),
        pd.to_str().unwrap(),
        &got["id"].to_string(),
        Some(&format!("{DISK_MIB}MiB")),
    );
    assert!(c_out == bytes[0], "s1 received through a command differs");
    for p in ["a", "b"] {
        thin_check_ok(&d.pool_files(p).0);
    }
}

/// Waits until job `id` runs (its thread has started); it must not have concluded.
fn wait_running(c: &mut vhost_thin::ctl::Client, id: &str) {
    let t0 = Instant::now();
    loop {
        let st = job_status(c, id);
        if st == "running" {
            return;
        }
        assert_eq!(st, "created", "job {id}");
        // A bound on hanging, not a speed figure.
        assert!(t0.elapsed() < Duration::from_secs(30), "job {id} never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the daemon has seen the guest of disk `name` go (query-disks' `connected`):
/// a frontend's end is noticed by the disk's serving thread, some time after it closed.
fn wait_disconnected(c: &mut vhost_thin::ctl::Client, name: &str) {
    let t0 = Instant::now();
    loop {
        let e = entry(c, "query-disks", name).unwrap();
        if e["connected"] == false {
            return;
        }
        // A bound on hanging, not a speed figure.
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{name} still connected: {e}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Job `id`'s status now ("" when it is not listed).
fn job_status(c: &mut vhost_thin::ctl::Client, id: &str) -> String {
    let jobs = c.execute("query-jobs", json!({})).unwrap();
    jobs.as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .map(|j| j["status"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

const SLOTS: u64 = 2048; // 4 KiB slots over the first 8 MiB

fn slot_data(seq: u64, slot: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(seq.wrapping_mul(0x9e37_79b9) ^ slot << 40 ^ i as u64).to_le_bytes());
    }
    b
}

#[test]
fn a_disk_being_written_moves_to_the_other_pool_with_its_snapshots() {
    let mut d = start();
    let mut c = d.client();
    // History: three snapshots with changes between them.
    write_pattern(&d.path("vm.sock"), 7, &[8, 12, 20, 30]);
    for (i, at) in [[12u64, 13], [20, 21], [24, 25]].iter().enumerate() {
        c.execute(
            "snapshot-create",
            json!({"disk": "vm", "name": format!("h{i}")}),
        )
        .unwrap();
        write_pattern(&d.path("vm.sock"), 9 + i as u8, at);
    }
    // A writer that verifies: every acknowledged write, before, during and after the
    // move, must read back; no write may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, last, sock) = (stop.clone(), last.clone(), d.path("vm.sock"));
        std::thread::spawn(move || {
            let mut g = Guest::connect(&sock, 2);
            let mut latest = vec![u64::MAX; SLOTS as usize];
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) || seq < 200 {
                let slot = seq.wrapping_mul(7919) % SLOTS;
                let st = g.write((seq % 2) as usize, slot * 8, &slot_data(seq, slot), 1);
                assert_eq!(st, 0, "write {seq} failed");
                latest[slot as usize] = seq;
                last.store(seq, Ordering::SeqCst);
                seq += 1;
            }
            // Read back every slot through the same connection (now on pool b).
            for (slot, &s) in latest.iter().enumerate() {
                if s == u64::MAX {
                    continue;
                }
                let (st, got) = g.read(1, slot as u64 * 8, 4096);
                assert_eq!(st, 0);
                assert!(
                    got == slot_data(s, slot as u64),
                    "slot {slot}: write {s} lost"
                );
            }
            g.stop();
            (seq, latest)
        })
    };
    while last.load(Ordering::SeqCst) < 100 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let e = c
        .execute("disk-migrate", json!({"disk": "vm", "pool": "a"}))
        .unwrap_err();
    assert!(e.to_string().contains("already"), "{e}");
    let r = c
        .execute(
            "disk-migrate",
            json!({"disk": "vm", "pool": "b", "job-id": "mv"}),
        )
        .unwrap();
    assert_eq!(r["job-id"], "mv");
    let j = wait_job(&mut c, "mv");
    assert!(j.get("error").is_none(), "{j}");
    let res = &j["result"];
    let writes_during = last.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (writes, latest) = writer.join().unwrap();
    println!(
        "disk-migrate under write load: {} snapshots, {} live passes, pass bytes {}, pause {} µs, {writes} writes (about {writes_during} by the switch), none failed",
        res["snapshots"], res["live-passes"], res["pass-bytes"], res["pause-us"]
    );
    assert_eq!(res["snapshots"], 3);
    // The disk and its snapshots are in pool b, sharing blocks there.
    let vm = entry(&mut c, "query-disks", "vm").unwrap();
    assert_eq!(vm["pool"], "b");
    for i in 0..3 {
        let h = entry(&mut c, "query-snapshots", &format!("h{i}")).unwrap();
        assert_eq!(h["pool"], "b", "{h}");
        assert_eq!(h["origin"], "vm", "{h}");
        assert!(
            h["exclusive-bytes"].as_u64().unwrap() <= 2 << 20,
            "snapshot h{i} is a full copy in pool b: {h}"
        );
    }
    let pools = c.execute("query-pools", json!({})).unwrap();
    assert_eq!(pools[0]["devices"], 0, "pool a still has devices: {pools}");
    // Snapshots taken after the move are of the disk in pool b.
    c.execute("snapshot-create", json!({"disk": "vm", "name": "after"}))
        .unwrap();
    assert_eq!(
        entry(&mut c, "query-snapshots", "after").unwrap()["pool"],
        "b"
    );
    drop(c);
    // After a restart the disk is served from pool b with every write.
    d.stop();
    for p in ["a", "b"] {
        thin_check_ok(&d.pool_files(p).0);
    }
    d.spawn();
    let mut g = Guest::connect(&d.path("vm.sock"), 2);
    for (slot, &s) in latest.iter().enumerate() {
        if s != u64::MAX {
            let (st, got) = g.read(0, slot as u64 * 8, 4096);
            assert_eq!(st, 0);
            assert!(
                got == slot_data(s, slot as u64),
                "after restart, slot {slot}: write {s} lost"
            );
        }
    }
    g.stop();
}

fn replication_of(c: &mut vhost_thin::ctl::Client, disk: &str) -> Value {
    c.execute("query-replication", json!({}))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["disk"] == disk)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until `disk` has done `rounds` rounds (successful or not).
fn wait_rounds(c: &mut vhost_thin::ctl::Client, disk: &str, rounds: u64) -> Value {
    let t0 = Instant::now();
    loop {
        let r = replication_of(c, disk);
        if r["rounds"].as_u64().unwrap_or(0) >= rounds && r["running"] == false {
            return r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no round {rounds}: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn snapshot_names(c: &mut vhost_thin::ctl::Client, pool: &str) -> Vec<String> {
    c.execute("query-snapshots", json!({}))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["pool"] == pool)
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn replication_rounds_copy_snapshots_keep_the_last_and_survive_failures_and_restarts() {
    let mut d = start();
    let mut c = d.client();
    // A writer runs the whole time, verified at the end.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, sock) = (stop.clone(), d.path("vm.sock"));
        std::thread::spawn(move || {
            let mut g = Guest::connect(&sock, 2);
            let mut latest = vec![u64::MAX; SLOTS as usize];
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let slot = seq.wrapping_mul(7919) % SLOTS;
                assert_eq!(
                    g.write((seq % 2) as usize, slot * 8, &slot_data(seq, slot), 1),
                    0
                );
                latest[slot as usize] = seq;
                seq += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            for (slot, &s) in latest.iter().enumerate() {
                if s != u64::MAX {
                    let (st, got) = g.read(1, slot as u64 * 8, 4096);
                    assert_eq!(st, 0);
                    assert!(
                        got == slot_data(s, slot as u64),
                        "slot {slot}: write {s} lost"
                    );
                }
            }
            g.stop();
            seq
        })
    };
    let e = c
        .execute("replication-start", json!({"disk": "vm", "pool": "a"}))
        .unwrap_err();
    assert!(e.to_string().contains("own pool"), "{e}");
    c.execute(
        "replication-start",
        json!({"disk": "vm", "pool": "b", "interval": 1, "keep": 2}),
    )
    .unwrap();
    let r = wait_rounds(&mut c, "vm", 4);
    assert_eq!(r["failures"], 0, "{r}");
    assert!(r["lag-seconds"].as_u64().unwrap() <= 5, "{r}");
    println!(
        "replication to pool b: {} rounds, last {} bytes, total {} bytes, lag {} s",
        r["rounds"], r["last-bytes"], r["total-bytes"], r["lag-seconds"]
    );
    let e = c
        .execute("disk-migrate", json!({"disk": "vm", "pool": "b"}))
        .unwrap_err();
    assert!(e.to_string().contains("replicated into pool b"), "{e}");
    // Keep 2 on both sides (a round may be under way: at most one more).
    c.execute("replication-stop", json!({"disk": "vm"}))
        .unwrap();
    let mine = snapshot_names(&mut c, "a");
    let theirs = snapshot_names(&mut c, "b");
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert_eq!(theirs.len(), 2, "{theirs:?}");
    for n in &mine {
        let seq = n.strip_prefix("vm@r").unwrap();
        assert!(
            theirs.contains(&format!("vm-replica@r{seq}")),
            "{mine:?} {theirs:?}"
        );
    }

    // A command that fails: rounds fail, their snapshots are dropped, the error is shown.
    c.execute(
        "replication-start",
        json!({"disk": "vm", "command": ["sh", "-c", "cat >/dev/null; echo target full >&2; exit 1"], "interval": 1, "keep": 2}),
    )
    .unwrap();
    let r = wait_rounds(&mut c, "vm", 1);
    // Every round fails: one, or two if the next (a second later) ran before this query.
    assert_eq!(r["failures"], r["rounds"], "{r}");
    assert!(
        r["last-error"].as_str().unwrap().contains("target full"),
        "{r}"
    );
    // Counted once stopped: a round under way has a snapshot until it fails.
    c.execute("replication-stop", json!({"disk": "vm"}))
        .unwrap();
    assert_eq!(snapshot_names(&mut c, "a").len(), 2);

    // Into a command: an offline receive into a pool of its own, which keeps 2 too.
    let (pm, pd) = (d.path("c.meta"), d.path("c.data"));
    cli(&[
        "pool",
        "create",
        "-m",
        pm.to_str().unwrap(),
        "-d",
        pd.to_str().unwrap(),
        "--data-size",
        "128MiB",
    ]);
    // Rounds on demand (replication-run), an hour apart otherwise: the daemon's stop below
    // must find no round under way, as it would cancel it and kill its receiver part way
    // (leaving the receiver's pool with a replica more than --keep-last, unpruned).
    c.execute(
        "replication-start",
        json!({"disk": "vm", "command": [bin(), "receive", "-m", pm, "-d", pd, "--keep-last", "2"], "interval": 3600, "keep": 2}),
    )
    .unwrap();
    // The first round runs at once.
    for round in 1..=3 {
        if round > 1 {
            c.execute("replication-run", json!({"disk": "vm"})).unwrap();
        }
        let r = wait_rounds(&mut c, "vm", round);
        assert_eq!(r["failures"], 0, "{r}");
    }
    // Still scheduled after a restart.
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    println!("replication under write load: {writes} writes verified");
    drop(c);
    d.stop();
    let ls = cli(&[
        "thin",
        "ls",
        "-m",
        pm.to_str().unwrap(),
        "-d",
        pd.to_str().unwrap(),
        "--json",
    ]);
    let remote: Value = serde_json::from_str(&ls).unwrap();
    let names: Vec<&str> = remote
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    for p in ["a", "b"] {
        thin_check_ok(&d.pool_files(p).0);
    }
    // The last replica equals its source snapshot byte for byte.
    let (am, ad) = d.pool_files("a");
    let a_reg: Value =
        serde_json::from_str(&cli(&["thin", "ls", "-m", &am, "-d", &ad, "--json"])).unwrap();
    let last = a_reg
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"].as_str().is_some_and(|n| n.starts_with("vm@r")))
        .max_by_key(|e| {
            e["name"]
                .as_str()
                .unwrap()
                .trim_start_matches("vm@r")
                .parse::<u64>()
                .unwrap()
        })
        .unwrap()
        .clone();
    let remote_last = remote
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == last["name"])
        .unwrap_or_else(|| panic!("{} not at the target: {names:?}", last["name"]));
    let here = offline_bytes(&d, "a", last["id"].as_u64().unwrap());
    let there = export(
        pm.to_str().unwrap(),
        pd.to_str().unwrap(),
        &remote_last["id"].to_string(),
        Some(&format!("{DISK_MIB}MiB")),
    );
    assert!(
        here == there,
        "replica {} differs from its source",
        last["name"]
    );
    d.spawn();
    let mut c = d.client();
    let r = replication_of(&mut c, "vm");
    assert_eq!(r["interval"], 3600, "not resumed after a restart: {r}");
    c.execute("replication-stop", json!({"disk": "vm"}))
        .unwrap();
}

/// Reads `len` bytes at byte `off` through the test frontend.
fn read_bytes(g: &mut Guest, off: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut at = off;
    while out.len() < len {
        let n = (len - out.len()).min(256 << 10);
        let (st, got) = g.read(0, at / 512, n as u32);
        assert_eq!(st, 0, "read at {at}");
        out.extend_from_slice(&got);
        at += n as u64;
    }
    out
}

#[test]
fn disks_over_an_external_origin_and_merging_a_snapshot_back_into_it() {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES};
    let d = start();
    let mut c = d.client();
    const IMG: usize = 8 << 20;
    let golden = d.path("golden.img");
    let mut image = pattern(IMG, 5);
    std::fs::write(&golden, &image).unwrap();
    let e = c
        .execute(
            "disk-add",
            json!({"name": "bad", "pool": "a", "external-origin": d.path("missing.img")}),
        )
        .unwrap_err();
    assert!(e.to_string().contains("missing.img"), "{e}");
    let r = c
        .execute(
            "disk-add",
            json!({"name": "base", "pool": "a", "external-origin": golden}),
        )
        .unwrap();
    let base = entry(&mut c, "query-disks", "base").unwrap();
    assert_eq!(base["size"], IMG);
    assert_eq!(base["mapped-bytes"], 0);
    let mut g = Guest::connect(Path::new(r["socket"].as_str().unwrap()), 1);
    assert!(
        read_bytes(&mut g, 0, IMG) == image,
        "unwritten disk differs from its origin"
    );
    // A write inside a block: the rest of the block is the origin's.
    let patch = pattern(4096, 9);
    assert_eq!(g.write(0, (64 << 10) / 512 + 1, &patch, 1), 0);
    image[(64 << 10) + 512..(64 << 10) + 512 + 4096].copy_from_slice(&patch);
    // Zeroes read as zeroes; a discarded block reads from the origin again.
    assert_eq!(g.ranges(0, VIRTIO_BLK_T_WRITE_ZEROES, &[(4096, 256, 0)]), 0);
    image[2 << 20..(2 << 20) + (128 << 10)].fill(0);
    assert_eq!(g.write(0, (1 << 20) / 512, &pattern(64 << 10, 3), 1), 0);
    assert_eq!(g.ranges(0, VIRTIO_BLK_T_DISCARD, &[(2048, 128, 0)]), 0);
    assert!(
        read_bytes(&mut g, 0, IMG) == image,
        "disk over its origin reads wrong"
    );
    // Snapshots and clones read the same origin.
    c.execute("snapshot-create", json!({"disk": "base", "name": "base-s"}))
        .unwrap();
    let r = c
        .execute("disk-add", json!({"name": "c1", "clone-from": "base-s"}))
        .unwrap();
    let c1 = entry(&mut c, "query-disks", "c1").unwrap();
    assert_eq!(c1["external-origin"], base["external-origin"]);
    let mut g1 = Guest::connect(Path::new(r["socket"].as_str().unwrap()), 1);
    assert!(read_bytes(&mut g1, 0, IMG) == image, "clone reads differ");
    g1.stop();
    // Merging rewrites the image: refused while readers are connected or others read it.
    let e = c
        .execute("origin-merge", json!({"snapshot": "base"}))
        .unwrap_err();
    assert!(e.to_string().contains("is a disk"), "{e}");
    let e = c
        .execute("origin-merge", json!({"snapshot": "base-s"}))
        .unwrap_err();
    assert!(e.to_string().contains("connected"), "{e}");
    g.stop();
    for disk in ["base", "c1"] {
        wait_disconnected(&mut c, disk);
    }
    let e = c
        .execute("origin-merge", json!({"snapshot": "base-s"}))
        .unwrap_err();
    assert!(e.to_string().contains("c1"), "{e}");
    c.execute("disk-remove", json!({"name": "c1"})).unwrap();
    let r = c
        .execute("origin-merge", json!({"snapshot": "base-s", "job-id": "m"}))
        .unwrap();
    assert_eq!(r["job-id"], "m");
    let j = wait_job(&mut c, "m");
    assert!(j.get("error").is_none(), "{j}");
    println!(
        "origin-merge: {} bytes written into the image",
        j["result"]["bytes-written"]
    );
    assert!(
        std::fs::read(&golden).unwrap() == image,
        "merged image differs from the snapshot"
    );
    // A new disk over the image reads the merged contents.
    let r = c
        .execute(
            "disk-add",
            json!({"name": "fresh", "pool": "b", "external-origin": golden}),
        )
        .unwrap();
    let mut g2 = Guest::connect(Path::new(r["socket"].as_str().unwrap()), 1);
    assert!(read_bytes(&mut g2, 0, IMG) == image);
    g2.stop();
}

#[test]
fn a_snapshot_chain_moves_to_another_daemon_through_a_pipe() {
    let mut a = start();
    let mut b = start();
    let mut ca = a.client();
    write_pattern(&a.path("vm.sock"), 3, &[0, 5, 30]);
    ca.execute("snapshot-create", json!({"disk": "vm", "name": "t1"}))
        .unwrap();
    write_pattern(&a.path("vm.sock"), 4, &[5, 6]);
    ca.execute("snapshot-create", json!({"disk": "vm", "name": "t2"}))
        .unwrap();
    let qmp_b = b.path("qmp.sock");
    let to_b = |pool: &str| {
        json!([
            bin(),
            "ctl",
            "-s",
            qmp_b,
            "--json",
            "receive",
            "-",
            "--pool",
            pool
        ])
    };
    // A full stream, then an incremental one on it: into the other daemon's pool b, whose
    // ctl passes its standard input to that daemon.
    for (snap, base) in [("t1", None), ("t2", Some("t1"))] {
        let r = ca
            .execute(
                "snapshot-send",
                json!({"snapshot": snap, "base": base, "command": to_b("b")}),
            )
            .unwrap();
        let j = wait_job(&mut ca, r["job-id"].as_str().unwrap());
        assert!(j.get("error").is_none(), "{snap}: {j}");
        let got: Value = serde_json::from_str(j["result"]["output"].as_str().unwrap()).unwrap();
        assert_eq!(got["name"], snap, "{j}");
    }
    // A stream the other side refuses (its base is missing there) fails the job with the
    // receiver's reason, and leaves nothing there.
    ca.execute("snapshot-create", json!({"disk": "vm", "name": "t3"}))
        .unwrap();
    let r = ca
        .execute(
            "snapshot-send",
            json!({"snapshot": "t3", "base": "t2", "command": to_b("a")}),
        )
        .unwrap();
    let j = wait_job(&mut ca, r["job-id"].as_str().unwrap());
    let err = j["error"].as_str().unwrap_or_default();
    assert!(err.contains("does not have"), "{j}");
    // The last snapshot becomes a disk there.
    let mut cb = b.client();
    assert!(entry(&mut cb, "query-snapshots", "t3").is_none());
    cb.execute("disk-add", json!({"name": "vm-moved", "clone-from": "t2"}))
        .unwrap();
    let t2b = entry(&mut cb, "query-snapshots", "t2").unwrap();
    let t1b = entry(&mut cb, "query-snapshots", "t1").unwrap();
    assert!(
        t1b["exclusive-bytes"].as_u64().unwrap() < (1 << 20),
        "t1 and t2 do not share blocks at the receiver: {t1b}"
    );
    let t2a = entry(&mut ca, "query-snapshots", "t2").unwrap();
    drop((ca, cb));
    a.stop();
    b.stop();
    assert!(
        offline_bytes(&a, "a", t2a["thin-id"].as_u64().unwrap())
            == offline_bytes(&b, "b", t2b["thin-id"].as_u64().unwrap()),
        "t2 differs after the move"
    );
}

#[test]
fn a_receive_cut_short_by_a_crash_is_dropped_at_the_next_start() {
    let mut d = start();
    let mut c = d.client();
    write_pattern(&d.path("vm.sock"), 6, &[1, 2, 3]);
    c.execute("snapshot-create", json!({"disk": "vm", "name": "k1"}))
        .unwrap();
    let file = d.path("k1.vts");
    send_to_file(&mut c, "k1", &file);
    let fifo = d.path("k1.fifo");
    mkfifo(&fifo);
    let r = c
        .execute(
            "snapshot-receive",
            json!({"file": fifo, "pool": "b", "name": "k1-copy"}),
        )
        .unwrap();
    let id = r["job-id"].as_str().unwrap().to_string();
    let stream = std::fs::read(&file).unwrap();
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    use std::io::Write;
    w.write_all(&stream[..stream.len() / 2]).unwrap();
    // The device exists (committed as receiving) once the job has read a record or two.
    let t0 = Instant::now();
    while c.execute("query-pools", json!({})).unwrap()[1]["devices"] != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the receive never made its device"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(job_status(&mut c, &id), "running");
    drop(c);
    d.kill();
    drop(w);
    d.spawn();
    let mut c = d.client();
    assert_eq!(
        c.execute("query-pools", json!({})).unwrap()[1]["devices"],
        0
    );
    assert!(entry(&mut c, "query-snapshots", "k1-copy").is_none());
    // The name is free again: the same stream is received whole.
    let r = c
        .execute(
            "snapshot-receive",
            json!({"file": file, "pool": "b", "name": "k1-copy"}),
        )
        .unwrap();
    let j = wait_job(&mut c, r["job-id"].as_str().unwrap());
    assert!(j.get("error").is_none(), "{j}");
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn a_receive_from_a_fifo_that_gets_no_data_is_cancelled_and_does_not_hold_up_a_stop() {
    use std::os::unix::fs::OpenOptionsExt;
    let mut d = start();
    let mut c = d.client();
    // No writer ever comes.
    let fifo = d.path("never.fifo");
    mkfifo(&fifo);
    c.execute(
        "snapshot-receive",
        json!({"job-id": "r1", "file": fifo, "pool": "b", "name": "x"}),
    )
    .unwrap();
    wait_running(&mut c, "r1");
    c.execute("job-cancel", json!({"id": "r1"})).unwrap();
    let t0 = Instant::now();
    let j = wait_job(&mut c, "r1");
    assert_eq!(j["error"], "cancelled", "{j}");
    // A bound on hanging, not a speed figure: the job blocked on the FIFO would wait forever.
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert!(entry(&mut c, "query-snapshots", "x").is_none());
    // A writer that came and sends nothing: the daemon's stop cancels the job and ends.
    let idle = d.path("idle.fifo");
    mkfifo(&idle);
    c.execute(
        "snapshot-receive",
        json!({"job-id": "r2", "file": idle, "pool": "b", "name": "y"}),
    )
    .unwrap();
    let _writer = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&idle)
        {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    };
    // The writer's open succeeded, so the job has opened its end: it runs, waiting for data.
    assert_eq!(job_status(&mut c, "r2"), "running");
    drop(c);
    let status = d
        .stop_within(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the daemon did not stop: a receive job kept it waiting"));
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_send_into_a_command_that_read_everything_but_does_not_exit_is_cancelled() {
    let d = start();
    let mut c = d.client();
    write_pattern(&d.path("vm.sock"), 3, &[1]);
    c.execute("snapshot-create", json!({"disk": "vm", "name": "s1"}))
        .unwrap();
    // The command says when it has read the whole stream (its end: the send is over), then
    // goes on running.
    let read_all = d.path("read-all");
    c.execute(
        "snapshot-send",
        json!({"job-id": "c1", "snapshot": "s1",
               "command": ["sh", "-c", format!("cat >/dev/null; touch '{}'; exec sleep 60", read_all.display())]}),
    )
    .unwrap();
    wait_for(&read_all);
    assert_eq!(job_status(&mut c, "c1"), "running");
    c.execute("job-cancel", json!({"id": "c1"})).unwrap();
    let t0 = Instant::now();
    let j = wait_job(&mut c, "c1");
    assert_eq!(j["error"], "cancelled", "{j}");
    // Well before the command's own 60 s: it was killed, not waited for.
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
}

#[test]
fn a_send_cancelled_while_its_command_reads_kills_the_command_and_does_not_wait_for_it() {
    let d = start();
    let mut c = d.client();
    // A stream of several MiB: the send is under way when the cancel comes.
    let every_mib: Vec<u64> = (0..DISK_MIB).collect();
    write_pattern(&d.path("vm.sock"), 4, &every_mib);
    c.execute("snapshot-create", json!({"disk": "vm", "name": "big"}))
        .unwrap();
    // The command reads a MiB, then stops reading at a gate (a FIFO, which it opens then),
    // while the send blocks in a write; past the gate it reads the rest, and never exits
    // by itself.
    let gate = d.path("gate.fifo");
    mkfifo(&gate);
    let script = format!(
        "head -c 1048576 >/dev/null; read go <'{}'; cat >/dev/null; exec sleep 60",
        gate.display()
    );
    c.execute(
        "snapshot-send",
        json!({"job-id": "g", "snapshot": "big", "command": ["sh", "-c", script]}),
    )
    .unwrap();
    // Opened once the command is at the gate.
    let mut gate = std::fs::OpenOptions::new().write(true).open(&gate).unwrap();
    c.execute("job-cancel", json!({"id": "g"})).unwrap();
    let t0 = Instant::now();
    // Reading again, the command lets the blocked write finish: the next one sees the cancel
    // and ends the send, most likely before the daemon's watcher of the send looks again.
    // (An error here is a command killed already.)
    use std::io::Write;
    let _ = gate.write_all(b"go\n");
    drop(gate);
    let j = wait_job(&mut c, "g");
    assert_eq!(j["error"], "cancelled", "{j}");
    // A bound on hanging, not a speed figure: the command's own 60 s.
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
}

#[test]
fn an_interrupted_resumable_receive_goes_on_from_where_it_stopped() {
    let mut d = start();
    let mut c = d.client();
    write_pattern(&d.path("vm.sock"), 8, &[0, 4, 9, 20, 31]);
    c.execute("snapshot-create", json!({"disk": "vm", "name": "r1"}))
        .unwrap();
    let whole = d.path("r1.vts");
    send_to_file(&mut c, "r1", &whole);
    // The stream cut short: what arrived is kept, and the error gives a token.
    let bytes = std::fs::read(&whole).unwrap();
    let cut = d.path("r1-cut.vts");
    std::fs::write(&cut, &bytes[..bytes.len() * 3 / 5]).unwrap();
    let r = c
        .execute(
            "snapshot-receive",
            json!({"file": cut, "pool": "b", "name": "r1-b", "resumable": true}),
        )
        .unwrap();
    let j = wait_job(&mut c, r["job-id"].as_str().unwrap());
    let err = j["error"].as_str().unwrap_or_default().to_string();
    let token = err
        .split_whitespace()
        .find(|w| w.trim_matches('`').starts_with("vt1-"))
        .map(|w| w.trim_matches(|ch| ch == '`' || ch == ',').to_string())
        .unwrap_or_else(|| panic!("no resume token in {err:?}"));
    let e = c
        .execute(
            "snapshot-send",
            json!({"snapshot": "vm@none", "file": d.path("x.vts"), "resume-token": token}),
        )
        .unwrap_err();
    assert!(e.to_string().contains("vm@none"), "{e}");
    // The rest only, then received on top of what arrived.
    let rest = d.path("r1-rest.vts");
    let r = c
        .execute(
            "snapshot-send",
            json!({"snapshot": "r1", "file": rest, "resume-token": token}),
        )
        .unwrap();
    let j = wait_job(&mut c, r["job-id"].as_str().unwrap());
    assert!(j.get("error").is_none(), "{j}");
    let rest_len = std::fs::metadata(&rest).unwrap().len();
    // Less than the whole: what arrived (the complete records before the cut) is not sent.
    assert!(
        rest_len < bytes.len() as u64 - (1 << 18),
        "{rest_len} of {}",
        bytes.len()
    );
    let r = c
        .execute(
            "snapshot-receive",
            json!({"file": rest, "pool": "b", "resumable": true}),
        )
        .unwrap();
    let j = wait_job(&mut c, r["job-id"].as_str().unwrap());
    assert!(j.get("error").is_none(), "{j}");
    assert_eq!(j["result"]["name"], "r1-b");
    let (a_id, b_id) = (
        entry(&mut c, "query-snapshots", "r1").unwrap()["thin-id"]
            .as_u64()
            .unwrap(),
        entry(&mut c, "query-snapshots", "r1-b").unwrap()["thin-id"]
            .as_u64()
            .unwrap(),
    );
    drop(c);
    d.stop();
    assert!(offline_bytes(&d, "a", a_id) == offline_bytes(&d, "b", b_id));
}

#[test]
fn a_command_that_leaves_a_process_holding_its_output_does_not_hold_up_the_send() {
    let d = start();
    let mut c = d.client();
    c.execute("snapshot-create", json!({"disk": "vm", "name": "o1"}))
        .unwrap();
    // The command reads everything and exits 0, but a background process it started keeps
    // its standard output and error open for 30 s.
    let r = c
        .execute(
            "snapshot-send",
            json!({"job-id": "bg", "snapshot": "o1",
                   "command": ["sh", "-c", "cat >/dev/null; echo done; sleep 30 & exit 0"]}),
        )
        .unwrap();
    assert_eq!(r["job-id"], "bg");
    let t0 = Instant::now();
    let j = wait_job(&mut c, "bg");
    assert!(j.get("error").is_none(), "{j}");
    assert_eq!(j["result"]["output"], "done");
    // A bound on hanging, not a speed figure: waiting for the output's end would take 30 s.
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
}
