//! Management operations under load, with the test frontend as the guest: snapshots of a
//! disk being written and flushed (consistency and pause), the golden-image clone workflow, and the
//! out-of-space policies, a disk grown under a connected guest. Figures are printed, not asserted.

mod common;
use common::{cli, Guest, Served, D};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};

const BLOCKS: u64 = 64; // 4 KiB slots the writer cycles through

fn slot_data(seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(seq ^ (i as u64) << 48).to_le_bytes());
    }
    b
}

fn seq_of(block: &[u8]) -> Option<u64> {
    let s = u64::from_le_bytes(block[..8].try_into().unwrap());
    (block == slot_data(s).as_slice()).then_some(s)
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn snapshots_of_a_disk_being_written_are_consistent_points_in_time() {
    let s = Served::new(",num-queues=2");
    let mut c = s.client();
    let acked = Arc::new(AtomicU64::new(0)); // highest completed sequence number
    let issued = Arc::new(AtomicU64::new(0)); // highest submitted
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acked, issued, stop, sock) =
            (acked.clone(), issued.clone(), stop.clone(), s.sock.clone());
        std::thread::spawn(move || {
            // The frontend lives in this thread (its queues are not Send).
            let mut g = Guest::connect(&sock, 2);
            // Seed every slot so each holds a valid sequence number.
            for b in 0..BLOCKS {
                assert_eq!(g.write(0, b * 8, &slot_data(b), 1), 0);
            }
            for b in 0..BLOCKS {
                let (st, got) = g.read(1, b * 8, 4096);
                assert_eq!(st, 0, "read of slot {b} on queue 1");
                assert!(
                    got == slot_data(b),
                    "slot {b} after seeding: {:?}",
                    &got[..16]
                );
            }
            issued.store(BLOCKS - 1, Ordering::SeqCst);
            acked.store(BLOCKS - 1, Ordering::SeqCst);
            let mut seq = BLOCKS;
            while !stop.load(Ordering::SeqCst) {
                issued.store(seq, Ordering::SeqCst);
                let st = g.write((seq % 2) as usize, (seq % BLOCKS) * 8, &slot_data(seq), 1);
                assert_eq!(st, 0, "write {seq} failed during snapshots");
                acked.store(seq, Ordering::SeqCst);
                // FLUSHes among the writes: a snapshot holds commits while it drains the
                // requests in flight, and must not wait for one that waits for a commit.
                if seq % 4 == 0 {
                    let st = g.simple((seq % 8 / 4) as usize, VIRTIO_BLK_T_FLUSH);
                    assert_eq!(st, 0, "flush after write {seq} failed during snapshots");
                }
                seq += 1;
            }
            seq
        })
    };
    while acked.load(Ordering::SeqCst) < BLOCKS - 1 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut pauses = Vec::new();
    let mut windows = Vec::new();
    let mut ids = Vec::new();
    for i in 0..100 {
        let before = acked.load(Ordering::SeqCst);
        let r = c
            .execute(
                "snapshot-create",
                json!({"disk": "disk0", "name": format!("s{i}")}),
            )
            .unwrap();
        let after = issued.load(Ordering::SeqCst);
        pauses.push(r["pause-us"].as_u64().unwrap());
        ids.push(r["thin-id"].as_u64().unwrap());
        windows.push((before, after));
    }
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().unwrap();
    drop(c);
    // Check each snapshot offline: its slots are the state after some prefix of the writes,
    // a prefix that includes every write acknowledged before the command and none issued
    // after it returned.
    let mut s = s;
    assert!(s.stop().success());
    for (i, (before, after)) in windows.iter().enumerate() {
        let out = common::export(
            &s.m,
            &s.d,
            &ids[i].to_string(),
            Some(&(BLOCKS * 4096).to_string()),
        );
        let seqs: Vec<u64> = out
            .chunks(4096)
            .enumerate()
            .map(|(slot, b)| {
                seq_of(b).unwrap_or_else(|| {
                    panic!(
                        "snapshot s{i} (thin {}): slot {slot} is torn: {:?}",
                        ids[i],
                        &b[..16]
                    )
                })
            })
            .collect();
        let prefix = *seqs.iter().max().unwrap();
        assert!(
            prefix >= *before,
            "snapshot s{i} lacks write {before} acknowledged before it"
        );
        assert!(
            prefix <= *after,
            "snapshot s{i} holds write {prefix}, issued after it returned ({after})"
        );
        for (slot, &q) in seqs.iter().enumerate() {
            // The slot holds the last write to it at or before the prefix.
            let want = if prefix >= slot as u64 {
                prefix - (prefix - slot as u64) % BLOCKS
            } else {
                slot as u64
            };
            assert_eq!(q, want, "snapshot s{i} slot {slot}: not a point in time");
        }
    }
    let (p50, p99) = (
        percentile(&mut pauses.clone(), 0.5),
        percentile(&mut pauses, 0.99),
    );
    println!("snapshot-create under write load: 100 snapshots, {written} writes, pause p50 {p50} µs, p99 {p99} µs");
    assert!(cli(&["pool", "check", "-m", &s.m]).contains("clean"));
}

