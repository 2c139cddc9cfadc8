//! What a killed daemon leaves: every write it acknowledged, flushed or not (the host's page
//! cache outlives the process, so the pool's journal does too), and a pool that checks
//! clean; a kill while free space goes back to the host loses nothing either. And one writer
//! per pool: a second daemon or an offline change of a served pool is
//! refused, naming the process that holds it.

mod common;
use common::{allocated, cli, export, pattern, run, thin_check_ok, Guest, Served};
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BS: u64 = 64 * 1024;

/// SIGKILL: no chance to commit or clean up.
fn kill(s: &mut Served) {
    let mut c = s.child.take().expect("running");
    c.kill().unwrap();
    c.wait().unwrap();
}

#[test]
fn writes_acknowledged_without_a_flush_survive_sigkill() {
    let mut s = Served::new("");
    let mut want = vec![0u8; 16 << 20];
    let put = |g: &mut Guest, want: &mut Vec<u8>, at: u64, data: &[u8]| {
        assert_eq!(g.write(0, at / 512, data, 3), 0, "write at {at}");
        want[at as usize..at as usize + data.len()].copy_from_slice(data);
    };
    let mut g = Guest::connect(&s.sock, 1);
    // Provisioning writes: whole blocks, partial blocks (zero-filled around), and one
    // crossing a block boundary.
    for (i, at) in [0, 3 * BS, 5 * BS + 4096, 9 * BS - 512, 100 * BS + 1024]
        .into_iter()
        .enumerate()
    {
        let len = if i % 2 == 0 { BS as usize } else { 8192 };
        put(&mut g, &mut want, at, &pattern(len, i as u8 + 1));
    }
    // A snapshot commits; the writes after it break sharing: new mappings again.
    let mut c = s.client();
    c.execute("snapshot-create", json!({"disk": "disk0", "name": "s1"}))
        .unwrap();
    let snap = want.clone();
    put(&mut g, &mut want, 3 * BS + 512, &pattern(4096, 40));
    put(&mut g, &mut want, 200 * BS, &pattern(BS as usize, 41));
    // Killed right after the last completion: well inside the one-second commit interval.
    kill(&mut s);
    drop(g);
    // Offline inspection shows them too (replayed in memory; nothing written), and the
    // metadata on disk is the last commit, which the kernel's tools accept.
    assert!(
        export(&s.m, &s.d, "0", None) == want,
        "thin export after the kill"
    );
    thin_check_ok(&s.m);

    s.start("");
    let mut g = Guest::connect(&s.sock, 1);
    for at in (0..want.len()).step_by(BS as usize * 4) {
        let (st, got) = g.read(0, at as u64 / 512, 4 * BS as u32);
        assert_eq!(st, 0);
        assert!(
            got == want[at..at + 4 * BS as usize],
            "bytes at {at} differ after the restart"
        );
    }
    g.stop();
    assert!(s.stop().success());
    thin_check_ok(&s.m);
    let out = cli(&["pool", "check", "--metadata", &s.m, "--data", &s.d]);
    assert!(!out.contains("journal:"), "{out}");
    let snap_id = cli(&["thin", "ls", "-m", &s.m, "-d", &s.d, "--json"]);
    let ls: serde_json::Value = serde_json::from_str(&snap_id).unwrap();
    let id = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "s1")
        .map(|d| d["id"].to_string())
        .expect("s1 listed");
    assert!(
        export(&s.m, &s.d, &id, None) == snap,
        "the snapshot changed"
    );
}

