//! Send and receive against `dd` of the same bytes, and the size of incremental streams
//! against the data changed. Prints figures; asserts only that what was received equals
//! what was sent.
//!
//!     cargo bench -p thinpool --bench stream
//!
//! Environment: STREAM_MIB (1024: device bytes written before the first snapshot),
//! BENCH_DIR (default /var/tmp).

mod common;

use common::{env_u64, file, scratch_dir, Rng, BS};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;
use thinpool::catalog::Catalog;
use thinpool::pool::{Pool, PoolOptions};
use thinpool::registry::{DeviceEntry, Registry};
use thinpool::stream::{self, ReceiveOptions, SendOptions};

struct Side {
    pool: Arc<Pool>,
    reg: Registry,
}

fn side(dir: &Path, name: &str, data_bytes: u64, block_sectors: u32) -> Side {
    let pool = Pool::create(
        file(&dir.join(format!("{name}.meta")), 256 << 20),
        file(&dir.join(format!("{name}.data")), data_bytes),
        block_sectors,
        PoolOptions::default(),
    )
    .unwrap();
    let reg = Registry::new(dir.join(format!("{name}.registry.json")), 0);
    Side {
        pool: Arc::new(pool),
        reg,
    }
}

/// The side's pool and registry as one catalog for `f`.
fn with_catalog<T>(s: &mut Side, f: impl FnOnce(&Catalog) -> T) -> T {
    let placeholder = Registry::new(s.reg.path(), 0);
    let reg = std::mem::replace(&mut s.reg, placeholder);
    let cat = Catalog::new(s.pool.clone(), reg, 0);
    let r = f(&cat);
    s.reg = cat.into_registry();
    r
}

fn snapshot(s: &mut Side, id: u32, origin: u32, name: &str, size: u64) {
    let e = DeviceEntry {
        name: Some(name.into()),
        size,
        serial: name.into(),
        snapshot: true,
        origin: Some(origin),
        ..Default::default()
    };
    with_catalog(s, |cat| {
        cat.change(|devices, reg| -> Result<(), stream::StreamError> {
            devices.create_snap(id, origin)?;
            reg.insert(id, e)?;
            stream::assign_guids(reg, &[id])?;
            Ok(())
        })
    })
    .unwrap();
}

/// Receives into `s` with default options.
fn receive(s: &mut Side, input: impl std::io::Read) -> thinpool::stream::Received {
    with_catalog(s, |cat| {
        stream::receive(cat, input, &ReceiveOptions::default(), &mut |_, _| {})
    })
    .unwrap()
}

fn mibs(bytes: u64, secs: f64) -> String {
    format!("{:.0} MiB/s", bytes as f64 / (1 << 20) as f64 / secs)
}

/// `dd` copying `bytes` from `src` to `dst` (1 MiB blocks, fsync at the end, as a receive
/// commits at its end).
fn dd(src: &Path, dst: &Path, bytes: u64) -> f64 {
    let t = Instant::now();
    let st = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dst.display()))
        .args(["bs=1M", "conv=fsync", "status=none"])
        .arg(format!("count={}", bytes.div_ceil(1 << 20)))
        .status()
        .unwrap();
    assert!(st.success());
    t.elapsed().as_secs_f64()
}

