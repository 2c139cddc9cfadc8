//! `vhost-thin pool …`

use crate::pools::{open_file, open_metadata_read_only, open_pool, registry_path, PoolPaths};
use crate::size::{human, parse_size};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use thinpool::pool::{Pool, PoolOptions};
use thinpool::registry::Registry;
use thinpool::storage::{FileStorage, Storage};
use thinpool::thin::metadata::{MetadataOptions, ThinMetadata};

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Create a new pool (creates the files when they do not exist).
    #[command(
        after_help = "Example:\n  vhost-thin pool create -m pool.meta -d pool.data --data-size 100G"
    )]
    Create(CreateArgs),
    /// Verify the metadata: every tree, every reference count. Exit 0 when clean.
    #[command(after_help = "Example:\n  vhost-thin pool check -m pool.meta && echo clean")]
    Check(CheckArgs),
    /// Show sizes, usage, transaction id and mode.
    #[command(after_help = "Example:\n  vhost-thin pool status -m pool.meta -d pool.data --json")]
    Status(StatusArgs),
    /// Put a longer data device (or file) and metadata device to use: the pool's size
    /// changes only this way (or `pool-grow` while served), never by itself at start.
    /// Example: `truncate -s +10G pool.data && vhost-thin pool grow -m pool.meta -d pool.data`.
    #[command(
        after_help = "Example:\n  truncate -s +10G pool.data && vhost-thin pool grow -m pool.meta -d pool.data"
    )]
    Grow(PoolPaths),
    /// Print the metadata as thin_dump-compatible XML.
    #[command(after_help = "Example:\n  vhost-thin pool dump -m pool.meta > pool.xml")]
    Dump(DumpArgs),
    /// Write fresh metadata from thin_dump XML.
    #[command(after_help = "Example:\n  vhost-thin pool restore -i pool.xml -m new.meta")]
    Restore(RestoreArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Metadata device or file (created when it does not exist, with --metadata-size or the default size).
    #[arg(long, short = 'm', value_name = "PATH")]
    metadata: PathBuf,
    /// Data device or file (created when it does not exist, with --data-size).
    #[arg(long, short = 'd', value_name = "PATH")]
    data: PathBuf,
    /// Data block size: 64KiB to 1GiB, a multiple of 64KiB.
    #[arg(long, default_value = "64KiB", value_parser = parse_size, allow_negative_numbers = true, value_name = "SIZE")]
    block_size: u64,
    /// Size of the data file to create (required when it does not exist). Units: K, M, G, T, P (or KiB … PiB), powers of 1024; e.g. 10G, 1.5T.
    #[arg(long, value_parser = parse_size, allow_negative_numbers = true, value_name = "SIZE")]
    data_size: Option<u64>,
    /// Size of the metadata file to create (default: 48 bytes per data block, at least 4 MiB). Units: K, M, G, T, P (or KiB … PiB), powers of 1024; e.g. 10G, 1.5T.
    #[arg(long, value_parser = parse_size, allow_negative_numbers = true, value_name = "SIZE")]
    metadata_size: Option<u64>,
    /// Registry file (default METADATA.registry.json).
    #[arg(long, value_name = "PATH")]
    registry: Option<PathBuf>,
    /// Overwrite a metadata device that already holds a pool.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Metadata device or file of the pool.
    #[arg(long, short = 'm', value_name = "PATH")]
    metadata: PathBuf,
    /// Also check that the data device is large enough for the pool.
    #[arg(long, short = 'd', value_name = "PATH")]
    data: Option<PathBuf>,
    /// Clear the needs_check flag when the check passes.
    #[arg(long)]
    clear_needs_check: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Metadata device or file of the pool.
    #[arg(long, short = 'm', value_name = "PATH")]
    metadata: PathBuf,
    /// Data device or file (without it, what the metadata alone says).
    #[arg(long, short = 'd', value_name = "PATH")]
    data: Option<PathBuf>,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    /// Metadata device or file of the pool.
    #[arg(long, short = 'm', value_name = "PATH")]
    metadata: PathBuf,
    /// Dump the held metadata snapshot instead of the live metadata.
    #[arg(long)]
    metadata_snap: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// thin_dump XML to read.
    #[arg(long, short = 'i', value_name = "XML")]
    input: PathBuf,
    /// Metadata device or file to write (created with --metadata-size if missing).
    #[arg(long, short = 'm', value_name = "PATH")]
    metadata: PathBuf,
    /// Size of the metadata file to create. Units: K, M, G, T, P (or KiB … PiB), powers of 1024; e.g. 10G, 1.5T.
    #[arg(long, value_parser = parse_size, allow_negative_numbers = true, value_name = "SIZE")]
    metadata_size: Option<u64>,
}

