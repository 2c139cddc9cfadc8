//! Pool and disk options of the configuration file that change what a guest sees: block
//! zeroing, discard support, the queue size.

mod common;
use common::{bin, sigterm, wait_for, Guest};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES};

/// Starts `serve --config` on `cfg` and waits for `sockets` to appear.
fn serve(cfg: &Path, sockets: &[&Path]) -> Child {
    let child = Command::new(bin())
        .arg("serve")
        .arg("--config")
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for s in sockets {
        wait_for(s);
    }
    child
}

fn stop(c: Child) {
    assert!(sigterm(c).status.success());
}

#[test]
fn zeroing_and_discard_of_a_pool_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let cfg = dir.path().join("c.yaml");
    // Pool `fast` skips zeroing and ignores discards; pool `safe` has the defaults.
    std::fs::write(
        &cfg,
        format!(
            "pools:\n\
             \x20 - name: fast\n    metadata: {d}/f.meta\n    data: {d}/f.data\n    create:\n      data-size: 16MiB\n    zeroing: false\n    discard: ignore\n\
             \x20 - name: safe\n    metadata: {d}/s.meta\n    data: {d}/s.data\n    create:\n      data-size: 16MiB\n\
             disks:\n\
             \x20 - name: f\n    pool: fast\n    size: 8MiB\n    socket: {d}/f.sock\n\
             \x20 - name: s\n    pool: safe\n    size: 8MiB\n    socket: {d}/s.sock\n"
        ),
    )
    .unwrap();
    let (fsock, ssock) = (dir.path().join("f.sock"), dir.path().join("s.sock"));
    // First run creates the pools and disks; then stale bytes go where new blocks will be.
    stop(serve(&cfg, &[&fsock, &ssock]));
    for data in ["f.data", "s.data"] {
        std::fs::write(dir.path().join(data), vec![0xEEu8; 16 << 20]).unwrap();
    }
    let c = serve(&cfg, &[&fsock, &ssock]);

    let mut g = Guest::connect(&fsock, 1);
    assert_eq!(
        g.features & (1 << VIRTIO_BLK_F_DISCARD),
        0,
        "discard offered"
    );
    assert_ne!(g.features & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert_eq!(g.write(0, 0, &[1u8; 512], 1), 0);
    let (st, got) = g.read(0, 0, 4096);
    assert_eq!(st, 0);
    assert_eq!(&got[..512], &[1u8; 512]);
    assert!(
        got[512..].iter().all(|&b| b == 0xEE),
        "zeroing: false still zero-filled the new block"
    );
    drop(g);

    let mut g = Guest::connect(&ssock, 1);
    assert_ne!(g.features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(g.write(0, 0, &[1u8; 512], 1), 0);
    let (st, got) = g.read(0, 0, 4096);
    assert_eq!(st, 0);
    assert_eq!(&got[..512], &[1u8; 512]);
    assert!(got[512..].iter().all(|&b| b == 0), "a new block is zeroed");
    drop(g);
    stop(c);
}

#[test]
fn the_queue_size_of_a_disk_is_honoured_from_the_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "pools:\n  - name: p\n    metadata: {d}/p.meta\n    data: {d}/p.data\n    create:\n      data-size: 16MiB\n\
             disks:\n  - name: d\n    size: 8MiB\n    socket: {d}/d.sock\n    queue-size: 128\n"
        ),
    )
    .unwrap();
    let sock = dir.path().join("d.sock");
    // seg_max, in the configuration space, follows the queue size (a chain fits the ring).
    let seg_max = |g: &mut Guest| u32::from_le_bytes(g.config(16)[12..16].try_into().unwrap());
    for run in ["creating the disk", "reusing it"] {
        let c = serve(&cfg, &[&sock]);
        let mut g = Guest::connect(&sock, 1);
        assert_eq!(seg_max(&mut g), 126, "{run}");
        drop(g);
        stop(c);
    }
}
