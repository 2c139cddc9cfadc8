use super::format::{Record, SnapshotRef, StreamHeader, StreamReader, StreamWriter};
use super::*;
use crate::catalog::{Catalog, CatalogError};
use crate::pool::{Pool, PoolOptions};
use crate::registry::{DeviceEntry, Registry};
use crate::storage::MemStorage;
use proptest::prelude::*;
use std::sync::Arc;

const DISK: u64 = 8 << 20;

/// A pool on memory with its registry in a temporary directory.
struct P {
    pool: Arc<Pool>,
    meta: Arc<MemStorage>,
    data: Arc<MemStorage>,
    reg: Registry,
    _dir: tempfile::TempDir,
}

fn pool(block_sectors: u32) -> P {
    let dir = tempfile::tempdir().unwrap();
    let meta = Arc::new(MemStorage::new(8 << 20));
    let data = Arc::new(MemStorage::new(64 << 20));
    let pool = Pool::create(
        meta.clone(),
        data.clone(),
        block_sectors,
        PoolOptions::default(),
    )
    .unwrap();
    let reg = Registry::new(dir.path().join("reg.json"), 0);
    P {
        pool: Arc::new(pool),
        meta,
        data,
        reg,
        _dir: dir,
    }
}

impl P {
    /// The pool and its registry as one catalog for `f`.
    fn with_catalog<T>(&mut self, f: impl FnOnce(&Catalog) -> T) -> T {
        let placeholder = Registry::new(self.reg.path(), 0);
        let reg = std::mem::replace(&mut self.reg, placeholder);
        let cat = Catalog::new(self.pool.clone(), reg, 0);
        let r = f(&cat);
        self.reg = cat.into_registry();
        r
    }

    fn disk(&mut self, id: u32) {
        let e = DeviceEntry {
            name: Some(format!("disk{id}")),
            size: DISK,
            serial: "s".into(),
            ..Default::default()
        };
        self.with_catalog(|cat| {
            cat.change(|devices, reg| -> Result<(), CatalogError> {
                devices.create_thin(id)?;
                reg.insert(id, e)?;
                Ok(())
            })
        })
        .unwrap();
    }

    fn snap(&mut self, id: u32, origin: u32, name: &str) {
        let e = DeviceEntry {
            name: Some(name.into()),
            size: DISK,
            serial: "s".into(),
            snapshot: true,
            origin: Some(origin),
            ..Default::default()
        };
        self.with_catalog(|cat| {
            cat.change(|devices, reg| -> Result<(), StreamError> {
                devices.create_snap(id, origin)?;
                reg.insert(id, e)?;
                assign_guids(reg, &[id])?;
                Ok(())
            })
        })
        .unwrap();
    }

    /// What a crash leaves: the pool and registry as last committed, reopened.
    fn crash_and_reopen(&mut self) {
        self.pool = Arc::new(
            Pool::open(self.meta.clone(), self.data.clone(), PoolOptions::default()).unwrap(),
        );
        self.reg = Registry::load(self.reg.path()).unwrap().unwrap();
        assert_eq!(self.reg.transaction_id, self.pool.status().transaction_id);
    }

    fn read_all(&self, id: u32) -> Vec<u8> {
        let mut v = vec![0u8; DISK as usize];
        self.pool.read(id, 0, &mut v).unwrap();
        v
    }

    fn send(&self, snap: u32, base: Option<u32>, resume: u64) -> (Vec<u8>, SendStats) {
        let mut out = Vec::new();
        let opts = SendOptions {
            base,
            resume_offset: resume,
        };
        let st = send(&self.pool, &self.reg, snap, &opts, &mut out, &mut |_, _| {}).unwrap();
        (out, st)
    }

    fn recv(&mut self, stream: &[u8], resumable: bool) -> Result<Received, ReceiveError> {
        self.recv_as(stream, resumable, None)
    }

    /// A receive under `name` (`receive --name`), or the stream's own name.
    fn recv_as(
        &mut self,
        stream: &[u8],
        resumable: bool,
        name: Option<&str>,
    ) -> Result<Received, ReceiveError> {
        let opts = ReceiveOptions {
            name: name.map(str::to_string),
            resumable,
            commit_every: 64 << 10,
            ..Default::default()
        };
        let mut last = None;
        let r =
            self.with_catalog(|cat| receive(cat, stream, &opts, &mut |d, t| last = Some((d, t))));
        // A finished receive has all of the device, unmapped tail included: a job's progress
        // ends complete.
        if r.is_ok() {
            let (done, total) = last.expect("a finished receive reports progress");
            assert_eq!(done, total, "progress at the end of a receive");
        }
        r
    }

    fn id_of(&self, name: &str) -> u32 {
        self.reg.find(name).unwrap()
    }

