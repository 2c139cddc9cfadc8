//! Tier-2 tests: the real vhost-user protocol between a frontend in this process and the
//! `vhost-thin serve` daemon in a child process.

mod common;
use common::{cli, export, pattern, Guest, Served, D};
use serde_json::json;
use thinpool::pdata::btree::node;
use thinpool::thin::image::Image;
use virtio_bindings::virtio_blk::*;

#[test]
fn io_flush_discard_zeroes_get_id_and_sigterm() {
    let mut s = Served::new(",num-queues=2");
    let mut g = Guest::connect(&s.sock, 2);
    // Config: capacity 16 MiB in sectors, topology from the 64 KiB pool block.
    let cfg = g.config(60);
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        (16 << 20) / 512
    );
    assert_eq!(cfg[24], 7, "physical_block_exp: 64 KiB = 512 << 7");
    assert_eq!(
        u16::from_le_bytes(cfg[34..36].try_into().unwrap()),
        2,
        "num_queues"
    );
    assert_eq!(
        g.config(7).len(),
        7,
        "get_config returns exactly the bytes asked for"
    );
    assert_eq!(g.config(96).len(), 96);

    // Writes of any alignment and layout, on both queues.
    let a = pattern(128 << 10, 1);
    assert_eq!(g.write(0, 0, &a, 3), 0);
    let b = pattern(4096, 2);
    assert_eq!(g.write(1, 130, &b, 1), 0); // inside block 1, not aligned to it
    let (st, got) = g.read(1, 0, 128 << 10);
    assert_eq!(st, 0);
    let mut want = a.clone();
    want[130 * 512..130 * 512 + 4096].copy_from_slice(&b);
    assert_eq!(got, want);
    let (st, got) = g.read(0, 256, 64 << 10);
    assert_eq!(
        (st, got),
        (0, vec![0u8; 64 << 10]),
        "unwritten space reads as zeroes"
    );
    assert_eq!(g.simple(0, VIRTIO_BLK_T_FLUSH), 0);

    let (st, id) = g.get_id(0);
    assert_eq!(st, 0);
    assert!(id.starts_with(b"vt-"), "{id:?}");

    // Discard the second 64 KiB block: it reads as zeroes and leaves the pool.
    // From the daemon: a served pool is not opened by another process.
    let used = |s: &Served| -> u64 {
        let pools = s.client().execute("query-pools", json!({})).unwrap();
        pools[0]["data-used"].as_u64().unwrap()
    };
    assert_eq!(g.ranges(0, VIRTIO_BLK_T_DISCARD, &[(128, 128, 0)]), 0);
    assert_eq!(g.read(0, 128, 512).1, vec![0u8; 512]);
    assert_eq!(g.simple(0, VIRTIO_BLK_T_FLUSH), 0);
    assert_eq!(used(&s), 1, "one block left mapped after the discard");
    // Write-zeroes without unmap on part of block 0, and with unmap over the whole of
    // block 2 (sectors 256..384), written first so that there is something to unmap.
    assert_eq!(g.write(0, 256, &pattern(64 << 10, 4), 2), 0);
    assert_eq!(g.simple(0, VIRTIO_BLK_T_FLUSH), 0);
    assert_eq!(used(&s), 2, "block 2 mapped by the write");
    assert_eq!(
        g.ranges(1, VIRTIO_BLK_T_WRITE_ZEROES, &[(1, 2, 0), (256, 128, 1)]),
        0
    );
    let (_, got) = g.read(0, 0, 2048);
    assert_eq!(&got[..512], &a[..512]);
    assert_eq!(&got[512..1536], &[0u8; 1024][..]);
    assert_eq!(&got[1536..], &a[1536..2048]);
    assert_eq!(
        g.read(1, 256, 64 << 10),
        (0, vec![0u8; 64 << 10]),
        "a block zeroed with unmap reads as zeroes"
    );
    assert_eq!(g.simple(0, VIRTIO_BLK_T_FLUSH), 0);
    assert_eq!(
        used(&s),
        1,
        "write-zeroes with unmap over a whole block unmaps it; only block 0 is left mapped"
    );
    g.stop();

    // SIGTERM: drain, commit, exit 0; the pool is clean and holds what the guest wrote.
    let status = s.stop();
    assert!(status.success(), "{status:?}");
    assert!(cli(&["pool", "check", "-m", &s.m]).contains("clean"));
    let ls: serde_json::Value =
        serde_json::from_str(&cli(&["thin", "ls", "-m", &s.m, "-d", &s.d, "--json"])).unwrap();
    assert_eq!(
        ls[0]["mapped_bytes"].as_u64(),
        Some(64 << 10),
        "device 0 maps block 0 only: {ls}"
    );
    let mut want0 = want[..65536].to_vec();
    want0[512..1536].fill(0);
    assert_eq!(export(&s.m, &s.d, "0", Some("65536")), want0);
}

