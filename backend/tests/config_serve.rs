//! `serve --config`, the quickstart, and `ctl`, as a user runs them.

mod common;
use common::{bin, cli, sigterm, wait_for};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running daemon, killed on drop (a failed assertion leaves no daemon behind).
struct Daemon(Option<Child>);

impl Daemon {
    /// SIGTERM; the daemon must exit 0. Returns its stdout.
    fn stop(mut self) -> String {
        let out = sigterm(self.0.take().expect("running"));
        assert!(out.status.success(), "{:?}", out.status);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `vhost-thin serve ARGS`, stdout piped (see [`Daemon::stop`]), stderr dropped.
fn spawn_serve(args: &[&str]) -> Daemon {
    let child = Command::new(bin())
        .arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Daemon(Some(child))
}

fn ctl(qmp: &Path, args: &[&str]) -> String {
    let mut all = vec!["ctl", "-s", qmp.to_str().unwrap()];
    all.extend_from_slice(args);
    cli(&all)
}

#[test]
fn config_creates_serves_and_remembers_run_time_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let cfg = dir.path().join("vhost-thin.yaml");
    std::fs::write(
        &cfg,
        format!(
            "pools:\n  - name: main\n    metadata: {d}/p.meta\n    data: {d}/p.data\n    create:\n      data-size: 256MiB\n    out-of-space:\n      policy: queue\n      timeout: 10\n\
             disks:\n  - name: golden\n    size: 64MiB\n    socket: {d}/golden.sock\n  - name: vm1\n    size: 64MiB\n    socket: {d}/vm1.sock\n    clone-from: golden\n\
             management:\n  socket: {d}/qmp.sock\n"
        ),
    )
    .unwrap();
    // Exits 0 (cli checks it) and says what it found.
    let check = cli(&["config", "check", cfg.to_str().unwrap()]);
    assert!(check.contains("valid (1 pools, 2 disks)"), "{check}");
    let qmp = dir.path().join("qmp.sock");
    let serve = || spawn_serve(&["--config", cfg.to_str().unwrap()]);
    let c = serve();
    wait_for(&qmp);
    let disks: serde_json::Value = serde_json::from_str(&ctl(&qmp, &["--json", "disks"])).unwrap();
    assert_eq!(disks.as_array().unwrap().len(), 2);
    assert_eq!(disks[1]["origin"], "golden");
    let pools: serde_json::Value = serde_json::from_str(&ctl(&qmp, &["--json", "pools"])).unwrap();
    assert_eq!(pools[0]["policy"]["out-of-space"], "queue");
    assert!(ctl(&qmp, &["add", "scratch", "--size", "8MiB"]).contains("scratch.sock"));
    assert!(ctl(&qmp, &["snapshot", "vm1", "vm1-snap"]).contains("writes held"));
    // A policy set at run time is kept for the next start.
    ctl(
        &qmp,
        &[
            "exec",
            "pool-set-policy",
            r#"{"out-of-space": "queue", "timeout": 30, "low-water-data": 70}"#,
        ],
    );
    let out = c.stop();
    assert!(out.contains("disk golden: created"), "{out}");
    // Second start: nothing created again; the disk added at run time is served too.
    let c = serve();
    wait_for(&qmp);
    let names = ctl(&qmp, &["disks"]);
    for n in ["golden", "vm1", "scratch"] {
        assert!(names.contains(n), "{names}");
    }
    assert!(ctl(&qmp, &["snapshots"]).contains("vm1-snap"));
    let pools: serde_json::Value = serde_json::from_str(&ctl(&qmp, &["--json", "pools"])).unwrap();
    assert_eq!(pools[0]["policy"]["out-of-space"], "queue", "{pools}");
    assert_eq!(pools[0]["policy"]["timeout"], 30, "{pools}");
    assert_eq!(pools[0]["low-water"]["data"], 70, "{pools}");
    let out = c.stop();
    assert!(out.contains("as set at run time"), "{out}");
    assert!(!out.contains("created"), "{out}");
    assert!(
        out.contains("disk scratch: in the registry (added at run time)"),
        "{out}"
    );
}

#[test]
fn quickstart_makes_and_reuses_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let serve = || spawn_serve(&["--state-dir", state.to_str().unwrap()]);
    let c = serve();
    let qmp = state.join("qmp.sock");
    wait_for(&qmp);
    assert!(ctl(&qmp, &["disks"]).contains("disk0"));
    let out = c.stop();
    assert!(out.contains("quickstart: wrote"), "{out}");
    assert!(
        out.contains("-device vhost-user-blk-pci,chardev=disk0"),
        "{out}"
    );
    assert!(out.contains("cloud-hypervisor"), "{out}");
    assert!(out.contains(" ctl -s "), "{out}");
    let c = serve();
    wait_for(&qmp);
    // Changes at run time, which the next start's banner shows as they are served.
    ctl(&qmp, &["add", "scratch", "--size", "8M"]);
    ctl(&qmp, &["resize", "disk0", "11G"]);
    let out = c.stop();
    assert!(
        !out.contains("quickstart: wrote") && !out.contains("created"),
        "{out}"
    );
    let c = serve();
    wait_for(&qmp);
    let out = c.stop();
    assert!(out.contains("serving disk0 (11 GiB, 2 queues)"), "{out}");
    assert!(out.contains("serving scratch (8 MiB, 1 queue)"), "{out}");
}

