//! Starting the daemon from a configuration file, and the one-command quickstart.
//!
//! The configuration describes the desired state. Pools are opened (or created when their
//! files are missing and `create` sizes are given); disks missing from the registry are
//! created (empty or as clones); disks that exist keep their data. State changed at run time
//! through the management socket lives in the registry, so where the file and the registry
//! disagree the registry wins and the daemon says so.

use crate::manager::{Manager, PoolHandle, ServedDisk};
use crate::pools::{catalog, load_registry, open_pool_to_serve, PoolPaths, Tuning};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thinpool::pool::{Pool, PoolOptions};
use thinpool::registry::Registry;
use thinpool::storage::{FileStorage, Storage};
use vmm_config::{Config, DiscardMode, DiskConfig, OutOfSpacePolicy, PoolConfig};

/// The management socket and who may connect to it, when configured.
pub type QmpSocket = Option<(PathBuf, crate::socket::Access)>;

fn create_pool(p: &vmm_config::PoolConfig) -> Result<()> {
    let Some(c) = &p.create else {
        bail!(
            "pool {}: {} or {} does not exist and the configuration gives no `create:` sizes",
            p.name,
            p.metadata.display(),
            p.data.display()
        );
    };
    let bs = p.block_size.0;
    let data_len = c.data_size.0 / bs * bs;
    let meta_len = c
        .metadata_size
        .map(|s| s.0)
        .unwrap_or_else(|| (48 * (data_len / bs)).max(4 << 20))
        .div_ceil(4096)
        * 4096;
    for path in [&p.metadata, &p.data] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    let meta: Arc<dyn Storage> = Arc::new(FileStorage::create(&p.metadata, meta_len)?);
    let data: Arc<dyn Storage> = Arc::new(FileStorage::create(&p.data, data_len)?);
    let pool = Pool::create(meta, data, (bs / 512) as u32, PoolOptions::default())
        .with_context(|| format!("cannot create pool {}", p.name))?;
    Registry::new(
        Registry::default_path(&p.metadata),
        pool.status().transaction_id,
    )
    .save()?;
    tracing::info!(
        "pool {}: created ({} of data, {} of metadata)",
        p.name,
        crate::size::human(data_len),
        crate::size::human(meta_len)
    );
    Ok(())
}

/// Opens (creating when asked) every pool and serves every disk of `cfg`.
pub fn start(cfg: &Config, cache_blocks: usize) -> Result<(Arc<Manager>, QmpSocket)> {
    if cfg.pools.is_empty() {
        bail!("the configuration has no pools");
    }
    let mut handles = Vec::new();
    for p in &cfg.pools {
        handles.push(Arc::new(open_configured_pool(p, cache_blocks)?));
    }
    let manager = configured_manager(cfg, handles)?;
    let qmp = match &cfg.management {
        Some(m) => {
            let access = socket_access(&m.mode, m.group.as_deref()).context("management")?;
            // Kept before any disk is served: no disk may take the management socket.
            let path = manager.reserve_management_socket(&m.socket)?;
            Some((path, access))
        }
        None => None,
    };
    manager.recover_at_start()?;
    for d in &cfg.disks {
        serve_configured_disk(&manager, d)?;
    }
    serve_run_time_disks(&manager, cfg);
    Ok((manager, qmp))
}

