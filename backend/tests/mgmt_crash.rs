//! A crash in the middle of management: the daemon is killed (SIGKILL, no chance to clean
//! up) at a random moment while a client runs a random sequence of state changes and a
//! guest writes and flushes disk0. After each kill the pool must check clean (ours and
//! `thin_check`), the registry and the metadata must agree, every acknowledged change must
//! be there after a restart, and the change in flight must be wholly there or wholly absent.
//!
//! The seed is printed; `VHOST_THIN_CRASH_SEED=N` replays a run's choices (commands,
//! delays; where exactly the kill lands still depends on timing), `VHOST_THIN_CRASH_ROUNDS`
//! changes its length. A second test reaches the one point that matters most exactly: the
//! registry written, the pool not committed.

mod common;
use common::{cli, Guest, Rng, Served, D};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;
use vhost_thin::ctl::Client;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};

/// What the test expects of one registry name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    size: u64,
    read_only: bool,
    snapshot: bool,
    /// The origin's name while the origin exists (query-disks shows null once it is gone).
    origin: Option<String>,
    /// Known once the reply arrived (or once observed).
    thin_id: Option<u32>,
}

type Model = BTreeMap<String, Entry>;

#[derive(Clone, Debug)]
enum Cmd {
    Add { name: String, size: u64 },
    Clone { name: String, from: String },
    Snap { disk: String, name: String },
    SnapDelete { name: String },
    Resize { name: String, size: u64 },
    SetReadOnly { name: String, read_only: bool },
    Remove { name: String },
}

impl Cmd {
    fn qmp(&self) -> (&'static str, Value) {
        match self {
            Cmd::Add { name, size } => ("disk-add", json!({"name": name, "size": size})),
            Cmd::Clone { name, from } => ("disk-add", json!({"name": name, "clone-from": from})),
            Cmd::Snap { disk, name } => ("snapshot-create", json!({"disk": disk, "name": name})),
            Cmd::SnapDelete { name } => ("snapshot-delete", json!({"name": name})),
            Cmd::Resize { name, size } => ("disk-resize", json!({"name": name, "size": size})),
            Cmd::SetReadOnly { name, read_only } => (
                "disk-set-read-only",
                json!({"name": name, "read-only": read_only}),
            ),
            Cmd::Remove { name } => ("disk-remove", json!({"name": name})),
        }
    }

    /// The model after this command; `reply` is None for a command in flight.
    fn apply(&self, m: &Model, reply: Option<&Value>) -> Model {
        let mut m = m.clone();
        let id = reply.and_then(|r| r["thin-id"].as_u64()).map(|i| i as u32);
        let forget = |m: &mut Model, name: &str| {
            m.remove(name);
            for e in m.values_mut() {
                if e.origin.as_deref() == Some(name) {
                    e.origin = None;
                }
            }
        };
        match self {
            Cmd::Add { name, size } => {
                m.insert(
                    name.clone(),
                    Entry {
                        size: *size,
                        read_only: false,
                        snapshot: false,
                        origin: None,
                        thin_id: id,
                    },
                );
            }
            Cmd::Clone { name, from } => {
                let size = m[from].size;
                m.insert(
                    name.clone(),
                    Entry {
                        size,
                        read_only: false,
                        snapshot: false,
                        origin: Some(from.clone()),
                        thin_id: id,
                    },
                );
            }
            Cmd::Snap { disk, name } => {
                let size = m[disk].size;
                m.insert(
                    name.clone(),
                    Entry {
                        size,
                        read_only: true,
                        snapshot: true,
                        origin: Some(disk.clone()),
                        thin_id: id,
                    },
                );
            }
            Cmd::SnapDelete { name } | Cmd::Remove { name } => forget(&mut m, name),
            Cmd::Resize { name, size } => m.get_mut(name).unwrap().size = *size,
            Cmd::SetReadOnly { name, read_only } => m.get_mut(name).unwrap().read_only = *read_only,
        }
        m
    }
}

