//! The daemon: serves each disk on its own vhost-user socket, commits the pool at least
//! once a second while its metadata changes (like dm-thin) and on every disconnect, and on
//! SIGTERM/SIGINT drains the requests in flight, commits and exits.

use crate::manager::Manager;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmm_config::limits;

/// `--disk` on the command line: `id=N|name=NAME,socket=PATH[,size=SIZE][,num-queues=N][,queue-size=N][,read-only][,serial=S]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskSpec {
    pub id: Option<u32>,
    pub name: Option<String>,
    pub socket: PathBuf,
    pub size: Option<u64>,
    pub num_queues: Option<usize>,
    pub queue_size: Option<usize>,
    pub read_only: bool,
    pub serial: Option<String>,
}

pub fn parse_disk_spec(s: &str) -> Result<DiskSpec, String> {
    let mut d = DiskSpec::default();
    let mut socket = None;
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let num = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("--disk {k}={v:?}: not a number"))
        };
        match k {
            "id" => d.id = Some(v.parse().map_err(|_| format!("--disk id={v:?}: not a thin id"))?),
            "name" => d.name = Some(crate::offline::parse_name(v)?),
            "socket" => socket = Some(PathBuf::from(v)),
            "size" => d.size = Some(crate::size::parse_size(v)?),
            "num-queues" => d.num_queues = Some(num(v)?),
            "queue-size" => d.queue_size = Some(num(v)?),
            "read-only" | "ro" if v.is_empty() || v == "on" || v == "true" => d.read_only = true,
            "serial" => d.serial = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "--disk: unknown option {part:?} (use id=, name=, socket=, size=, num-queues=, queue-size=, read-only, serial=)"
                ))
            }
        }
    }
    d.socket = socket.ok_or("--disk needs socket=PATH")?;
    if d.id.is_none() && d.name.is_none() {
        return Err("--disk needs id=N or name=NAME".into());
    }
    if let Some(n) = d.num_queues {
        if !limits::num_queues_ok(n) {
            return Err(format!(
                "--disk num-queues={n}: must be 1 to {}",
                limits::MAX_NUM_QUEUES
            ));
        }
    }
    if let Some(q) = d.queue_size {
        if !limits::queue_size_ok(q) {
            return Err(format!(
                "--disk queue-size={q}: must be a power of two, {} to {}",
                limits::MIN_QUEUE_SIZE,
                limits::MAX_QUEUE_SIZE
            ));
        }
    }
    Ok(d)
}

/// Blocks SIGTERM and SIGINT in this thread and every thread it starts afterwards, so that
/// [`wait_for_signal`] receives them.
pub fn block_signals() {
    // SAFETY: plain signal-mask calls on a local, initialised sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn wait_for_signal() -> i32 {
    // SAFETY: as above; sigwait writes the signal number into `sig`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        sig
    }
}

/// Runs until SIGTERM or SIGINT: commit timers, discard passdown, the pool monitor, the
/// management socket.
/// Call [`block_signals`] first, before any thread starts. On the signal, requests being
/// executed finish, new ones wait, every pool is committed.
pub fn run(
    manager: Arc<Manager>,
    commit_interval: Duration,
    qmp: crate::config_run::QmpSocket,
) -> Result<()> {
    let stopping = Arc::new(AtomicBool::new(false));
    for p in manager.pools.values() {
        let (pool, stop) = (p.pool().clone(), stopping.clone());
        std::thread::Builder::new()
            .name(format!("commit-{}", p.name))
            .spawn(move || {
                // dm-thin commits at least every second when the metadata changed; so do
                // we (data overwritten in place waits for a FLUSH, as there).
                // A failure is logged once until it changes: a failed pool with changes
                // fails every commit, and the log is no place for one line a second.
                let mut last_error = None;
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(commit_interval);
                    match pool.commit_if_changed() {
                        Ok(()) => last_error = None,
                        Err(e) => {
                            let text = e.to_string();
                            if last_error.as_ref() != Some(&text) {
                                tracing::error!("periodic commit failed: {text}");
                                last_error = Some(text);
                            }
                        }
                    }
                }
            })?;
        // The space a commit frees is given back to the host here, not by the commit
        // (a guest's FLUSH, the periodic one), which would then wait for it: a deleted
        // snapshot of many GiB takes seconds to punch. First, a few runs at a time, the
        // free space the data file still holds: what the last run of the daemon did not
        // give back (its stop does not wait for a passdown).
        let (pool, stop, name) = (p.pool().clone(), stopping.clone(), p.name.clone());
        std::thread::Builder::new()
            .name(format!("passdown-{}", p.name))
            .spawn(move || {
                let (mut from, mut reclaimed) = (Some(0), 0);
                while let Some(at) = from.filter(|_| !stop.load(Ordering::SeqCst)) {
                    let (blocks, next) = pool.reclaim_free_space(at);
                    pool.pass_down_waiting();
                    (from, reclaimed) = (next, reclaimed + blocks);
                }
                if reclaimed > 0 {
                    tracing::info!(
                        "pool {name}: gave back the space of {} MiB of free blocks the data \
                         file still held",
                        (reclaimed * pool.block_bytes()) >> 20
                    );
                }
                while !stop.load(Ordering::SeqCst) {
                    if pool.wait_for_freed_space(commit_interval) {
                        pool.pass_down();
                    }
                }
            })?;
    }
    manager.monitor(stopping.clone())?;
    let management = match &qmp {
        Some((path, access)) => {
            let path = manager.reserve_management_socket(path)?;
            Some(
                crate::mgmt::server::spawn(manager.clone(), &path, *access).with_context(|| {
                    format!("cannot open the management socket {}", path.display())
                })?,
            )
        }
        None => None,
    };
    let sig = wait_for_signal();
    tracing::info!("signal {sig}: draining requests in flight");
    stopping.store(true, Ordering::SeqCst);
    manager.shutdown()?;
    if let Some(f) = management {
        f.remove();
    }
    tracing::info!("pools committed; exiting");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        let d =
            parse_disk_spec("id=3,socket=/tmp/a.sock,size=1GiB,num-queues=4,read-only").unwrap();
        assert_eq!(d.id, Some(3));
        assert_eq!(d.size, Some(1 << 30));
        assert!(d.read_only);
        assert_eq!(d.num_queues, Some(4));
        assert!(parse_disk_spec("id=3").unwrap_err().contains("socket"));
        assert!(parse_disk_spec("socket=/x")
            .unwrap_err()
            .contains("id=N or name"));
        assert!(parse_disk_spec("id=1,socket=/x,bogus=2")
            .unwrap_err()
            .contains("unknown option"));
        assert!(parse_disk_spec("id=1,socket=/x,num-queues=0").is_err());
        assert!(parse_disk_spec("id=1,socket=/x,queue-size=100").is_err());
    }
}
