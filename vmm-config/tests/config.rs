//! Table-driven tests of valid and invalid configuration files, with the exact messages.

use vmm_config::{parse, DiscardMode, LogLevel, OutOfSpacePolicy, Size};

const GOOD: &str = r#"
pools:
  - name: main
    metadata: /var/lib/vhost-thin/pool.meta
    data: /var/lib/vhost-thin/pool.data
    block-size: 128KiB
    create:
      data-size: 100GiB
    zeroing: false
    discard-passdown: false
    out-of-space:
      policy: queue
      timeout: 30
    low-water: { data: 90 }
disks:
  - name: disk0
    size: 10GiB
    socket: /run/vhost-thin/disk0.sock
    num-queues: 4
  - name: ci-1
    pool: main
    size: 10737418240
    socket: /run/vhost-thin/ci-1.sock
    read-only: true
    clone-from: disk0
management:
  socket: /run/vhost-thin/qmp.sock
logging:
  level: debug
"#;

#[test]
fn a_good_file_parses_with_defaults() {
    let c = parse(GOOD, "good.yaml").unwrap();
    let p = &c.pools[0];
    assert_eq!(p.block_size, Size(128 << 10));
    assert_eq!(p.create.as_ref().unwrap().data_size, Size(100 << 30));
    assert!(!p.zeroing);
    assert!(!p.discard_passdown);
    assert_eq!(p.discard, DiscardMode::Unmap);
    assert_eq!(p.out_of_space.policy, OutOfSpacePolicy::Queue);
    assert_eq!(p.out_of_space.timeout, 30);
    assert_eq!((p.low_water.data, p.low_water.metadata), (90, 80));
    assert_eq!(c.disks[0].num_queues, 4);
    assert_eq!(c.disks[0].queue_size, 256);
    assert_eq!(c.disks[1].size, Size(10 << 30));
    assert!(c.disks[1].read_only);
    assert_eq!(c.disks[0].pool, None);
    assert_eq!(c.disks[1].pool.as_deref(), Some("main"));
    assert_eq!(c.disks[0].clone_from, None);
    assert_eq!(c.disks[1].clone_from.as_deref(), Some("disk0"));
    assert_eq!(c.logging.as_ref().unwrap().level, LogLevel::Debug);
    assert_eq!(c.management.as_ref().unwrap().mode, "0600");
    assert_eq!(parse("", "empty.yaml").unwrap(), Default::default());
}