/// A random command valid in state `m`; `serial` makes names unique over the whole run.
fn random_cmd(rng: &mut Rng, m: &Model, serial: &mut u64) -> Cmd {
    let disks: Vec<String> = m
        .iter()
        .filter(|(_, e)| !e.snapshot)
        .map(|(n, _)| n.clone())
        .collect();
    let snaps: Vec<String> = m
        .iter()
        .filter(|(_, e)| e.snapshot)
        .map(|(n, _)| n.clone())
        .collect();
    // disk0 is served with the guest on it from the command line: it stays, and writable.
    let others: Vec<String> = disks.iter().filter(|n| *n != "disk0").cloned().collect();
    *serial += 1;
    let fresh = |p: &str| format!("{p}{serial}");
    loop {
        match rng.below(14) {
            0..=1 if disks.len() < 10 => {
                return Cmd::Add {
                    name: fresh("d"),
                    size: (1 + rng.below(8)) << 20,
                }
            }
            2..=3 if disks.len() < 10 && !snaps.is_empty() => {
                return Cmd::Clone {
                    name: fresh("c"),
                    from: rng.pick(&snaps).clone(),
                }
            }
            4..=6 if snaps.len() < 10 => {
                return Cmd::Snap {
                    disk: rng.pick(&disks).clone(),
                    name: fresh("s"),
                }
            }
            7..=8 if !snaps.is_empty() => {
                return Cmd::SnapDelete {
                    name: rng.pick(&snaps).clone(),
                }
            }
            9..=10 => {
                let name = rng.pick(&disks).clone();
                let size = m[&name].size + ((1 + rng.below(4)) << 20);
                return Cmd::Resize { name, size };
            }
            11 if !others.is_empty() => {
                let name = rng.pick(&others).clone();
                let read_only = !m[&name].read_only;
                return Cmd::SetReadOnly { name, read_only };
            }
            12..=13 if !others.is_empty() => {
                return Cmd::Remove {
                    name: rng.pick(&others).clone(),
                }
            }
            _ => {}
        }
    }
}

/// What one client session got done before the kill.
struct Session {
    model: Model,
    acked: usize,
    /// The command sent last, whose reply never came: the client keeps one going at all
    /// times, so every kill lands with a command in flight (perhaps not yet read by the
    /// daemon, perhaps committed but not answered).
    in_flight: Cmd,
    serial: u64,
}

/// Issues random changes until the connection dies; an error before `killed` is a failure.
fn client_session(
    mut c: Client,
    mut model: Model,
    mut rng: Rng,
    mut serial: u64,
    killed: Arc<AtomicBool>,
    started: mpsc::Sender<()>,
) -> Session {
    let mut acked = 0;
    let _ = started.send(());
    loop {
        let cmd = random_cmd(&mut rng, &model, &mut serial);
        let (name, args) = cmd.qmp();
        match c.execute(name, args.clone()) {
            Ok(reply) => {
                model = cmd.apply(&model, Some(&reply));
                acked += 1;
            }
            Err(e) => {
                assert!(
                    killed.load(Ordering::SeqCst),
                    "{name} {args} failed with the daemon alive: {e:#}"
                );
                return Session {
                    model,
                    acked,
                    in_flight: cmd,
                    serial,
                };
            }
        }
    }
}

/// Writes and flushes disk0 until `stop`, so that pool commits (FLUSH) race with the
/// management changes. Never waits for a reply past `stop`: the daemon may be dead.
fn guest_load(sock: PathBuf, seed: u64, stop: Arc<AtomicBool>, connected: mpsc::Sender<()>) {
    let mut g = Guest::connect(&sock, 1);
    let _ = connected.send(());
    let mut rng = Rng(seed);
    let wait = |g: &Guest, seq: u16| g.wait_used_or_stop(0, seq, &stop);
    let (w, f) = (Guest::buf(1), Guest::buf(2));
    loop {
        // 4 KiB somewhere in the first 4 MiB: bounded space, many block-sharing breaks.
        let sector = rng.below(1024) * 8;
        g.header(w, VIRTIO_BLK_T_OUT, sector);
        g.mem
            .write_slice(&[rng.next() as u8; 4096], GuestAddress(w + 0x1000))
            .unwrap();
        let seq = g.submit(
            0,
            &[
                D(w, 16, false),
                D(w + 0x1000, 4096, false),
                D(w + 0x10_0800, 1, true),
            ],
        );
        if !wait(&g, seq) {
            return;
        }
        g.header(f, VIRTIO_BLK_T_FLUSH, 0);
        let seq = g.submit(0, &[D(f, 16, false), D(f + 0x800, 1, true)]);
        if !wait(&g, seq) {
            return;
        }
    }
}

/// The registry as the daemon reports it.
fn observe(c: &mut Client) -> Model {
    let mut m = Model::new();
    for (cmd, snapshot) in [("query-disks", false), ("query-snapshots", true)] {
        for e in c.execute(cmd, json!({})).unwrap().as_array().unwrap() {
            m.insert(
                e["name"].as_str().unwrap().to_string(),
                Entry {
                    size: e["size"].as_u64().unwrap(),
                    read_only: e["read-only"].as_bool().unwrap(),
                    snapshot,
                    origin: e["origin"].as_str().map(str::to_string),
                    thin_id: Some(e["thin-id"].as_u64().unwrap() as u32),
                },
            );
        }
    }
    m
}