#[test]
fn golden_image_clone_workflow() {
    let s = Served::new("");
    let mut g = Guest::connect(&s.sock, 1);
    assert_eq!(g.write(0, 0, &vec![7u8; 1 << 20], 4), 0);
    drop(g);
    let mut c = s.client();
    c.execute(
        "snapshot-create",
        json!({"disk": "disk0", "name": "golden"}),
    )
    .unwrap();
    let mut create = Vec::new();
    for i in 0..100 {
        let t = Instant::now();
        c.execute(
            "disk-add",
            json!({"name": format!("ci-{i}"), "clone-from": "golden"}),
        )
        .unwrap();
        create.push(t.elapsed().as_micros() as u64);
    }
    // A clone reads the golden image's data.
    let mut g = Guest::connect(&s.dir.path().join("ci-42.sock"), 1);
    assert_eq!(g.read(0, 0, 4096), (0, vec![7u8; 4096]));
    drop(g);
    let mut remove = Vec::new();
    for i in 0..100 {
        let t = Instant::now();
        c.execute("disk-remove", json!({"name": format!("ci-{i}")}))
            .unwrap();
        remove.push(t.elapsed().as_micros() as u64);
    }
    println!(
        "golden image: 100 clones created in p50 {} µs / p99 {} µs each, removed in p50 {} µs / p99 {} µs (each durable: registry fsync + pool commit)",
        percentile(&mut create.clone(), 0.5),
        percentile(&mut create, 0.99),
        percentile(&mut remove.clone(), 0.5),
        percentile(&mut remove, 0.99)
    );
    let disks = c.execute("query-disks", json!({})).unwrap();
    assert_eq!(disks.as_array().unwrap().len(), 1);
}

/// Polls `query-pools` on a client of its own until a write is held (`queued-writes` 1):
/// how a test knows a write is waiting, rather than timing it.
fn wait_until_a_write_is_held(s: &Served) -> std::thread::JoinHandle<bool> {
    let mut c = s.client();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let pools = c.execute("query-pools", json!({})).unwrap();
            if pools[0]["queued-writes"] == 1 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    })
}

