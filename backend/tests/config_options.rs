//! Pool and disk options of the configuration file that change what a guest sees: block
//! zeroing, discard support and passdown, the queue size.

mod common;
use common::{allocated, allocated_once, bin, sigterm, wait_for, Guest};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
};

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
    // Pool `fast` skips zeroing, ignores discards and keeps freed space allocated (with
    // passdown the daemon would give back the free space the stale bytes below take);
    // pool `safe` has the defaults.
    std::fs::write(
        &cfg,
        format!(
            "pools:\n\
             \x20 - name: fast\n    metadata: {d}/f.meta\n    data: {d}/f.data\n    create:\n      data-size: 16MiB\n    zeroing: false\n    discard: ignore\n    discard-passdown: false\n\
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

#[test]
fn a_guest_discard_gives_the_space_back_to_the_host_after_the_flush_unless_passdown_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "pools:\n\
             \x20 - name: on\n    metadata: {d}/on.meta\n    data: {d}/on.data\n    create:\n      data-size: 128MiB\n\
             \x20 - name: off\n    metadata: {d}/off.meta\n    data: {d}/off.data\n    create:\n      data-size: 128MiB\n    discard-passdown: false\n\
             disks:\n\
             \x20 - name: on\n    pool: on\n    size: 96MiB\n    socket: {d}/on.sock\n\
             \x20 - name: off\n    pool: off\n    size: 96MiB\n    socket: {d}/off.sock\n"
        ),
    )
    .unwrap();
    let socks = [dir.path().join("on.sock"), dir.path().join("off.sock")];
    let c = serve(&cfg, &[&socks[0], &socks[1]]);
    const WRITTEN: u64 = 64 << 20;
    let mut kept = None;
    for (sock, passdown) in [(&socks[1], false), (&socks[0], true)] {
        let data = dir
            .path()
            .join(if passdown { "on.data" } else { "off.data" });
        let mut g = Guest::connect(sock, 1);
        let chunk = vec![0x5Au8; 512 << 10];
        for i in 0..WRITTEN / chunk.len() as u64 {
            assert_eq!(g.write(0, i * (chunk.len() as u64 / 512), &chunk, 4), 0);
        }
        assert_eq!(g.simple(0, VIRTIO_BLK_T_FLUSH), 0);
        let before = allocated(&data);
        assert!(before >= WRITTEN, "{before} bytes allocated");
        // Partial pool blocks at either end are left alone: 1 KiB in, 1 KiB short.
        let (first, sectors) = (2u64, (WRITTEN / 512 - 4) as u32);
        assert_eq!(g.ranges(0, VIRTIO_BLK_T_DISCARD, &[(first, sectors, 0)]), 0);
        assert_eq!(g.simple(0, VIRTIO_BLK_T_FLUSH), 0);
        if passdown {
            // All but the first and the last 64 KiB block.
            let after = allocated_once(&data, |now| before - now >= WRITTEN - (128 << 10));
            assert!(
                before - after >= WRITTEN - (128 << 10),
                "passdown: {before} bytes allocated before the discard, {after} after"
            );
        } else {
            kept = Some((data.clone(), before));
        }
        let (st, got) = g.read(0, 0, 4096);
        assert_eq!(st, 0);
        assert!(got[..1024].iter().all(|&b| b == 0x5A));
        let (st, got) = g.read(0, (64 << 10) / 512, 4096);
        assert_eq!(st, 0);
        assert!(got.iter().all(|&b| b == 0));
        drop(g);
    }
    // Checked after the other pool's space came back, and after the daemon stopped.
    let (data, before) = kept.unwrap();
    assert_eq!(allocated(&data), before, "discard-passdown: false punched");
    stop(c);
    assert_eq!(allocated(&data), before, "discard-passdown: false punched");
}

