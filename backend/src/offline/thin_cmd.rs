//! `vhost-thin thin …`

use crate::pools::{open_catalog, PoolPaths};
use crate::progress::Progress;
use crate::size::{human, parse_size};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use thinpool::catalog::{Catalog, RegistryRef, SnapshotKind};
use thinpool::delta::DeltaMode;
use thinpool::pool::Pool;
use thinpool::registry::{DeviceEntry, Registry};

#[derive(Subcommand, Debug)]
pub enum ThinCmd {
    /// Create an empty thin device.
    #[command(
        after_help = "Example:\n  vhost-thin thin create -m pool.meta -d pool.data --id 0 --size 10G --name disk0"
    )]
    Create(CreateArgs),
    /// Snapshot a thin device (O(1), any depth).
    #[command(
        after_help = "Example:\n  vhost-thin thin snapshot -m pool.meta -d pool.data --origin 0 --id 1 --name before-upgrade --kept"
    )]
    Snapshot(SnapshotArgs),
    /// Delete a thin device; blocks shared with other devices stay.
    #[command(after_help = "Example:\n  vhost-thin thin delete -m pool.meta -d pool.data --id 1")]
    Delete(IdArgs),
    /// List thin devices.
    #[command(after_help = "Example:\n  vhost-thin thin ls -m pool.meta -d pool.data")]
    Ls(LsArgs),
    /// Copy a file into a thin device (all-zero blocks are not provisioned).
    #[command(
        after_help = "Example:\n  vhost-thin thin import -m pool.meta -d pool.data --id 0 -i debian.raw"
    )]
    Import(ImportArgs),
    /// Copy a thin device's contents out to a file or stdout.
    #[command(
        after_help = "Example:\n  vhost-thin thin export -m pool.meta -d pool.data --id 1 -o backup.raw"
    )]
    Export(ExportArgs),
    /// Changed blocks between two thin devices: thin_delta-compatible XML, or --json.
    #[command(
        after_help = "Example:\n  vhost-thin thin delta -m pool.meta --snap1 1 --snap2 0 --changed-only"
    )]
    Delta(DeltaArgs),
}

#[derive(Args, Debug)]
pub struct DeltaArgs {
    /// Metadata device or file of the pool.
    #[arg(long, short = 'm', value_name = "PATH")]
    metadata: PathBuf,
    /// Left device (typically the older snapshot).
    #[arg(long, visible_alias = "thin1")]
    snap1: u32,
    /// Right device.
    #[arg(long, visible_alias = "thin2")]
    snap2: u32,
    /// Compare the trees of the held metadata snapshot (for a pool in use).
    #[arg(long)]
    metadata_snap: bool,
    /// Leave out `same` runs, and so skip the tree nodes the devices share (faster; not
    /// thin_delta's output).
    #[arg(long)]
    changed_only: bool,
    /// Print the runs as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    paths: PoolPaths,
    /// Thin id (0 to 16777215).
    #[arg(long)]
    id: u32,
    /// Virtual size, recorded in the registry. Units: K, M, G, T, P (or KiB … PiB), powers of 1024; e.g. 10G, 1.5T.
    #[arg(long, value_parser = parse_size, allow_negative_numbers = true, value_name = "SIZE")]
    size: Option<u64>,
    /// Name, recorded in the registry.
    #[arg(long, value_parser = super::parse_name)]
    name: Option<String>,
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(flatten)]
    paths: PoolPaths,
    /// Device to snapshot.
    #[arg(long)]
    origin: u32,
    /// Thin id of the new snapshot.
    #[arg(long)]
    id: u32,
    /// Name, recorded in the registry.
    #[arg(long, value_parser = super::parse_name)]
    name: Option<String>,
    /// A kept snapshot (read-only, never served; what `ctl snapshot` makes and what `send`
    /// sends) instead of a writable clone.
    #[arg(long)]
    kept: bool,
}

