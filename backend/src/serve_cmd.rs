//! `vhost-thin serve`: open the pool, resolve the disks, run the daemon.

use crate::daemon::{self, parse_disk_spec, DiskSpec};
use crate::manager::{Manager, PoolHandle};
use crate::pools::{load_registry, open_pool_to_serve, PoolPaths, Tuning};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use thinpool::registry::{make_serial, Registry};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Configuration file (YAML): pools, disks, management socket. See docs/CONFIG.md.
    #[arg(long, short = 'c', value_name = "FILE", conflicts_with_all = ["metadata", "data"])]
    config: Option<PathBuf>,
    /// Without --config or a pool: the quickstart's state directory (created on first use).
    #[arg(long, value_name = "DIR", default_value = "vhost-thin-state")]
    state_dir: PathBuf,
    /// Metadata device or file of the pool to serve.
    #[arg(long, short = 'm', value_name = "PATH", requires = "data")]
    metadata: Option<PathBuf>,
    /// Data device or file of the pool to serve.
    #[arg(long, short = 'd', value_name = "PATH", requires = "metadata")]
    data: Option<PathBuf>,
    /// Registry file (default METADATA.registry.json).
    #[arg(long, value_name = "PATH")]
    registry: Option<PathBuf>,
    /// A disk to serve (repeat for more):
    /// `id=N|name=NAME,socket=PATH[,size=SIZE][,num-queues=N][,queue-size=N][,read-only][,serial=S]`.
    /// Size and serial default to the registry's.
    #[arg(long = "disk", value_parser = parse_disk_spec)]
    disks: Vec<DiskSpec>,
    /// Management socket (QMP protocol) to create, snapshot and clone disks at run time.
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
    /// Directory for the sockets of disks added at run time (default: beside the metadata).
    #[arg(long, value_name = "DIR")]
    socket_dir: Option<PathBuf>,
    /// Metadata cache size in 4 KiB blocks.
    #[arg(long, default_value_t = 16384, value_name = "BLOCKS")]
    cache_blocks: usize,
    /// A directory under which management clients may read and write files (stream
    /// files, external origins); repeat for more. Default: the metadata's directory, the
    /// socket directory and the management socket's. See docs/SECURITY.md.
    #[arg(long = "file-dir", value_name = "DIR")]
    file_dirs: Vec<PathBuf>,
    /// Let management clients run programs (snapshot-send and replication to a `command`).
    #[arg(long)]
    allow_commands: bool,
    /// Serve only the disks given with --disk, not the other disks of the registry (which
    /// are served by default, on SOCKET_DIR/NAME.sock).
    #[arg(long)]
    only_listed: bool,
    /// Serve the pool read-only (dm-thin's `read_only` feature): its metadata never
    /// changes; reads work, and writes to blocks a disk owns alone; writes that need a
    /// new block, snapshots and other changes fail.
    #[arg(long)]
    read_only_pool: bool,
    /// Keep the space of freed data blocks allocated on the host (dm-thin's
    /// no_discard_passdown); by default it is given back once the commit that freed them
    /// is durable: holes punched in a data file, discards sent to a data block device.
    /// With --config: the pool's `discard-passdown`.
    #[arg(long, conflicts_with = "config")]
    no_discard_passdown: bool,
    /// Commit the pool at least this often while mappings change (milliseconds; dm-thin
    /// uses 1000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1000))]
    commit_interval_ms: u64,
    /// After serving a queue's requests, watch it for new ones for up to this long before
    /// sleeping until the driver's next kick (microseconds; 0: never). Only while watching
    /// finds work, and by at most half the CPUs' worth of queues at once: a busy queue is
    /// served without wake-ups at the cost of a CPU kept busy, an idle one costs nothing.
    #[arg(long, default_value_t = crate::blk::poll::DEFAULT_MAX_US, value_parser = clap::value_parser!(u64).range(0..=1000))]
    poll_max_us: u64,
}