/// Opens pool `p` (created first when its files are missing) with its registry and the
/// configuration's settings, and any settings kept at run time.
fn open_configured_pool(p: &PoolConfig, cache_blocks: usize) -> Result<PoolHandle> {
    if !p.metadata.exists() || !p.data.exists() {
        create_pool(p)?;
    }
    let paths = PoolPaths {
        metadata: p.metadata.clone(),
        data: p.data.clone(),
        registry: None,
        cache_blocks: p
            .metadata_cache
            .map(|s| (s.0 / 4096) as usize)
            .unwrap_or(cache_blocks),
    };
    let tuning = Tuning {
        zeroing: p.zeroing,
        discard_passdown: p.discard_passdown,
    };
    let pool = open_pool_to_serve(&paths, tuning).with_context(|| format!("pool {}", p.name))?;
    if p.read_only {
        pool.set_read_only(true)
            .with_context(|| format!("pool {}: read-only", p.name))?;
    }
    let reg = load_registry(&paths, &pool)?.unwrap_or_else(|| {
        Registry::new(
            Registry::default_path(&p.metadata),
            pool.status().transaction_id,
        )
    });
    let mut h = PoolHandle::new(&p.name, catalog(&paths, pool, Some(reg)));
    h.discard = p.discard == DiscardMode::Unmap;
    h.space.set_mode(match p.out_of_space.policy {
        OutOfSpacePolicy::Error => crate::blk::disk::OutOfSpace::Error,
        OutOfSpacePolicy::Queue => crate::blk::disk::OutOfSpace::Queue {
            timeout: (p.out_of_space.timeout > 0)
                .then(|| Duration::from_secs(p.out_of_space.timeout)),
        },
    });
    *crate::sync::lock(&h.low_water) = (p.low_water.data, p.low_water.metadata);
    h.settings_path = crate::manager::pool_settings::path_for(&p.metadata);
    crate::manager::device_state::check_registry(&h.registry())
        .map_err(|e| anyhow::anyhow!("pool {}: {e}", p.name))?;
    if let Some(line) = h
        .restore_settings()
        .map_err(|e| anyhow::anyhow!("pool {}: {e}", p.name))?
    {
        println!("{line}");
    }
    Ok(h)
}

/// The manager of `handles`, with the configuration's socket directory, access and file
/// confinement.
fn configured_manager(cfg: &Config, handles: Vec<Arc<PoolHandle>>) -> Result<Arc<Manager>> {
    // Sockets of disks added at run time go beside the configured ones, or beside the
    // management socket when no disk is configured.
    let socket_dir = cfg
        .disks
        .first()
        .map(|d| &d.socket)
        .or(cfg.management.as_ref().map(|m| &m.socket))
        .and_then(|s| s.parent().map(Path::to_path_buf))
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let disk_access = socket_access(&cfg.disk_sockets.mode, cfg.disk_sockets.group.as_deref())
        .context("disk-sockets")?;
    let confinement = match cfg.management.as_ref().and_then(|m| m.file_dirs.clone()) {
        Some(dirs) => dirs,
        // The pools' directories and the management socket's: the quickstart's state
        // directory, or what the operator set aside for the daemon.
        None => cfg
            .pools
            .iter()
            .map(|p| parent_dir(&p.metadata))
            .chain(cfg.management.as_ref().map(|m| parent_dir(&m.socket)))
            .collect(),
    };
    let confinement = crate::manager::confine::Confinement::new(
        confinement,
        cfg.management.as_ref().is_some_and(|m| m.allow_commands),
    );
    Ok(Manager::with_limits(
        handles,
        socket_dir,
        disk_access,
        confinement,
    ))
}