#[derive(Args, Debug)]
pub struct IdArgs {
    #[command(flatten)]
    paths: PoolPaths,
    /// The thin device's id (see `thin ls`).
    #[arg(long)]
    id: u32,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    paths: PoolPaths,
    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    #[command(flatten)]
    paths: PoolPaths,
    /// The thin device to write into (its id, see `thin ls`).
    #[arg(long)]
    id: u32,
    /// File to read.
    #[arg(long, short = 'i')]
    input: PathBuf,
    /// Byte offset in the device where the file goes. Units: K, M, G, T, P (or KiB … PiB), powers of 1024; e.g. 10G, 1.5T.
    #[arg(long, default_value = "0", value_parser = parse_size, allow_negative_numbers = true, value_name = "SIZE")]
    offset: u64,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    paths: PoolPaths,
    /// The thin device to read (its id, see `thin ls`).
    #[arg(long)]
    id: u32,
    /// Bytes to export (default: the size in the registry). Units: K, M, G, T, P (or KiB … PiB), powers of 1024; e.g. 10G, 1.5T.
    #[arg(long, value_parser = parse_size, allow_negative_numbers = true, value_name = "SIZE")]
    size: Option<u64>,
    /// Output file, or - for stdout.
    #[arg(long, short = 'o')]
    output: PathBuf,
}

pub fn run(cmd: ThinCmd) -> Result<ExitCode> {
    match cmd {
        ThinCmd::Create(a) => create(a),
        ThinCmd::Snapshot(a) => snapshot(a),
        ThinCmd::Delete(a) => delete(a),
        ThinCmd::Ls(a) => ls(a),
        ThinCmd::Import(a) => import(a),
        ThinCmd::Export(a) => export(a),
        ThinCmd::Delta(a) => delta(a),
    }
}

fn create(a: CreateArgs) -> Result<ExitCode> {
    let cat = open_catalog(&a.paths, true)?;
    if !cat.has_registry_file() && (a.size.is_some() || a.name.is_some()) {
        bail!("this pool has no registry, so --size and --name cannot be recorded (give --registry PATH to keep one)");
    }
    cat.change(|devices, reg| -> Result<()> {
        devices
            .create_thin(a.id)
            .with_context(|| format!("cannot create thin device {}", a.id))?;
        let entry = DeviceEntry {
            name: a.name.clone(),
            ..cat.new_thin_entry(a.id, a.size.unwrap_or(0))
        };
        reg.insert(a.id, entry)?;
        Ok(())
    })?;
    println!("created thin device {}", a.id);
    Ok(ExitCode::SUCCESS)
}

fn snapshot(a: SnapshotArgs) -> Result<ExitCode> {
    let cat = open_catalog(&a.paths, true)?;
    let kind = if a.kept {
        SnapshotKind::Kept
    } else {
        SnapshotKind::Clone
    };
    cat.change(|devices, reg| -> Result<()> {
        devices
            .create_snap(a.id, a.origin)
            .with_context(|| format!("cannot snapshot thin device {} as {}", a.origin, a.id))?;
        // `@x` and `disk@x` name a snapshot in its disk's namespace, as the daemon's do.
        let disk = reg.devices.get(&a.origin).and_then(|e| e.name.clone());
        let name = match (&a.name, disk) {
            (Some(n), Some(disk)) if a.kept => Some(thinpool::names::snapshot_name(&disk, n)?),
            (n, _) => n.clone(),
        };
        let entry = DeviceEntry {
            name,
            ..cat.new_snapshot_entry(reg, a.origin, a.id, kind)
        };
        reg.insert(a.id, entry)?;
        Ok(())
    })?;
    println!("created snapshot {} of thin device {}", a.id, a.origin);
    Ok(ExitCode::SUCCESS)
}

