//! Opening a pool with its registry, as one `thinpool::catalog::Catalog` (which makes
//! every change to the two durable): what the daemon and the offline commands share. A pool is opened here for every use, so the rules that
//! protect it (one writer at a time, needs_check, the registry recovered to the pool's
//! transaction) hold wherever it is opened.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thinpool::catalog::Catalog;
use thinpool::journal::{self, Journal};
use thinpool::pool::{Pool, PoolOptions};
use thinpool::registry::Registry;
use thinpool::storage::lock::{LockError, LockKind};
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

/// Opens a pool's metadata or data device, locked: exclusively to change the pool, shared
/// to read it (see `thinpool::storage::lock`). A pool has one writer: a second daemon, or
/// an offline change of a pool a daemon serves, is refused with the holder's process id.
pub fn open_file(path: &Path, what: &str, writable: bool) -> Result<Arc<dyn Storage>> {
    let s = if writable {
        FileStorage::open(path)
    } else {
        FileStorage::open_read_only(path)
    }
    .with_context(|| format!("cannot open {what} {}", path.display()))?;
    let kind = if writable {
        LockKind::Exclusive
    } else {
        LockKind::Shared
    };
    s.try_lock(kind).map_err(|e| match e {
        LockError::Held { .. } => anyhow!(
            "{what} {}: {e}; a pool has one writer at a time: stop that process first, or change a served pool through its management socket (`vhost-thin ctl`)",
            path.display()
        ),
        LockError::Io(_) => anyhow!("{what} {}: {e}", path.display()),
    })?;
    Ok(Arc::new(s))
}

/// Where a pool's journal lives (see `thinpool::journal`): beside the metadata file, or
/// beside the registry given for a metadata block device. None for a block device
/// without one: such a pool has no journal, and a daemon killed between commits loses
/// the writes acknowledged since the last one.
pub fn journal_path(paths: &PoolPaths) -> Option<PathBuf> {
    let regular = std::fs::metadata(&paths.metadata).is_ok_and(|m| m.is_file());
    let base = if regular {
        &paths.metadata
    } else {
        paths.registry.as_ref()?
    };
    let mut p = base.as_os_str().to_owned();
    p.push(".journal");
    Some(PathBuf::from(p))
}

/// Opens the pool's journal, making it first for a writable open.
fn open_journal(path: &Path, writable: bool) -> Result<Option<Journal>> {
    let boot_id = match journal::host_boot_id() {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!("no journal: the host's boot id is unknown ({e})");
            return Ok(None);
        }
    };
    if !path.exists() {
        if !writable {
            return Ok(None);
        }
        journal::create_file(path, journal::DEFAULT_BYTES)
            .with_context(|| format!("cannot create the journal {}", path.display()))?;
    }
    let s = if writable {
        FileStorage::open(path)
    } else {
        FileStorage::open_read_only(path)
    }
    .with_context(|| format!("cannot open the journal {}", path.display()))?;
    let j = Journal::open(Arc::new(s), boot_id)
        .with_context(|| format!("journal {}", path.display()))?;
    Ok(Some(j))
}

/// For commands that read the metadata without opening the pool (dump, delta): applies,
/// in memory, the journaled changes a writer that did not stop cleanly left, so that what
/// they show holds every acknowledged write. Returns how many were applied.
pub fn replay_journal_read_only(metadata: &Path, md: &mut ThinMetadata) -> Result<usize> {
    let Some(path) = journal_path(&metadata_only(metadata)) else {
        return Ok(0);
    };
    let Some(j) = open_journal(&path, false)? else {
        return Ok(0);
    };
    let pending = j.pending(md.committed_ident())?;
    if pending.is_empty() {
        return Ok(0);
    }
    Ok(md.replay_in_memory(&pending)?)
}

/// How many journaled changes wait for the next writable open (for `pool check`, which
/// checks what is on disk).
pub fn pending_journal(metadata: &Path, md: &ThinMetadata) -> Result<usize> {
    let Some(path) = journal_path(&metadata_only(metadata)) else {
        return Ok(0);
    };
    match open_journal(&path, false)? {
        Some(j) => Ok(j.pending(md.committed_ident())?.len()),
        None => Ok(0),
    }
}

fn metadata_only(metadata: &Path) -> PoolPaths {
    PoolPaths {
        metadata: metadata.to_path_buf(),
        data: PathBuf::new(),
        registry: None,
        cache_blocks: 0,
    }
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
    open_pool_tuned(paths, writable, Tuning::default())
}

