//! The offline CLI: pool and thin-device commands that work on the metadata and data
//! devices directly (the daemon must not be serving the pool at the same time).

pub mod pool_cmd;
pub mod stream_cmd;
pub mod thin_cmd;

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thinpool::pool::{CommitHold, Pool, PoolOptions};
use thinpool::registry::Registry;
use thinpool::storage::{FileStorage, Storage};
use thinpool::thin::metadata::{MetadataOptions, ThinMetadata};

/// Where the pool lives.
#[derive(Args, Debug, Clone)]
pub struct PoolPaths {
    /// Metadata device or file.
    #[arg(long, short = 'm', value_name = "PATH")]
    pub metadata: PathBuf,
    /// Data device or file.
    #[arg(long, short = 'd', value_name = "PATH")]
    pub data: PathBuf,
    /// Registry file (names, sizes, serials); default: METADATA.registry.json when the
    /// metadata is a regular file.
    #[arg(long, value_name = "PATH")]
    pub registry: Option<PathBuf>,
    /// Metadata cache size in 4 KiB blocks.
    #[arg(long, default_value_t = 16384, value_name = "BLOCKS")]
    pub cache_blocks: usize,
}

pub fn open_file(path: &Path, what: &str, writable: bool) -> Result<Arc<dyn Storage>> {
    let s = if writable {
        FileStorage::open(path)
    } else {
        FileStorage::open_read_only(path)
    }
    .with_context(|| format!("cannot open {what} {}", path.display()))?;
    Ok(Arc::new(s))
}

/// The metadata of a pool, opened without writing anything (what inspecting commands use).
pub fn open_metadata_read_only(meta: Arc<dyn Storage>) -> thinpool::Result<ThinMetadata> {
    ThinMetadata::open(
        meta,
        MetadataOptions {
            read_only: true,
            ..Default::default()
        },
    )
}

/// A buffered writer to `path`, or to standard output for "-".
pub fn output_stream(path: &Path) -> Result<Box<dyn std::io::Write>> {
    let w: Box<dyn std::io::Write> = if path.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )
    };
    Ok(Box::new(std::io::BufWriter::with_capacity(1 << 20, w)))
}

/// A buffered reader of `path`, or of standard input for "-".
pub fn input_stream(path: &Path) -> Result<Box<dyn std::io::Read>> {
    let r: Box<dyn std::io::Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        )
    };
    Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, r)))
}

pub fn registry_path(paths: &PoolPaths) -> Option<PathBuf> {
    if let Some(r) = &paths.registry {
        return Some(r.clone());
    }
    let regular = std::fs::metadata(&paths.metadata)
        .map(|m| m.is_file())
        .unwrap_or(false);
    regular.then(|| Registry::default_path(&paths.metadata))
}

pub fn open_pool(paths: &PoolPaths, writable: bool) -> Result<Pool> {
    open_pool_zeroing(paths, writable, true)
}

/// [`open_pool`], saying whether the rest of a newly provisioned block is zeroed (`false`
/// is dm-thin's skip_block_zeroing: faster, but a guest may read stale data).
pub fn open_pool_zeroing(paths: &PoolPaths, writable: bool, zeroing: bool) -> Result<Pool> {
    let meta = open_file(&paths.metadata, "metadata device", writable)?;
    let data = open_file(&paths.data, "data device", writable)?;
    let opts = PoolOptions {
        cache_blocks: paths.cache_blocks,
        read_only: !writable,
        skip_block_zeroing: !zeroing,
    };
    let pool = Pool::open(meta, data, opts).with_context(|| {
        format!(
            "cannot open the pool (metadata {}, data {})",
            paths.metadata.display(),
            paths.data.display()
        )
    })?;
    if writable {
        let st = pool.status();
        if st.needs_check {
            bail!(
                "the pool's metadata {} is flagged needs_check: run `vhost-thin pool check --metadata {} --clear-needs-check` first",
                paths.metadata.display(),
                paths.metadata.display()
            );
        }
    }
    Ok(pool)
}

/// Loads the registry if there is one, back at the pool's transaction after a crash in
/// the middle of a change, printing any disagreement with the pool.
pub fn load_registry(paths: &PoolPaths, pool: &Pool) -> Result<Option<Registry>> {
    let Some(path) = registry_path(paths) else {
        return Ok(None);
    };
    let Some(mut reg) = Registry::load(&path)? else {
        return Ok(None);
    };
    let tid = pool.status().transaction_id;
    // A crash between the registry write and the pool commit: go back to the state the
    // pool holds. In memory only; the next change writes it (a read-only command, such as
    // `thin ls`, must not write).
    if let Some(m) = reg.recover(tid) {
        eprintln!("vhost-thin: warning: {}: {m}", path.display());
    }
    let ids: Vec<u32> = pool.devices().iter().map(|(id, _)| *id).collect();
    let rec = reg.reconcile(tid, &ids);
    for m in &rec.messages {
        eprintln!("vhost-thin: warning: {}: {m}", path.display());
    }
    // External origins are beside the metadata, in the registry: attach them before any
    // device is read. A missing one fails only its devices' reads of unmapped blocks.
    for f in thinpool::origin::attach_from_registry(pool, &reg) {
        eprintln!("vhost-thin: warning: external origin {}: {f}", f.path);
        tracing::warn!("external origin {}: {f}", f.path);
    }
    Ok(Some(reg))
}

/// Commits a change: registry first (with the next transaction id), then the pool
/// carrying the same id — so after a crash in between the registry is exactly one ahead.
pub fn commit_change(pool: &Pool, registry: Option<&mut Registry>) -> Result<()> {
    commit_change_held(&pool.hold_commits(), registry)
}

/// [`commit_change`] under a hold the caller took before changing the pool, so that no
/// other commit made part of the change durable under the old transaction id.
pub fn commit_change_held(hold: &CommitHold<'_>, registry: Option<&mut Registry>) -> Result<()> {
    match registry {
        Some(reg) => reg.commit(hold)?,
        None => hold.commit().context("commit failed")?,
    }
    Ok(())
}

/// A name given on the command line (`--name`, `--disk name=`): held to the rule of names
/// (see `thinpool::names`) before anything is opened, as everywhere else names come in.
pub fn parse_name(s: &str) -> Result<String, String> {
    vmm_config::limits::check_name(s)
        .map(|()| s.to_string())
        .map_err(|why| {
            format!(
                "{s:?} is not a valid name: {why}; a name is {}",
                vmm_config::limits::NAME_RULE
            )
        })
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A per-pool value that makes generated serials differ between pools.
pub fn serial_salt(metadata: &Path) -> u64 {
    metadata
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
}