#[test]
fn a_second_daemon_on_a_served_pool_is_refused_with_the_holder_named() {
    let s = Served::new("");
    let pid = s.child.as_ref().unwrap().id();
    let sock2 = s.dir.path().join("other.sock");
    let mut second = Command::new(common::bin())
        .args(["serve", "-m", &s.m, "-d", &s.d, "--disk"])
        .arg(format!("id=0,socket={}", sock2.display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A refusal is immediate; one that serves would run until stopped.
    let deadline = Instant::now() + Duration::from_secs(30);
    while second.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second daemon kept running on the served pool");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = second.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("process {pid}")),
        "the error names the daemon: {err}"
    );
    assert!(!sock2.exists());
    // The first daemon still serves.
    let mut g = Guest::connect(&s.sock, 1);
    assert_eq!(g.write(0, 0, &pattern(4096, 9), 1), 0);
}

#[test]
fn offline_commands_on_a_served_pool_are_refused_and_change_nothing() {
    let mut s = Served::new("");
    let pid = s.child.as_ref().unwrap().id();
    let file = s.dir.path().join("in.img");
    std::fs::write(&file, pattern(1 << 20, 3)).unwrap();
    let attempts: [&[&str]; 4] = [
        &["thin", "create", "-m", &s.m, "-d", &s.d, "--id", "5"],
        &[
            "thin",
            "import",
            "-m",
            &s.m,
            "-d",
            &s.d,
            "--id",
            "0",
            "--input",
            file.to_str().unwrap(),
        ],
        &["thin", "ls", "-m", &s.m, "-d", &s.d],
        &["pool", "dump", "-m", &s.m],
    ];
    for args in attempts {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded on a served pool");
        assert!(err.contains(&format!("process {pid}")), "{args:?}: {err}");
    }
    assert!(s.stop().success());
    let ls = cli(&["thin", "ls", "-m", &s.m, "-d", &s.d]);
    assert!(!ls.contains(" 5 "), "{ls}");
    assert!(export(&s.m, &s.d, "0", None).iter().all(|&b| b == 0));
}

/// SIGTERM (a clean stop, as for an upgrade) under a guest that keeps writing new blocks:
/// every write the daemon acknowledged is in the metadata it committed last, none waits in
/// the journal. The drain holds new requests back for the final commit; they must stay held
/// until the process is gone, or requests executed after the commit are acknowledged to a
/// guest while only the journal knows of them.
#[test]
fn sigterm_under_writes_leaves_nothing_acknowledged_after_the_final_commit() {
    use common::D;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
    use vm_memory::{Bytes, GuestAddress};
    // 128 MiB of disk: 2048 fresh 64 KiB blocks, more than the guest writes before the
    // daemon is gone.
    let mut s = Served::with_pool(",size=128MiB", "256MiB");
    let mut child = s.child.take().expect("running");
    let mut g = Guest::connect(&s.sock, 1);
    // Up to 16 requests in flight (48 of the 64 descriptors), each a 64 KiB write to a block
    // no request wrote before, from a buffer slot no request in flight uses.
    const DEPTH: u16 = 16;
    const SLOTS: u16 = 20;
    const MOST: u16 = 2000;
    let used_idx =
        |g: &Guest| -> u16 { g.mem.read_obj(GuestAddress(g.queues[0].used + 2)).unwrap() };
    let (mut submitted, mut signalled) = (0u16, false);
    let deadline = Instant::now() + Duration::from_secs(60);
    let exited = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the daemon did not stop");
        let completed = used_idx(&g);
        while submitted < completed + DEPTH && submitted < MOST {
            let b = Guest::buf(u64::from(submitted % SLOTS));
            g.header(b, VIRTIO_BLK_T_OUT, u64::from(submitted) * BS / 512);
            g.mem
                .write_slice(
                    &pattern(BS as usize, submitted as u8),
                    GuestAddress(b + 0x1000),
                )
                .unwrap();
            g.submit(
                0,
                &[
                    D(b, 16, false),
                    D(b + 0x1000, BS as u32, false),
                    D(b + 0x10_0800, 1, true),
                ],
            );
            submitted += 1;
        }
        if completed >= 100 && !signalled {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            signalled = true;
        }
        std::thread::sleep(Duration::from_micros(100));
    };
    assert!(exited.success(), "{exited:?}");
    assert!(signalled, "the daemon ended before the stop");
    let used = used_idx(&g);
    assert!(
        used < MOST,
        "the guest ran out of writes before the daemon stopped"
    );
    let out = cli(&["pool", "check", "--metadata", &s.m, "--data", &s.d]);
    assert!(
        !out.contains("journal:"),
        "{used} writes acknowledged, some of them after the final commit: {out}"
    );
    thin_check_ok(&s.m);
}

/// The space of free blocks goes back to the host on a thread of the daemon, after the
/// commit that freed them, and the list of what is left is in memory only. A SIGKILL in the
/// middle of it loses no data, and the next start finds the space still held (free blocks
/// whose range is not a hole) and gives it back.
#[test]
fn a_sigkill_while_space_is_given_back_loses_nothing_and_the_next_start_gives_back_the_rest() {
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
    const DATA: u64 = 512 << 20;
    let mut s = Served::with_pool("", "512MiB");
    let data = std::path::PathBuf::from(&s.d);
    let mut want = vec![0u8; 16 << 20];
    let mut g = Guest::connect(&s.sock, 1);
    // 2 MiB in 512 KiB writes (the test frontend's buffers hold less than 1 MiB).
    for (i, at) in [0usize, 512 << 10, 8 << 20, (8 << 20) + (512 << 10)]
        .into_iter()
        .enumerate()
    {
        let p = pattern(512 << 10, i as u8 + 1);
        assert_eq!(g.write(0, at as u64 / 512, &p, 4), 0);
        want[at..at + p.len()].copy_from_slice(&p);
    }
    assert_eq!(g.simple(0, VIRTIO_BLK_T_FLUSH), 0);
    drop(g);
    assert!(s.stop().success());
    let in_use = allocated(&data);
    assert!((2 << 20..4 << 20).contains(&in_use), "{in_use}");
    // Killed once the first piece is back and before the rest is (the whole passdown
    // takes 0.1 s or more: 512 pieces, each followed by a pause); a test process kept
    // off the CPU for that long sees it end first and tries again.
    for attempt in 1.. {
        common::fill_holes(&data, 0x77);
        assert_eq!(allocated(&data), DATA);
        s.start("");
        let deadline = Instant::now() + Duration::from_secs(60);
        while allocated(&data) == DATA {
            assert!(
                Instant::now() < deadline,
                "no space given back at the start"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        kill(&mut s);
        assert!(
            export(&s.m, &s.d, "0", None) == want,
            "thin export after a kill during the passdown"
        );
        thin_check_ok(&s.m);
        let left = allocated(&data);
        eprintln!("attempt {attempt}: killed with {} MiB held", left >> 20);
        if left > in_use + (DATA >> 3) {
            break;
        }
        assert!(attempt < 5, "the passdown always ended before the kill");
    }
    s.start("");
    assert_eq!(
        common::allocated_once(&data, |now| now <= in_use),
        in_use,
        "the space a kill left held is given back after the next start"
    );
    let mut g = Guest::connect(&s.sock, 1);
    for at in (0..want.len()).step_by(256 << 10) {
        let (st, got) = g.read(0, at as u64 / 512, 256 << 10);
        assert_eq!(st, 0);
        assert!(got == want[at..at + (256 << 10)], "bytes at {at} differ");
    }
    g.stop();
    assert!(s.stop().success());
    thin_check_ok(&s.m);
}