/// How a served pool treats its data device (the configuration's pool options).
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Zero the rest of a newly provisioned block (`false` is dm-thin's
    /// skip_block_zeroing: faster, but a guest may read stale data).
    pub zeroing: bool,
    /// Give freed data blocks' space back to the host once their freeing is committed
    /// (`false` is dm-thin's no_discard_passdown).
    pub discard_passdown: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            zeroing: true,
            discard_passdown: true,
        }
    }
}

/// [`open_pool`] with the pool options of [`Tuning`]. A writable open refuses a pool
/// flagged needs_check (its changes would extend metadata in doubt).
pub fn open_pool_tuned(paths: &PoolPaths, writable: bool, tuning: Tuning) -> Result<Pool> {
    let pool = open_pool_flagged_or_not(paths, writable, tuning)?;
    if writable && pool.status().needs_check {
        bail!(
            "the pool's metadata {} is flagged needs_check: run `vhost-thin pool check --metadata {} --clear-needs-check` first",
            paths.metadata.display(),
            paths.metadata.display()
        );
    }
    Ok(pool)
}

/// Opens a pool to serve it: as a writable open (locked, its journal replayed), except that
/// a pool whose metadata is flagged needs_check comes up read-only, as dm-thin's does, so
/// that its disks can be read and copied off: reads work, and writes to blocks a disk owns
/// alone; nothing that changes the metadata does. The check comes after a stop
/// (`pool check --clear-needs-check`).
pub fn open_pool_to_serve(paths: &PoolPaths, tuning: Tuning) -> Result<Pool> {
    let pool = open_pool_flagged_or_not(paths, true, tuning)?;
    if pool.status().needs_check {
        tracing::warn!(
            "the pool's metadata {} is flagged needs_check: serving it read-only (reads, and \
             writes to blocks a disk owns alone); stop the daemon, then run `vhost-thin pool \
             check --metadata {} --clear-needs-check`",
            paths.metadata.display(),
            paths.metadata.display()
        );
    }
    Ok(pool)
}

fn open_pool_flagged_or_not(paths: &PoolPaths, writable: bool, tuning: Tuning) -> Result<Pool> {
    let meta = open_file(&paths.metadata, "metadata device", writable)?;
    let data = open_file(&paths.data, "data device", writable)?;
    let opts = PoolOptions {
        cache_blocks: paths.cache_blocks,
        read_only: !writable,
        skip_block_zeroing: !tuning.zeroing,
        discard_passdown: tuning.discard_passdown,
    };
    let journal = match journal_path(paths) {
        Some(p) => open_journal(&p, writable)?,
        None => None,
    };
    let pool = Pool::open_with_journal(meta, data, journal, opts).with_context(|| {
        format!(
            "cannot open the pool (metadata {}, data {})",
            paths.metadata.display(),
            paths.data.display()
        )
    })?;
    if pool.replayed_at_open() > 0 {
        eprintln!(
            "vhost-thin: {}: replayed {} journaled mapping changes of writes acknowledged before the pool was last closed uncleanly{}",
            paths.metadata.display(),
            pool.replayed_at_open(),
            if writable {
                ""
            } else {
                " (in memory only: the next writable open commits them)"
            }
        );
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
    Ok(Some(reg))
}

/// The pool with its registry (none: a pool without a registry file), as one catalog,
/// with the external origins the registry names attached.
pub fn catalog(paths: &PoolPaths, pool: Pool, registry: Option<Registry>) -> Catalog {
    let pool = Arc::new(pool);
    let salt = serial_salt(&paths.metadata);
    let cat = match registry {
        Some(reg) => Catalog::new(pool, reg, salt),
        None => Catalog::without_registry(pool, salt),
    };
    // External origins are beside the metadata, in the registry: attach them before any
    // device is read. A missing one fails only its devices' reads of unmapped blocks.
    for f in cat.attach_origins() {
        eprintln!("vhost-thin: warning: external origin {}: {f}", f.path);
        tracing::warn!("external origin {}: {f}", f.path);
    }
    cat
}

/// Opens the pool and its registry, if it has one (what the offline commands work on).
pub fn open_catalog(paths: &PoolPaths, writable: bool) -> Result<Catalog> {
    let pool = open_pool(paths, writable)?;
    let reg = load_registry(paths, &pool)?;
    Ok(catalog(paths, pool, reg))
}

pub use thinpool::catalog::now_secs;

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