/// `got` is `want`, thin ids compared where `want` knows them.
fn matches(got: &Model, want: &Model) -> bool {
    got.len() == want.len()
        && got.iter().zip(want).all(|((gn, g), (wn, w))| {
            gn == wn
                && g.size == w.size
                && g.read_only == w.read_only
                && g.snapshot == w.snapshot
                && g.origin == w.origin
                && (w.thin_id.is_none() || g.thin_id == w.thin_id)
        })
}

/// Offline, after the kill: the metadata checks clean, every thin device has a name,
/// and the registry agrees with the pool (at most after undoing a change the pool did not
/// commit). Returns the pool's devices, thin id → (name, size), and whether a change was
/// undone.
fn check_offline(s: &Served, round: usize) -> (BTreeMap<u32, (String, u64)>, bool) {
    let out = cli(&["pool", "check", "-m", &s.m, "-d", &s.d]);
    assert!(out.contains("clean"), "round {round}: pool check: {out}");
    common::thin_check_ok(&s.m);
    let out = Command::new(common::bin())
        .args(["thin", "ls", "-m", &s.m, "-d", &s.d, "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "round {round}: thin ls failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The guest's writes since the last commit come back from the journal: said, and fine.
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("journaled mapping changes"))
        .collect();
    let undone = match warnings.as_slice() {
        [] => false,
        [w] if w.contains("so it is undone") => true,
        _ => panic!("round {round}: the registry disagrees with the pool:\n{stderr}"),
    };
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let devices = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let id = r["id"].as_u64().unwrap() as u32;
            let name = r["name"].as_str().unwrap_or_else(|| {
                panic!("round {round}: thin device {id} has no registry entry: {r}")
            });
            (id, (name.to_string(), r["size"].as_u64().unwrap()))
        })
        .collect();
    (devices, undone)
}

