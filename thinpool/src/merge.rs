//! Merge back: writing every mapped block of a thin device into its external origin, so
//! that the origin (the golden image) becomes what the device reads.
//!
//! The source must be a snapshot that does not change during the merge (the caller's
//! job): then every block write is idempotent, and the merge can be cut at any point and
//! run again. Blocks are written in ascending order; at checkpoints (every
//! [`CHECKPOINT_BYTES`] written, and at the end) the origin is synced and only then is the
//! progress callback told the device offset below which the origin is complete, so the
//! caller can record it (in the registry) and resume from it.
//!
//! After a crash the origin holds the new bytes below the last checkpoint, and past it a
//! mix of old and new blocks (some written, possibly torn, some not). Running the merge
//! again from the last recorded checkpoint — or from 0 — rewrites every block past it
//! and leaves the origin equal to the device. Unmapped blocks are never written: the
//! device reads the origin there, so those bytes are already the device's.
//!
//! Every other device that reads the same origin sees the merged bytes in its unmapped
//! blocks: merging changes the image under all of them, which is what the caller must
//! want (or ensure none exists).

use crate::origin::OriginError;
use crate::pool::Pool;
use crate::storage::{FileStorage, Storage};
use std::io;
use std::path::{Path, PathBuf};

/// How much is written between two syncs of the origin (and two progress reports).
pub const CHECKPOINT_BYTES: u64 = 64 << 20;