/// Serves configured disk `d`: created first when the registry has no such disk, grown
/// when the configuration says it is larger.
fn serve_configured_disk(manager: &Arc<Manager>, d: &DiskConfig) -> Result<()> {
    if let Some(dir) = d.socket.parent().filter(|x| !x.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // A registry lookup, not query-disks: that one walks every mapping for its usage figures.
    // Missing disks are created first; every disk is then served the same way, with
    // its queue settings.
    match manager.entry(&d.name) {
        None => {
            let external_origin = match &d.external_origin {
                None => None,
                Some(p) => Some(p.to_str().with_context(|| {
                    format!(
                        "disk {}: external-origin {} is not a UTF-8 path",
                        d.name,
                        p.display()
                    )
                })?),
            };
            manager
                .disk_create(&crate::manager::NewDisk {
                    name: &d.name,
                    pool: d.pool.as_deref(),
                    size: Some(d.size.0),
                    clone_from: d.clone_from.as_deref(),
                    external_origin,
                    read_only: d.read_only,
                    serial: d.serial.clone(),
                })
                .map_err(|e| anyhow::anyhow!("disk {}: {}", d.name, e))?;
            println!(
                "disk {}: created ({} bytes{})",
                d.name,
                d.size.0,
                d.clone_from
                    .as_ref()
                    .map(|c| format!(", clone of {c}"))
                    .unwrap_or_default()
            );
        }
        Some(e) => {
            let reg_size = e.size;
            if d.size.0 > reg_size {
                manager
                    .disk_resize(&d.name, d.size.0)
                    .map_err(|e| anyhow::anyhow!(e.to_string()))?;
                println!(
                    "disk {}: grown from {reg_size} to {} bytes as the configuration says",
                    d.name, d.size.0
                );
            } else if d.size.0 < reg_size {
                println!(
                    "disk {}: the configuration says {} bytes, the registry {reg_size} (grown at run time); serving {reg_size}",
                    d.name, d.size.0
                );
            }
            if e.read_only != d.read_only {
                println!("disk {}: read-only is {} in the registry (set at run time), {} in the configuration; the registry wins", d.name, e.read_only, d.read_only);
            }
        }
    }
    manager
        .serve(
            &d.name,
            Some(d.socket.clone()),
            Some(d.num_queues as usize),
            Some(d.queue_size as usize),
        )
        .map_err(|e| anyhow::anyhow!("disk {}: {}", d.name, e))?;
    Ok(())
}

/// Disks added at run time live in the registry only: keep serving them.
fn serve_run_time_disks(manager: &Arc<Manager>, cfg: &Config) {
    let configured: Vec<&str> = cfg.disks.iter().map(|d| d.name.as_str()).collect();
    let served: Vec<String> = manager
        .served()
        .iter()
        .map(|(d, _)| d.name.clone())
        .collect();
    for name in manager.disk_names() {
        let name = name.as_str();
        if configured.contains(&name) || served.iter().any(|s| s == name) {
            continue;
        }
        match manager.serve(name, None, None, None) {
            Ok(sock) => println!(
                "disk {name}: in the registry (added at run time) but not in the configuration; serving it on {}",
                sock.display()
            ),
            Err(e) => println!("disk {name}: in the registry but not served: {}", e),
        }
    }
}

/// The directory a file given by the configuration lies in ("." for a bare name).
pub fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A socket's access from the configuration's octal mode and group (checked by
/// `vmm_config` already; the group is looked up here, on the host that serves).
fn socket_access(mode: &str, group: Option<&str>) -> Result<crate::socket::Access> {
    let mode = u32::from_str_radix(mode, 8).with_context(|| format!("mode {mode:?}"))?;
    let gid = match group {
        Some(g) => Some(crate::socket::group_id(g).with_context(|| format!("group {g:?}"))?),
        None => None,
    };
    Ok(crate::socket::Access { mode, gid })
}

/// The quickstart: a state directory with a default pool and a first disk, made on first
/// use and reused after; prints how to attach QEMU and cloud-hypervisor and the ctl commands.
pub fn quickstart(dir: &Path, cache_blocks: usize) -> Result<(Arc<Manager>, QmpSocket)> {
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        // The state directory holds every VM's disks: its owner's alone, also when an
        // earlier version made it with the umask's mode.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict the state directory {}", dir.display()))?;
    }
    let dir = dir.canonicalize()?;
    let cfg_path = dir.join("vhost-thin.yaml");
    if !cfg_path.exists() {
        let free = free_bytes(&dir).unwrap_or(8 << 30);
        // Half the free space, at least 1 GiB, at most 64 GiB; sparse, so it costs nothing yet.
        let data = (free / 2).clamp(1 << 30, 64 << 30) / (1 << 20) * (1 << 20);
        let disk = (10u64 << 30).min(data);
        let text = format!(
            "# Made by `vhost-thin serve` (quickstart); edit freely. Reference: docs/CONFIG.md\n\
             pools:\n  - name: default\n    metadata: {d}/pool.meta\n    data: {d}/pool.data\n    create:\n      data-size: {data}\n\
             disks:\n  - name: disk0\n    size: {disk}\n    socket: {d}/disk0.sock\n    num-queues: 2\n\
             management:\n  socket: {d}/qmp.sock\n",
            d = dir.display()
        );
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&cfg_path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .with_context(|| format!("cannot write {}", cfg_path.display()))?;
        }
        println!("quickstart: wrote {}", cfg_path.display());
    }
    let cfg = vmm_config::load(&cfg_path)?;
    crate::logging::apply_config(cfg.logging.as_ref());
    let r = start(&cfg, cache_blocks)?;
    println!(
        "{}",
        quickstart_help(&cfg, &dir, &r.0.served_disks(), &command_name())
    );
    Ok(r)
}

