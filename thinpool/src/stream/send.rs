//! Writing a snapshot as a stream: every mapped extent (full), or only what changed since a
//! base snapshot (incremental: the changed-only walk of the two mapping trees, which skips
//! the subtrees they share; within a changed block only the 4 KiB pages that differ from
//! the base are sent). Unmapped extents are not sent; pages that read as zeros are not
//! sent as data.
//!
//! A device with an external origin reads the origin where it is unmapped, and the
//! receiver does not have the origin: a full stream carries every block the origin
//! reaches as well as the mapped ones, so the received copy stands alone. An incremental
//! stream between two snapshots of the same origin still skips what is unmapped in both
//! (both read the origin there: unchanged); what one of them maps is compared with the
//! base's bytes, since "unmapped" no longer means zeros. Snapshots with different
//! origins (or only one with an origin) are compared byte for byte over the whole device.

use super::format::{SnapshotRef, StreamHeader, StreamWriter, MAX_DATA};
use super::{new_guid, StreamError};
use crate::catalog::Catalog;
use crate::delta::{self, DeltaKind, DeltaMode};
use crate::pool::Pool;
use crate::registry::Registry;
use std::io::Write;

/// Granularity of zero detection and of comparison with the base: a guest's page.
const PIECE: u64 = 4096;

#[derive(Clone, Debug, Default)]
pub struct SendOptions {
    /// Send only what changed since this snapshot (thin id), which the receiver must have.
    pub base: Option<u32>,
    /// Start at this device byte: the offset of a resume token.
    pub resume_offset: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SendStats {
    /// DATA records' payload bytes.
    pub data_bytes: u64,
    /// Bytes sent as ZERO records (unmapped since the base, or zero-filled).
    pub zero_bytes: u64,
    /// Bytes of changed or mapped extents that read as zeros and were not sent as data.
    pub zero_detected_bytes: u64,
    /// Bytes of changed blocks equal to the base's (a block is copied whole on its first
    /// write after a snapshot; only the pages that differ are sent).
    pub unchanged_bytes: u64,
    pub records: u64,
    /// Length of the whole stream.
    pub stream_bytes: u64,
}

/// Gives `ids` their send/receive identities, durably, if any has none yet: a snapshot
/// gets its identity at its first send. Nothing is committed when all have one.
pub fn ensure_guids(cat: &Catalog, ids: &[u32]) -> Result<(), StreamError> {
    let needed = ids.iter().any(|id| {
        cat.registry()
            .devices
            .get(id)
            .is_none_or(|e| e.guid.is_none())
    });
    if !needed {
        return Ok(());
    }
    cat.change(|_, reg| -> Result<(), StreamError> {
        assign_guids(reg, ids)?;
        Ok(())
    })
}

/// Gives every device in `ids` a guid if it has none. True when the registry changed (the
/// caller commits it before sending, so the receiver's copy can be matched later).
pub fn assign_guids(reg: &mut Registry, ids: &[u32]) -> Result<bool, StreamError> {
    let mut changed = false;
    for id in ids {
        let e = reg
            .devices
            .get_mut(id)
            .ok_or_else(|| StreamError::Refused(format!("thin device {id} is not registered")))?;
        if e.guid.is_none() {
            e.guid = Some(new_guid()?);
            changed = true;
        }
    }
    Ok(changed)
}

fn snapshot_ref(reg: &Registry, id: u32) -> Result<SnapshotRef, StreamError> {
    let e = reg
        .devices
        .get(&id)
        .ok_or_else(|| StreamError::Refused(format!("thin device {id} is not registered")))?;
    let what = e
        .name
        .clone()
        .unwrap_or_else(|| format!("thin device {id}"));
    if e.receiving.is_some() {
        return Err(StreamError::Refused(format!(
            "{what} is still being received"
        )));
    }
    if !e.snapshot {
        return Err(StreamError::Refused(format!(
            "{what} is not a snapshot: only snapshots are sent (they do not change while the stream is written); take one first"
        )));
    }
    let guid = e.guid.clone().ok_or_else(|| {
        StreamError::Refused(format!("{what} has no guid yet (assign_guids first)"))
    })?;
    Ok(SnapshotRef {
        guid,
        name: e.name.clone(),
        size: e.size,
        created: e.created,
    })
}

/// What the receiver's device holds in an extent before the stream reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Before {
    /// Zeros: the base does not map it (or there is no base).
    Zeros,
    /// The base's data, which the snapshot changed (mapped to another block): only the
    /// parts that differ are sent.
    Base,
    /// The base's data, which the snapshot unmapped: it reads as zeros now (no external
    /// origin).
    Unmapped,
}