#[test]
fn out_of_space_policies_error_and_queue() {
    // A pool of 16 blocks (1 MiB) under a 16 MiB disk.
    let s = Served::with_pool("", "1MiB");
    let mut c = s.client();
    let mut g = Guest::connect(&s.sock, 1);
    for b in 0..16u64 {
        assert_eq!(g.write(0, b * 128, &[1u8; 512], 1), 0);
    }
    // Policy error: a write needing a new block fails at once.
    let t = Instant::now();
    assert_eq!(
        g.write(0, 16 * 128, &[2u8; 512], 1),
        VIRTIO_BLK_S_IOERR as u8
    );
    let failed = t.elapsed();
    // dm-thin's out-of-data-space mode, with what writes needing a block do.
    let pool =
        |c: &mut vhost_thin::ctl::Client| c.execute("query-pools", json!({})).unwrap()[0].clone();
    let p = pool(&mut c);
    assert_eq!(p["mode"], "out-of-data-space", "{p}");
    assert!(p["mode-reason"].as_str().unwrap().contains("fail"), "{p}");
    // Writes to provisioned blocks still work.
    assert_eq!(g.write(0, 0, &[3u8; 512], 1), 0);
    // Policy queue with a 1 s timeout: held, then IOERR.
    c.execute(
        "pool-set-policy",
        json!({"out-of-space": "queue", "timeout": 1}),
    )
    .unwrap();
    let watcher = wait_until_a_write_is_held(&s);
    let t = Instant::now();
    assert_eq!(
        g.write(0, 16 * 128, &[2u8; 512], 1),
        VIRTIO_BLK_S_IOERR as u8
    );
    let held = t.elapsed();
    assert!(watcher.join().unwrap(), "the write was never held");
    // As when dm-thin's no_space_timeout expires: from now on such writes fail at once
    // (the policy object's unit test shows it), until space appears.
    let p = pool(&mut c);
    assert_eq!(p["mode"], "out-of-data-space", "{p}");
    assert!(
        p["mode-reason"]
            .as_str()
            .unwrap()
            .contains("queue timeout passed"),
        "{p}"
    );
    assert_eq!(
        p["policy"]["out-of-space"], "queue",
        "the policy stays as set"
    );
    assert_eq!(
        g.write(0, 17 * 128, &[2u8; 512], 1),
        VIRTIO_BLK_S_IOERR as u8
    );
    // Policy queue without a deadline: the write waits until the operator grows the pool.
    c.execute(
        "pool-set-policy",
        json!({"out-of-space": "queue", "timeout": 0}),
    )
    .unwrap();
    let data = s.d.clone();
    let watcher = wait_until_a_write_is_held(&s);
    let operator = std::thread::spawn(move || {
        assert!(watcher.join().unwrap(), "the write was never held");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&data)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let grown = c.execute("pool-grow", json!({})).unwrap();
        assert_eq!(grown["data-blocks"], 64);
    });
    let t = Instant::now();
    let st = g.write(0, 20 * 128, &[4u8; 512], 1);
    let waited = t.elapsed();
    operator.join().unwrap();
    assert_eq!(st, 0, "the held write completes once the pool has grown");
    let p = s.client().execute("query-pools", json!({})).unwrap()[0].clone();
    assert_eq!(p["mode"], "write", "{p}");
    assert_eq!(g.read(0, 20 * 128, 512), (0, vec![4u8; 512]));
    println!("out of space: error after {failed:?}; queue held a write {held:?} before its 1 s timeout; a write held {waited:?} completed after pool-grow");
}