    fn check(&self) {
        self.pool.commit().unwrap();
        let r = crate::check::check(self.meta.clone()).unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.devices, self.reg.devices.len() as u64);
    }
}

/// A deterministic workload: writes of random length, some all-zero, discards, zeroes.
fn scribble(p: &P, id: u32, seed: u64, ops: usize) {
    let mut x = seed | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..ops {
        let off = rnd() % (DISK - 200_000);
        let len = 1 + rnd() % 150_000;
        match rnd() % 6 {
            0 => {
                p.pool.discard(id, off, len).unwrap();
            }
            1 => p.pool.write_zeroes(id, off, len, rnd() % 2 == 0).unwrap(),
            2 => p.pool.write(id, off, &vec![0u8; len as usize]).unwrap(),
            _ => {
                let v: Vec<u8> = (0..len).map(|i| (i ^ seed) as u8 | 1).collect();
                p.pool.write(id, off, &v).unwrap();
            }
        }
    }
}

#[test]
fn full_and_incremental_chains_recreate_every_snapshot_across_block_sizes() {
    for (src_bs, dst_bs) in [(128u32, 128u32), (128, 512), (512, 128)] {
        let mut a = pool(src_bs);
        let mut b = pool(dst_bs);
        a.disk(0);
        let mut prev: Option<u32> = None;
        for round in 0..4u32 {
            scribble(&a, 0, 7 + round as u64, 40);
            let snap = 10 + round;
            a.snap(snap, 0, &format!("s{round}"));
            let (stream, st) = a.send(snap, prev, 0);
            let got = b.recv(&stream, false).unwrap();
            assert_eq!(got.name, format!("s{round}"));
            assert_eq!(got.base.is_some(), prev.is_some());
            assert_eq!(st.stream_bytes, stream.len() as u64);
            assert_eq!(got.stream_bytes, stream.len() as u64);
            assert_eq!(
                b.read_all(got.id),
                a.read_all(snap),
                "round {round}, block sizes {src_bs} -> {dst_bs}"
            );
            prev = Some(snap);
        }
        // Every snapshot on the receiver still holds its own contents.
        for round in 0..4u32 {
            let name = format!("s{round}");
            assert_eq!(b.read_all(b.id_of(&name)), a.read_all(a.id_of(&name)));
        }
        b.check();
    }
}

#[test]
fn unmapped_and_zero_blocks_are_not_sent_and_incremental_size_follows_the_change() {
    let mut a = pool(128);
    a.disk(0);
    a.pool.write(0, 0, &vec![5u8; 1 << 20]).unwrap();
    a.pool.write(0, 4 << 20, &vec![0u8; 1 << 20]).unwrap(); // mapped, but zeros
    a.snap(1, 0, "base");
    let (_, full) = a.send(1, None, 0);
    assert_eq!(full.data_bytes, 1 << 20);
    assert_eq!(full.zero_detected_bytes, 1 << 20);
    assert!(full.stream_bytes < (1 << 20) + 4096);
    // Change 128 KiB and unmap 64 KiB of the first MiB.
    a.pool.write(0, 256 << 10, &vec![6u8; 128 << 10]).unwrap();
    a.pool.discard(0, 0, 64 << 10).unwrap();
    a.snap(2, 0, "next");
    let (stream, inc) = a.send(2, Some(1), 0);
    assert_eq!(inc.data_bytes, 128 << 10);
    assert_eq!(inc.zero_bytes, 64 << 10);
    assert!(stream.len() < (128 << 10) + 4096);
    // A 4 KiB write copies its 64 KiB block, but only the page that differs is sent.
    a.pool.write(0, (512 << 10) + 8192, &[9u8; 4096]).unwrap();
    a.snap(3, 0, "page");
    let (_, page) = a.send(3, Some(2), 0);
    assert_eq!(page.data_bytes, 4096);
    assert_eq!(page.unchanged_bytes, (64 << 10) - 4096);
}

/// A golden image shorter than the disk, ending inside a block, with a zero page in it.
fn golden(len: u64, seed: u64) -> Arc<crate::origin::ExternalOrigin> {
    let mut v: Vec<u8> = (0..len).map(|i| ((i * 7) ^ seed) as u8 | 1).collect();
    v[8192..12288].fill(0);
    let s: Arc<dyn crate::storage::Storage> = Arc::new(MemStorage::from_vec(v));
    Arc::new(crate::origin::ExternalOrigin::from_storage(s, "golden").unwrap())
}