/// Extents to send, in device bytes: `(offset, length, before)`.
fn extents(
    pool: &Pool,
    snap: u32,
    base: Option<u32>,
    size: u64,
) -> Result<Vec<(u64, u64, Before)>, StreamError> {
    let bb = pool.block_bytes();
    let mut runs: Vec<(u64, u64, Before)> = Vec::new();
    let blocks = size.div_ceil(bb);
    let mut push = |begin: u64, len: u64, before: Before| {
        // Keys come from metadata, which may be damaged: clip before multiplying.
        let (begin, end) = (begin.min(blocks), begin.saturating_add(len).min(blocks));
        let (start, end) = (begin * bb, (end * bb).min(size));
        if start >= end {
            return;
        }
        match runs.last_mut() {
            Some(r) if r.2 == before && r.0 + r.1 == start => r.1 = end - r.0,
            _ => runs.push((start, end - start, before)),
        }
    };
    let origin = pool.external_origin(snap);
    match base {
        Some(base) => {
            let base_origin = pool.external_origin(base);
            let same_origin = match (&origin, &base_origin) {
                (None, None) => Some(false),
                (Some(a), Some(b)) if a.same_as(b) => Some(true),
                _ => None,
            };
            let Some(with_origin) = same_origin else {
                // What is unmapped in both reads differently in each: compare it all.
                push(0, blocks, Before::Base);
                return Ok(runs);
            };
            let changed = pool
                .with_metadata(|md| delta::runs(md, base, snap, false, DeltaMode::ChangedOnly))?;
            for r in changed {
                let before = match r.kind {
                    // The unmapped side reads the origin, not zeros: compare bytes.
                    _ if with_origin => Before::Base,
                    DeltaKind::LeftOnly => Before::Unmapped,
                    DeltaKind::Different => Before::Base,
                    _ => Before::Zeros,
                };
                push(r.begin, r.length, before);
            }
        }
        None => {
            // Every block the origin reaches reads from it where unmapped; past that,
            // unmapped blocks read as zeros, as the receiver's new device does.
            let origin_blocks = origin.map_or(0, |o| o.len().div_ceil(bb)).min(blocks);
            push(0, origin_blocks, Before::Zeros);
            // In windows, so that a live pool's I/O gets the metadata lock in between.
            const WINDOW: u64 = 1 << 16;
            let mut begin = origin_blocks;
            while begin < blocks {
                let end = (begin + WINDOW).min(blocks);
                let mut mapped = Vec::new();
                pool.with_metadata(|md| {
                    md.for_each_mapping(snap, begin, end, &mut |vb, _| {
                        mapped.push(vb);
                        Ok(())
                    })
                })?;
                for vb in mapped {
                    push(vb, 1, Before::Zeros);
                }
                begin = end;
            }
        }
    }
    Ok(runs)
}

/// Coalesces pieces into records in device order: data up to MAX_DATA, zeros unbounded.
struct Emitter<W: Write> {
    w: StreamWriter<W>,
    data: Option<(u64, Vec<u8>)>,
    zero: Option<(u64, u64)>,
    stats: SendStats,
}

impl<W: Write> Emitter<W> {
    fn flush_data(&mut self) -> Result<(), StreamError> {
        if let Some((off, buf)) = self.data.take() {
            self.w.data(off, &buf)?;
            self.stats.data_bytes += buf.len() as u64;
            self.stats.records += 1;
        }
        Ok(())
    }