fn delete(a: IdArgs) -> Result<ExitCode> {
    let cat = open_catalog(&a.paths, true)?;
    cat.change(|devices, reg| -> Result<()> {
        devices
            .delete(a.id)
            .with_context(|| format!("cannot delete thin device {}", a.id))?;
        reg.remove(a.id);
        Ok(())
    })?;
    println!("deleted thin device {}", a.id);
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct LsRow {
    id: u32,
    name: Option<String>,
    size: Option<u64>,
    serial: Option<String>,
    origin: Option<u32>,
    /// A kept snapshot (`thin snapshot --kept`, `ctl snapshot`, or received).
    snapshot: bool,
    /// Send/receive identity, once the device has been sent or received.
    #[serde(skip_serializing_if = "Option::is_none")]
    guid: Option<String>,
    /// A receive in progress or interrupted into this device: not a snapshot yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    receiving: Option<thinpool::registry::PartialReceive>,
    mapped_bytes: u64,
    exclusive_bytes: u64,
    shared_bytes: u64,
    #[serde(flatten)]
    details: thinpool::thin::device::DeviceDetails,
}

fn ls(a: LsArgs) -> Result<ExitCode> {
    let cat = open_catalog(&a.paths, false)?;
    let (pool, reg) = (cat.pool(), registry_of(&cat));
    let bs = pool.block_bytes();
    let usage = pool
        .with_metadata(thinpool::thin::usage::device_usage)
        .context("cannot read the devices' mappings")?;
    let rows: Vec<LsRow> = usage
        .iter()
        .map(|u| {
            let e = reg.as_ref().and_then(|r| r.devices.get(&u.id));
            LsRow {
                id: u.id,
                name: e.and_then(|e| e.name.clone()),
                size: e.map(|e| e.size),
                serial: e.map(|e| e.serial.clone()),
                origin: e.and_then(|e| e.origin),
                snapshot: e.is_some_and(|e| e.snapshot),
                guid: e.and_then(|e| e.guid.clone()),
                receiving: e.and_then(|e| e.receiving.clone()),
                mapped_bytes: u.mapped_blocks * bs,
                exclusive_bytes: u.exclusive_blocks * bs,
                shared_bytes: u.shared_blocks * bs,
                details: pool.device(u.id).unwrap_or_default(),
            }
        })
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>8}  {:<16} {:>10} {:>10} {:>10} {:>10} {:>6}  SERIAL",
        "ID", "NAME", "SIZE", "MAPPED", "EXCLUSIVE", "SHARED", "ORIGIN"
    );
    for r in rows {
        println!(
            "{:>8}  {:<16} {:>10} {:>10} {:>10} {:>10} {:>6}  {}",
            r.id,
            match (&r.name, &r.receiving) {
                (Some(n), _) => n.clone(),
                (None, Some(p)) => format!("({} receiving)", p.name),
                (None, None) => "-".into(),
            },
            r.size.map(human).unwrap_or_else(|| "-".into()),
            human(r.mapped_bytes),
            human(r.exclusive_bytes),
            human(r.shared_bytes),
            r.origin
                .map(|o| o.to_string())
                .unwrap_or_else(|| "-".into()),
            r.serial.unwrap_or_else(|| "-".into()),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The registry, if the pool has a registry file.
fn registry_of(cat: &Catalog) -> Option<RegistryRef<'_>> {
    cat.has_registry_file().then(|| cat.registry())
}

fn registered_size(reg: Option<&Registry>, id: u32) -> Option<u64> {
    reg.and_then(|r| r.devices.get(&id))
        .map(|e| e.size)
        .filter(|&s| s > 0)
}

fn import(a: ImportArgs) -> Result<ExitCode> {
    let cat = open_catalog(&a.paths, true)?;
    let pool = cat.pool();
    pool.device(a.id)
        .with_context(|| format!("cannot import into thin device {}", a.id))?;
    let mut input = std::fs::File::open(&a.input)
        .with_context(|| format!("cannot open {}", a.input.display()))?;
    let len = input.metadata()?.len();
    if let Some(size) = registered_size(registry_of(&cat).as_deref(), a.id) {
        if a.offset + len > size {
            bail!(
                "{} ({} bytes at offset {}) does not fit in thin device {} of {} bytes",
                a.input.display(),
                len,
                a.offset,
                a.id,
                size
            );
        }
    }
    let bs = pool.block_bytes();
    let mut buf = vec![0u8; bs as usize];
    let mut pos = 0u64;
    let mut progress = Progress::new("importing", len);
    let mut provisioned = 0u64;
    while pos < len {
        // Chunks end on pool block boundaries, so a zero chunk is a whole or partial block.
        let dev_off = a.offset + pos;
        let n = (bs - dev_off % bs).min(len - pos) as usize;
        input
            .read_exact(&mut buf[..n])
            .with_context(|| format!("reading {} at {pos}", a.input.display()))?;
        if buf[..n].iter().all(|&b| b == 0) {
            pool.write_zeroes(a.id, dev_off, n as u64, true)
        } else {
            provisioned += 1;
            pool.write(a.id, dev_off, &buf[..n])
        }
        .with_context(|| format!("writing thin device {} at {dev_off}", a.id))?;
        pos += n as u64;
        progress.update(pos);
    }
    progress.finish();
    // The data written goes into this change's commit.
    cat.change(|_, reg| -> Result<()> {
        if let Some(e) = reg.devices.get_mut(&a.id) {
            if e.size == 0 {
                e.size = a.offset + len;
            }
        }
        Ok(())
    })?;
    println!(
        "imported {} into thin device {} ({} blocks with data)",
        human(len),
        a.id,
        provisioned
    );
    Ok(ExitCode::SUCCESS)
}

fn export(a: ExportArgs) -> Result<ExitCode> {
    let cat = open_catalog(&a.paths, false)?;
    let pool = cat.pool();
    pool.device(a.id)
        .with_context(|| format!("cannot export thin device {}", a.id))?;
    let registered = registered_size(registry_of(&cat).as_deref(), a.id);
    let Some(size) = a.size.or(registered) else {
        bail!("the size of thin device {} is not known: give --size", a.id);
    };
    let mut out = super::output_stream(&a.output)?;
    export_to(pool, a.id, size, &mut out)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

pub fn export_to(pool: &Pool, id: u32, size: u64, out: &mut dyn Write) -> Result<()> {
    let chunk = pool.block_bytes().max(1 << 20);
    let mut buf = vec![0u8; chunk as usize];
    let mut pos = 0u64;
    let mut progress = Progress::new("exporting", size);
    while pos < size {
        let n = chunk.min(size - pos) as usize;
        pool.read(id, pos, &mut buf[..n])
            .with_context(|| format!("reading thin device {id} at {pos}"))?;
        out.write_all(&buf[..n])?;
        pos += n as u64;
        progress.update(pos);
    }
    progress.finish();
    Ok(())
}

fn delta(a: DeltaArgs) -> Result<ExitCode> {
    let meta = crate::pools::open_file(&a.metadata, "metadata device", false)?;
    let mut md = crate::pools::open_metadata_read_only(meta)
        .with_context(|| format!("cannot open {}", a.metadata.display()))?;
    crate::pools::replay_journal_read_only(&a.metadata, &mut md)?;
    let mode = if a.changed_only {
        DeltaMode::ChangedOnly
    } else {
        DeltaMode::Exact
    };
    let runs = thinpool::delta::runs(&mut md, a.snap1, a.snap2, a.metadata_snap, mode)
        .with_context(|| format!("delta of thin devices {} and {}", a.snap1, a.snap2))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
    } else {
        let out = std::io::BufWriter::new(std::io::stdout().lock());
        thinpool::delta::write_xml(&mut md, a.snap1, a.snap2, a.metadata_snap, &runs, out)?;
    }
    Ok(ExitCode::SUCCESS)
}