#[test]
fn malformed_chains_get_errors_and_the_daemon_keeps_serving() {
    let s = Served::new("");
    let mut g = Guest::connect(&s.sock, 1);
    let b = Guest::buf(5);
    // Unknown request type: UNSUPP.
    assert_eq!(g.simple(0, 99), VIRTIO_BLK_S_UNSUPP as u8);
    // Unaligned length, beyond capacity, wrong direction: IOERR.
    assert_eq!(g.read(0, 0, 100).0, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(g.read(0, (16 << 20) / 512, 512).0, VIRTIO_BLK_S_IOERR as u8);
    // A data buffer the device may write, for a write.
    g.header(b, VIRTIO_BLK_T_OUT, 0);
    g.run(
        0,
        &[
            D(b, 16, false),
            D(b + 0x1000, 512, true),
            D(b + 0x800, 1, true),
        ],
    );
    assert_eq!(g.status(b + 0x800), VIRTIO_BLK_S_IOERR as u8);
    // Short header, no status byte, buffers outside guest memory: used with length 0 or
    // an error status, never a crash.
    g.header(b, VIRTIO_BLK_T_IN, 0);
    assert_eq!(g.run(0, &[D(b, 8, false), D(b + 0x800, 1, true)]), 1);
    assert_eq!(g.status(b + 0x800), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(g.run(0, &[D(b, 16, false)]), 0);
    g.run(
        0,
        &[
            D(b, 16, false),
            D(1 << 40, 512, true),
            D(b + 0x800, 1, true),
        ],
    );
    assert_eq!(g.status(b + 0x800), VIRTIO_BLK_S_IOERR as u8);
    // Still serving.
    assert_eq!(g.write(0, 0, &[7u8; 512], 1), 0);
    assert_eq!(g.read(0, 0, 512), (0, vec![7u8; 512]));
}

#[test]
fn reconnect_and_restart_keep_the_data() {
    let mut s = Served::new(",num-queues=2");
    let mut g = Guest::connect(&s.sock, 2);
    assert_eq!(g.write(1, 2048, &pattern(8192, 3), 2), 0);
    g.stop();
    // A new frontend on the same daemon (as after the VM restarts).
    let mut g = Guest::connect(&s.sock, 2);
    assert_eq!(g.read(0, 2048, 8192), (0, pattern(8192, 3)));
    drop(g);
    // A restarted daemon (the commit on disconnect made it durable).
    assert!(s.stop().success());
    s.start(",num-queues=2");
    let mut g = Guest::connect(&s.sock, 2);
    assert_eq!(g.read(1, 2048, 8192), (0, pattern(8192, 3)));
}

#[test]
fn read_only_disk_refuses_writes_and_serves_reads() {
    let mut s = Served::new("");
    let mut g = Guest::connect(&s.sock, 1);
    assert_eq!(g.write(0, 0, &[9u8; 4096], 1), 0);
    drop(g);
    assert!(s.stop().success());
    s.start(",read-only");
    let mut g = Guest::connect(&s.sock, 1);
    assert_ne!(g.features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(g.features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(g.write(0, 8, &[1u8; 512], 1), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(
        g.ranges(0, VIRTIO_BLK_T_DISCARD, &[(0, 128, 0)]),
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(g.read(0, 0, 4096), (0, vec![9u8; 4096]));
}

#[test]
fn without_event_idx_too() {
    let s = Served::new(",num-queues=2");
    let mask = !(1u64 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
    let mut g = Guest::connect_with(&s.sock, 2, mask);
    for i in 0..20u64 {
        assert_eq!(
            g.write((i % 2) as usize, i * 8, &pattern(4096, i as u8), 1),
            0
        );
    }
    for i in 0..20u64 {
        assert_eq!(
            g.read((i % 2) as usize, i * 8, 4096),
            (0, pattern(4096, i as u8))
        );
    }
}

/// A guest read that meets damaged metadata (checksums valid, the device's entry in the
/// top-level mapping tree naming the details tree's leaf) fails with IOERR, rather than
/// giving zeroes or other blocks' bytes; so does every later read of the device, and the
/// pool turns read-only with its metadata flagged for checking.
#[test]
fn damaged_metadata_fails_guest_reads_and_turns_the_pool_read_only() {
    let mut s = Served::new("");
    let mut g = Guest::connect(&s.sock, 1);
    let data = pattern(16 << 20, 5);
    for (i, chunk) in data.chunks(512 << 10).enumerate() {
        assert_eq!(g.write(0, i as u64 * 1024, chunk, 1), 0);
    }
    g.stop();
    assert!(s.stop().success());

    let mut img = Image(std::fs::read(&s.m).unwrap());
    let sb = img.superblock().unwrap();
    img.edit(sb.mapping_root, |b| {
        let i = node::find(b, 0).unwrap();
        node::set_value_u64(b, i, sb.details_root);
    })
    .unwrap();
    std::fs::write(&s.m, &img.0).unwrap();

    s.start("");
    let mut g = Guest::connect(&s.sock, 1);
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    assert_eq!(g.read(0, 0, 65536).0, ioerr);
    assert_eq!(g.read(0, 8 << 11, 4096).0, ioerr, "a second read fails too");
    assert_eq!(g.write(0, 0, &pattern(4096, 6), 1), ioerr);
    g.stop();
    s.stop();
    let st: serde_json::Value =
        serde_json::from_str(&cli(&["pool", "status", "-m", &s.m, "--json"])).unwrap();
    assert_eq!(st["needs_check"], true, "{st}");
}

/// As dm-thin's, a pool flagged needs_check comes up read-only rather than not at all, so
/// that its disks can be read and copied off: reads work, and writes to blocks a disk owns
/// alone; a write that needs a new block fails. After a check clears the flag, it serves
/// read-write again.
#[test]
fn a_pool_flagged_needs_check_is_served_read_only() {
    let mut s = Served::new("");
    let mut g = Guest::connect(&s.sock, 1);
    let data = pattern(1 << 20, 7);
    assert_eq!(g.write(0, 0, &data, 4), 0);
    g.stop();
    assert!(s.stop().success());
    let mut img = Image(std::fs::read(&s.m).unwrap());
    let mut sb = img.superblock().unwrap();
    sb.flags |= 1; // NEEDS_CHECK
    img.set_superblock(&sb).unwrap();
    std::fs::write(&s.m, &img.0).unwrap();

    s.start("");
    let mut c = s.client();
    let p = c.execute("query-pools", serde_json::json!({})).unwrap()[0].clone();
    assert_eq!(p["mode"], "read-only", "{p}");
    assert_eq!(p["needs-check"], true, "{p}");
    let mut g = Guest::connect(&s.sock, 1);
    for at in [0usize, 64 << 10, 1000 << 10] {
        let (st, got) = g.read(0, (at / 512) as u64, 4096);
        assert_eq!(st, 0);
        assert!(got == data[at..at + 4096], "the bytes at {at} read back");
    }
    assert_eq!(
        g.write(0, 0, &pattern(4096, 8), 1),
        0,
        "a block the disk owns"
    );
    assert_eq!(
        g.write(0, 8 << 11, &pattern(4096, 9), 1),
        VIRTIO_BLK_S_IOERR as u8,
        "a write that needs a new block"
    );
    assert!(c
        .execute(
            "snapshot-create",
            serde_json::json!({"disk": "disk0", "name": "s"})
        )
        .is_err());
    g.stop();
    drop(c);
    assert!(s.stop().success());

    cli(&["pool", "check", "-m", &s.m, "--clear-needs-check"]);
    s.start("");
    let mut g = Guest::connect(&s.sock, 1);
    assert_eq!(g.write(0, 8 << 11, &pattern(4096, 9), 1), 0);
    let (st, got) = g.read(0, 0, 4096);
    assert!(
        st == 0 && got == pattern(4096, 8),
        "the write in place is kept"
    );
    g.stop();
    assert!(s.stop().success());
}
