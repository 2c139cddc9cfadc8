//! Sockets and modes: a management client cannot take over another disk's socket, the
//! management socket or anything else at a path by spelling it differently, and nothing
//! the daemon makes depends on the umask it was started with.

mod common;
use common::{bin, cli, pattern, sigterm, wait_for, Guest, Served};
use serde_json::json;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command};

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// disk-add of a new disk on `socket`: must be refused, naming why.
fn refused(s: &Served, socket: &Path, why: &str) {
    let mut c = s.client();
    let e = c
        .execute(
            "disk-add",
            json!({"name": "stranger", "size": 8 << 20, "socket": socket}),
        )
        .expect_err("disk-add on a taken path succeeded");
    assert!(e.to_string().contains(why), "{}: {e}", socket.display());
    // Nothing was created.
    assert!(c
        .execute("query-disks", json!({}))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["name"] != "stranger"));
}

/// disk0 still answers on its socket with its own data.
fn disk0_is_disk0(s: &Served) {
    let mut g = Guest::connect(&s.sock, 1);
    let (st, got) = g.read(0, 0, 4096);
    assert_eq!(st, 0);
    assert_eq!(got, pattern(4096, 77), "disk0's socket serves another disk");
    g.stop();
}

#[test]
fn another_spelling_of_a_served_socket_is_refused() {
    let s = Served::new("");
    let mut g = Guest::connect(&s.sock, 1);
    assert_eq!(g.write(0, 0, &pattern(4096, 77), 1), 0);
    g.stop();
    let dir = s.dir.path();
    let name = dir.file_name().unwrap();
    // state/../state/disk0.sock
    refused(
        &s,
        &dir.join("..").join(name).join("disk0.sock"),
        "in use by disk 'disk0'",
    );
    // Through a symlinked directory.
    let link = tempfile::tempdir().unwrap();
    let via = link.path().join("via");
    std::os::unix::fs::symlink(dir, &via).unwrap();
    refused(&s, &via.join("disk0.sock"), "in use by disk 'disk0'");
    // A symlink to the socket itself.
    let alias = dir.join("alias.sock");
    std::os::unix::fs::symlink(&s.sock, &alias).unwrap();
    refused(&s, &alias, "symbolic link");
    disk0_is_disk0(&s);
}

#[test]
fn the_management_socket_cannot_be_taken_by_a_disk() {
    let s = Served::new("");
    let qmp = s.qmp();
    let name = s.dir.path().file_name().unwrap();
    refused(&s, &qmp, "management socket");
    refused(
        &s,
        &s.dir.path().join("..").join(name).join("qmp.sock"),
        "management socket",
    );
    // Management still works.
    s.client().execute("query-version", json!({})).unwrap();
}

#[test]
fn sockets_the_daemon_did_not_make_are_left_alone() {
    let s = Served::new("");
    let elsewhere = tempfile::tempdir().unwrap();
    // A live socket of another program.
    let live = elsewhere.path().join("live.sock");
    let l = UnixListener::bind(&live).unwrap();
    refused(&s, &live, "another program listens on it");
    drop(l);
    // Now dead, but not the daemon's: still not removed.
    refused(&s, &live, "nobody listens");
    assert!(live.exists());
    // A file that is not a socket.
    let file = elsewhere.path().join("data.img");
    std::fs::write(&file, b"keep").unwrap();
    refused(&s, &file, "not a socket");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    // In the daemon's own socket directory, a dead socket (a crashed run's) is replaced.
    let stale = s.dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let mut c = s.client();
    c.execute(
        "disk-add",
        json!({"name": "fresh", "size": 8 << 20, "socket": stale}),
    )
    .unwrap();
    UnixStream::connect(&stale).unwrap();
}

/// `vhost-thin serve --state-dir DIR` (the quickstart) started with umask 000.
fn quickstart_with_umask_000(dir: &Path) -> Child {
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec {} serve --state-dir {}",
            bin(),
            dir.display()
        ))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&dir.join("qmp.sock"));
    child
}

#[test]
fn nothing_the_daemon_makes_is_open_to_other_users_whatever_the_umask() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("state");
    let child = quickstart_with_umask_000(&dir);
    wait_for(&dir.join("disk0.sock"));
    let mut c = vhost_thin::ctl::Client::connect(&dir.join("qmp.sock")).unwrap();
    c.execute("disk-add", json!({"name": "late", "size": 8 << 20}))
        .unwrap();
    assert_eq!(mode(&dir), 0o700, "state directory");
    for f in [
        "pool.meta",
        "pool.data",
        "pool.meta.registry.json",
        "pool.meta.journal",
        "vhost-thin.yaml",
    ] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    for s in ["disk0.sock", "late.sock", "qmp.sock"] {
        assert_eq!(mode(&dir.join(s)), 0o600, "{s}");
    }
    assert!(sigterm(child).status.success());
}

#[test]
fn disk_sockets_get_the_configured_group_and_mode_and_world_access_is_refused() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path();
    let gid = std::fs::metadata(dir).unwrap().gid();
    let write_cfg = |mode: &str| {
        let cfg = dir.join("c.yaml");
        std::fs::write(
            &cfg,
            format!(
                "pools:\n  - name: p\n    metadata: {d}/m\n    data: {d}/d\n    create:\n      data-size: 64MiB\n\
                 disks:\n  - name: vm\n    size: 8MiB\n    socket: {d}/vm.sock\n\
                 disk-sockets:\n  mode: \"{mode}\"\n  group: \"{gid}\"\n\
                 management:\n  socket: {d}/q.sock\n",
                d = dir.display()
            ),
        )
        .unwrap();
        cfg
    };
    let out = Command::new(bin())
        .args(["config", "check"])
        .arg(write_cfg("0666"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("every local user"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = write_cfg("0660");
    cli(&["config", "check", cfg.to_str().unwrap()]);
    let child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&dir.join("q.sock"));
    let sock = dir.join("vm.sock");
    assert_eq!(mode(&sock), 0o660);
    assert_eq!(std::fs::metadata(&sock).unwrap().gid(), gid);
    // The management socket keeps its own (default) mode.
    assert_eq!(mode(&dir.join("q.sock")), 0o600);
    assert!(sigterm(child).status.success());
}
