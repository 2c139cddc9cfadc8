//! What the management socket refuses, as QEMU's QMP would or as the engine must: messages
//! with a key twice, names that are not names (a NUL, '/', '.', '..', a leading '-', too
//! long), sizes the engine cannot serve, a job id no job can have. Each refusal is a
//! GenericError reply; nothing is created, and the daemon goes on serving and stops on
//! SIGTERM.

mod common;
use common::two_pools::wait_job;
use common::{cli, wait_output, RawQmp, Served};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;
use vhost_thin::ctl::Client;

/// The largest disk, as docs/MANAGEMENT.md gives it: 4 EiB.
const MAX_DISK: u64 = 1 << 62;

/// The names of what `query` (query-disks or query-snapshots) lists.
fn listed(c: &mut Client, query: &str) -> Vec<String> {
    c.execute(query, json!({}))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

/// A GenericError reply without an id (QEMU answers input it cannot parse so), whose
/// description has `needle` in it.
fn assert_parse_error(reply: &Value, needle: &str) {
    assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
    let desc = reply["error"]["desc"].as_str().unwrap();
    assert!(
        desc.starts_with("JSON parse error, ") && desc.contains(needle),
        "{reply}"
    );
    assert!(reply.get("id").is_none(), "{reply}");
}

/// The QMP class and description of an error reply.
fn class_and_desc(e: &anyhow::Error) -> (String, String) {
    let q = e
        .downcast_ref::<vhost_thin::ctl::QmpReplyError>()
        .unwrap_or_else(|| panic!("not an error reply: {e:#}"));
    (q.class.clone(), q.desc.clone())
}

/// Runs `command`, which must fail with a GenericError saying all of `needles`.
fn refused(c: &mut Client, command: &str, args: Value, needles: &[&str]) {
    let e = match c.execute(command, args.clone()) {
        Ok(r) => panic!("{command} {args} succeeded: {r}"),
        Err(e) => class_and_desc(&e),
    };
    assert!(
        e.0 == "GenericError" && needles.iter().all(|n| e.1.contains(n)),
        "{command} {args}: {e:?}"
    );
}

#[test]
fn a_key_given_twice_at_the_top_is_refused_and_nothing_runs() {
    let s = Served::new("");
    let mut raw = RawQmp::connect(&s.qmp());
    // Whichever 'execute' a parser kept, this must not remove disk0.
    let r = raw.send(
        r#"{"execute": "query-version", "execute": "disk-remove", "arguments": {"name": "disk0"}, "id": "dup"}"#,
    );
    assert_parse_error(&r, "duplicate key 'execute'");
    let r = raw.send(r#"{"execute": "query-version", "id": 1, "id": 2}"#);
    assert_parse_error(&r, "duplicate key 'id'");
    let r =
        raw.send(r#"{"execute": "disk-remove", "arguments": {}, "arguments": {"name": "disk0"}}"#);
    assert_parse_error(&r, "duplicate key 'arguments'");
    assert_eq!(listed(&mut s.client(), "query-disks"), ["disk0"]);
    // The connection goes on.
    let r = raw.send(r#"{"execute": "query-version", "id": "after"}"#);
    assert_eq!(r["id"], "after", "{r}");
}

#[test]
fn a_key_given_twice_inside_the_arguments_or_deeper_is_refused() {
    let s = Served::new("");
    let mut raw = RawQmp::connect(&s.qmp());
    let r = raw.send(
        r#"{"execute": "disk-add", "arguments": {"name": "a", "size": 1048576, "name": "b"}}"#,
    );
    assert_parse_error(&r, "duplicate key 'name'");
    // The same key spelt two ways is the same key.
    let r = raw.send(
        r#"{"execute": "disk-add", "arguments": {"name": "a", "size": 1048576, "n\u0061me": "b"}}"#,
    );
    assert_parse_error(&r, "duplicate key 'name'");
    // At any depth, in any member.
    let r = raw
        .send(r#"{"execute": "query-version", "id": [{"k": {"x": 1, "y": [{"z": 1, "z": 2}]}}]}"#);
    assert_parse_error(&r, "duplicate key 'z'");
    // One object each with the same key is no duplicate.
    let r = raw.send(r#"{"execute": "query-version", "id": [{"k": 1}, {"k": 2}]}"#);
    assert_eq!(r["id"], json!([{"k": 1}, {"k": 2}]), "{r}");
    assert_eq!(listed(&mut s.client(), "query-disks"), ["disk0"]);
}

#[test]
fn a_job_id_with_a_nul_is_refused_leaving_no_job_and_the_daemon_stops_on_sigterm() {
    let mut s = Served::new("");
    let mut c = s.client();
    c.execute("snapshot-create", json!({"disk": "disk0", "name": "s1"}))
        .unwrap();
    let out = s.dir.path().join("s1.stream");
    let r = c.execute(
        "snapshot-send",
        json!({"job-id": "a\u{0}b", "snapshot": "s1", "file": out}),
    );
    assert!(r.is_err(), "{r:?}");
    assert_eq!(
        c.execute("query-jobs", json!({})).unwrap(),
        json!([]),
        "a refused job must leave nothing behind"
    );
    let (class, e) = class_and_desc(&r.unwrap_err());
    assert!(
        class == "GenericError"
            && e.contains("Parameter 'job-id' expects a job ID")
            && e.contains("control character"),
        "{class}: {e}"
    );
    assert!(!out.exists());
    // The same send with a good id runs, concludes and is dismissed.
    let r = c
        .execute(
            "snapshot-send",
            json!({"job-id": "send-1", "snapshot": "s1", "file": out}),
        )
        .unwrap();
    assert_eq!(r["job-id"], "send-1");
    let j = wait_job(&mut c, "send-1", Duration::from_secs(120));
    assert!(j.get("error").is_none(), "{j}");
    c.execute("job-dismiss", json!({"id": "send-1"})).unwrap();
    assert_eq!(c.execute("query-jobs", json!({})).unwrap(), json!([]));
    // Other commands refuse such an id too, and lookups with it find nothing.
    refused(
        &mut c,
        "job-dismiss",
        json!({"id": "a\u{0}b"}),
        &["Parameter 'id' expects a job ID"],
    );
    refused(
        &mut c,
        "origin-merge",
        json!({"job-id": "/x", "snapshot": "s1"}),
        &["Parameter 'job-id' expects a job ID", "'/'"],
    );
    drop(c);
    let child = s.child.take().unwrap();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let (out, in_time) = wait_output(child, Duration::from_secs(60));
    assert!(in_time, "SIGTERM did not stop the daemon within a minute");
    assert!(out.status.success(), "{:?}", out.status);
    assert!(cli(&["pool", "check", "-m", &s.m]).contains("clean"));
}

/// Names that are not names, and what the refusal says about each.
fn bad_names() -> Vec<(String, &'static str)> {
    vec![
        ("a\u{0}b".into(), "control character"),
        ("a\nb".into(), "control character"),
        ("tab\there".into(), "control character"),
        ("a/b".into(), "'/'"),
        ("../../x".into(), "'/'"),
        (".".into(), "'.' or '..'"),
        ("..".into(), "'.' or '..'"),
        ("-x".into(), "'-'"),
        ("n".repeat(65), "65 bytes"),
        (String::new(), "empty"),
    ]
}

#[test]
fn disk_add_and_snapshot_create_refuse_names_that_are_not_names() {
    let s = Served::new("");
    let mut c = s.client();
    for (bad, why) in bad_names() {
        refused(
            &mut c,
            "disk-add",
            json!({"name": bad, "size": 1 << 20}),
            &["Parameter 'name' expects a name", why],
        );
        refused(
            &mut c,
            "snapshot-create",
            json!({"disk": "disk0", "name": bad}),
            &["Parameter 'name' expects a name", why],
        );
        // Names that refer to something are held to the same rule.
        refused(
            &mut c,
            "snapshot-create",
            json!({"disk": bad, "name": "s"}),
            &["Parameter 'disk' expects a name", why],
        );
        refused(
            &mut c,
            "disk-add",
            json!({"name": "c", "clone-from": bad}),
            &["Parameter 'clone-from' expects a name", why],
        );
        refused(
            &mut c,
            "disk-add",
            json!({"name": "c", "size": 1 << 20, "pool": bad}),
            &["Parameter 'pool' expects a name", why],
        );
    }
    assert_eq!(listed(&mut c, "query-disks"), ["disk0"]);
    assert_eq!(listed(&mut c, "query-snapshots"), Vec::<String>::new());
    // The longest name, and names with characters other than letters, are names.
    let longest = "n".repeat(64);
    c.execute("disk-add", json!({"name": longest, "size": 1 << 20}))
        .unwrap();
    c.execute(
        "snapshot-create",
        json!({"disk": longest, "name": "before upgrade (é)"}),
    )
    .unwrap();
    c.execute("disk-add", json!({"name": "x..y", "size": 1 << 20}))
        .unwrap();
    assert_eq!(listed(&mut c, "query-disks"), ["disk0", &longest, "x..y"]);
    assert_eq!(listed(&mut c, "query-snapshots"), ["before upgrade (é)"]);
    // Every socket is in the daemon's directory.
    let outside = s.dir.path().parent().unwrap().join("x.sock");
    assert!(!outside.exists());
}

#[test]
fn disk_add_and_disk_resize_refuse_sizes_the_engine_cannot_serve() {
    let mut s = Served::new("");
    let mut c = s.client();
    let too_big: [Value; 5] = [
        json!(1u64 << 63),
        json!(u64::MAX - 511),
        json!(MAX_DISK + 512),
        json!("8388608TiB"),
        json!("4194305TiB"),
    ];
    for size in &too_big {
        refused(
            &mut c,
            "disk-add",
            json!({"name": "d1", "size": size}),
            &["Parameter 'size'", "at most 4 EiB"],
        );
        refused(
            &mut c,
            "disk-resize",
            json!({"name": "disk0", "size": size}),
            &["Parameter 'size'", "at most 4 EiB"],
        );
    }
    for size in [json!(1000), json!(MAX_DISK - 1), json!("1000B")] {
        refused(
            &mut c,
            "disk-add",
            json!({"name": "d1", "size": size}),
            &["Parameter 'size'", "multiple of 512"],
        );
        refused(
            &mut c,
            "disk-resize",
            json!({"name": "disk0", "size": size}),
            &["Parameter 'size'", "multiple of 512"],
        );
    }
    refused(
        &mut c,
        "disk-add",
        json!({"name": "d1", "size": 0}),
        &["Parameter 'size'", "positive"],
    );
    assert_eq!(listed(&mut c, "query-disks"), ["disk0"]);
    let size_of = |c: &mut Client, name: &str| {
        c.execute("query-disks", json!({}))
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .map(|d| d["size"].as_u64().unwrap())
    };
    assert_eq!(size_of(&mut c, "disk0"), Some(16 << 20), "disk0 unchanged");
    // The largest is served, and a disk grows to it.
    c.execute("disk-add", json!({"name": "d1", "size": MAX_DISK}))
        .unwrap();
    c.execute(
        "disk-resize",
        json!({"name": "disk0", "size": "4194304TiB"}),
    )
    .unwrap();
    assert_eq!(size_of(&mut c, "d1"), Some(MAX_DISK));
    assert_eq!(size_of(&mut c, "disk0"), Some(MAX_DISK));
    drop(c);
    assert!(s.stop().success());
    assert!(cli(&["pool", "check", "-m", &s.m]).contains("clean"));
}