fn main() {
    let mib = env_u64("STREAM_MIB", 1024);
    let size = mib << 20;
    let dir = scratch_dir();
    let d = dir.path();
    let mut a = side(d, "a", size * 2, (BS / 512) as u32);
    let mut b = side(d, "b", size * 2, 4 * (BS / 512) as u32);
    a.pool.create_thin(0).unwrap();
    a.reg
        .insert(
            0,
            DeviceEntry {
                name: Some("disk".into()),
                size,
                serial: "disk".into(),
                ..Default::default()
            },
        )
        .unwrap();
    // Incompressible, non-zero data over the whole device, also kept as a raw image for dd.
    let raw = d.join("raw.img");
    {
        let mut img = BufWriter::new(std::fs::File::create(&raw).unwrap());
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..mib {
            for w in buf.chunks_mut(8) {
                w.copy_from_slice(&(rng.next() | 1).to_le_bytes());
            }
            a.pool.write(0, i << 20, &buf).unwrap();
            img.write_all(&buf).unwrap();
        }
        img.flush().unwrap();
        img.get_ref().sync_all().unwrap();
    }
    snapshot(&mut a, 1, 0, "s1", size);

    println!("send/receive: {mib} MiB device, source pool 64 KiB blocks, destination 256 KiB blocks; files under {}", d.display());
    // Full stream to a file, then received from it; dd copies the same bytes each way.
    let full = d.join("s1.vts");
    let t = Instant::now();
    let st = {
        let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(&full).unwrap());
        let st = stream::send(
            &a.pool,
            &a.reg,
            1,
            &SendOptions::default(),
            &mut out,
            &mut |_, _| {},
        )
        .unwrap();
        out.flush().unwrap();
        out.get_ref().sync_all().unwrap();
        st
    };
    let send_s = t.elapsed().as_secs_f64();
    let dd_send = dd(&raw, &d.join("dd-send.img"), size);
    let t = Instant::now();
    let input = BufReader::with_capacity(1 << 20, std::fs::File::open(&full).unwrap());
    let got = receive(&mut b, input);
    let recv_s = t.elapsed().as_secs_f64();
    let dd_recv = dd(&full, &d.join("dd-recv.img"), st.stream_bytes);
    println!(
        "  full stream: {} bytes for {} data bytes ({:.3}% framing)",
        st.stream_bytes,
        st.data_bytes,
        (st.stream_bytes - st.data_bytes) as f64 * 100.0 / st.data_bytes as f64
    );
    println!("  | step | vhost-thin | dd of the same bytes | ratio |");
    println!("  |---|---|---|---|");
    println!(
        "  | send (pool -> stream file) | {:.2} s, {} | {:.2} s, {} | {:.2} |",
        send_s,
        mibs(size, send_s),
        dd_send,
        mibs(size, dd_send),
        dd_send / send_s
    );
    println!(
        "  | receive (stream file -> pool, committed) | {:.2} s, {} | {:.2} s, {} | {:.2} |",
        recv_s,
        mibs(size, recv_s),
        dd_recv,
        mibs(size, dd_recv),
        dd_recv / recv_s
    );

    // Incremental streams: 1% of the device rewritten, scattered 4 KiB writes and in 1 MiB
    // extents; stream size against the bytes the "guest" wrote.
    println!(
        "  | 1% of the device changed as | bytes written | incremental stream | stream / written |"
    );
    println!("  |---|---|---|---|");
    let mut rng = Rng(42);
    let mut prev = 1;
    for (snap_id, (label, piece)) in (2u32..).zip([
        ("4 KiB writes, scattered", 4096u64),
        ("1 MiB extents", 1 << 20),
    ]) {
        let n = (size / 100) / piece;
        let label = format!("{label} ({n} writes)");
        let buf = vec![0x5au8; piece as usize];
        for _ in 0..n {
            let off = (rng.next() % (size / piece)) * piece;
            a.pool.write(0, off, &buf).unwrap();
        }
        let name = format!("s{snap_id}");
        snapshot(&mut a, snap_id, 0, &name, size);
        let mut out = Vec::new();
        let t = Instant::now();
        let st = stream::send(
            &a.pool,
            &a.reg,
            snap_id,
            &SendOptions {
                base: Some(prev),
                resume_offset: 0,
            },
            &mut out,
            &mut |_, _| {},
        )
        .unwrap();
        let inc_send = t.elapsed().as_secs_f64();
        let got_inc = receive(&mut b, &out[..]);
        println!(
            "  | {label} | {} | {} ({:.1} ms to send) | {:.1}× |",
            n * piece,
            st.stream_bytes,
            inc_send * 1000.0,
            st.stream_bytes as f64 / (n * piece) as f64
        );
        // What arrived equals what was sent.
        let mut x = vec![0u8; 1 << 20];
        let mut y = vec![0u8; 1 << 20];
        for i in 0..mib {
            a.pool.read(snap_id, i << 20, &mut x).unwrap();
            b.pool.read(got_inc.id, i << 20, &mut y).unwrap();
            assert!(x == y, "{label}: MiB {i} differs after receive");
        }
        prev = snap_id;
    }
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    let mut raw_in = std::fs::File::open(&raw).unwrap();
    for i in 0..mib {
        raw_in.read_exact(&mut x).unwrap();
        b.pool.read(got.id, i << 20, &mut y).unwrap();
        assert!(x == y, "full: MiB {i} differs after receive");
    }
    println!("  received snapshots equal the sent ones: yes");
}