#[test]
fn query_delta_pages_through_changed_blocks() {
    let s = Served::new("");
    let mut c = s.client();
    let mut g = Guest::connect(&s.sock, 1);
    for b in [0u64, 2, 4] {
        assert_eq!(g.write(0, b * 128, &[1u8; 4096], 1), 0);
    }
    c.execute("snapshot-create", json!({"disk": "disk0", "name": "s"}))
        .unwrap();
    assert_eq!(g.write(0, 2 * 128, &[2u8; 4096], 1), 0); // different
    assert_eq!(g.write(0, 6 * 128, &[2u8; 4096], 1), 0); // right only
    assert_eq!(
        g.ranges(
            0,
            virtio_bindings::virtio_blk::VIRTIO_BLK_T_DISCARD,
            &[(4 * 128, 128, 0)]
        ),
        0
    ); // left only
    let mut runs = Vec::new();
    let mut start = 0;
    loop {
        let page = c
            .execute(
                "query-delta",
                json!({"left": "s", "right": "disk0", "start": start, "max-runs": 1}),
            )
            .unwrap();
        assert_eq!(page["block-size"], 65536);
        runs.extend(page["runs"].as_array().unwrap().iter().cloned());
        match page["next"].as_u64() {
            Some(n) => start = n,
            None => break,
        }
    }
    let got: Vec<(String, u64, u64)> = runs
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_string(),
                r["begin"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
            )
        })
        .collect();
    let want = [
        ("same", 0, 1),
        ("different", 2, 1),
        ("left_only", 4, 1),
        ("right_only", 6, 1),
    ];
    assert_eq!(
        got,
        want.iter()
            .map(|(k, b, l)| (k.to_string(), *b, *l))
            .collect::<Vec<_>>()
    );
    // changed-only: the same run left out.
    let page = c
        .execute(
            "query-delta",
            json!({"left": "s", "right": "disk0", "changed-only": true}),
        )
        .unwrap();
    assert_eq!(page["next"], json!(null));
    assert_eq!(
        page["runs"],
        json!([
            {"kind": "different", "begin": 2, "length": 1},
            {"kind": "left_only", "begin": 4, "length": 1},
            {"kind": "right_only", "begin": 6, "length": 1},
        ])
    );
}

#[test]
fn disk_resize_tells_the_connected_guest() {
    use std::io::Read;
    let s = Served::new("");
    let capacity = |g: &mut Guest| u64::from_le_bytes(g.config(8).try_into().unwrap());
    let mut c = s.client();

    let mut g = Guest::connect(&s.sock, 1);
    let mut chan = g.open_backend_channel();
    assert_eq!(capacity(&mut g), (16 << 20) / 512);
    let r = c
        .execute("disk-resize", json!({"name": "disk0", "size": 32 << 20}))
        .unwrap();
    assert_eq!(r, json!({"guest-notified": true}));
    // VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, version 1, no payload, no reply asked.
    chan.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut hdr = [0u8; 12];
    chan.read_exact(&mut hdr).unwrap();
    assert_eq!(hdr, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(capacity(&mut g), (32 << 20) / 512);
    // The new space is usable at once.
    let top = (32 << 20) / 512 - 8;
    assert_eq!(g.write(0, top, &[9u8; 4096], 1), 0);
    assert_eq!(g.read(0, top, 4096), (0, vec![9u8; 4096]));
    drop(g);
    drop(chan);

    // A frontend that gave no channel is not told, and says so; it reads the new size.
    let mut g = Guest::connect(&s.sock, 1);
    let r = c
        .execute("disk-resize", json!({"name": "disk0", "size": 48 << 20}))
        .unwrap();
    assert_eq!(r, json!({"guest-notified": false}));
    assert_eq!(capacity(&mut g), (48 << 20) / 512);
}

#[test]
fn pool_set_policy_refuses_a_timeout_too_long_to_hold() {
    let s = Served::new("");
    let mut c = s.client();
    let e = c
        .execute(
            "pool-set-policy",
            json!({"out-of-space": "queue", "timeout": u64::MAX}),
        )
        .unwrap_err();
    let q = e
        .downcast_ref::<vhost_thin::ctl::QmpReplyError>()
        .expect("an error reply");
    assert!(
        q.class == "GenericError" && q.desc.contains("too long") && q.desc.contains("one year"),
        "{q:?}"
    );
    // Nothing changed, and the daemon still answers.
    let pools = c.execute("query-pools", json!({})).unwrap();
    assert_eq!(pools[0]["policy"], json!({"out-of-space": "error"}));
    // The longest allowed timeout is taken.
    c.execute(
        "pool-set-policy",
        json!({"out-of-space": "queue", "timeout": 365 * 24 * 3600}),
    )
    .unwrap();
}

/// Runs `f` on a thread of its own and waits for it for a patient minute: a command stuck
/// behind a held write fails the test rather than hanging it.
fn within_patience<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what} did not complete while a write was held"))
}