pub fn run(cmd: PoolCmd) -> Result<ExitCode> {
    match cmd {
        PoolCmd::Create(a) => create(a),
        PoolCmd::Check(a) => check(a),
        PoolCmd::Status(a) => status(a),
        PoolCmd::Grow(a) => grow(a),
        PoolCmd::Dump(a) => dump(a),
        PoolCmd::Restore(a) => restore(a),
    }
}

fn ensure_file(path: &Path, size: Option<u64>, what: &str) -> Result<Arc<dyn Storage>> {
    if path.exists() {
        let s = open_file(path, what, true)?;
        if let Some(want) = size {
            if s.len() != want && std::fs::metadata(path)?.is_file() {
                bail!(
                    "{what} {} exists with {} bytes, not the {} bytes asked for (remove it or drop the size option)",
                    path.display(),
                    s.len(),
                    want
                );
            }
        }
        return Ok(s);
    }
    let Some(size) = size else {
        bail!(
            "{what} {} does not exist: give its size (--{}-size) to create it",
            path.display(),
            if what.starts_with("data") {
                "data"
            } else {
                "metadata"
            }
        );
    };
    let s = FileStorage::create(path, size)
        .with_context(|| format!("cannot create {what} {}", path.display()))?;
    Ok(Arc::new(s))
}

