//! A commit that fails fails the pool's promises: the metadata lives on a filesystem that
//! fills up under a writing guest; once a commit has failed and the pool rolled back, no
//! FLUSH succeeds any more (it would vouch for writes that are gone), query-pools and
//! POOL_MODE_CHANGED say so, and DISK_DISCONNECTED does not claim a commit.
//!
//! The small filesystem is a tmpfs mounted in a mount namespace of the daemon's own
//! (`unshare -rm`), so nothing outlives the test.
//!
//! A change whose registry cannot be written fails whole: the pool and the registry change
//! together or not at all, in memory and across a restart.

mod common;
use common::{bin, pattern, run, wait_for, Guest, Served};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;

const BS: usize = 64 * 1024;

/// A daemon serving disk0 from a pool whose metadata, registry and journal are on a tmpfs
/// that a filler file leaves with `free_bytes` free once the pool exists; the data file
/// and the sockets are in `dir`.
fn serve_on_small_fs(dir: &std::path::Path, free_bytes: u64) -> Child {
    let mnt = dir.join("fs");
    std::fs::create_dir(&mnt).unwrap();
    let (m, d) = (mnt.join("meta"), dir.join("data"));
    let b = bin();
    let script = format!(
        "set -e; mount -t tmpfs -o size=32m tmpfs {mnt}; \
         {b} pool create -m {m} -d {d} --data-size 512MiB --metadata-size 8MiB >/dev/null; \
         {b} thin create -m {m} -d {d} --id 0 --size 256MiB --name disk0 >/dev/null; \
         avail=$(( $(stat -f -c '%a * %S' {mnt}) )); \
         head -c $(( avail - {free_bytes} )) /dev/zero > {mnt}/filler; \
         exec {b} serve -m {m} -d {d} --disk id=0,socket={sock} --qmp {qmp} --commit-interval-ms 50",
        mnt = mnt.display(),
        m = m.display(),
        d = d.display(),
        sock = dir.join("disk0.sock").display(),
        qmp = dir.join("qmp.sock").display(),
    );
    Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("unshare (util-linux) runs")
}

/// A raw QMP connection that keeps the events it reads.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &std::path::Path) -> Qmp {
        wait_for(path);
        let s = UnixStream::connect(path).unwrap();
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            events: Vec::new(),
        };
        q.read();
        q.exec("qmp_capabilities", json!({}));
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        assert!(self.r.read_line(&mut line).unwrap() > 0, "daemon hung up");
        serde_json::from_str(&line).unwrap()
    }

    fn exec(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({"execute": cmd, "arguments": args});
        self.w.write_all(format!("{msg}\n").as_bytes()).unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            return v;
        }
    }

    fn pool(&mut self) -> Value {
        self.exec("query-pools", json!({}))["return"][0].clone()
    }
}