    fn flush_zero(&mut self) -> Result<(), StreamError> {
        if let Some((off, len)) = self.zero.take() {
            self.w.zero(off, len)?;
            self.stats.zero_bytes += len;
            self.stats.records += 1;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        self.flush_data()?;
        self.flush_zero()
    }

    fn data(&mut self, off: u64, bytes: &[u8]) -> Result<(), StreamError> {
        self.flush_zero()?;
        if let Some((o, b)) = &mut self.data {
            if *o + b.len() as u64 == off && b.len() + bytes.len() <= MAX_DATA as usize {
                b.extend_from_slice(bytes);
                return Ok(());
            }
        }
        self.flush_data()?;
        self.data = Some((off, bytes.to_vec()));
        Ok(())
    }

    fn zero(&mut self, off: u64, len: u64) -> Result<(), StreamError> {
        self.flush_data()?;
        if let Some((o, l)) = &mut self.zero {
            if *o + *l == off {
                *l += len;
                return Ok(());
            }
        }
        self.flush_zero()?;
        self.zero = Some((off, len));
        Ok(())
    }
}

/// Writes snapshot `snap` (and, incremental, what changed since `opts.base`) to `out`.
/// `progress(done, total)` is called in device bytes as extents are read.
pub fn send<W: Write>(
    pool: &Pool,
    reg: &Registry,
    snap: u32,
    opts: &SendOptions,
    out: W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SendStats, StreamError> {
    let snapshot = snapshot_ref(reg, snap)?;
    let base = match opts.base {
        Some(b) if b == snap => {
            return Err(StreamError::Refused(
                "the base is the snapshot itself: nothing to send".into(),
            ))
        }
        Some(b) => Some(snapshot_ref(reg, b)?),
        None => None,
    };
    if opts.resume_offset > snapshot.size {
        return Err(StreamError::Refused(format!(
            "resume offset {} is past the snapshot's {} bytes",
            opts.resume_offset, snapshot.size
        )));
    }
    let mut runs = extents(pool, snap, opts.base, snapshot.size)?;
    // A resumed stream carries only what lies at or after the offset.
    let from = opts.resume_offset;
    runs.retain_mut(|r| {
        if r.0 + r.1 <= from {
            return false;
        }
        if r.0 < from {
            r.1 -= from - r.0;
            r.0 = from;
        }
        true
    });
    let total: u64 = runs.iter().map(|r| r.1).sum();
    let header = StreamHeader {
        snapshot,
        base,
        block_size: pool.block_bytes(),
        resume_offset: from,
    };
    let mut em = Emitter {
        w: StreamWriter::new(out, &header)?,
        data: None,
        zero: None,
        stats: SendStats::default(),
    };
    let mut buf = vec![0u8; MAX_DATA as usize];
    let mut old = vec![0u8; MAX_DATA as usize];
    let mut done = 0;
    for (off, len, before) in runs {
        if before == Before::Unmapped {
            em.zero(off, len)?;
            done += len;
            progress(done, total);
            continue;
        }
        let mut at = off;
        while at < off + len {
            let n = (off + len - at).min(MAX_DATA);
            let chunk = &mut buf[..n as usize];
            pool.read(snap, at, chunk)?;
            if before == Before::Base {
                pool.read(
                    opts.base.expect("Base runs come from a base"),
                    at,
                    &mut old[..n as usize],
                )?;
            }
            let mut p = 0u64;
            while p < n {
                // Pieces follow the device's PIECE boundaries.
                let q = (((at + p) / PIECE + 1) * PIECE - at).min(n);
                let (i, j) = (p as usize, q as usize);
                let bytes = &chunk[i..j];
                if before == Before::Base && bytes == &old[i..j] {
                    // The receiver has these bytes from its copy of the base.
                    em.stats.unchanged_bytes += q - p;
                    em.flush()?;
                } else if bytes.iter().all(|&b| b == 0) {
                    em.stats.zero_detected_bytes += q - p;
                    if before == Before::Base {
                        // The base holds data here: the receiver must zero it.
                        em.zero(at + p, q - p)?;
                    } else {
                        // Reads as zeros there already.
                        em.flush()?;
                    }
                } else {
                    em.data(at + p, bytes)?;
                }
                p = q;
            }
            at += n;
            done += n;
            progress(done, total);
        }
    }
    em.flush()?;
    let mut stats = em.stats;
    let (_, bytes) = em.w.finish()?;
    stats.stream_bytes = bytes;
    Ok(stats)
}