/// `serve` of pool `p` with one disk, `--no-discard-passdown` unless `passdown`.
fn serve_one_disk(p: &common::PoolFiles, disk: &str, passdown: bool) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "-m", &p.m, "-d", &p.d, "--disk", disk]);
    if !passdown {
        cmd.arg("--no-discard-passdown");
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    cmd
}

/// Free blocks whose space the data file still holds (a passdown a stop or a crash cut
/// short, or a file allocated whole) are given back once the daemon has started, unless
/// passdown is off; the disks read and write as before.
#[test]
fn serve_gives_back_the_space_of_free_blocks_the_data_file_still_holds() {
    for passdown in [false, true] {
        let p = common::new_pool("32MiB");
        common::cli(&[
            "thin", "create", "-m", &p.m, "-d", &p.d, "--id", "0", "--size", "16MiB",
        ]);
        let sock = p.root.join("d.sock");
        let disk = format!("id=0,socket={}", sock.display());
        let mut cmd = serve_one_disk(&p, &disk, passdown);
        let mut g = {
            let c = cmd.spawn().unwrap();
            wait_for(&sock);
            let mut g = Guest::connect(&sock, 1);
            assert_eq!(g.write(0, 0, &[0x11u8; 4096], 1), 0);
            assert_eq!(g.simple(0, VIRTIO_BLK_T_FLUSH), 0);
            drop(g);
            stop(c);
            // Every byte of the data file allocated, the written block's too.
            common::fill_holes(Path::new(&p.d), 0x77);
            assert_eq!(allocated(Path::new(&p.d)), 32 << 20);
            let c = cmd.spawn().unwrap();
            wait_for(&sock);
            (Guest::connect(&sock, 1), c)
        };
        let (st, got) = g.0.read(0, 0, 4096);
        assert_eq!(st, 0);
        assert!(got.iter().all(|&b| b == 0x11), "the written block");
        let (st, got) = g.0.read(0, 128, 4096);
        assert_eq!(st, 0);
        assert!(got.iter().all(|&b| b == 0), "an unmapped block");
        if passdown {
            let after = allocated_once(Path::new(&p.d), |now| now <= 64 << 10);
            assert_eq!(after, 64 << 10, "all but the one block in use given back");
        }
        drop(g.0);
        stop(g.1);
        if !passdown {
            assert_eq!(
                allocated(Path::new(&p.d)),
                32 << 20,
                "--no-discard-passdown punched"
            );
        }
    }
}

#[test]
fn serve_with_no_discard_passdown_keeps_the_space_of_discarded_blocks() {
    let p = common::new_pool("32MiB");
    common::cli(&[
        "thin", "create", "-m", &p.m, "-d", &p.d, "--id", "0", "--size", "16MiB",
    ]);
    let sock = p.root.join("d.sock");
    let disk = format!("id=0,socket={}", sock.display());
    for passdown in [false, true] {
        let c = serve_one_disk(&p, &disk, passdown).spawn().unwrap();
        wait_for(&sock);
        let mut g = Guest::connect(&sock, 1);
        let chunk = vec![0x11u8; 512 << 10];
        for i in 0..8u64 {
            assert_eq!(g.write(0, i * 1024, &chunk, 2), 0);
        }
        assert_eq!(g.simple(0, VIRTIO_BLK_T_FLUSH), 0);
        let before = allocated(Path::new(&p.d));
        assert_eq!(g.ranges(0, VIRTIO_BLK_T_DISCARD, &[(0, 8192, 0)]), 0);
        assert_eq!(g.simple(0, VIRTIO_BLK_T_FLUSH), 0);
        if passdown {
            let after = allocated_once(Path::new(&p.d), |now| before - now >= 4 << 20);
            assert!(before - after >= 4 << 20, "{before} -> {after}");
        }
        drop(g);
        stop(c);
        if !passdown {
            let after = allocated(Path::new(&p.d));
            assert_eq!(after, before, "--no-discard-passdown punched");
        }
    }
}