#[test]
fn after_a_failed_commit_no_flush_succeeds_and_the_pool_says_why() {
    let dir = tempfile::tempdir().unwrap();
    // 64 metadata blocks' worth of room: the metadata's sparse file soon outgrows it.
    let mut child = serve_on_small_fs(dir.path(), 256 << 10);
    let mut q = Qmp::connect(&dir.path().join("qmp.sock"));
    let mut g = Guest::connect(&dir.path().join("disk0.sock"), 1);
    let mut failed_at = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Distinct blocks, a FLUSH after every few: each commit shadows more metadata blocks
    // into the filesystem until one cannot be written.
    for i in 0..4096 {
        assert!(
            Instant::now() < deadline,
            "the metadata filesystem never filled"
        );
        let st = g.write(0, (i * BS / 512) as u64, &pattern(BS, i as u8), 1);
        let fl = if i % 8 == 7 {
            g.simple(0, VIRTIO_BLK_T_FLUSH)
        } else {
            0
        };
        if st != 0 || fl != 0 {
            failed_at = Some(i);
            break;
        }
    }
    let failed_at = failed_at.expect("a write or a flush failed once the filesystem was full");
    // Every FLUSH from now on fails: some acknowledged writes are gone from the pool.
    for _ in 0..3 {
        assert_ne!(
            g.simple(0, VIRTIO_BLK_T_FLUSH),
            0,
            "a FLUSH succeeded after the rollback (first failure at write {failed_at})"
        );
    }
    let p = q.pool();
    assert_eq!(p["rolled-back"], json!(true), "{p}");
    assert_eq!(p["needs-check"], json!(true), "{p}");
    assert_eq!(p["mode"], json!("read-only"), "{p}");
    // The pool monitor reports the change.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !q
        .events
        .iter()
        .any(|e| e["event"] == "POOL_MODE_CHANGED" && e["data"]["rolled-back"] == json!(true))
    {
        assert!(
            Instant::now() < deadline,
            "no POOL_MODE_CHANGED: {:?}",
            q.events
        );
        q.exec("query-version", json!({}));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Disconnecting commits the disk's writes: that commit cannot vouch for them either.
    g.stop();
    let deadline = Instant::now() + Duration::from_secs(30);
    let disconnected = loop {
        if let Some(e) = q.events.iter().find(|e| e["event"] == "DISK_DISCONNECTED") {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "no DISK_DISCONNECTED");
        q.exec("query-version", json!({}));
    };
    assert_eq!(
        disconnected["data"]["committed"],
        json!(false),
        "{disconnected}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// The names `query` (query-disks or query-snapshots) lists, sorted.
fn listed(c: &mut vhost_thin::ctl::Client, query: &str) -> Vec<String> {
    let v = c.execute(query, json!({})).unwrap();
    let mut names: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// `thin ls` of the stopped daemon's pool: (thin id, name) of every device, and what it
/// warned of (a device in the pool but not in the registry, or the other way round).
fn devices_at_rest(s: &Served) -> (Vec<(u64, Option<String>)>, String) {
    let out = run(&["thin", "ls", "-m", &s.m, "-d", &s.d, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let ls: Value = serde_json::from_slice(&out.stdout).unwrap();
    let devices = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_u64().unwrap(),
                r["name"].as_str().map(String::from),
            )
        })
        .collect();
    (devices, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_change_whose_registry_cannot_be_written_leaves_nothing_behind() {
    let mut s = Served::new("");
    let mut c = s.client();
    c.execute("disk-add", json!({"name": "gone", "size": 1 << 20}))
        .unwrap();
    c.execute("snapshot-create", json!({"disk": "disk0", "name": "keep"}))
        .unwrap();
    // The registry is written to a temporary file renamed over it: a directory in its
    // place stops the write, for root too.
    let tmp = format!("{}.registry.json.tmp", s.m);
    std::fs::create_dir(&tmp).unwrap();
    let changes = [
        ("disk-add", json!({"name": "d1", "size": 1 << 20})),
        ("snapshot-create", json!({"disk": "disk0", "name": "s1"})),
        ("disk-remove", json!({"name": "gone"})),
        ("snapshot-delete", json!({"name": "keep"})),
    ];
    for (cmd, args) in &changes {
        let e = c.execute(cmd, args.clone()).unwrap_err().to_string();
        assert!(e.contains("registry"), "{cmd}: {e}");
    }
    assert_eq!(listed(&mut c, "query-disks"), ["disk0", "gone"]);
    assert_eq!(listed(&mut c, "query-snapshots"), ["keep"]);
    drop(c);
    assert!(s.stop().success());
    let (devices, warnings) = devices_at_rest(&s);
    let names: Vec<Option<&str>> = devices.iter().map(|(_, n)| n.as_deref()).collect();
    assert_eq!(
        names,
        [Some("disk0"), Some("gone"), Some("keep")],
        "{devices:?}"
    );
    assert!(!warnings.contains("registry"), "{warnings}");
    // Writable again: the same changes succeed.
    std::fs::remove_dir(&tmp).unwrap();
    s.start("");
    let mut c = s.client();
    for (cmd, args) in &changes {
        c.execute(cmd, args.clone())
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    }
    assert_eq!(listed(&mut c, "query-disks"), ["d1", "disk0"]);
    assert_eq!(listed(&mut c, "query-snapshots"), ["s1"]);
    drop(c);
    assert!(s.stop().success());
    let (devices, warnings) = devices_at_rest(&s);
    let mut names: Vec<&str> = devices.iter().filter_map(|(_, n)| n.as_deref()).collect();
    names.sort();
    assert_eq!(names, ["d1", "disk0", "s1"], "{devices:?}");
    assert!(!warnings.contains("registry"), "{warnings}");
}
