//! End-to-end tests of the offline CLI, against the real thin-provisioning-tools when
//! they are installed (required when VHOST_THIN_REQUIRE_TOOLS=1, as in CI).

mod common;
use common::{
    bin, cli, export, new_pool, new_pool_with, pattern, run, thin_check_ok, tool, PoolFiles,
};
use sha2::{Digest, Sha256};
use std::process::Command;
use thinpool::pdata::btree::node;
use thinpool::thin::image::Image;

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

/// `thin import` of `bytes` (through a file under the pool's directory) into device `id`.
/// `--offset`, when given, is passed on; returns the command's output.
fn import(p: &PoolFiles, id: &str, file: &str, bytes: &[u8], offset: Option<&str>) -> String {
    let f = p.root.join(file);
    std::fs::write(&f, bytes).unwrap();
    let mut args = vec![
        "thin",
        "import",
        "-m",
        &p.m,
        "-d",
        &p.d,
        "--id",
        id,
        "-i",
        f.to_str().unwrap(),
    ];
    if let Some(offset) = offset {
        args.extend(["--offset", offset]);
    }
    cli(&args)
}

#[test]
fn create_import_snapshot_export_check() {
    let p = new_pool("64MiB");
    let (m, d) = (p.m.as_str(), p.d.as_str());
    cli(&[
        "thin", "create", "-m", m, "-d", d, "--id", "0", "--size", "8MiB", "--name", "golden",
    ]);
    // 1 MiB of data, then 1 MiB of zeroes (not provisioned), then 512 KiB of data.
    let mut image = pattern(1 << 20, 1);
    image.extend(vec![0u8; 1 << 20]);
    image.extend(pattern(512 << 10, 2));
    let out = import(&p, "0", "image", &image, None);
    assert!(out.contains("24 blocks with data"), "{out}");
    cli(&[
        "thin", "snapshot", "-m", m, "-d", d, "--origin", "0", "--id", "1", "--name", "vm1",
    ]);
    import(&p, "0", "patch", &pattern(4096, 9), Some("4096"));

    // The snapshot keeps the original, the origin has the patch; sizes come from the registry.
    let mut want = image.clone();
    want.resize(8 << 20, 0);
    assert_eq!(export(m, d, "1", None), want);
    let out = export(m, d, "0", Some("8192"));
    assert_eq!(&out[4096..], &pattern(4096, 9)[..]);
    assert_eq!(&out[..4096], &image[..4096]);

    let ls = cli(&["thin", "ls", "-m", m, "-d", d, "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&ls).unwrap();
    assert_eq!(rows[0]["name"], "golden");
    assert_eq!(rows[1]["origin"], 0);
    assert_eq!(rows[0]["mapped_blocks"], 24);
    assert_eq!(rows[0]["exclusive_bytes"], 65536);
    assert_eq!(rows[1]["exclusive_bytes"], 65536);
    assert_ne!(rows[0]["serial"], rows[1]["serial"]);

    let st: serde_json::Value =
        serde_json::from_str(&cli(&["pool", "status", "-m", m, "-d", d, "--json"])).unwrap();
    assert_eq!(st["data_used"], 25);
    assert_eq!(st["mode"], "write");
    let chk = cli(&["pool", "check", "-m", m, "-d", d]);
    assert!(chk.contains("clean"), "{chk}");

    thin_check_ok(m);
    if let Some(td) = tool("thin_dump") {
        let o = Command::new(td).arg(m).output().unwrap();
        assert!(o.status.success());
        assert_eq!(
            String::from_utf8(o.stdout).unwrap(),
            cli(&["pool", "dump", "-m", m])
        );
    }

    // Changed blocks between the snapshot and the origin, as thin_delta prints them.
    let delta = cli(&["thin", "delta", "-m", m, "--snap1", "1", "--snap2", "0"]);
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
    let changed = cli(&[
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
    cli(&["thin", "delete", "-m", m, "-d", d, "--id", "0"]);
    assert_eq!(export(m, d, "1", None), want);
    assert!(cli(&["pool", "check", "-m", m]).contains("clean"));
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
    cli(&[
        "thin", "create", "-m", m, "-d", d, "--id", "3", "--size", "4MiB",
    ]);
    import(&p, "3", "image", &pattern(3 << 20, 4), None);
    cli(&[
        "thin", "snapshot", "-m", m, "-d", d, "--origin", "3", "--id", "4",
    ]);
    let xml = cli(&["pool", "dump", "-m", m]);
    let xml_path = p.root.join("dump.xml");
    std::fs::write(&xml_path, &xml).unwrap();
    let m2 = p.root.join("meta2");
    cli(&[
        "pool",
        "restore",
        "-i",
        xml_path.to_str().unwrap(),
        "-m",
        m2.to_str().unwrap(),
        "--metadata-size",
        "4MiB",
    ]);
    assert_eq!(cli(&["pool", "dump", "-m", m2.to_str().unwrap()]), xml);
    assert!(cli(&["pool", "check", "-m", m2.to_str().unwrap()]).contains("clean"));
    // The restored metadata serves the same data (no registry: sizes given explicitly).
    let out = export(m2.to_str().unwrap(), d, "4", Some("3MiB"));
    let want = Sha256::digest(pattern(3 << 20, 4));
    assert_eq!(Sha256::digest(&out), want);
    let bad = p.root.join("bad.xml");
    std::fs::write(&bad, "<superblock uuid=\"\">\n<device>\n").unwrap();
    let e = fails(
        &[
            "pool",
            "restore",
            "-i",
            bad.to_str().unwrap(),
            "-m",
            m2.to_str().unwrap(),
        ],
        "bad.xml",
    );
    assert!(e.contains("line"), "{e}");
}

#[test]
fn a_crash_between_registry_and_pool_loses_no_device() {
    let p = new_pool("16MiB");
    let (m, d) = (p.m.as_str(), p.d.as_str());
    cli(&[
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
    cli(&["thin", "create", "-m", m, "-d", d, "--id", "9"]);
    let ls: serde_json::Value =
        serde_json::from_str(&cli(&["thin", "ls", "-m", m, "-d", d, "--json"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 2);
    fails(
        &[
            "thin", "create", "-m", m, "-d", d, "--id", "10", "--name", "x",
        ],
        "no registry",
    );
}

/// The offline `thin snapshot` of a disk over an external origin reads the origin after the
/// pool is reopened, as the daemon's `snapshot-create` does: the snapshot's registry entry
/// names the origin its pool device shares.
#[test]
fn an_offline_snapshot_of_a_disk_over_an_external_origin_reads_the_origin() {
    let mut s = common::Served::new("");
    let image = pattern(1 << 20, 0xab);
    let golden = s.dir.path().join("golden.img");
    std::fs::write(&golden, &image).unwrap();
    let r = s
        .client()
        .execute(
            "disk-add",
            serde_json::json!({"name": "d1", "external-origin": golden}),
        )
        .unwrap();
    let id = r["thin-id"].as_u64().unwrap().to_string();
    assert!(s.stop().success());
    let (m, d) = (s.m.clone(), s.d.clone());
    cli(&[
        "thin", "snapshot", "-m", &m, "-d", &d, "--origin", &id, "--id", "7",
    ]);
    assert!(export(&m, &d, &id, None) == image, "the disk reads wrong");
    assert!(
        export(&m, &d, "7", None) == image,
        "the offline snapshot does not read the disk's external origin"
    );
}

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// `thin export` to a file (the path that `export` to stdout does not take).
fn export_file(p: &PoolFiles, id: &str) -> Vec<u8> {
    let out = p.root.join(format!("export-{id}"));
    cli(&[
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
    cli(&[
        "thin", "create", "-m", m, "-d", d, "--id", "0", "--size", "8MiB", "--name", "vm",
    ]);
    import(&a, "0", "img", &pattern(3 << 20, 1), Some("0"));
    let snap = |id: &str, name: &str| {
        cli(&[
            "thin", "snapshot", "-m", m, "-d", d, "--origin", "0", "--id", id, "--name", name,
            "--kept",
        ])
    };
    snap("1", "monday");
    import(&a, "0", "patch", &pattern(200 << 10, 7), Some("1000000"));
    snap("2", "tuesday");

    // A clone (not a kept snapshot) is not sent.
    fails(
        &["send", "-m", m, "-d", d, "0", "-o", "/dev/null"],
        "not a snapshot",
    );

    let full = a.root.join("monday.vts");
    let inc = a.root.join("tuesday.vts");
    cli(&[
        "send",
        "-m",
        m,
        "-d",
        d,
        "monday",
        "-o",
        full.to_str().unwrap(),
    ]);
    cli(&[
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
    cli(&[
        "receive",
        "-m",
        &b.m,
        "-d",
        &b.d,
        "-i",
        inc.to_str().unwrap(),
    ]);

    let ls = cli(&["thin", "ls", "-m", &b.m, "-d", &b.d, "--json"]);
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
            sha(&export_file(&b, &id_of(name))),
            sha(&export_file(&a, src)),
            "{name}"
        );
    }
    cli(&["pool", "check", "-m", &b.m, "-d", &b.d]);
    thin_check_ok(&b.m);
}

/// `receive --name` keeps a second copy of a snapshot the pool holds (same guid); cut
/// short, that copy is dropped by `receive --abort TOKEN`, and the first stays.
#[test]
fn a_second_copy_is_received_under_another_name_and_its_abort_leaves_the_first() {
    let a = new_pool("64MiB");
    let b = new_pool("64MiB");
    let (m, d) = (a.m.as_str(), a.d.as_str());
    cli(&[
        "thin", "create", "-m", m, "-d", d, "--id", "0", "--size", "8MiB", "--name", "vm",
    ]);
    import(&a, "0", "img", &pattern(3 << 20, 5), Some("0"));
    cli(&[
        "thin", "snapshot", "-m", m, "-d", d, "--origin", "0", "--id", "1", "--name", "s1",
        "--kept",
    ]);
    let full = a.root.join("s1.vts");
    cli(&["send", "-m", m, "-d", d, "s1", "-o", full.to_str().unwrap()]);
    let cut = a.root.join("cut.vts");
    let bytes = std::fs::read(&full).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (full, cut) = (full.to_str().unwrap(), cut.to_str().unwrap());
    let r = ["receive", "-m", b.m.as_str(), "-d", b.d.as_str()];
    cli(&[&r[..], &["-i", full]].concat());
    // Again: refused, saying how to keep a second copy.
    fails(
        &[&r[..], &["-i", full]].concat(),
        "already in the pool as s1",
    );
    // A second copy, cut short: exit 3 and a token, which drops it.
    let out = run(&[&r[..], &["--name", "s1-copy", "-s", "-i", cut, "--json"]].concat());
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = v["resume-token"].as_str().unwrap().to_string();
    let out = cli(&[&r[..], &["--abort", &token]].concat());
    assert!(out.contains("dropped"), "{out}");
    let ls = cli(&["thin", "ls", "-m", &b.m, "-d", &b.d, "--json"]);
    let ls: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names, ["s1"], "{ls}");
    // The whole stream under that name: two copies, each the snapshot.
    cli(&[&r[..], &["--name", "s1-copy", "-i", full]].concat());
    let ls = cli(&["thin", "ls", "-m", &b.m, "-d", &b.d, "--json"]);
    let ls: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let want = sha(&export_file(&a, "1"));
    for name in ["s1", "s1-copy"] {
        let id = ls
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {ls}"))["id"]
            .to_string();
        assert_eq!(sha(&export_file(&b, &id)), want, "{name}");
    }
    cli(&["pool", "check", "-m", &b.m, "-d", &b.d]);
    thin_check_ok(&b.m);
}

#[test]
fn names_given_on_the_command_line_follow_the_name_rule() {
    let p = new_pool("16MiB");
    let (m, d) = (p.m.as_str(), p.d.as_str());
    for (bad, why) in [
        ("--name=../../x", "'/'"),
        ("--name=..", "'.' or '..'"),
        ("--name=-x", "'-'"),
        ("--name=a\nb", "control character"),
    ] {
        fails(&["thin", "create", "-m", m, "-d", d, "--id", "0", bad], why);
    }
    // Nothing was made by the refused commands.
    let ls = cli(&["thin", "ls", "-m", m, "-d", d, "--json"]);
    assert_eq!(ls.trim(), "[]", "{ls}");
    cli(&[
        "thin", "create", "-m", m, "-d", d, "--id", "0", "--size", "1MiB", "--name", "vm",
    ]);
    fails(
        &[
            "thin",
            "snapshot",
            "-m",
            m,
            "-d",
            d,
            "--origin",
            "0",
            "--id",
            "1",
            "--kept",
            "--name",
            &"s".repeat(65),
        ],
        "65 bytes",
    );
    cli(&[
        "thin", "snapshot", "-m", m, "-d", d, "--origin", "0", "--id", "1", "--kept", "--name", "s",
    ]);
    let stream = p.root.join("s.vts");
    cli(&[
        "send",
        "-m",
        m,
        "-d",
        d,
        "s",
        "-o",
        stream.to_str().unwrap(),
    ]);
    let q = new_pool("16MiB");
    fails(
        &[
            "receive",
            "-m",
            &q.m,
            "-d",
            &q.d,
            "-i",
            stream.to_str().unwrap(),
            "--name",
            "a/b",
        ],
        "'/'",
    );
    let ls = cli(&["thin", "ls", "-m", &q.m, "-d", &q.d, "--json"]);
    assert_eq!(ls.trim(), "[]", "{ls}");
}

/// Checksum-valid damage to the metadata (see thinpool's tests/untrusted_metadata.rs):
/// every command that reads what is damaged fails with exit status 1 and a message that
/// says what is wrong. None panics (status 101), none prints a device's bytes as if
/// nothing were wrong, and `pool check` calls the pool damaged.
#[test]
fn damaged_metadata_fails_commands_with_a_message() {
    let p = new_pool("64MiB");
    let (m, d) = (p.m.as_str(), p.d.as_str());
    cli(&[
        "thin", "create", "-m", m, "-d", d, "--id", "0", "--size", "24MiB", "--name", "disk",
    ]);
    // 320 blocks: the device's mapping tree has an internal root.
    import(&p, "0", "image", &pattern(20 << 20, 3), None);
    cli(&[
        "thin", "snapshot", "-m", m, "-d", d, "--origin", "0", "--id", "1", "--name", "snap",
        "--kept",
    ]);
    // Device 0 moves on (and gets a root of its own); the damage is to the snapshot's tree.
    import(&p, "0", "patch", &pattern(4096, 4), Some("65536"));

    fn top_entry(img: &mut Image, dev: u64, to: u64) {
        let top = img.superblock().unwrap().mapping_root;
        img.edit(top, |b| {
            let i = node::find(b, dev).unwrap();
            node::set_value_u64(b, i, to);
        })
        .unwrap();
    }
    fn snapshot_root(img: &Image) -> u64 {
        let top = img.block(img.superblock().unwrap().mapping_root).unwrap();
        node::value_u64(top, node::find(top, 1).unwrap())
    }
    type Damage = fn(&mut Image);
    // (what, damage, words the error must hold, whether opening the pool fails)
    let cases: [(&str, Damage, &str, bool); 5] = [
        (
            "details tree on a space-map node",
            |img| {
                let mut sb = img.superblock().unwrap();
                sb.details_root = sb.data_sm_root.bitmap_root;
                img.set_superblock(&sb).unwrap();
            },
            "corrupt",
            true,
        ),
        (
            "snapshot's mapping tree on a details node",
            |img| {
                let details = img.superblock().unwrap().details_root;
                top_entry(img, 1, details);
            },
            "corrupt",
            false,
        ),
        (
            "snapshot's internal root without entries",
            |img| {
                let root = snapshot_root(img);
                assert!(!node::is_leaf(img.block(root).unwrap()));
                img.edit(root, |b| node::set_nr_entries(b, 0)).unwrap();
            },
            "corrupt",
            false,
        ),
        (
            "unknown version",
            |img| {
                let mut sb = img.superblock().unwrap();
                sb.version = 3;
                img.set_superblock(&sb).unwrap();
            },
            "version 3",
            true,
        ),
        (
            "unknown incompatible feature",
            |img| {
                let mut sb = img.superblock().unwrap();
                sb.incompat_flags = 1;
                img.set_superblock(&sb).unwrap();
            },
            "incompatible",
            true,
        ),
    ];
    for (n, (what, damage, needle, at_open)) in cases.into_iter().enumerate() {
        let meta = p.root.join(format!("damaged{n}"));
        std::fs::copy(m, &meta).unwrap();
        std::fs::copy(
            format!("{m}.registry.json"),
            p.root.join(format!("damaged{n}.registry.json")),
        )
        .unwrap();
        let mut img = Image(std::fs::read(&meta).unwrap());
        damage(&mut img);
        std::fs::write(&meta, &img.0).unwrap();
        let mm = meta.to_str().unwrap();
        let mut commands = vec![
            vec!["thin", "export", "-m", mm, "-d", d, "--id", "1", "-o", "-"],
            vec!["thin", "ls", "-m", mm, "-d", d],
            vec!["pool", "dump", "-m", mm],
            vec!["thin", "delta", "-m", mm, "--snap1", "1", "--snap2", "0"],
            vec!["send", "-m", mm, "-d", d, "snap", "-o", "-"],
        ];
        let sock = p.root.join(format!("damaged{n}.sock"));
        let disk = format!("id=1,socket={}", sock.display());
        if at_open {
            commands.push(vec!["pool", "status", "-m", mm, "-d", d]);
            commands.push(vec!["serve", "-m", mm, "-d", d, "--disk", &disk]);
        }
        for args in &commands {
            let out = run(args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{what}: vhost-thin {args:?} exited with {}: {err}",
                out.status
            );
            assert!(
                err.contains(needle),
                "{what}: vhost-thin {args:?}: the error lacks {needle:?}: {err}"
            );
        }
        let out = run(&["pool", "check", "-m", mm]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what}: pool check: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// Exit statuses as zfs's and most tools': 1 when the operation fails, 2 when the command
/// line is wrong, whether clap or the command itself finds it so.
#[test]
fn a_failed_operation_exits_1_and_a_wrong_command_line_2() {
    let p = new_pool("16MiB");
    let (m, d) = (p.m.as_str(), p.d.as_str());
    let code = |args: &[&str]| run(args).status.code();
    assert_eq!(
        code(&["thin", "ls", "-m", "/nonexistent/m", "-d", d]),
        Some(1)
    );
    assert_eq!(
        code(&["thin", "delete", "-m", m, "-d", d, "--id", "7"]),
        Some(1),
        "no such device"
    );
    assert_eq!(code(&["thin", "ls", "--no-such-option"]), Some(2));
    assert_eq!(
        code(&["serve", "-m", m, "-d", d]),
        Some(2),
        "nothing to serve"
    );
    let err = fails(
        &[
            "thin", "create", "-m", m, "-d", d, "--id", "0", "--size", "-5",
        ],
        "cannot be negative",
    );
    assert!(!err.contains("unexpected argument"), "{err}");
    assert_eq!(
        code(&["thin", "create", "-m", m, "-d", d, "--id", "0", "--size", "-5"]),
        Some(2)
    );
    // The sizes qemu-img and lvcreate users write.
    for (n, size) in ["10g", "1.5M", "2MiB"].iter().enumerate() {
        let id = n.to_string();
        cli(&[
            "thin", "create", "-m", m, "-d", d, "--id", &id, "--size", size,
        ]);
    }
    let ls = cli(&["thin", "ls", "-m", m, "-d", d, "--json"]);
    for bytes in ["10737418240", "1572864", "2097152"] {
        assert!(ls.contains(bytes), "{bytes} not in {ls}");
    }
}

/// A terminal: (the side a program writes to or reads from, the side kept open here).
fn pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the two ints; the null pointers ask
    // for no name, termios or window size.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned by nothing else.
    unsafe {
        (
            std::fs::File::from_raw_fd(slave),
            std::fs::File::from_raw_fd(master),
        )
    }
}

/// As `zfs send` does, a stream (or an export) is not written to a terminal, and a receive
/// does not sit waiting on one; neither changes the pool.
#[test]
fn streams_are_not_written_to_or_read_from_a_terminal() {
    let p = new_pool("16MiB");
    let (m, d) = (p.m.as_str(), p.d.as_str());
    cli(&[
        "thin", "create", "-m", m, "-d", d, "--id", "0", "--size", "1MiB", "--name", "disk",
    ]);
    cli(&[
        "thin", "snapshot", "-m", m, "-d", d, "--origin", "0", "--id", "1", "--name", "snap",
        "--kept",
    ]);
    let registry = std::fs::read(format!("{m}.registry.json")).unwrap();
    let with_terminal = |args: &[&str], stdout: bool| {
        let (tty, _keep) = pty();
        let mut c = Command::new(bin());
        c.args(args);
        if stdout {
            c.stdout(tty).stdin(std::process::Stdio::null());
        } else {
            c.stdin(tty).stdout(std::process::Stdio::null());
        }
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in [
        vec!["send", "-m", m, "-d", d, "snap"],
        vec!["thin", "export", "-m", m, "-d", d, "--id", "1", "-o", "-"],
    ] {
        let (code, err) = with_terminal(&args, true);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains("standard output is a terminal"),
            "{args:?}: {err}"
        );
    }
    let (code, err) = with_terminal(&["receive", "-m", m, "-d", d], false);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("standard input is a terminal"), "{err}");
    assert_eq!(
        std::fs::read(format!("{m}.registry.json")).unwrap(),
        registry,
        "the registry changed"
    );
}

/// A data file made longer by other means is not taken over when the pool is opened: its
/// size changes only when asked (`pool grow` here, `pool-grow` while served).
#[test]
fn the_pool_grows_only_when_asked() {
    let p = new_pool("16MiB");
    let (m, d) = (p.m.as_str(), p.d.as_str());
    std::fs::OpenOptions::new()
        .write(true)
        .open(d)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let blocks = || {
        let st: serde_json::Value =
            serde_json::from_str(&cli(&["pool", "status", "-m", m, "-d", d, "--json"])).unwrap();
        st["data_blocks"].as_u64().unwrap()
    };
    // A writable open (a change) leaves the size alone.
    cli(&[
        "thin", "create", "-m", m, "-d", d, "--id", "0", "--size", "1M",
    ]);
    assert_eq!(blocks(), 256);
    let out = cli(&["pool", "grow", "-m", m, "-d", d]);
    assert!(out.contains("256 → 512 blocks"), "{out}");
    assert_eq!(blocks(), 512);
    thin_check_ok(m);
}