#[test]
fn bad_files_say_where_and_how_to_fix() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "typo in a field",
            "disks:\n  - name: d\n    size: 1GiB\n    socket: /s\n    num_queue: 2\n",
            "f.yaml:5:5: disks[0]: unknown field `num_queue`; did you mean `num-queues`?",
        ),
        (
            "unknown top-level field",
            "pool:\n  - name: x\n",
            "f.yaml:1:1: unknown field `pool`; did you mean `pools`?",
        ),
        (
            "bad size",
            "pools:\n  - name: p\n    metadata: /m\n    data: /d\n    block-size: 64kb\n",
            "f.yaml:5:17: pools[0].block-size: \"64kb\": \"kb\" means powers of 1000 to some and of 1024 to others: write KiB (or K) for powers of 1024",
        ),
        (
            "bad block size",
            "pools:\n  - name: p\n    metadata: /m\n    data: /d\n    block-size: 96KiB\n",
            "f.yaml:5: pools[0].block-size: 98304 bytes is not a valid block size; use 64KiB to 1GiB in multiples of 64KiB",
        ),
        (
            "bad enum value",
            "pools:\n  - name: p\n    metadata: /m\n    data: /d\n    out-of-space:\n      policy: queu\n",
            "f.yaml:6:15: pools[0].out-of-space.policy: unknown value `queu`; did you mean `queue`?",
        ),
        (
            "queue timeout too long",
            "pools:\n  - name: p\n    metadata: /m\n    data: /d\n    out-of-space:\n      policy: queue\n      timeout: 18446744073709551615\n",
            "f.yaml:7: pools[0].out-of-space.timeout: a timeout of 18446744073709551615 seconds is too long: at most 31536000 (one year); 0 holds writes forever",
        ),
        (
            "log level typo",
            "logging:\n  level: debg\n",
            "f.yaml:2:10: logging.level: unknown value `debg`; did you mean `debug`?",
        ),
        (
            "unknown pool",
            "pools:\n  - name: main\n    metadata: /m\n    data: /d\ndisks:\n  - name: d\n    pool: mian\n    size: 1GiB\n    socket: /s\n",
            "f.yaml:7: disks[0].pool: no pool named `mian`; did you mean `main`?",
        ),
        (
            "pool left out with two pools",
            "pools:\n  - name: a\n    metadata: /m\n    data: /d\n  - name: b\n    metadata: /m2\n    data: /d2\ndisks:\n  - name: d\n    size: 1GiB\n    socket: /s\n",
            "f.yaml:9: disks[0].pool: which pool?; add `pool:` naming one of: a, b",
        ),
        (
            "queues out of range",
            "pools:\n  - name: p\n    metadata: /m\n    data: /d\ndisks:\n  - name: d\n    size: 1GiB\n    socket: /s\n    num-queues: 100\n",
            "f.yaml:9: disks[0].num-queues: 100 queues; use 1 to 64",
        ),
        (
            "queue size not a power of two",
            "pools:\n  - name: p\n    metadata: /m\n    data: /d\ndisks:\n  - name: d\n    size: 1GiB\n    socket: /s\n    queue-size: 100\n",
            "f.yaml:9: disks[0].queue-size: 100 is not a power of two; use 2 to 32768, a power of two (256 is usual)",
        ),
        (
            "duplicate disk",
            "pools:\n  - name: p\n    metadata: /m\n    data: /d\ndisks:\n  - name: d\n    size: 1GiB\n    socket: /s\n  - name: d\n    size: 1GiB\n    socket: /t\n",
            "f.yaml:6: disks[1].name: disk `d` is defined twice; give each disk its own name",
        ),
        (
            "shared socket",
            "pools:\n  - name: p\n    metadata: /m\n    data: /d\ndisks:\n  - name: d\n    size: 1GiB\n    socket: /s\n  - name: e\n    size: 1GiB\n    socket: /s\n",
            "f.yaml:8: disks[1].socket: two disks on one socket; give each disk its own socket path",
        ),
        (
            "clone with an external origin",
            "pools:\n  - name: p\n    metadata: /m\n    data: /d\ndisks:\n  - name: d\n    size: 1GiB\n    socket: /s\n  - name: e\n    size: 1GiB\n    socket: /t\n    clone-from: d\n    external-origin: /img\n",
            "f.yaml:13: disks[1].external-origin: a clone reads its origin's external origin; give either clone-from or external-origin",
        ),
        (
            "odd disk size",
            "pools:\n  - name: p\n    metadata: /m\n    data: /d\ndisks:\n  - name: d\n    size: 1000\n    socket: /s\n",
            "f.yaml:7: disks[0].size: 1000 bytes is not a disk size; use a positive multiple of 512 bytes, like 10GiB",
        ),
        (
            "missing field",
            "disks:\n  - name: d\n    size: 1GiB\n",
            "f.yaml:2:5: disks[0]: missing field `socket`",
        ),
        (
            "wrong type",
            "disks:\n  - name: d\n    size: 1GiB\n    socket: /s\n    read-only: maybe\n",
            "f.yaml:5:16: disks[0].read-only: invalid type: string \"maybe\", expected a boolean",
        ),
        (
            "not YAML",
            "pools: [\n",
            "f.yaml:2:1: did not find expected node content",
        ),
        (
            "bad mode",
            "management:\n  socket: /q\n  mode: rw\n",
            "f.yaml:3: management.mode: `rw` is not an octal file mode; like \"0600\"",
        ),
        (
            "serial too long",
            "pools:\n  - name: p\n    metadata: /m\n    data: /d\ndisks:\n  - name: d\n    size: 1GiB\n    socket: /s\n    serial: abcdefghijklmnopqrstuvwxyz\n",
            "f.yaml:9: disks[0].serial: the serial must be at most 20 ASCII bytes",
        ),
    ];
    let mut failures = Vec::new();
    for (what, text, want) in cases {
        match parse(text, "f.yaml") {
            Ok(_) => failures.push(format!("{what}: parsed, expected {want:?}")),
            Err(e) if e.to_string() != *want => failures.push(format!(
                "{what}:\n   got {:?}\n  want {want:?}",
                e.to_string()
            )),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn load_names_the_file() {
    let e = vmm_config::load(std::path::Path::new("/nonexistent/x.yaml")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/x.yaml: cannot read the file"),
        "{e}"
    );
}

/// Names and sizes are held to the engine's rules (the same as the management socket's):
/// a name that is not one, or a disk larger than the engine serves, is refused with its line.
#[test]
fn names_and_sizes_the_engine_refuses_are_refused_where_they_are() {
    const RULE: &str = "a name is 1 to 64 printable characters, without '/', not '.' or '..', and not starting with '-'";
    let disks = |name: &str, extra: &str| {
        format!(
            "pools:\n  - name: p\n    metadata: /m\n    data: /d\ndisks:\n  - name: {name}\n    size: 1GiB\n    socket: /s\n{extra}"
        )
    };
    let long = "n".repeat(65);
    let cases: Vec<(&str, String, String)> = vec![
        (
            "a disk name that is a path",
            disks("../../x", ""),
            format!("f.yaml:6: disks[0].name: \"../../x\" is not a valid name: it contains '/'; {RULE}"),
        ),
        (
            "a disk name with a NUL (no line: the file holds it escaped)",
            disks("\"a\\0b\"", ""),
            format!("f.yaml: disks[0].name: \"a\\0b\" is not a valid name: it contains a control character (U+0000); {RULE}"),
        ),
        (
            "a disk name too long",
            disks(&long, ""),
            format!("f.yaml:6: disks[0].name: \"{long}\" is not a valid name: it is 65 bytes long, more than 64; {RULE}"),
        ),
        (
            "a pool name like an option",
            "pools:\n  - name: -p\n    metadata: /m\n    data: /d\n".into(),
            format!("f.yaml:2: pools[0].name: \"-p\" is not a valid name: it starts with '-'; {RULE}"),
        ),
        (
            "a clone of '..'",
            disks("d", "  - name: e\n    socket: /t\n    size: 1GiB\n    clone-from: ..\n"),
            format!("f.yaml:12: disks[1].clone-from: \"..\" is not a valid name: it is '.' or '..'; {RULE}"),
        ),
        (
            "a disk larger than the engine serves",
            "pools:\n  - name: p\n    metadata: /m\n    data: /d\ndisks:\n  - name: d\n    size: 4194305TiB\n    socket: /s\n".into(),
            "f.yaml:7: disks[0].size: 4611687117939015680 bytes is larger than the largest disk; use at most 4 EiB (4194304TiB)".into(),
        ),
    ];
    let mut failures = Vec::new();
    for (what, text, want) in &cases {
        match parse(text, "f.yaml") {
            Ok(_) => failures.push(format!("{what}: parsed, expected {want:?}")),
            Err(e) if e.to_string() != *want => failures.push(format!(
                "{what}:\n   got {:?}\n  want {want:?}",
                e.to_string()
            )),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // The largest disk, and names that are names, are taken.
    let ok = "pools:\n  - name: p.1\n    metadata: /m\n    data: /d\ndisks:\n  - name: \"vm 1@r2 (é)\"\n    size: 4194304TiB\n    socket: /s\n";
    parse(ok, "f.yaml").unwrap();
}

#[test]
fn discard_passdown_is_on_unless_turned_off() {
    let c = parse(
        "pools:\n  - name: p\n    metadata: /m\n    data: /d\n",
        "minimal.yaml",
    )
    .unwrap();
    assert!(c.pools[0].discard_passdown);
    assert!(c.pools[0].zeroing);
}