#[test]
fn origin_backed_snapshots_arrive_as_standalone_copies() {
    for (src_bs, dst_bs) in [(128u32, 128u32), (128, 512)] {
        let mut a = pool(src_bs);
        let mut b = pool(dst_bs);
        a.disk(0);
        let origin = golden(DISK / 2 + 4608, 3);
        a.pool.set_external_origin(0, Some(origin.clone())).unwrap();
        let mut prev: Option<u32> = None;
        for round in 0..3u32 {
            scribble(&a, 0, 11 + round as u64, 30);
            let snap = 10 + round;
            a.snap(snap, 0, &format!("s{round}"));
            assert!(a.pool.external_origin(snap).is_some());
            let (stream, _) = a.send(snap, prev, 0);
            let got = b.recv(&stream, false).unwrap();
            assert!(b.pool.external_origin(got.id).is_none());
            assert_eq!(
                b.read_all(got.id),
                a.read_all(snap),
                "round {round}, block sizes {src_bs} -> {dst_bs}"
            );
            prev = Some(snap);
        }
        b.check();
    }
}

#[test]
fn snapshots_of_different_origins_are_compared_byte_for_byte() {
    let mut a = pool(128);
    let mut b = pool(128);
    a.disk(0);
    a.pool.write(0, 0, &vec![5u8; 100_000]).unwrap();
    a.snap(1, 0, "plain");
    let (full, _) = a.send(1, None, 0);
    b.recv(&full, false).unwrap();
    // The same device, now over a golden image: unmapped in both, yet different.
    a.pool
        .set_external_origin(0, Some(golden(DISK / 4, 9)))
        .unwrap();
    a.snap(2, 0, "backed");
    let (inc, st) = a.send(2, Some(1), 0);
    assert!(st.data_bytes > 0);
    let got = b.recv(&inc, false).unwrap();
    assert_eq!(b.read_all(got.id), a.read_all(2));
    // And back: the origin's bytes must be zeroed on the receiver.
    a.pool.set_external_origin(0, None).unwrap();
    a.snap(3, 0, "plain-again");
    let (inc, st) = a.send(3, Some(2), 0);
    assert!(st.zero_bytes > 0);
    let got = b.recv(&inc, false).unwrap();
    assert_eq!(b.read_all(got.id), a.read_all(3));
}

#[test]
fn a_stream_whose_base_is_missing_or_different_is_refused_and_changes_nothing() {
    let mut a = pool(128);
    a.disk(0);
    scribble(&a, 0, 1, 10);
    a.snap(1, 0, "s1");
    scribble(&a, 0, 2, 10);
    a.snap(2, 0, "s2");
    let (inc, _) = a.send(2, Some(1), 0);
    let mut b = pool(128);
    let e = b.recv(&inc, false).unwrap_err().to_string();
    assert!(e.contains("does not have"), "{e}");
    assert!(b.reg.devices.is_empty() && b.pool.devices().is_empty());

    // The base arrives; then the same stream works, and a second time it is refused.
    let (full, _) = a.send(1, None, 0);
    b.recv(&full, false).unwrap();
    b.recv(&inc, false).unwrap();
    let e = b.recv(&inc, false).unwrap_err().to_string();
    assert!(e.contains("already in the pool"), "{e}");

    // A full stream under a name already used is refused before anything is made.
    let mut c = pool(128);
    c.disk(0);
    c.reg.devices.get_mut(&0).unwrap().name = Some("s1".into());
    let e = c.recv(&full, false).unwrap_err().to_string();
    assert!(e.contains("exists"), "{e}");
    assert_eq!(c.pool.devices().len(), 1);
}

/// A full stream of a snapshot the pool holds is received again under another name, as
/// zfs allows: a second copy, with the sender's guid, beside the first. Without a new name
/// it is refused, saying how to keep a second copy.
#[test]
fn a_full_stream_is_received_under_a_new_name_beside_the_copy_the_pool_holds() {
    let mut a = pool(128);
    a.disk(0);
    scribble(&a, 0, 21, 40);
    a.snap(1, 0, "s1");
    let (full, _) = a.send(1, None, 0);
    let mut b = pool(512);
    let first = b.recv(&full, false).unwrap();
    // Again under the stream's name, or under the name the copy has: refused, saying how.
    for name in [None, Some("s1")] {
        let e = b.recv_as(&full, false, name).unwrap_err().to_string();
        assert!(
            e.contains("already in the pool as s1") && e.contains("--name"),
            "{name:?}: {e}"
        );
    }
    assert_eq!(b.pool.devices().len(), 1);
    let second = b.recv_as(&full, false, Some("s1-copy")).unwrap();
    assert_eq!(second.name, "s1-copy");
    assert_ne!(second.id, first.id);
    // A third copy, resumable this time: as for any fresh receive.
    let third = b.recv_as(&full, true, Some("s1-third")).unwrap();
    // The registry holds the guid three times, and loads so after a crash.
    b.crash_and_reopen();
    for (got, name) in [(&first, "s1"), (&second, "s1-copy"), (&third, "s1-third")] {
        assert_eq!(b.id_of(name), got.id);
        let e = &b.reg.devices[&got.id];
        assert_eq!(e.guid, a.reg.devices[&1].guid);
        assert!(e.snapshot && e.read_only && e.receiving.is_none(), "{e:?}");
        assert_eq!(b.read_all(got.id), a.read_all(1), "{name}");
    }
    b.check();
    // Each is a device of its own: the first deleted, the others read as before.
    b.with_catalog(|cat| {
        cat.change(|devices, reg| -> Result<(), StreamError> {
            reg.devices.remove(&first.id);
            devices.delete(first.id)?;
            Ok(())
        })
    })
    .unwrap();
    assert_eq!(b.read_all(second.id), a.read_all(1));
    assert_eq!(b.read_all(third.id), a.read_all(1));
    b.check();
}