/// The unit of reading the device and writing the origin (blocks can be up to 1 GiB).
const CHUNK: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("cannot open the origin {path} for writing: {source}")]
    OpenForWrite {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot extend the origin {path} to {len} bytes: {source}")]
    Extend {
        path: PathBuf,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("the origin is {len} bytes and cannot grow (a block device), but the thin device has data up to byte {needed}")]
    TooSmall { len: u64, needed: u64 },
    #[error("invalid merge: {0}")]
    InvalidArgument(String),
    #[error("writing the origin at byte {offset}: {source}")]
    Write {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("syncing the origin: {0}")]
    Sync(#[source] io::Error),
    #[error(transparent)]
    Pool(#[from] crate::Error),
}

#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// Device byte to start at: 0, or the last checkpoint recorded. Rounded down to a
    /// block boundary (rewriting part of a block is harmless).
    pub start_offset: u64,
    /// Bytes written between checkpoints (tests use small values).
    pub checkpoint_bytes: u64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            start_offset: 0,
            checkpoint_bytes: CHECKPOINT_BYTES,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MergeOutcome {
    /// The origin holds the device's bytes below this device offset (durably).
    pub next_offset: u64,
    /// The whole device was merged (else it was cancelled at `next_offset`).
    pub complete: bool,
    /// Bytes written to the origin by this run.
    pub bytes_written: u64,
}

/// Merges thin device `dev` (of `device_size` bytes) into the file or block device at
/// `origin_path`, opened for writing for the purpose. A regular file shorter than the
/// device is extended to its size first (the new bytes read as zeroes, as the device read
/// them past the origin's end); a block device must be long enough for every mapped
/// block. `progress(next_offset, device_size)` is called at each checkpoint, after the
/// sync; returning false cancels the merge there.
pub fn merge_into_origin(
    pool: &Pool,
    dev: u32,
    device_size: u64,
    origin_path: &Path,
    opts: &MergeOptions,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<MergeOutcome, MergeError> {
    check_size(device_size)?;
    let ft = crate::origin::image_metadata(origin_path)?.file_type();
    let target = FileStorage::open(origin_path).map_err(|source| MergeError::OpenForWrite {
        path: origin_path.into(),
        source,
    })?;
    if ft.is_file() && target.len() < device_size {
        let extend = |source| MergeError::Extend {
            path: origin_path.into(),
            len: device_size,
            source,
        };
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(origin_path)
            .map_err(extend)?;
        f.set_len(device_size).map_err(extend)?;
        // The new length must be durable before any checkpoint relies on it.
        f.sync_all().map_err(extend)?;
        target.refresh_len().map_err(extend)?;
    }
    merge_into_storage(pool, dev, device_size, &target, opts, progress)
}

/// [`merge_into_origin`] onto storage the caller opened; it must be long enough for
/// every mapped block (it is not extended).
pub fn merge_into_storage(
    pool: &Pool,
    dev: u32,
    device_size: u64,
    target: &dyn Storage,
    opts: &MergeOptions,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<MergeOutcome, MergeError> {
    check_size(device_size)?;
    if opts.start_offset > device_size {
        return Err(MergeError::InvalidArgument(format!(
            "start offset {} is past the device's {device_size} bytes",
            opts.start_offset
        )));
    }
    pool.device(dev)?;
    let bs = pool.block_bytes();
    let blocks = device_size.div_ceil(bs);
    let needed = last_mapped(pool, dev, blocks)?.map_or(0, |vb| ((vb + 1) * bs).min(device_size));
    if target.len() < needed {
        return Err(MergeError::TooSmall {
            len: target.len(),
            needed,
        });
    }
    let checkpoint_bytes = opts.checkpoint_bytes.max(1);
    let mut out = MergeOutcome {
        next_offset: opts.start_offset / bs * bs,
        ..Default::default()
    };
    let mut since_checkpoint = 0u64;
    let mut buf = vec![0u8; bs.min(CHUNK) as usize];
    // In windows, so that a live pool's I/O gets the metadata lock in between.
    const WINDOW: u64 = 1 << 16;
    let mut begin = opts.start_offset / bs;
    while begin < blocks {
        let end = (begin + WINDOW).min(blocks);
        let mut mapped = Vec::new();
        pool.with_metadata(|md| {
            md.for_each_mapping(dev, begin, end, &mut |vb, _| {
                mapped.push(vb);
                Ok(())
            })
        })?;
        for vb in mapped {
            let (start, stop) = (vb * bs, ((vb + 1) * bs).min(device_size));
            let mut at = start;
            while at < stop {
                let n = (stop - at).min(CHUNK);
                let chunk = &mut buf[..n as usize];
                pool.read(dev, at, chunk)?;
                target
                    .write_at(chunk, at)
                    .map_err(|source| MergeError::Write { offset: at, source })?;
                at += n;
            }
            out.bytes_written += stop - start;
            since_checkpoint += stop - start;
            if since_checkpoint >= checkpoint_bytes {
                since_checkpoint = 0;
                target.sync().map_err(MergeError::Sync)?;
                out.next_offset = stop;
                if !progress(stop, device_size) {
                    return Ok(out);
                }
            }
        }
        begin = end;
    }
    target.sync().map_err(MergeError::Sync)?;
    out.next_offset = device_size;
    out.complete = true;
    progress(device_size, device_size);
    Ok(out)
}

fn check_size(device_size: u64) -> Result<(), MergeError> {
    if device_size % 512 != 0 {
        return Err(MergeError::InvalidArgument(format!(
            "device size {device_size} is not a whole number of 512-byte sectors"
        )));
    }
    Ok(())
}

/// The last mapped block below `blocks`, if any: a binary search on "some block at or
/// after `k` is mapped", a few lookups rather than a walk of every mapping.
fn last_mapped(pool: &Pool, dev: u32, blocks: u64) -> Result<Option<u64>, MergeError> {
    let mapped_from = |k: u64| pool.with_metadata(|md| md.next_mapped(dev, k, blocks));
    let Some(first) = mapped_from(0)? else {
        return Ok(None);
    };
    // Invariant: a block at or after `lo` is mapped; none at or after `hi` is.
    let (mut lo, mut hi) = (first, blocks);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if mapped_from(mid)?.is_some() {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo))
}

#[cfg(test)]
mod tests;
