//! End-to-end tests of the offline CLI, against the real thin-provisioning-tools when
//! they are installed (required when VHOST_THIN_REQUIRE_TOOLS=1, as in CI).

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vhost-thin")
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run vhost-thin");
    out
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "vhost-thin {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs the CLI, expecting it to fail with `needle` in its stderr; returns the stderr.
fn fails(args: &[&str], needle: &str) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "vhost-thin {args:?} succeeded; stderr: {err}"
    );
    assert!(
        err.contains(needle),
        "vhost-thin {args:?}: stderr lacks {needle:?}: {err}"
    );
    err.into_owned()
}

fn tool(name: &str) -> Option<PathBuf> {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Some(p);
        }
    }
    if std::env::var("VHOST_THIN_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{name} is required (VHOST_THIN_REQUIRE_TOOLS=1) but not installed");
    }
    eprintln!("note: {name} not installed, skipping that part");
    None
}

struct PoolFiles {
    _dir: tempfile::TempDir,
    m: String,
    d: String,
    root: PathBuf,
}

fn new_pool(data_size: &str) -> PoolFiles {
    new_pool_with(&["--data-size", data_size])
}

/// A pool made by `pool create` with these extra arguments.
fn new_pool_with(args: &[&str]) -> PoolFiles {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("meta").to_str().unwrap().to_string();
    let d = dir.path().join("data").to_str().unwrap().to_string();
    let mut all = vec!["pool", "create", "-m", &m, "-d", &d];
    all.extend_from_slice(args);
    ok(&all);
    PoolFiles {
        root: dir.path().to_path_buf(),
        _dir: dir,
        m,
        d,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
fn create_import_snapshot_export_check() {
    let p = new_pool("64MiB");
    let (m, d) = (p.m.as_str(), p.d.as_str());
    ok(&[
        "thin", "create", "-m", m, "-d", d, "--id", "0", "--size", "8MiB", "--name", "golden",
    ]);
    // 1 MiB of data, then 1 MiB of zeroes (not provisioned), then 512 KiB of data.
    let mut image = pattern(1 << 20, 1);
    image.extend(vec![0u8; 1 << 20]);
    image.extend(pattern(512 << 10, 2));
    let img = p.root.join("image");
    std::fs::write(&img, &image).unwrap();
    let out = ok(&[
        "thin",
        "import",
        "-m",
        m,
        "-d",
        d,
        "--id",
        "0",
        "-i",
        img.to_str().unwrap(),
    ]);
    assert!(out.contains("24 blocks with data"), "{out}");
    ok(&[
        "thin", "snapshot", "-m", m, "-d", d, "--origin", "0", "--id", "1", "--name", "vm1",
    ]);
    let patch = p.root.join("patch");
    std::fs::write(&patch, pattern(4096, 9)).unwrap();
    ok(&[
        "thin",
        "import",
        "-m",
        m,
        "-d",
        d,
        "--id",
        "0",
        "-i",
        patch.to_str().unwrap(),
        "--offset",
        "4096",
    ]);

    // The snapshot keeps the original, the origin has the patch; sizes come from the registry.
    let exp = p.root.join("snap.out");
    ok(&[
        "thin",
        "export",
        "-m",
        m,
        "-d",
        d,
        "--id",
        "1",
        "-o",
        exp.to_str().unwrap(),
    ]);
    let mut want = image.clone();
    want.resize(8 << 20, 0);
    assert_eq!(std::fs::read(&exp).unwrap(), want);
    let out = Command::new(bin())
        .args([
            "thin", "export", "-m", m, "-d", d, "--id", "0", "--size", "8192", "-o", "-",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(&out.stdout[4096..], &pattern(4096, 9)[..]);
    assert_eq!(&out.stdout[..4096], &image[..4096]);

    let ls = ok(&["thin", "ls", "-m", m, "-d", d, "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&ls).unwrap();
    assert_eq!(rows[0]["name"], "golden");
    assert_eq!(rows[1]["origin"], 0);
    assert_eq!(rows[0]["mapped_blocks"], 24);
    assert_eq!(rows[0]["exclusive_bytes"], 65536);
    assert_eq!(rows[1]["exclusive_bytes"], 65536);
    assert_ne!(rows[0]["serial"], rows[1]["serial"]);

    let st: serde_json::Value =
        serde_json::from_str(&ok(&["pool", "status", "-m", m, "-d", d, "--json"])).unwrap();
    assert_eq!(st["data_used"], 25);
    assert_eq!(st["mode"], "write");
    let chk = ok(&["pool", "check", "-m", m, "-d", d]);
    assert!(chk.contains("clean"), "{chk}");

    if let Some(tc) = tool("thin_check") {
        let o = Command::new(tc).arg(m).output().unwrap();
        assert!(
            o.status.success(),
            "thin_check: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    if let Some(td) = tool("thin_dump") {
        let o = Command::new(td).arg(m).output().unwrap();
        assert!(o.status.success());
        assert_eq!(
            String::from_utf8(o.stdout).unwrap(),
            ok(&["pool", "dump", "-m", m])
        );
    }

    // Changed blocks between the snapshot and the origin, as thin_delta prints them.
    let delta = ok(&["thin", "delta", "-m", m, "--snap1", "1", "--snap2", "0"]);
    assert!(
        delta.contains("<different begin=\"0\" length=\"1\"/>"),
        "{delta}"
    );
    if let Some(td) = tool("thin_delta") {
        let o = Command::new(td)
            .args(["--snap1", "1", "--snap2", "0", m])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(o.stdout).unwrap(), delta);
    }
    // --changed-only: the same runs left out, nothing else changed.
    let changed = ok(&[
        "thin",
        "delta",
        "-m",
        m,
        "--snap1",
        "1",
        "--snap2",
        "0",
        "--changed-only",
    ]);
    let without_same: String = delta
        .lines()
        .filter(|l| !l.trim_start().starts_with("<same "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(changed, without_same);

    // Delete the origin: the snapshot's data survives.
    ok(&["thin", "delete", "-m", m, "-d", d, "--id", "0"]);
    ok(&[
        "thin",
        "export",
        "-m",
        m,
        "-d",
        d,
        "--id",
        "1",
        "-o",
        exp.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&exp).unwrap(), want);
    assert!(ok(&["pool", "check", "-m", m]).contains("clean"));
}

#[test]
fn errors_name_the_file_and_the_fix() {
    let p = new_pool("16MiB");
    let (m, d) = (p.m.as_str(), p.d.as_str());
    fails(
        &["thin", "create", "-m", m, "-d", d, "--id", "16777216"],
        "above the maximum",
    );
    fails(
        &[
            "thin", "snapshot", "-m", m, "-d", d, "--origin", "5", "--id", "6",
        ],
        "thin device 5 does not exist",
    );
    fails(&["pool", "create", "-m", m, "-d", d], "--force");
    let missing = p.root.join("nope");
    let e = fails(
        &["pool", "status", "-m", missing.to_str().unwrap()],
        "No such file",
    );
    assert!(e.contains("nope"), "{e}");
    fails(
        &[
            "pool",
            "create",
            "-m",
            &format!("{m}2"),
            "-d",
            &format!("{d}2"),
        ],
        "--data-size",
    );
    fails(
        &[
            "pool",
            "create",
            "-m",
            &format!("{m}3"),
            "-d",
            &format!("{d}3"),
            "--data-size",
            "1GiB",
            "--block-size",
            "96KiB",
        ],
        "multiple of 64KiB",
    );
    let o = run(&["thin", "export", "-m", m, "-d", d, "--id", "0", "-o", "-"]);
    assert!(!o.status.success());

    // Damage the metadata: check reports it and exits 1; the CLI refuses to write.
    let mut raw = std::fs::read(m).unwrap();
    for b in &mut raw[4096 * 6 + 100..4096 * 6 + 200] {
        *b ^= 0x5a;
    }
    std::fs::write(m, &raw).unwrap();
    let o = run(&["pool", "check", "-m", m]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("DAMAGED"));
}

#[test]
fn dump_and_restore_round_trip() {
    let p = new_pool("32MiB");
    let (m, d) = (p.m.as_str(), p.d.as_str());
    ok(&[
        "thin", "create", "-m", m, "-d", d, "--id", "3", "--size", "4MiB",
    ]);
    let img = p.root.join("image");
    std::fs::write(&img, pattern(3 << 20, 4)).unwrap();
    ok(&[
        "thin",
        "import",
        "-m",
        m,
        "-d",
        d,
        "--id",
        "3",
        "-i",
        img.to_str().unwrap(),
    ]);
    ok(&[
        "thin", "snapshot", "-m", m, "-d", d, "--origin", "3", "--id", "4",
    ]);
    let xml = ok(&["pool", "dump", "-m", m]);
    let xml_path = p.root.join("dump.xml");
    std::fs::write(&xml_path, &xml).unwrap();
    let m2 = p.root.join("meta2");
    ok(&[
        "pool",
        "restore",
        "-i",
        xml_path.to_str().unwrap(),
        "-m",
        m2.to_str().unwrap(),
        "--metadata-size",
        "4MiB",
    ]);
    assert_eq!(ok(&["pool", "dump", "-m", m2.to_str().unwrap()]), xml);
    assert!(ok(&["pool", "check", "-m", m2.to_str().unwrap()]).contains("clean"));
    // The restored metadata serves the same data (no registry: sizes given explicitly).
    let out = Command::new(bin())
        .args([
            "thin",
            "export",
            "-m",
            m2.to_str().unwrap(),
            "-d",
            d,
            "--id",
            "4",
            "--size",
            "3MiB",
            "-o",
            "-",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = Sha256::digest(pattern(3 << 20, 4));
    assert_eq!(Sha256::digest(&out.stdout), want);
    let bad = p.root.join("bad.xml");
    std::fs::write(&bad, "<superblock uuid=\"\">\n<device>\n").unwrap();
    let o = run(&[
        "pool",
        "restore",
        "-i",
        bad.to_str().unwrap(),
        "-m",
        m2.to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("bad.xml") && e.contains("line"),
        "{e}"
    );
}

#[test]
fn a_crash_between_registry_and_pool_loses_no_device() {
    let p = new_pool("16MiB");
    let (m, d) = (p.m.as_str(), p.d.as_str());
    ok(&[
        "thin", "create", "-m", m, "-d", d, "--id", "0", "--size", "1MiB", "--name", "a",
    ]);
    // Simulate a crash after the registry of the next change was written but before the
    // pool committed: the registry is one transaction ahead and names a device 7 that the
    // pool never got; the pool has device 0 only.
    let reg_path = format!("{m}.registry.json");
    let mut reg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&reg_path).unwrap()).unwrap();
    let tid = reg["transaction_id"].as_u64().unwrap();
    reg["transaction_id"] = (tid + 1).into();
    reg["devices"]["7"] = serde_json::json!({"name": "b", "size": 4096, "serial": "vt-x"});
    std::fs::write(&reg_path, serde_json::to_string(&reg).unwrap()).unwrap();
    let o = run(&["thin", "ls", "-m", m, "-d", d]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("one transaction ahead"), "{err}");
    assert!(
        err.contains("registry entries [7] have no thin device"),
        "{err}"
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(" a "), "{out}");
    // A bare pool without a registry: devices by thin id.
    std::fs::remove_file(&reg_path).unwrap();
    ok(&["thin", "create", "-m", m, "-d", d, "--id", "9"]);
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&["thin", "ls", "-m", m, "-d", d, "--json"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 2);
    fails(
        &[
            "thin", "create", "-m", m, "-d", d, "--id", "10", "--name", "x",
        ],
        "no registry",
    );
}

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn export(p: &PoolFiles, id: &str) -> Vec<u8> {
    let out = p.root.join(format!("export-{id}"));
    ok(&[
        "thin",
        "export",
        "-m",
        &p.m,
        "-d",
        &p.d,
        "--id",
        id,
        "-o",
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

#[test]
fn send_and_receive_full_incremental_resumed_and_piped() {
    // Source: 64 KiB blocks; destination: 256 KiB blocks.
    let a = new_pool("64MiB");
    let b = new_pool_with(&["--data-size", "64MiB", "--block-size", "256KiB"]);
    let (m, d) = (a.m.as_str(), a.d.as_str());
    ok(&[
        "thin", "create", "-m", m, "-d", d, "--id", "0", "--size", "8MiB", "--name", "vm",
    ]);
    let import = |file: &str, bytes: &[u8], offset: &str| {
        let f = a.root.join(file);
        std::fs::write(&f, bytes).unwrap();
        ok(&[
            "thin",
            "import",
            "-m",
            m,
            "-d",
            d,
            "--id",
            "0",
            "-i",
            f.to_str().unwrap(),
            "--offset",
            offset,
        ]);
    };
    import("img", &pattern(3 << 20, 1), "0");
    let snap = |id: &str, name: &str| {
        ok(&[
            "thin", "snapshot", "-m", m, "-d", d, "--origin", "0", "--id", id, "--name", name,
            "--kept",
        ])
    };
    snap("1", "monday");
    import("patch", &pattern(200 << 10, 7), "1000000");
    snap("2", "tuesday");

    // A clone (not a kept snapshot) is not sent.
    fails(
        &["send", "-m", m, "-d", d, "0", "-o", "/dev/null"],
        "not a snapshot",
    );

    let full = a.root.join("monday.vts");
    let inc = a.root.join("tuesday.vts");
    ok(&[
        "send",
        "-m",
        m,
        "-d",
        d,
        "monday",
        "-o",
        full.to_str().unwrap(),
    ]);
    ok(&[
        "send",
        "-m",
        m,
        "-d",
        d,
        "--base",
        "monday",
        "tuesday",
        "-o",
        inc.to_str().unwrap(),
    ]);
    let inc_len = std::fs::metadata(&inc).unwrap().len();
    // 200 KiB changed, sent as whole 64 KiB blocks: at most 4 blocks + framing.
    assert!(
        inc_len < (320 << 10),
        "incremental stream of {inc_len} bytes"
    );

    // The incremental alone is refused: its base is missing.
    fails(
        &[
            "receive",
            "-m",
            &b.m,
            "-d",
            &b.d,
            "-i",
            inc.to_str().unwrap(),
        ],
        "does not have",
    );

    // The full stream, cut short, into a resumable receive: exit 3 and a token.
    let bytes = std::fs::read(&full).unwrap();
    let cut = a.root.join("cut.vts");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let out = run(&[
        "receive",
        "-m",
        &b.m,
        "-d",
        &b.d,
        "-s",
        "-i",
        cut.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = v["resume-token"].as_str().unwrap().to_string();
    // The rest, piped from send to receive.
    let mut sender = Command::new(bin())
        .args(["send", "-m", m, "-d", d, "--resume", &token, "monday"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let recv = Command::new(bin())
        .args(["receive", "-m", &b.m, "-d", &b.d, "-s"])
        .stdin(sender.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(
        recv.status.success(),
        "{}",
        String::from_utf8_lossy(&recv.stderr)
    );
    assert!(sender.wait().unwrap().success());
    ok(&[
        "receive",
        "-m",
        &b.m,
        "-d",
        &b.d,
        "-i",
        inc.to_str().unwrap(),
    ]);

    let ls = ok(&["thin", "ls", "-m", &b.m, "-d", &b.d, "--json"]);
    let ls: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let id_of = |name: &str| {
        ls.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {ls}"))["id"]
            .to_string()
    };
    for name in ["monday", "tuesday"] {
        let src = if name == "monday" { "1" } else { "2" };
        assert_eq!(
            sha(&export(&b, &id_of(name))),
            sha(&export(&a, src)),
            "{name}"
        );
    }
    ok(&["pool", "check", "-m", &b.m, "-d", &b.d]);
    if let Some(tc) = tool("thin_check") {
        let st = Command::new(tc).arg(&b.m).output().unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
    }
}