/// Fills the 16-block pool of `s`, sets policy queue without a timeout and submits a write
/// needing a new block; returns once it is held: the guest, the write's sequence number on
/// queue 0 and where its status byte goes.
fn hold_a_write_forever(s: &Served) -> (Guest, u16, u64) {
    let mut g = Guest::connect(&s.sock, 1);
    for b in 0..16u64 {
        assert_eq!(g.write(0, b * 128, &[1u8; 512], 1), 0);
    }
    s.client()
        .execute(
            "pool-set-policy",
            json!({"out-of-space": "queue", "timeout": 0}),
        )
        .unwrap();
    let watcher = wait_until_a_write_is_held(s);
    let b = Guest::buf(1);
    let status = b + 0x10_0000 + 0x800;
    g.header(b, VIRTIO_BLK_T_OUT, 16 * 128);
    g.mem
        .write_slice(&[2u8; 512], GuestAddress(b + 0x1000))
        .unwrap();
    g.mem.write_obj(0xAAu8, GuestAddress(status)).unwrap();
    let seq = g.submit(
        0,
        &[
            D(b, 16, false),
            D(b + 0x1000, 512, false),
            D(status, 1, true),
        ],
    );
    assert!(watcher.join().unwrap(), "the write was never held");
    (g, seq, status)
}

#[test]
fn a_write_held_for_space_holds_up_neither_snapshots_nor_removal_nor_shutdown() {
    let s = Served::with_pool("", "1MiB");
    let (g, seq, status) = hold_a_write_forever(&s);
    let c = s.client();
    let (c, r) = within_patience("snapshot-create", move || {
        let mut c = c;
        let r = c.execute(
            "snapshot-create",
            json!({"disk": "disk0", "name": "while-held"}),
        );
        (c, r)
    });
    r.unwrap();
    let mut c = c;
    let pools = c.execute("query-pools", json!({})).unwrap();
    assert_eq!(pools[0]["queued-writes"], 1, "the write is still held");
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(status)).unwrap(), 0xAA);
    // disk-remove --force ends the connection; the held write fails rather than keep the
    // removal waiting for space.
    let (mut c, r) = within_patience("disk-remove --force", move || {
        let r = c.execute("disk-remove", json!({"name": "disk0", "force": true}));
        (c, r)
    });
    r.unwrap();
    g.wait_used(0, seq);
    assert_eq!(
        g.mem.read_obj::<u8>(GuestAddress(status)).unwrap(),
        VIRTIO_BLK_S_IOERR as u8
    );
    let pools = c.execute("query-pools", json!({})).unwrap();
    assert_eq!(pools[0]["queued-writes"], 0);
    drop(g);

    // SIGTERM with a write held: the daemon commits and exits.
    let s = Served::with_pool("", "1MiB");
    let (g, _, _) = hold_a_write_forever(&s);
    let (s, exit) = within_patience("SIGTERM", move || {
        let mut s = s;
        let exit = s.stop();
        (s, exit)
    });
    assert!(exit.success(), "{exit:?}");
    drop(g);
    assert!(cli(&["pool", "check", "-m", &s.m]).contains("clean"));
}