pub fn run(a: ServeArgs) -> Result<ExitCode> {
    daemon::block_signals();
    let interval = Duration::from_millis(a.commit_interval_ms);
    crate::blk::poll::set_max(Duration::from_micros(a.poll_max_us));
    if let Some(file) = &a.config {
        let cfg = vmm_config::load(file)?;
        crate::logging::apply_config(cfg.logging.as_ref());
        let (manager, qmp) = crate::config_run::start(&cfg, a.cache_blocks)?;
        daemon::run(manager, interval, qmp)?;
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(metadata), Some(data)) = (a.metadata.clone(), a.data.clone()) else {
        let (manager, qmp) = crate::config_run::quickstart(&a.state_dir, a.cache_blocks)?;
        daemon::run(manager, interval, qmp)?;
        return Ok(ExitCode::SUCCESS);
    };
    if a.disks.is_empty() && a.qmp.is_none() {
        return Err(crate::usage::UsageError(
            "nothing to serve: give --disk (and/or --qmp to add disks at run time)".into(),
        )
        .into());
    }
    let paths = PoolPaths {
        metadata,
        data,
        registry: a.registry.clone(),
        cache_blocks: a.cache_blocks,
    };
    let tuning = Tuning {
        discard_passdown: !a.no_discard_passdown,
        ..Tuning::default()
    };
    let pool = open_pool_to_serve(&paths, tuning)?;
    if a.read_only_pool {
        pool.set_read_only(true)?;
    }
    let reg_path = crate::pools::registry_path(&paths)
        .unwrap_or_else(|| thinpool::registry::Registry::default_path(&paths.metadata));
    let mut reg = load_registry(&paths, &pool)?
        .unwrap_or_else(|| Registry::new(&reg_path, pool.status().transaction_id));
    // Resolve the --disk specs to registry entries (in memory: a bare pool made by the
    // kernel gets entries named thinN; nothing is written until something changes).
    let salt = crate::pools::serial_salt(&paths.metadata);
    let mut to_serve = Vec::new();
    for spec in &a.disks {
        let name = resolve_disk(spec, &pool, &mut reg, salt)?;
        to_serve.push((name, spec.clone()));
    }
    let mut handle = PoolHandle::new("pool", crate::pools::catalog(&paths, pool, Some(reg)));
    handle.settings_path = crate::manager::pool_settings::path_for(&paths.metadata);
    crate::manager::device_state::check_registry(&handle.registry())
        .map_err(|e| anyhow::anyhow!(e))?;
    if let Some(line) = handle.restore_settings().map_err(|e| anyhow::anyhow!(e))? {
        println!("{line}");
    }
    let manager = manager_for(&a, &paths, Arc::new(handle));
    // Kept before any disk is served: no disk may take the management socket.
    let qmp = match &a.qmp {
        Some(p) => Some((
            manager.reserve_management_socket(p)?,
            crate::socket::Access::default(),
        )),
        None => None,
    };
    manager.recover_at_start()?;
    for (name, spec) in &to_serve {
        serve_listed_disk(&manager, name, spec)?;
    }
    // The registry's other disks (added at run time, or named by an earlier --disk) are
    // served too, on SOCKET_DIR/NAME.sock, as a configured daemon serves them: a restart
    // does not leave a VM's disk behind.
    if !a.only_listed {
        let listed: Vec<&str> = to_serve.iter().map(|(n, _)| n.as_str()).collect();
        serve_the_others(&manager, &listed);
    }
    if let Some((p, _)) = &qmp {
        println!("management socket: {}", p.display());
    }
    daemon::run(manager, interval, qmp)?;
    Ok(ExitCode::SUCCESS)
}

/// The registry entry `--disk` `spec` names (by id or by name), made or completed in
/// memory: a name, a size, a serial. Returns the disk's name.
fn resolve_disk(
    spec: &DiskSpec,
    pool: &thinpool::pool::Pool,
    reg: &mut Registry,
    salt: u64,
) -> Result<String> {
    let id = match (spec.id, &spec.name) {
        (Some(id), _) => id,
        (None, Some(name)) => reg.find(name).with_context(|| {
            format!(
                "no disk named {name:?} in the registry {}",
                reg.path().display()
            )
        })?,
        (None, None) => bail!("--disk needs id= or name="),
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
    Ok(name)
}

/// The manager of the one pool, with its socket directory and file confinement.
fn manager_for(a: &ServeArgs, paths: &PoolPaths, handle: Arc<PoolHandle>) -> Arc<Manager> {
    let socket_dir = a
        .socket_dir
        .clone()
        .unwrap_or_else(|| crate::config_run::parent_dir(&paths.metadata));
    let file_dirs = if a.file_dirs.is_empty() {
        [Some(&paths.metadata), a.qmp.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| crate::config_run::parent_dir(p))
            .chain([socket_dir.clone()])
            .collect()
    } else {
        a.file_dirs.clone()
    };
    Manager::with_limits(
        vec![handle],
        socket_dir,
        crate::socket::Access::default(),
        crate::manager::confine::Confinement::new(file_dirs, a.allow_commands),
    )
}

/// Serves a disk named by `--disk` on its socket, and says how QEMU connects to it.
fn serve_listed_disk(manager: &Arc<Manager>, name: &str, spec: &DiskSpec) -> Result<()> {
    let socket = manager
        .serve(
            name,
            Some(spec.socket.clone()),
            spec.num_queues,
            spec.queue_size,
        )
        .map_err(|e| anyhow::anyhow!("{}", e))?;
    let Some(d) = manager
        .served()
        .into_iter()
        .find(|(d, _)| d.name == name)
        .map(|(d, _)| d)
    else {
        bail!("disk {name}: not served after all (removed meanwhile?)");
    };
    println!(
        "serving {name} (thin device {}, {} bytes{}) on {}\n  qemu: -chardev socket,id={name},path={},reconnect=1 -device vhost-user-blk-pci,chardev={name},num-queues={}\n  (guest memory must be shared: -object memory-backend-memfd,id=mem,size=<RAM>,share=on -numa node,memdev=mem)",
        d.thin_id(),
        d.size(),
        if d.read_only() { ", read-only" } else { "" },
        socket.display(),
        socket.display(),
        d.num_queues
    );
    Ok(())
}

/// Serves the registry's disks not in `listed` on SOCKET_DIR/NAME.sock.
fn serve_the_others(manager: &Arc<Manager>, listed: &[&str]) {
    for name in manager.disk_names() {
        if listed.contains(&name.as_str()) {
            continue;
        }
        match manager.serve(&name, None, None, None) {
            Ok(sock) => println!("serving {name} (in the registry) on {}", sock.display()),
            Err(e) => println!("disk {name}: in the registry but not served: {e}"),
        }
    }
}