#[test]
fn sigkill_during_management_changes_leaves_old_or_new_state() {
    let seed = std::env::var("VHOST_THIN_CRASH_SEED")
        .ok()
        .map(|s| s.parse().expect("VHOST_THIN_CRASH_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let rounds: usize = std::env::var("VHOST_THIN_CRASH_ROUNDS")
        .ok()
        .map(|s| s.parse().expect("VHOST_THIN_CRASH_ROUNDS is a number"))
        .unwrap_or(24);
    println!("mgmt crash: seed {seed} (VHOST_THIN_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let mut s = Served::with_pool("", "256MiB");
    let mut model = observe(&mut s.client());
    assert_eq!(model.keys().collect::<Vec<_>>(), ["disk0"]);
    let mut serial = 0;
    let (mut acked, mut old, mut new, mut undone) = (0, 0, 0, 0);
    for round in 0..rounds {
        let delay = Duration::from_millis(rng.below(41));
        let stop_guest = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let guest = {
            let (sock, seed, stop) = (s.sock.clone(), rng.next(), stop_guest.clone());
            thread::spawn(move || guest_load(sock, seed, stop, tx))
        };
        rx.recv().expect("the guest connects");
        let killed = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let session = {
            let (c, m, r, k) = (s.client(), model.clone(), Rng(rng.next()), killed.clone());
            thread::spawn(move || client_session(c, m, r, serial, k, tx))
        };
        rx.recv().expect("the client starts");
        thread::sleep(delay);
        killed.store(true, Ordering::SeqCst);
        let mut child = s.child.take().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let got = session.join().unwrap();
        stop_guest.store(true, Ordering::SeqCst);
        guest.join().unwrap();
        serial = got.serial;
        acked += got.acked;

        let (devices, undone_now) = check_offline(&s, round);
        undone += undone_now as usize;

        s.start("");
        let mut c = s.client();
        let seen = observe(&mut c);
        let after = got.in_flight.apply(&got.model, None);
        let state = if matches(&seen, &got.model) {
            old += 1;
            "old"
        } else if matches(&seen, &after) {
            new += 1;
            "new"
        } else {
            panic!(
                "round {round} (seed {seed}): after the kill the daemon shows\n{seen:#?}\nexpected the state after {} acknowledged changes\n{:#?}\nor that plus the change in flight ({:?})\n{after:#?}",
                got.acked, got.model, got.in_flight
            );
        };
        assert!(
            !undone_now || state == "old",
            "round {round} (seed {seed}): the registry's change was undone, yet the state is the new one"
        );
        // The registry the daemon serves and the pool's metadata name the same devices.
        let named: BTreeMap<u32, (String, u64)> = seen
            .iter()
            .map(|(n, e)| (e.thin_id.unwrap(), (n.clone(), e.size)))
            .collect();
        assert_eq!(
            named, devices,
            "round {round} (seed {seed}): registry (left) and pool metadata (right) disagree"
        );
        let ids: BTreeSet<u32> = named.keys().copied().collect();
        let pool = c.execute("query-pools", json!({})).unwrap();
        assert_eq!(pool[0]["devices"], ids.len(), "round {round}");
        println!(
            "round {round}: killed after {delay:?}, {} acknowledged, in flight: {}, found the {state} state{}",
            got.acked,
            got.in_flight.qmp().0,
            if undone_now { " (undone from a registry one transaction ahead)" } else { "" }
        );
        model = seen;
    }
    println!(
        "mgmt crash summary: seed {seed}, {rounds} rounds, {acked} commands acknowledged, {rounds} kills each with a command in flight: {old} left the old state ({undone} of them undone from a registry one transaction ahead), {new} the new"
    );
    assert!(s.stop().success());
    let out = cli(&["pool", "check", "-m", &s.m, "-d", &s.d]);
    assert!(out.contains("clean"), "{out}");
}

/// The registry's names and sizes by thin id, as `thin ls` shows them offline, and what
/// it said on stderr.
fn thin_ls(s: &Served) -> (BTreeMap<u32, String>, String) {
    let out = Command::new(common::bin())
        .args(["thin", "ls", "-m", &s.m, "-d", &s.d, "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_u64().unwrap() as u32,
                r["name"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    (names, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The precise point the random kills hit only now and then: the registry written with
/// the next transaction id, the pool not committed. Reached with the library steps a
/// change takes, stopping before the commit (the pool is dropped uncommitted, as SIGKILL
/// leaves it), for a change that creates a device and one that deletes one.
#[test]
fn a_crash_after_the_registry_write_leaves_the_old_state() {
    use thinpool::pool::Pool;
    use thinpool::registry::{DeviceEntry, Registry};
    use vhost_thin::pools::{load_registry, open_pool, PoolPaths};

    let mut s = Served::with_pool("", "64MiB");
    let snap = s
        .client()
        .execute("snapshot-create", json!({"disk": "disk0", "name": "s"}))
        .unwrap()["thin-id"]
        .as_u64()
        .unwrap() as u32;
    assert!(s.stop().success());
    let before: BTreeMap<u32, String> = [(0, "disk0".into()), (snap, "s".into())].into();
    assert_eq!(thin_ls(&s).0, before);

    let paths = PoolPaths {
        metadata: s.m.clone().into(),
        data: s.d.clone().into(),
        registry: None,
        cache_blocks: 1024,
    };
    let cut_short = |change: &dyn Fn(&Pool, &mut Registry)| {
        let pool = open_pool(&paths, true).unwrap();
        let mut reg = load_registry(&paths, &pool).unwrap().unwrap();
        change(&pool, &mut reg);
        reg.transaction_id = pool.status().transaction_id + 1;
        reg.save().unwrap();
    };
    // disk-add: the registry names a device the pool never committed.
    cut_short(&|pool, reg| {
        pool.create_thin(7).unwrap();
        reg.insert(
            7,
            DeviceEntry {
                name: Some("ghost".into()),
                size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap();
    });
    let (names, stderr) = thin_ls(&s);
    assert_eq!(names, before, "{stderr}");
    assert!(stderr.contains("undone"), "{stderr}");
    // snapshot-delete: the registry lost a name whose device the pool still has.
    cut_short(&|pool, reg| {
        pool.delete(snap).unwrap();
        reg.devices.remove(&snap);
    });
    assert_eq!(thin_ls(&s).0, before);

    // The daemon starts on the old state, and the next change carries on from it.
    s.start("");
    let mut c = s.client();
    let seen = observe(&mut c);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["disk0", "s"]);
    let ghost = c
        .execute("disk-add", json!({"name": "ghost", "size": 1 << 20}))
        .unwrap()["thin-id"]
        .as_u64()
        .unwrap() as u32;
    drop(c);
    assert!(s.stop().success());
    let (names, stderr) = thin_ls(&s);
    let mut after = before.clone();
    after.insert(ghost, "ghost".into());
    assert_eq!(names, after);
    assert!(stderr.is_empty(), "{stderr}");
    assert!(cli(&["pool", "check", "-m", &s.m, "-d", &s.d]).contains("clean"));
}