#[test]
fn a_socket_path_holding_a_file_is_refused_and_the_file_kept() {
    let s = Served::new("");
    let mut c = s.client();
    let precious = s.dir.path().join("precious");
    std::fs::write(&precious, b"keep me").unwrap();
    let e = c
        .execute(
            "disk-add",
            json!({"name": "d1", "size": 1 << 20, "socket": precious}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
}

#[test]
fn a_disk_add_that_cannot_serve_leaves_nothing_behind() {
    let s = Served::new("");
    let mut c = s.client();
    let nowhere = s.dir.path().join("missing-dir").join("d1.sock");
    let e = c
        .execute(
            "disk-add",
            json!({"name": "d1", "size": 1 << 20, "socket": nowhere}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot listen"), "{e}");
    let names = |c: &mut vhost_thin::ctl::Client| {
        c.execute("query-disks", json!({}))
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&mut c), ["disk0"]);
    // The name is free: the same disk-add with a good path works.
    let good = s.dir.path().join("d1.sock");
    let r = c
        .execute(
            "disk-add",
            json!({"name": "d1", "size": 1 << 20, "socket": good}),
        )
        .unwrap();
    assert_eq!(r["socket"], json!(good));
    assert_eq!(names(&mut c), ["disk0", "d1"]);
    // A socket already serving another disk is refused before anything is created too.
    let e = c
        .execute(
            "disk-add",
            json!({"name": "d2", "size": 1 << 20, "socket": s.sock}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("in use"), "{e}");
    assert_eq!(names(&mut c), ["disk0", "d1"]);
    let mut s = s;
    assert!(s.stop().success());
    assert!(cli(&["pool", "check", "-m", &s.m]).contains("clean"));
}

#[test]
fn disk_disconnected_is_sent_once_the_writes_are_durable() {
    use std::io::{BufRead, BufReader, Write};
    let mut s = Served::new("");
    drop(s.client()); // waits for the management socket
    let qmp = std::os::unix::net::UnixStream::connect(s.qmp()).unwrap();
    qmp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut lines = BufReader::new(qmp.try_clone().unwrap()).lines();
    lines.next().unwrap().unwrap(); // greeting
    (&qmp)
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    lines.next().unwrap().unwrap();
    // A write, no FLUSH, then the guest leaves.
    let mut g = Guest::connect(&s.sock, 1);
    assert_eq!(g.write(0, 0, &[0x3c; 4096], 1), 0);
    drop(g);
    let event = loop {
        let line = lines.next().expect("no DISK_DISCONNECTED").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["event"] == "DISK_DISCONNECTED" {
            break v;
        }
    };
    assert_eq!(event["data"], json!({"disk": "disk0", "committed": true}));
    // Killed at once, no chance to commit again: the write is there.
    let mut child = s.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let out = std::process::Command::new(common::bin())
        .args([
            "thin", "export", "-m", &s.m, "-d", &s.d, "--id", "0", "--size", "4096", "-o", "-",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, vec![0x3c; 4096]);
}

#[test]
fn disk_add_refuses_queue_counts_out_of_range() {
    let s = Served::new("");
    let mut c = s.client();
    for n in [0, 65, 1000] {
        let e = c
            .execute(
                "disk-add",
                json!({"name": "d1", "size": 1 << 20, "num-queues": n}),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("'num-queues' must be 1 to 64"), "{e}");
    }
    assert_eq!(
        c.execute("query-disks", json!({}))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1,
        "nothing was created"
    );
    let r = c
        .execute(
            "disk-add",
            json!({"name": "d1", "size": 1 << 20, "num-queues": 64}),
        )
        .unwrap();
    assert!(r["socket"].is_string());
}

/// dm-thin's set_transaction_id over QMP: refused unless the old id matches, kept across a
/// restart, and changes go on from the new id.
#[test]
fn pool_set_transaction_id_is_a_compare_and_swap() {
    let mut s = Served::new("");
    let mut c = s.client();
    let tid = c.execute("query-pools", json!({})).unwrap()[0]["transaction-id"]
        .as_u64()
        .unwrap();
    let e = c
        .execute(
            "pool-set-transaction-id",
            json!({"old": tid + 1, "new": 42}),
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("is {tid}, not {}", tid + 1)),
        "{e}"
    );
    let r = c
        .execute("pool-set-transaction-id", json!({"old": tid, "new": 1000}))
        .unwrap();
    assert_eq!(r["transaction-id"], 1000);
    drop(c);
    assert!(s.stop().success());
    s.start("");
    let mut c = s.client();
    assert_eq!(
        c.execute("query-pools", json!({})).unwrap()[0]["transaction-id"],
        1000
    );
    c.execute("snapshot-create", json!({"disk": "disk0", "name": "s"}))
        .unwrap();
    assert_eq!(
        c.execute("query-pools", json!({})).unwrap()[0]["transaction-id"],
        1001
    );
}