/// An incremental stream finds its base by guid: when the pool holds the base twice it is
/// applied on a complete copy, and may itself be received twice.
#[test]
fn an_incremental_stream_is_received_onto_a_base_the_pool_holds_twice() {
    let mut a = pool(128);
    a.disk(0);
    scribble(&a, 0, 31, 40);
    a.snap(1, 0, "s1");
    scribble(&a, 0, 32, 20);
    a.snap(2, 0, "s2");
    let (full, _) = a.send(1, None, 0);
    let (inc, _) = a.send(2, Some(1), 0);
    let mut b = pool(128);
    let base = b.recv(&full, false).unwrap();
    let base_copy = b.recv_as(&full, false, Some("s1-copy")).unwrap();
    let got = b.recv(&inc, false).unwrap();
    assert!(
        [Some(base.id), Some(base_copy.id)].contains(&got.base),
        "{got:?}"
    );
    assert_eq!(b.read_all(got.id), a.read_all(2));
    // The same incremental again needs another name too.
    let e = b.recv(&inc, false).unwrap_err().to_string();
    assert!(e.contains("already in the pool as s2"), "{e}");
    let again = b.recv_as(&inc, false, Some("s2-copy")).unwrap();
    assert_eq!(b.read_all(again.id), a.read_all(2));
    // A third copy of the base cut off (receiving): the incremental still finds a complete
    // one.
    let Err(ReceiveError::Interrupted(_)) = b.recv_as(&full[..full.len() / 2], true, Some("s1-3"))
    else {
        panic!("expected an interruption")
    };
    let third = b.recv_as(&inc, false, Some("s2-3")).unwrap();
    assert!(
        [Some(base.id), Some(base_copy.id)].contains(&third.base),
        "{third:?}"
    );
    assert_eq!(b.read_all(third.id), a.read_all(2));
    assert_eq!(b.read_all(base.id), a.read_all(1));
    assert_eq!(b.read_all(base_copy.id), a.read_all(1));
    b.check();
}

/// A second copy cut off stays the one copy of that snapshot being received (a token names
/// the snapshot, not the copy): a receive under yet another name is refused, naming it; the
/// rest goes on into it, with its name given again or none. `receive --abort TOKEN` drops
/// that copy and leaves the complete one.
#[test]
fn an_interrupted_second_copy_is_resumed_or_aborted_and_the_first_copy_stays() {
    let mut a = pool(128);
    a.disk(0);
    scribble(&a, 0, 41, 60);
    a.snap(1, 0, "s1");
    let (full, _) = a.send(1, None, 0);
    let mut b = pool(128);
    let first = b.recv(&full, false).unwrap();
    let Err(ReceiveError::Interrupted(i)) =
        b.recv_as(&full[..full.len() / 2], true, Some("s1-copy"))
    else {
        panic!("expected an interruption")
    };
    assert!(i.token.offset > 0, "{}", i.token);
    b.crash_and_reopen();
    b.check();
    // The rest or the whole under a third name, or the whole again: refused, naming the
    // interrupted copy.
    let (rest, _) = a.send(1, None, i.token.offset);
    for (stream, name) in [
        (&rest, Some("s1-other")),
        (&full, Some("s1-other")),
        (&full, None),
    ] {
        let e = b.recv_as(stream, true, name).unwrap_err().to_string();
        assert!(
            e.contains("interrupted receive") && e.contains("\"s1-copy\""),
            "{name:?}: {e}"
        );
    }
    assert_eq!(b.pool.devices().len(), 2);
    // Dropped by its token: the complete copy stays.
    let dropped = b.with_catalog(|cat| abort(cat, &i.token.guid)).unwrap();
    assert_ne!(dropped, first.id);
    assert_eq!(b.reg.devices.keys().collect::<Vec<_>>(), [&first.id]);
    let ids: Vec<u32> = b.pool.devices().iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [first.id]);
    assert_eq!(b.read_all(first.id), a.read_all(1));
    b.check();
    let e = b
        .with_catalog(|cat| abort(cat, &i.token.guid))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no interrupted receive"), "{e}");
    // Cut off again, then resumed: with its name (cut once more), then without one.
    let Err(ReceiveError::Interrupted(i)) =
        b.recv_as(&full[..full.len() / 3], true, Some("s1-copy"))
    else {
        panic!("expected an interruption")
    };
    let (rest, _) = a.send(1, None, i.token.offset);
    let Err(ReceiveError::Interrupted(i)) =
        b.recv_as(&rest[..rest.len() / 2], true, Some("s1-copy"))
    else {
        panic!("expected an interruption")
    };
    let (rest, _) = a.send(1, None, i.token.offset);
    let second = b.recv(&rest, true).unwrap();
    assert_eq!(second.resumed_from, i.token.offset);
    assert_eq!(second.name, "s1-copy");
    assert_eq!(b.read_all(second.id), a.read_all(1));
    assert_eq!(b.read_all(first.id), a.read_all(1));
    b.check();
}