/// What the quickstart prints once serving: each disk as it is served now (a size grown at
/// run time, disks added at run time), how to attach it (QEMU, cloud-hypervisor, libvirt),
/// how to put an OS on it, and the ctl commands, spelled with a binary that runs as printed.
fn quickstart_help(cfg: &Config, dir: &Path, disks: &[ServedDisk], exe: &str) -> String {
    let qmp = cfg
        .management
        .as_ref()
        .map(|m| m.socket.display().to_string())
        .unwrap_or_default();
    let ctl = format!("{exe} ctl -s {qmp}");
    let Some(first) = disks.first() else {
        return format!(
            "\nvhost-thin is serving no disk: {dir}/vhost-thin.yaml has none.\n\
             \nadd one:\n  {ctl} add disk0 --size 10G\n  {ctl} disks\n\
             \nor list it under `disks:` in the file and start again.",
            dir = dir.display(),
        );
    };
    let mut out = String::from("\n");
    for d in disks {
        out += &format!(
            "vhost-thin is serving {} ({}, {} queue{}) on {}\n",
            d.name,
            crate::size::human(d.size),
            d.num_queues,
            if d.num_queues == 1 { "" } else { "s" },
            d.socket.display()
        );
    }
    let (name, sock, nq) = (&first.name, first.socket.display(), first.num_queues);
    // The golden-image steps only while they have not been taken: printed again after a
    // restart they would fail (names taken), and `qemu-img convert` would overwrite the
    // image the clones read.
    if !disks.iter().any(|d| d.name == "golden") {
        out += &format!(
            "\n{name} is empty. To give disks an OS, e.g. a Debian cloud image as a golden image\n\
             that every clone reads until it writes its own blocks:\n\
             \x20 qemu-img convert -O raw debian-12-genericcloud-amd64.qcow2 {dir}/golden.raw\n\
             \x20 {ctl} add golden --external-origin {dir}/golden.raw\n\
             \x20 {ctl} snapshot golden@base\n\
             \x20 {ctl} clone golden@base vm1 --num-queues {nq}   # then boot vm1: the QEMU line below with {dir}/vm1.sock\n\
             or write an image into a disk that is not connected with `vhost-thin thin import`.\n",
            dir = dir.display(),
        );
    }
    out += &format!(
        "\nQEMU (shared guest memory is required by vhost-user; num-queues as the disk has):\n\
         \x20 qemu-system-x86_64 -machine q35,accel=kvm:tcg -m 2G \\\n\
         \x20   -object memory-backend-memfd,id=mem,size=2G,share=on -numa node,memdev=mem \\\n\
         \x20   -chardev socket,id={name},path={sock},reconnect=1 \\\n\
         \x20   -device vhost-user-blk-pci,chardev={name},num-queues={nq},bootindex=1 -nographic\n\
         (accel=tcg where /dev/kvm is there but unusable, as in some nested sandboxes)\n\
         \ncloud-hypervisor:\n\
         \x20 cloud-hypervisor --memory size=2G,shared=on --kernel hypervisor-fw \\\n\
         \x20   --disk vhost_user=true,socket={sock},num_queues={nq} --serial tty --console off\n\
         \nlibvirt (with <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>):\n\
         \x20 <disk type='vhostuser' device='disk'>\n\
         \x20   <driver name='qemu' type='raw' queues='{nq}'/>\n\
         \x20   <source type='unix' path='{sock}'>\n\
         \x20     <reconnect enabled='yes' timeout='1'/>\n\
         \x20   </source>\n\
         \x20   <target dev='vda' bus='virtio'/>\n\
         \x20 </disk>\n\
         \nsnapshot and clone:\n\
         \x20 {ctl} snapshot {name}@$(date +%Y%m%d-%H%M%S)\n\
         \x20 {ctl} snapshots {name}\n\
         \x20 {ctl} clone SNAPSHOT NEW-DISK --num-queues {nq}\n\
         \x20 {ctl} disks        # every disk with its socket, added at run time too\n\
         \x20 {ctl} watch\n\
         \nstop with Ctrl-C (requests in flight finish, the pool is committed); start again to reuse {dir}.",
        dir = dir.display(),
    );
    out
}