fn create(a: CreateArgs) -> Result<ExitCode> {
    if a.block_size % 65536 != 0 || !(65536..=1 << 30).contains(&a.block_size) {
        bail!(
            "--block-size {}: must be 64KiB to 1GiB and a multiple of 64KiB",
            a.block_size
        );
    }
    let data = ensure_file(&a.data, a.data_size, "data device")?;
    let data_blocks = data.len() / a.block_size;
    let default_meta = (48 * data_blocks).max(4 << 20).div_ceil(4096) * 4096;
    let meta = ensure_file(
        &a.metadata,
        a.metadata_size
            .or(Some(default_meta))
            .filter(|_| !a.metadata.exists()),
        "metadata device",
    )?;
    if !a.force {
        let mut first = vec![0u8; 4096.min(meta.len() as usize)];
        meta.read_at(&mut first, 0)?;
        if first.iter().any(|&b| b != 0) && open_metadata_read_only(meta.clone()).is_ok() {
            bail!(
                "{} already holds a pool; pass --force to overwrite it",
                a.metadata.display()
            );
        }
    }
    let pool = Pool::create(
        meta,
        data,
        (a.block_size / 512) as u32,
        PoolOptions::default(),
    )
    .with_context(|| format!("cannot create a pool on {}", a.metadata.display()))?;
    pool.with_metadata(|md| {
        for w in &md.warnings {
            eprintln!("vhost-thin: warning: {w}");
        }
    });
    let reg_path = a
        .registry
        .clone()
        .unwrap_or_else(|| Registry::default_path(&a.metadata));
    Registry::new(&reg_path, pool.status().transaction_id).save()?;
    let st = pool.status();
    println!(
        "created pool: {} data blocks of {} ({}), metadata {} blocks; registry {}",
        st.usage.data_blocks,
        human(st.data_block_bytes),
        human(st.usage.data_blocks * st.data_block_bytes),
        st.usage.metadata_blocks,
        reg_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn grow(a: PoolPaths) -> Result<ExitCode> {
    let pool = open_pool(&a, true)?;
    let before = pool.status().usage;
    let data = pool.grow_data()?;
    let metadata = pool.grow_metadata()?;
    pool.commit()?;
    let bs = pool.status().data_block_bytes;
    println!(
        "data: {} → {} ({} → {data} blocks); metadata: {} → {metadata} blocks",
        human(before.data_blocks * bs),
        human(data * bs),
        before.data_blocks,
        before.metadata_blocks
    );
    Ok(ExitCode::SUCCESS)
}

fn check(a: CheckArgs) -> Result<ExitCode> {
    let meta = open_file(&a.metadata, "metadata device", a.clear_needs_check)?;
    let mut report = thinpool::check::check(meta.clone())
        .with_context(|| format!("cannot check {}", a.metadata.display()))?;
    if let Some(d) = &a.data {
        let data = open_file(d, "data device", false)?;
        let md = open_metadata_read_only(meta.clone());
        if let Ok(md) = md {
            let need = md.usage().data_blocks * md.data_block_bytes();
            if data.len() < need {
                report.errors.push(format!(
                    "data device {} has {} bytes, the pool needs {need}",
                    d.display(),
                    data.len()
                ));
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for e in &report.errors {
            println!("error: {e}");
        }
        for w in &report.warnings {
            println!("warning: {w}");
        }
        println!(
            "{}: {} ({} devices, {} mappings, {} metadata blocks and {} data blocks in use{})",
            a.metadata.display(),
            if report.is_clean() {
                "clean"
            } else {
                "DAMAGED"
            },
            report.devices,
            report.mappings,
            report.metadata_blocks_used,
            report.data_blocks_used,
            if report.needs_check {
                ", needs_check set"
            } else {
                ""
            }
        );
    }
    if !report.is_clean() {
        return Ok(ExitCode::from(1));
    }
    if let Ok(md) = open_metadata_read_only(meta.clone()) {
        let pending = crate::pools::pending_journal(&a.metadata, &md)?;
        if pending > 0 {
            println!(
                "journal: {pending} mapping changes of acknowledged writes are not in the metadata yet; the next writable open of the pool replays them"
            );
        }
    }
    if a.clear_needs_check && report.needs_check {
        let mut md = ThinMetadata::open(meta, MetadataOptions::default())?;
        md.write_needs_check(false)?;
        println!("needs_check cleared");
    }
    Ok(ExitCode::SUCCESS)
}

fn status(a: StatusArgs) -> Result<ExitCode> {
    let meta = open_file(&a.metadata, "metadata device", false)?;
    let st = match &a.data {
        Some(d) => {
            let data = open_file(d, "data device", false)?;
            let pool = Pool::open(
                meta,
                data,
                PoolOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .with_context(|| format!("cannot open the pool on {}", a.metadata.display()))?;
            pool.status()
        }
        None => {
            // Without the data device: metadata only, through a scratch data device of the right size.
            let md = open_metadata_read_only(meta.clone())
                .with_context(|| format!("cannot open {}", a.metadata.display()))?;
            let data: Arc<dyn Storage> =
                Arc::new(SizeOnly(md.usage().data_blocks * md.data_block_bytes()));
            drop(md);
            Pool::open(
                meta,
                data,
                PoolOptions {
                    read_only: true,
                    ..Default::default()
                },
            )?
            .status()
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(ExitCode::SUCCESS);
    }
    let u = &st.usage;
    let pct = |a: u64, b: u64| {
        if b == 0 {
            0.0
        } else {
            a as f64 * 100.0 / b as f64
        }
    };
    println!("transaction id:  {}", st.transaction_id);
    println!("snapshot time:   {}", st.time);
    println!(
        "data:            {} of {} blocks used ({:.1}%), blocks of {}",
        u.data_used,
        u.data_blocks,
        pct(u.data_used, u.data_blocks),
        human(st.data_block_bytes)
    );
    println!(
        "metadata:        {} of {} blocks used ({:.1}%) as dm-thin counts them: {} allocated, {} held in reserve",
        u.metadata_used,
        u.metadata_blocks,
        pct(u.metadata_used, u.metadata_blocks),
        u.metadata_allocated,
        u.metadata_reserve
    );
    println!("devices:         {}", st.devices);
    println!(
        "metadata snap:   {}",
        st.held_metadata_root
            .map(|h| h.to_string())
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "mode:            {}{}",
        serde_json::to_value(st.mode)?.as_str().unwrap_or("?"),
        st.mode_reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    println!(
        "needs_check:     {}",
        if st.needs_check { "yes" } else { "no" }
    );
    if let Some(path) = registry_path(&PoolPaths {
        metadata: a.metadata.clone(),
        data: PathBuf::new(),
        registry: None,
        cache_blocks: 0,
    }) {
        if let Some(reg) = Registry::load(&path)? {
            println!(
                "registry:        {} (transaction id {})",
                path.display(),
                reg.transaction_id
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A stand-in data device for reading metadata without the data device at hand.
struct SizeOnly(u64);

impl Storage for SizeOnly {
    fn read_at(&self, _: &mut [u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("no data device given"))
    }
    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("no data device given"))
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> u64 {
        self.0
    }
}

fn dump(a: DumpArgs) -> Result<ExitCode> {
    let meta = open_file(&a.metadata, "metadata device", false)?;
    let mut md = open_metadata_read_only(meta)
        .with_context(|| format!("cannot open {}", a.metadata.display()))?;
    crate::pools::replay_journal_read_only(&a.metadata, &mut md)?;
    let out = std::io::BufWriter::new(std::io::stdout().lock());
    thinpool::dump::dump(&mut md, a.metadata_snap, out)
        .with_context(|| format!("dump of {} failed", a.metadata.display()))?;
    Ok(ExitCode::SUCCESS)
}

fn restore(a: RestoreArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&a.input)
        .with_context(|| format!("cannot read {}", a.input.display()))?;
    let parsed = thinpool::xml::parse(&text).with_context(|| format!("{}", a.input.display()))?;
    let meta = ensure_file(&a.metadata, a.metadata_size, "metadata device")?;
    let md =
        thinpool::dump::restore(&parsed, meta, MetadataOptions::default()).with_context(|| {
            format!(
                "cannot restore {} into {}",
                a.input.display(),
                a.metadata.display()
            )
        })?;
    println!(
        "restored {} devices into {}",
        md.devices().len(),
        a.metadata.display()
    );
    let _ = std::io::stdout().flush();
    Ok(ExitCode::SUCCESS)
}