#[test]
fn corrupted_and_truncated_streams_are_rejected_and_leave_nothing() {
    let mut a = pool(128);
    a.disk(0);
    scribble(&a, 0, 3, 30);
    a.snap(1, 0, "s1");
    let (stream, _) = a.send(1, None, 0);
    let mut b = pool(128);
    let mut x = 99u64;
    for i in 0..60 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut bad = stream.clone();
        if i % 2 == 0 {
            let at = (x >> 11) as usize % bad.len();
            bad[at] ^= 1 << (x % 8);
        } else {
            bad.truncate((x >> 11) as usize % bad.len());
        }
        let err = b.recv(&bad, false).unwrap_err();
        assert!(matches!(err, ReceiveError::Failed(_)), "case {i}: {err}");
        assert!(b.reg.devices.is_empty(), "case {i}: {err}");
        assert!(b.pool.devices().is_empty(), "case {i}: {err}");
    }
    b.check();
    // A header that is well-formed JSON with a hostile guid is refused, not sliced.
    let mut h = header();
    h.snapshot.guid = "é".repeat(16);
    let (hostile, _) = StreamWriter::new(Vec::new(), &h).unwrap().finish().unwrap();
    let e = b.recv(&hostile, false).unwrap_err().to_string();
    assert!(e.contains("not a guid"), "{e}");
    // Trailing bytes after the end record are refused too.
    let mut long = stream.clone();
    long.push(0);
    let e = b.recv(&long, false).unwrap_err().to_string();
    assert!(e.contains("follow the end record"), "{e}");
}

