//! What a management client may reach outside the pools: files under the directories the
//! operator allowed (by default the pool's and the sockets' directories), and programs only
//! when allowed. Each refusal leaves nothing behind: no file made, no program run, nothing
//! read or overwritten.

mod common;
use common::{bin, cli, pattern, sigterm, wait_for, Served};
use serde_json::json;
use std::process::{Command, Stdio};

fn refused(s: &Served, cmd: &str, args: serde_json::Value, why: &str) {
    let e = s
        .client()
        .execute(cmd, args.clone())
        .expect_err("a confined request succeeded");
    assert!(e.to_string().contains(why), "{cmd} {args}: {e}");
}

#[test]
fn files_outside_the_allowed_directories_are_neither_written_nor_read() {
    let s = Served::new("");
    let outside = tempfile::tempdir().unwrap();
    let mut c = s.client();
    c.execute("snapshot-create", json!({"disk": "disk0", "name": "s1"}))
        .unwrap();
    // Writing a stream anywhere.
    let target = outside.path().join("stream");
    refused(
        &s,
        "snapshot-send",
        json!({"snapshot": "s1", "file": target}),
        "outside the directories",
    );
    assert!(!target.exists());
    // Also through a link planted in an allowed directory.
    std::os::unix::fs::symlink(outside.path(), s.dir.path().join("escape")).unwrap();
    refused(
        &s,
        "snapshot-send",
        json!({"snapshot": "s1", "file": s.dir.path().join("escape").join("stream")}),
        "outside the directories",
    );
    assert!(!target.exists());
    // Reading any file as a golden image or as a stream.
    let secret = outside.path().join("secret");
    std::fs::write(&secret, pattern(1 << 20, 9)).unwrap();
    refused(
        &s,
        "disk-add",
        json!({"name": "peek", "size": 1 << 20, "external-origin": secret}),
        "outside the directories",
    );
    refused(
        &s,
        "snapshot-receive",
        json!({"file": secret}),
        "outside the directories",
    );
    // Inside, it works; the stream is the daemon's user's alone.
    let inside = s.dir.path().join("s1.stream");
    let r = c
        .execute("snapshot-send", json!({"snapshot": "s1", "file": inside}))
        .unwrap();
    let id = r["job-id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let jobs = c.execute("query-jobs", json!({})).unwrap();
        let j = jobs.as_array().unwrap().iter().find(|j| j["id"] == id);
        if j.is_some_and(|j| j["status"] == "concluded") {
            assert!(j.unwrap().get("error").is_none(), "{j:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "send never concluded");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&inside).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn running_a_program_needs_the_operator_s_leave() {
    let s = Served::new("");
    let mut c = s.client();
    c.execute("snapshot-create", json!({"disk": "disk0", "name": "s1"}))
        .unwrap();
    let marker = s.dir.path().join("ran");
    let argv = json!(["sh", "-c", format!("touch '{}'", marker.display())]);
    refused(
        &s,
        "snapshot-send",
        json!({"snapshot": "s1", "command": argv}),
        "has not allowed",
    );
    refused(
        &s,
        "replication-start",
        json!({"disk": "disk0", "command": argv, "interval": 3600}),
        "has not allowed",
    );
    assert!(!marker.exists(), "the program ran");
}

#[test]
fn an_origin_merge_does_not_write_outside_the_allowed_directories() {
    // The operator's configuration gives the disk a golden image elsewhere (allowed: it is
    // the operator's choice); a client may not have the daemon write into it.
    let dir = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let golden = images.path().join("golden.raw");
    let bytes = pattern(1 << 20, 5);
    std::fs::write(&golden, &bytes).unwrap();
    let d = dir.path().display();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "pools:\n  - name: p\n    metadata: {d}/m\n    data: {d}/d\n    create:\n      data-size: 64MiB\n\
             disks:\n  - name: vm\n    size: 1MiB\n    socket: {d}/vm.sock\n    external-origin: {g}\n\
             management:\n  socket: {d}/q.sock\n",
            g = golden.display()
        ),
    )
    .unwrap();
    let child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&dir.path().join("q.sock"));
    let mut c = vhost_thin::ctl::Client::connect(&dir.path().join("q.sock")).unwrap();
    c.execute("snapshot-create", json!({"disk": "vm", "name": "s"}))
        .unwrap();
    c.execute("disk-remove", json!({"name": "vm"})).unwrap();
    let e = c
        .execute("origin-merge", json!({"snapshot": "s"}))
        .expect_err("merge into a file outside the allowed directories");
    assert!(e.to_string().contains("outside the directories"), "{e}");
    assert!(sigterm(child).status.success());
    assert_eq!(std::fs::read(&golden).unwrap(), bytes);
    let _ = cli(&["pool", "check", "-m", &format!("{d}/m")]);
}
