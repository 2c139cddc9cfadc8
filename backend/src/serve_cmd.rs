//! `vhost-thin serve`: open the pool, resolve the disks, run the daemon.

use crate::daemon::{self, parse_disk_spec, DiskSpec};
use crate::manager::{Manager, PoolHandle};
use crate::offline::{load_registry, open_pool, PoolPaths};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use thinpool::registry::{make_serial, Registry};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    paths: PoolPaths,
    /// A disk to serve (repeat for more):
    /// `id=N|name=NAME,socket=PATH[,size=SIZE][,num-queues=N][,queue-size=N][,read-only][,serial=S]`.
    /// Size and serial default to the registry's.
    #[arg(long = "disk", value_parser = parse_disk_spec)]
    disks: Vec<DiskSpec>,
    /// Management socket (QMP protocol) to create, snapshot and clone disks at run time.
    #[arg(long, value_name = "PATH")]
    qmp: Option<std::path::PathBuf>,
    /// Directory for the sockets of disks added at run time (default: beside the metadata).
    #[arg(long, value_name = "DIR")]
    socket_dir: Option<std::path::PathBuf>,
    /// Commit the pool at least this often (milliseconds; dm-thin uses 1000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1000))]
    commit_interval_ms: u64,
}

pub fn run(a: ServeArgs) -> Result<ExitCode> {
    daemon::block_signals();
    let pool = Arc::new(open_pool(&a.paths, true)?);
    let reg_path = crate::offline::registry_path(&a.paths)
        .unwrap_or_else(|| thinpool::registry::Registry::default_path(&a.paths.metadata));
    let mut reg = load_registry(&a.paths, &pool)?
        .unwrap_or_else(|| Registry::new(&reg_path, pool.status().transaction_id));
    let salt = crate::offline::serial_salt(&a.paths.metadata);
    // Resolve the --disk specs to registry entries (in memory: a bare pool made by the
    // kernel gets entries named thinN; nothing is written until something changes).
    let mut to_serve = Vec::new();
    for spec in &a.disks {
        let id = match (spec.id, &spec.name) {
            (Some(id), _) => id,
            (None, Some(name)) => reg.find(name).with_context(|| {
                format!(
                    "no disk named {name:?} in the registry {}",
                    reg.path().display()
                )
            })?,
            (None, None) => unreachable!("checked by the parser"),
        };
        pool.device(id)
            .with_context(|| format!("cannot serve thin device {id}"))?;
        let mut e = reg.devices.get(&id).cloned().unwrap_or_default();
        if e.name.is_none() {
            e.name = Some(spec.name.clone().unwrap_or_else(|| format!("thin{id}")));
        }
        if let Some(s) = spec.size {
            e.size = s;
        }
        if e.size == 0 || e.size % 512 != 0 {
            bail!("thin device {id}: the size is not known or not a multiple of 512: give size= in --disk");
        }
        if let Some(s) = &spec.serial {
            e.serial = s.clone();
        }
        if e.serial.is_empty() {
            e.serial = make_serial(id, 0, salt);
        }
        e.read_only |= spec.read_only;
        e.snapshot = false;
        let name = e.name.clone().unwrap_or_default();
        reg.insert(id, e).map_err(|err| anyhow::anyhow!("{err}"))?;
        to_serve.push((name, spec.clone()));
    }
    let handle = Arc::new(PoolHandle::new("pool", pool, reg, salt));
    let socket_dir = a
        .socket_dir
        .clone()
        .or_else(|| a.paths.metadata.parent().map(|p| p.to_path_buf()))
        .unwrap_or_else(|| ".".into());
    let manager = Manager::new(vec![handle], socket_dir);
    for (name, spec) in &to_serve {
        let socket = manager
            .serve(
                name,
                Some(spec.socket.clone()),
                spec.num_queues,
                spec.queue_size,
            )
            .map_err(|e| anyhow::anyhow!("{}", e.desc))?;
        let d = manager
            .served()
            .into_iter()
            .find(|(d, _)| &d.name == name)
            .map(|(d, _)| d)
            .unwrap();
        println!(
            "serving {name} (thin device {}, {} bytes{}) on {}\n  qemu: -chardev socket,id={name},path={},reconnect=1 -device vhost-user-blk-pci,chardev={name},num-queues={}\n  (guest memory must be shared: -object memory-backend-memfd,id=mem,size=<RAM>,share=on -numa node,memdev=mem)",
            d.thin_id,
            d.size(),
            if d.read_only() { ", read-only" } else { "" },
            socket.display(),
            socket.display(),
            d.num_queues
        );
    }
    let qmp = a.qmp.clone().map(|p| (p, 0o600));
    if let Some((p, _)) = &qmp {
        println!("management socket: {}", p.display());
    }
    daemon::run(manager, Duration::from_millis(a.commit_interval_ms), qmp)?;
    Ok(ExitCode::SUCCESS)
}