/// How to run this binary as the banner prints it: `vhost-thin` when that is what the
/// shell finds on PATH, else its full path (after `cargo run`, it is not on PATH).
fn command_name() -> String {
    let Ok(exe) = std::env::current_exe().and_then(|e| e.canonicalize()) else {
        return "vhost-thin".into();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            d.join("vhost-thin")
                .canonicalize()
                .is_ok_and(|found| found == exe)
        })
    });
    if on_path {
        "vhost-thin".into()
    } else {
        exe.display().to_string()
    }
}

fn free_bytes(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills the struct we pass for the NUL-terminated path.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut s) == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quickstart_help_copes_with_a_file_without_disks() {
        let dir = Path::new("/state");
        let cfg = vmm_config::parse(
            "management:\n  socket: /state/qmp.sock\n",
            "vhost-thin.yaml",
        )
        .unwrap();
        let help = quickstart_help(&cfg, dir, &[], "vhost-thin");
        assert!(help.contains("serving no disk"), "{help}");
        assert!(help.contains("ctl -s /state/qmp.sock add"), "{help}");
    }

    /// After a restart: the sizes as served (one grown at run time), every disk served
    /// (one added at run time), commands spelled with a binary that runs as printed, and a
    /// snapshot name that a second start does not find taken.
    #[test]
    fn the_quickstart_help_describes_the_disks_as_served() {
        let dir = Path::new("/state");
        let cfg = vmm_config::parse(
            "pools:\n  - name: p\n    metadata: /state/m\n    data: /state/d\n\
             disks:\n  - name: disk0\n    size: 10GiB\n    socket: /state/disk0.sock\n\
             management:\n  socket: /state/qmp.sock\n",
            "vhost-thin.yaml",
        )
        .unwrap();
        let disk = |name: &str, size: u64| ServedDisk {
            name: name.into(),
            size,
            socket: dir.join(format!("{name}.sock")),
            num_queues: 2,
        };
        let served = [disk("disk0", 12 << 30), disk("scratch", 1 << 30)];
        let help = quickstart_help(&cfg, dir, &served, "/src/target/release/vhost-thin");
        assert!(
            help.contains("serving disk0 (12 GiB, 2 queues) on /state/disk0.sock"),
            "{help}"
        );
        assert!(
            help.contains("serving scratch (1 GiB, 2 queues) on /state/scratch.sock"),
            "{help}"
        );
        assert!(!help.contains("10737418240"), "{help}");
        assert!(
            help.contains(
                "/src/target/release/vhost-thin ctl -s /state/qmp.sock snapshot disk0@$(date"
            ),
            "{help}"
        );
        assert!(
            help.contains("<source type='unix' path='/state/disk0.sock'>"),
            "{help}"
        );
        assert!(help.contains("qemu-img convert -O raw"), "{help}");
        assert!(
            help.contains("clone golden@base vm1 --num-queues 2"),
            "{help}"
        );
        assert!(!help.contains("vmlinuz"), "{help}");
        // Once the golden image is in, its steps are not printed again: they would fail,
        // and the conversion would overwrite the image its clones read.
        let served = [disk("disk0", 12 << 30), disk("golden", 1 << 30)];
        let help = quickstart_help(&cfg, dir, &served, "vhost-thin");
        assert!(!help.contains("qemu-img convert"), "{help}");
        assert!(help.contains("-device vhost-user-blk-pci"), "{help}");
    }
}