/// Speaks QMP on `qmp`: the greeting, negotiation, then each of `commands` (JSON texts).
/// Returns the replies to `commands`, events left out.
fn qmp_session(qmp: &Path, commands: &[&str]) -> Vec<serde_json::Value> {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(qmp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut next = || loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v.get("event").is_none() {
            return v;
        }
    };
    assert!(next().get("QMP").is_some());
    let mut out = Vec::new();
    for c in std::iter::once(&r#"{"execute": "qmp_capabilities"}"#).chain(commands) {
        w.write_all(c.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        out.push(next());
    }
    out.remove(0);
    out
}

/// Every management command is one log line on stderr with its outcome; the level comes from
/// the configuration unless RUST_LOG is set.
#[test]
fn each_management_command_is_logged_with_its_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let qmp = dir.path().join("qmp.sock");
    let cfg = dir.path().join("vhost-thin.yaml");
    let write_cfg = |level: Option<&str>| {
        let logging = level
            .map(|l| format!("logging:\n  level: {l}\n"))
            .unwrap_or_default();
        std::fs::write(
            &cfg,
            format!(
                "pools:\n  - name: main\n    metadata: {d}/p.meta\n    data: {d}/p.data\n    create:\n      data-size: 64MiB\n\
                 disks:\n  - name: disk0\n    size: 8MiB\n    socket: {d}/disk0.sock\n\
                 management:\n  socket: {d}/qmp.sock\n{logging}"
            ),
        )
        .unwrap();
    };
    // Runs the daemon, one session, SIGTERM; returns stderr.
    let run = |rust_log: Option<&str>| {
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(l) = rust_log {
            cmd.env("RUST_LOG", l);
        }
        let mut c = Daemon(Some(cmd.spawn().unwrap()));
        wait_for(&qmp);
        let replies = qmp_session(
            &qmp,
            &[
                r#"{"execute": "query-version", "id": 1}"#,
                r#"{"execute": "disk-remove", "arguments": {"name": "nope"}}"#,
            ],
        );
        assert!(replies[0].get("return").is_some(), "{replies:?}");
        assert_eq!(replies[1]["error"]["class"], "DeviceNotFound");
        let out = sigterm(c.0.take().expect("running"));
        assert!(out.status.success(), "{:?}", out.status);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let line = |log: &str, command: &str| {
        log.lines()
            .find(|l| l.contains(&format!("command=\"{command}\"")))
            .map(str::to_owned)
    };

    write_cfg(None);
    let log = run(None);
    let ok = line(&log, "query-version").unwrap_or_else(|| panic!("{log}"));
    assert!(ok.contains("INFO") && ok.contains("outcome=\"ok\"") && ok.contains("elapsed_ms="));
    assert!(ok.contains("client=") && ok.contains("pid="), "{ok}");
    let err = line(&log, "disk-remove").unwrap_or_else(|| panic!("{log}"));
    assert!(
        err.contains(
            r#"outcome="error" class="DeviceNotFound" desc="no disk or snapshot named 'nope'""#
        ),
        "{err}"
    );
    assert!(err.contains(r#"args={"name":"nope"}"#), "{err}");
    assert!(line(&log, "qmp_capabilities").is_some(), "{log}");
    assert_eq!(
        log.matches(" qmp ").count(),
        3,
        "one line per command:\n{log}"
    );

    // The configuration's level: warn hides the command lines ...
    write_cfg(Some("warn"));
    let log = run(None);
    assert!(line(&log, "query-version").is_none(), "{log}");
    // ... and RUST_LOG wins over the configuration.
    let log = run(Some("info"));
    assert!(line(&log, "disk-remove").is_some(), "{log}");
}

#[test]
fn a_registry_entry_named_like_a_path_is_refused_at_start_and_nothing_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run_dir = state.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let m = state.join("p.meta").display().to_string();
    let d = state.join("p.data").display().to_string();
    cli(&["pool", "create", "-m", &m, "-d", &d, "--data-size", "64MiB"]);
    cli(&[
        "thin", "create", "-m", &m, "-d", &d, "--id", "0", "--size", "1MiB", "--name", "disk0",
    ]);
    // The registry is a file anybody with access may edit: a name in it that is a path
    // would put the disk's socket (`<socket dir>/<name>.sock`) outside the socket directory.
    let reg = format!("{m}.registry.json");
    let text = std::fs::read_to_string(&reg).unwrap();
    assert!(text.contains("\"disk0\""), "{text}");
    std::fs::write(&reg, text.replace("\"disk0\"", "\"../../x\"")).unwrap();
    let cfg = dir.path().join("vhost-thin.yaml");
    std::fs::write(
        &cfg,
        format!(
            "pools:\n  - name: main\n    metadata: {m}\n    data: {d}\nmanagement:\n  socket: {}/qmp.sock\n",
            run_dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(bin())
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, in_time) = common::wait_output(child, Duration::from_secs(60));
    let outside = dir.path().join("x.sock");
    assert!(
        !outside.exists(),
        "a socket was made outside the socket directory"
    );
    assert!(in_time, "the daemon started with the bad name");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&reg) && err.contains("thin device 0") && err.contains("\"../../x\""),
        "{err}"
    );
    assert!(!run_dir.join("qmp.sock").exists());
    // The offline CLI refuses it the same way: one rule wherever the registry is opened.
    let o = common::run(&["thin", "ls", "-m", &m, "-d", &d]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("thin device 0") && err.contains("\"../../x\""),
        "{err}"
    );
}

/// `ctl` as a user runs it from a shell: paths are the caller's (relative to where `ctl`
/// runs, not the daemon), the new disk's socket is `--disk-socket` (`--socket` is the
/// management socket's), and a socket that is not a management one gets an error, not a
/// wait forever.
#[test]
fn ctl_resolves_paths_where_it_runs_and_names_the_disk_socket_apart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let cfg = dir.path().join("vhost-thin.yaml");
    std::fs::write(
        &cfg,
        format!(
            "pools:\n  - name: main\n    metadata: {d}/p.meta\n    data: {d}/p.data\n    create:\n      data-size: 64MiB\n\
             disks:\n  - name: vm1\n    size: 8MiB\n    socket: {d}/vm1.sock\n\
             management:\n  socket: {d}/qmp.sock\n"
        ),
    )
    .unwrap();
    let qmp = dir.path().join("qmp.sock");
    let c = spawn_serve(&["--config", cfg.to_str().unwrap()]);
    wait_for(&qmp);
    let ctl_in = |cwd: &Path, args: &[&str]| {
        let out = Command::new(bin())
            .current_dir(cwd)
            .args(["ctl", "-s", qmp.to_str().unwrap()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = ctl_in(dir.path(), &["snapshot", "vm1", "s1"]);
    assert_eq!(code, Some(0), "{err}");
    // Relative to ctl's directory, which the daemon (started elsewhere) does not share.
    let (code, _, err) = ctl_in(dir.path(), &["send", "s1", "--file", "s1.stream"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(dir.path().join("s1.stream").is_file());
    let (code, out, err) = ctl_in(
        dir.path(),
        &["clone", "s1", "vm2", "--disk-socket", "vm2.sock"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&format!("{d}/vm2.sock")), "{out}");
    assert!(dir.path().join("vm2.sock").exists());
    // The old spelling, which named the management socket's option too, is a usage error.
    let (code, _, err) = ctl_in(dir.path(), &["clone", "s1", "vm3", "--socket", "vm3.sock"]);
    assert_eq!(code, Some(2), "{err}");
    // Errors in words for a person; the QMP class for scripts (--json), exit 1 both ways.
    let (code, _, err) = ctl_in(dir.path(), &["remove", "nope"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no disk or snapshot named 'nope'"), "{err}");
    assert!(!err.contains("DeviceNotFound"), "{err}");
    let (code, out, _) = ctl_in(dir.path(), &["--json", "remove", "nope"]);
    assert_eq!(code, Some(1));
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["error"]["class"], "DeviceNotFound", "{out}");
    // Every change says what it did in a sentence.
    let (code, out, err) = ctl_in(dir.path(), &["resize", "vm2", "16M"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("disk vm2 is now 16 MiB"), "{out}");
    let (_, out, _) = ctl_in(dir.path(), &["delete-snapshot", "s1"]);
    assert!(out.contains("snapshot s1 deleted"), "{out}");
    // A disk's socket answers no QMP greeting: an error naming the mistake, in bounded time.
    let out = Command::new(bin())
        .args(["ctl", "-s", &format!("{d}/vm1.sock"), "disks"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a vhost-thin management socket"), "{err}");
    c.stop();
}

/// dm-thin's read_only feature: `read-only: true` under a pool serves its disks while its
/// metadata never changes; changes are refused with a reason.
#[test]
fn a_pool_configured_read_only_serves_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let cfg = dir.path().join("vhost-thin.yaml");
    let write_cfg = |extra: &str| {
        std::fs::write(
            &cfg,
            format!(
                "pools:\n  - name: main\n    metadata: {d}/p.meta\n    data: {d}/p.data\n{extra}    create:\n      data-size: 64MiB\n\
                 disks:\n  - name: vm1\n    size: 8MiB\n    socket: {d}/vm1.sock\n\
                 management:\n  socket: {d}/qmp.sock\n"
            ),
        )
        .unwrap()
    };
    write_cfg("");
    let qmp = dir.path().join("qmp.sock");
    let c = spawn_serve(&["--config", cfg.to_str().unwrap()]);
    wait_for(&qmp);
    c.stop();
    write_cfg("    read-only: true\n");
    let meta_before = std::fs::read(dir.path().join("p.meta")).unwrap();
    let c = spawn_serve(&["--config", cfg.to_str().unwrap()]);
    wait_for(&qmp);
    let pools: serde_json::Value = serde_json::from_str(&ctl(&qmp, &["--json", "pools"])).unwrap();
    assert_eq!(pools[0]["mode"], "read-only", "{pools}");
    for args in [["snapshot", "vm1", "s1"], ["add", "x", "--size"]] {
        let mut all = vec!["ctl", "-s", qmp.to_str().unwrap()];
        all.extend_from_slice(&args);
        if args[0] == "add" {
            all.push("1M");
        }
        let out = common::run(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("read-only"), "{args:?}: {err}");
    }
    c.stop();
    assert!(
        std::fs::read(dir.path().join("p.meta")).unwrap() == meta_before,
        "the metadata changed"
    );
}

/// `serve -m M -d D` serves every disk of the registry, not only those named with --disk:
/// a disk added at run time is back after a restart (on SOCKET_DIR/NAME.sock), unless
/// --only-listed says otherwise.
#[test]
fn serve_serves_the_registrys_disks_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (m, dd) = (dir.path().join("m"), dir.path().join("d"));
    let (m, dd) = (m.to_str().unwrap(), dd.to_str().unwrap());
    cli(&["pool", "create", "-m", m, "-d", dd, "--data-size", "64M"]);
    cli(&[
        "thin", "create", "-m", m, "-d", dd, "--id", "0", "--size", "8M", "--name", "vm1",
    ]);
    let qmp = dir.path().join("qmp.sock");
    let vm1 = format!("name=vm1,socket={}/vm1.sock", dir.path().display());
    let serve = |extra: &[&str]| {
        let mut args = vec![
            "-m",
            m,
            "-d",
            dd,
            "--disk",
            &vm1,
            "--qmp",
            qmp.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let c = spawn_serve(&args);
        wait_for(&qmp);
        c
    };
    let c = serve(&[]);
    ctl(&qmp, &["add", "scratch", "--size", "4M"]);
    c.stop();
    let _ = std::fs::remove_file(&qmp);
    let c = serve(&["--only-listed"]);
    assert!(!dir.path().join("scratch.sock").exists());
    c.stop();
    let _ = std::fs::remove_file(&qmp);
    let c = serve(&[]);
    wait_for(&dir.path().join("scratch.sock"));
    let disks: serde_json::Value = serde_json::from_str(&ctl(&qmp, &["--json", "disks"])).unwrap();
    let scratch = disks
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "scratch")
        .unwrap();
    assert!(
        scratch["socket"]
            .as_str()
            .unwrap()
            .ends_with("scratch.sock"),
        "{disks}"
    );
    let out = c.stop();
    assert!(out.contains("serving scratch (in the registry)"), "{out}");
}

/// `serve -m p.meta -d p.data --qmp q.sock` in the pool's directory, as the README's users
/// type it: the relative paths mean that directory (disk sockets and management files go
/// there), and the daemon's log speaks of sizes in binary units, not in bytes.
#[test]
fn relative_pool_paths_put_sockets_and_files_beside_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    cli(&[
        "pool",
        "create",
        "-m",
        dir.path().join("p.meta").to_str().unwrap(),
        "-d",
        dir.path().join("p.data").to_str().unwrap(),
        "--data-size",
        "64M",
    ]);
    let child = Command::new(bin())
        .current_dir(dir.path())
        .args(["serve", "-m", "p.meta", "-d", "p.data", "--qmp", "q.sock"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let qmp = dir.path().join("q.sock");
    let mut daemon = Daemon(Some(child));
    wait_for(&qmp);
    // The disk's socket goes to the socket directory: the metadata's, here.
    let qmp_arg = qmp.to_str().unwrap();
    let out = cli(&["ctl", "-s", qmp_arg, "add", "vm1", "--size", "2G"]);
    assert!(dir.path().join("vm1.sock").exists(), "{out}");
    cli(&["ctl", "-s", qmp_arg, "snapshot", "vm1", "s1"]);
    // A stream file beside the pool is a management file the daemon may write.
    let stream = dir.path().join("s1.stream");
    cli(&[
        "ctl",
        "-s",
        qmp_arg,
        "send",
        "s1",
        "--file",
        stream.to_str().unwrap(),
    ]);
    assert!(stream.is_file());
    let out = sigterm(daemon.0.take().unwrap());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains("not a directory"), "{log}");
    assert!(log.contains(", 2 GiB, socket"), "{log}");
    assert!(!log.contains("2147483648 bytes"), "{log}");
}