#[test]
fn an_interrupted_resumable_receive_resumes_without_resending_what_arrived() {
    let mut a = pool(128);
    a.disk(0);
    scribble(&a, 0, 4, 60);
    a.snap(1, 0, "s1");
    scribble(&a, 0, 5, 30);
    a.snap(2, 0, "s2");
    let mut b = pool(512);
    let mut x = 5u64;
    for (snap, base) in [(1u32, None), (2, Some(1))] {
        let (whole, _) = a.send(snap, base, 0);
        let mut cut = whole.clone();
        let mut interruptions = 0;
        loop {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let keep = (x >> 11) as usize % cut.len().max(1);
            let attempt = if interruptions < 3 {
                &cut[..keep]
            } else {
                &cut[..]
            };
            match b.recv(attempt, true) {
                Ok(r) => {
                    assert_eq!(b.read_all(r.id), a.read_all(snap));
                    break;
                }
                Err(ReceiveError::Interrupted(i)) => {
                    interruptions += 1;
                    let token: ResumeToken = i.token.to_string().parse().unwrap();
                    assert_eq!(token, i.token);
                    // What arrived survives a crash in between.
                    b.crash_and_reopen();
                    b.check();
                    let (rest, _) = a.send(snap, base, token.offset);
                    assert!(rest.len() <= whole.len());
                    cut = rest;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    // An interrupted receive can be dropped instead.
    scribble(&a, 0, 6, 10);
    a.snap(3, 0, "s3");
    let (s3, _) = a.send(3, Some(2), 0);
    let Err(ReceiveError::Interrupted(i)) = b.recv(&s3[..s3.len() / 2], true) else {
        panic!("expected an interruption")
    };
    let e = b.recv(&s3, true).unwrap_err().to_string();
    assert!(e.contains("interrupted receive"), "{e}");
    let before = b.pool.devices().len();
    b.with_catalog(|cat| abort(cat, &i.token.guid)).unwrap();
    assert_eq!(b.pool.devices().len(), before - 1);
    b.recv(&s3, false).unwrap();
    b.check();
}

#[test]
fn a_receive_cut_in_its_first_record_resumes_and_its_name_stays_reserved() {
    let mut a = pool(128);
    a.disk(0);
    a.pool.write(0, 0, &vec![7u8; 2 << 20]).unwrap();
    a.snap(1, 0, "s1");
    let (whole, _) = a.send(1, None, 0);
    let mut b = pool(128);
    // Cut inside the first (1 MiB) record: nothing applied, the token's offset is 0.
    let Err(ReceiveError::Interrupted(i)) = b.recv(&whole[..4096], true) else {
        panic!("expected an interruption")
    };
    assert_eq!(i.token.offset, 0);
    // The pending name is taken: neither another device nor another receive gets it.
    let e = DeviceEntry {
        name: Some("s1".into()),
        ..Default::default()
    };
    assert!(b.reg.insert(99, e).is_err());
    let mut c = pool(128);
    c.disk(0);
    c.pool.write(0, 0, &[1u8; 4096]).unwrap();
    c.snap(1, 0, "s1");
    let (other, _) = c.send(1, None, 0);
    let err = b.recv(&other, false).unwrap_err().to_string();
    assert!(err.contains("exists"), "{err}");
    // The stream sent again from offset 0 resumes the receive.
    let (rest, _) = a.send(1, None, i.token.offset);
    let got = b.recv(&rest, true).unwrap();
    assert_eq!(got.name, "s1");
    assert_eq!(b.read_all(got.id), a.read_all(1));
    b.check();
}

#[test]
fn a_second_receive_of_a_stream_being_received_is_refused_and_spoils_nothing() {
    use std::io::Write;
    let mut a = pool(128);
    a.disk(0);
    scribble(&a, 0, 9, 40);
    a.snap(1, 0, "s1");
    let (whole, _) = a.send(1, None, 0);
    let b = pool(128);
    let cat = Catalog::new(b.pool.clone(), Registry::new(b.reg.path(), 0), 0);
    let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let stream = whole.clone();
    let writer = std::thread::spawn(move || {
        // The header and a little more, then the rest once told.
        tx.write_all(&stream[..4096]).unwrap();
        go_rx.recv().unwrap();
        tx.write_all(&stream[4096..]).unwrap();
    });
    std::thread::scope(|s| {
        let first = s.spawn(|| receive(&cat, &rx, &ReceiveOptions::default(), &mut |_, _| {}));
        // Wait until the first receive made its device.
        while !cat
            .registry()
            .devices
            .values()
            .any(|e| e.receiving.is_some())
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // The same stream again (a command given twice): refused, and it drops nothing.
        let e = receive(&cat, &whole[..], &ReceiveOptions::default(), &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("under way"), "{e}");
        go_tx.send(()).unwrap();
        let got = first.join().unwrap().unwrap();
        assert_eq!(b.read_all(got.id), a.read_all(1));
    });
    writer.join().unwrap();
    assert!(cat.registry().receiving_now.is_empty());
}

#[test]
fn the_callers_state_is_on_the_received_entry_from_its_first_commit() {
    let mut a = pool(128);
    a.disk(0);
    scribble(&a, 0, 11, 40);
    a.snap(1, 0, "s1");
    let (whole, _) = a.send(1, None, 0);
    let mut b = pool(128);
    let mark = serde_json::json!({"migration": {"role": "incoming", "job": "m"}});
    let recv = |b: &mut P, stream: &[u8]| {
        let opts = ReceiveOptions {
            resumable: true,
            daemon_state: Some(mark.clone()),
            ..Default::default()
        };
        b.with_catalog(|cat| receive(cat, stream, &opts, &mut |_, _| {}))
    };
    // Cut off, then a crash: what the next start finds is marked.
    let Err(ReceiveError::Interrupted(_)) = recv(&mut b, &whole[..whole.len() / 2]) else {
        panic!("expected an interruption")
    };
    b.crash_and_reopen();
    let marked: Vec<_> = b
        .reg
        .devices
        .values()
        .map(|e| e.daemon_state.clone())
        .collect();
    assert_eq!(marked, vec![Some(mark.clone())]);
    // Resumed to the end: still marked.
    let id = b.reg.devices.keys().next().copied().unwrap();
    let offset = b.reg.devices[&id].receiving.as_ref().unwrap().next_offset;
    let (rest, _) = a.send(1, None, offset);
    let got = recv(&mut b, &rest).unwrap();
    b.crash_and_reopen();
    assert_eq!(b.reg.devices[&got.id].daemon_state, Some(mark));
}

#[test]
fn only_snapshots_are_sent() {
    let mut a = pool(128);
    a.disk(0);
    assign_guids(&mut a.reg, &[0]).unwrap();
    let e = send(
        &a.pool,
        &a.reg,
        0,
        &SendOptions::default(),
        Vec::new(),
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a snapshot"), "{e}");
}

fn header() -> StreamHeader {
    StreamHeader {
        snapshot: SnapshotRef {
            guid: "0".repeat(32),
            name: Some("x".into()),
            size: 1 << 30,
            created: 1,
        },
        base: None,
        block_size: 65536,
        resume_offset: 0,
    }
}

/// A stream's header names the snapshot (and its base): a name that is not one (a path, a
/// NUL, too long) is refused when the header is read, before anything is received, and so is
/// such a name given to the receiver.
#[test]
fn a_stream_whose_header_carries_a_bad_name_is_refused_and_changes_nothing() {
    let with_name = |name: &str, base: Option<&str>| {
        let mut h = header();
        h.snapshot.name = Some(name.into());
        h.base = base.map(|b| SnapshotRef {
            guid: "1".repeat(32),
            name: Some(b.into()),
            size: 1 << 30,
            created: 0,
        });
        let (bytes, _) = StreamWriter::new(Vec::new(), &h).unwrap().finish().unwrap();
        bytes
    };
    for (name, base) in [
        ("../../x", None),
        ("a\0b", None),
        ("..", None),
        ("-x", None),
        ("", None),
        ("ok", Some("a/b")),
    ] {
        let long = "n".repeat(65);
        for n in [name, long.as_str()] {
            let e = match StreamReader::new(&with_name(n, base)[..]) {
                Ok(_) => panic!("{n:?} (base {base:?}) was read"),
                Err(e) => e,
            };
            assert!(
                matches!(&e, StreamError::BadHeader(m) if m.contains("is not a valid name")),
                "{n:?}: {e}"
            );
        }
    }
    // Nothing is received from such a stream, and a bad name given to the receiver is
    // refused too.
    let mut a = pool(128);
    a.disk(0);
    a.snap(1, 0, "s1");
    let (stream, _) = a.send(1, None, 0);
    let mut b = pool(128);
    let bad = with_name("../../x", None);
    assert!(b.recv(&bad, false).is_err());
    let opts = ReceiveOptions {
        name: Some("a/b".into()),
        ..Default::default()
    };
    let e = b
        .with_catalog(|cat| receive(cat, &stream[..], &opts, &mut |_, _| {}))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not a valid name"), "{e}");
    assert!(b.reg.devices.is_empty());
    assert!(b.pool.devices().is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Records round-trip; any byte flipped or any cut is an error, never a panic or a
    /// different record sequence.
    #[test]
    fn records_round_trip_and_damage_is_detected(
        recs in proptest::collection::vec((0u64..4096, 1usize..3000, any::<bool>()), 0..20),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
    ) {
        let mut w = StreamWriter::new(Vec::new(), &header()).unwrap();
        let mut pos = 0u64;
        let mut want = Vec::new();
        for (gap, len, data) in recs {
            let off = pos + gap;
            let r = if data {
                Record::Data { offset: off, data: vec![(off % 251) as u8; len] }
            } else {
                Record::Zero { offset: off, length: len as u64 }
            };
            match &r {
                Record::Data { offset, data } => w.data(*offset, data).unwrap(),
                Record::Zero { offset, length } => w.zero(*offset, *length).unwrap(),
            }
            pos = r.end();
            want.push(r);
        }
        let (bytes, n) = w.finish().unwrap();
        prop_assert_eq!(bytes.len() as u64, n);
        let read = |b: &[u8]| -> Result<Vec<Record>, StreamError> {
            let mut r = StreamReader::new(b)?;
            let mut v = Vec::new();
            while let Some(x) = r.next_record()? { v.push(x); }
            Ok(v)
        };
        prop_assert_eq!(read(&bytes).unwrap(), want);
        let mut bad = bytes.clone();
        bad[flip.index(bytes.len())] ^= 1 << bit;
        prop_assert!(read(&bad).is_err());
        prop_assert!(read(&bytes[..cut.index(bytes.len())]).is_err());
    }
}

/// A migration's copy carries its mark in every commit of the receive, the first (before
/// any data) included: a crash mid-copy, or just after it, leaves a device the next start
/// recognises as the migration's (it once got the mark only after the receive, and a crash
/// in between left an unmarked copy behind for good).
#[test]
fn a_received_copy_is_marked_from_its_first_commit() {
    let mut a = pool(128);
    a.disk(0);
    scribble(&a, 0, 9, 40);
    a.snap(1, 0, "s1");
    let (stream, _) = a.send(1, None, 0);
    let mut b = pool(512);
    let mark = serde_json::json!({"migration": {"role": "incoming", "job": "m"}});
    /// Hands out the stream; halfway, reads what is durable of the registry, as a crash
    /// there would leave it.
    struct Halfway<'a> {
        rest: &'a [u8],
        half: usize,
        path: std::path::PathBuf,
        seen: Option<Registry>,
    }
    impl std::io::Read for Halfway<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.seen.is_none() && self.rest.len() <= self.half {
                self.seen = Registry::load(&self.path).unwrap();
            }
            let n = buf.len().min(self.rest.len()).min(4096);
            buf[..n].copy_from_slice(&self.rest[..n]);
            self.rest = &self.rest[n..];
            Ok(n)
        }
    }
    let mut input = Halfway {
        rest: &stream,
        half: stream.len() / 2,
        path: b.reg.path().to_path_buf(),
        seen: None,
    };
    let opts = ReceiveOptions {
        name: Some(".m.in0".into()),
        daemon_state: Some(mark.clone()),
        ..Default::default()
    };
    let got = b
        .with_catalog(|cat| receive(cat, &mut input, &opts, &mut |_, _| {}))
        .unwrap();
    let mid = input.seen.expect("the registry was read halfway");
    let e = &mid.devices[&got.id];
    assert!(e.receiving.is_some(), "{e:?}");
    assert_eq!(e.daemon_state.as_ref(), Some(&mark), "mid-receive: {e:?}");
    b.crash_and_reopen();
    assert_eq!(b.reg.devices[&got.id].daemon_state.as_ref(), Some(&mark));
    assert!(b.reg.devices[&got.id].receiving.is_none());
}

/// Writes the seed corpus of the `stream` fuzz target (fuzz/corpus/stream/): small valid
/// streams of a 1 MiB device of a 64 KiB block pool, full and incremental, the incremental
/// ones on top of a snapshot with the guid and size that the target's pool gives its `base`
/// (fuzz/fuzz_targets/stream.rs). Deterministic: fixed guids and times, so running it again
/// rewrites the same files. Run with
/// `cargo test -p thinpool --lib write_fuzz_seeds -- --ignored`.
#[test]
#[ignore = "writes files into fuzz/corpus/stream"]
fn write_fuzz_seeds() {
    const BASE_GUID: &str = "0123456789abcdef0123456789abcdef";
    const SIZE: u64 = 1 << 20;
    let mut a = pool(128);
    let disk = DeviceEntry {
        name: Some("disk".into()),
        size: SIZE,
        serial: "s".into(),
        ..Default::default()
    };
    let entry = disk.clone();
    a.with_catalog(|cat| {
        cat.change(|devices, reg| -> Result<(), CatalogError> {
            devices.create_thin(0)?;
            reg.insert(0, entry)?;
            Ok(())
        })
    })
    .unwrap();
    let snap = |a: &mut P, id: u32, name: &str, guid: &str| {
        let e = DeviceEntry {
            name: Some(name.into()),
            snapshot: true,
            origin: Some(0),
            guid: Some(guid.into()),
            created: 1_700_000_000 + id as u64,
            ..disk.clone()
        };
        a.with_catalog(|cat| {
            cat.change(|devices, reg| -> Result<(), CatalogError> {
                devices.create_snap(id, 0)?;
                reg.insert(id, e)?;
                Ok(())
            })
        })
        .unwrap();
    };
    snap(&mut a, 1, "empty", "0000000000000000000000000000e0e0");
    // Pages of data, a run of zeros written (mapped but zero: a ZERO record), and a page
    // in the last block.
    for (off, byte) in [(0u64, 1u8), (8192, 2), (200 << 10, 3), (SIZE - 4096, 4)] {
        a.pool.write(0, off, &[byte; 4096]).unwrap();
    }
    a.pool.write(0, 512 << 10, &[0u8; 64 << 10]).unwrap();
    snap(&mut a, 2, "base", BASE_GUID);
    // The next one changes a page, unmaps a block and zeroes part of one.
    a.pool.write(0, 12288, &[5u8; 4096]).unwrap();
    a.pool.discard(0, 192 << 10, 64 << 10).unwrap();
    a.pool.write_zeroes(0, SIZE - 2048, 1024, false).unwrap();
    snap(&mut a, 3, "next", "fedcba9876543210fedcba9876543210");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/stream");
    std::fs::create_dir_all(&dir).unwrap();
    for (file, id, base) in [
        ("full-empty", 1, None),
        ("full-next", 3, None),
        ("incremental-next-on-base", 3, Some(2)),
    ] {
        let (stream, _) = a.send(id, base, 0);
        assert!(stream.len() < 64 << 10, "{file}: {} bytes", stream.len());
        std::fs::write(dir.join(file), &stream).unwrap();
    }
    // A resumed stream: the receiver refuses it without the interrupted receive, but the
    // header's resume offset and the records from there on are worth mutating.
    let (stream, _) = a.send(3, Some(2), 256 << 10);
    std::fs::write(dir.join("incremental-next-resumed"), &stream).unwrap();
}
