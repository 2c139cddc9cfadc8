//! Executes a parsed request against the disk's thin device, moving data straight between
//! guest memory and the data device (vectored I/O on the guest's own buffers).

use super::disk::{Disk, OutOfSpace, Stats, Target};
use super::mirror::{Mirror, MirrorError};
use super::request::{Op, Seg};
use std::io::{IoSlice, IoSliceMut};
use std::time::Duration;
use thinpool::pool::Pool;
use thinpool::Error;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Outcome: the status byte and how many bytes went into the guest's data buffers.
pub struct Done {
    pub status: u8,
    pub written: u32,
}

pub(super) fn fail(disk: &Disk, what: &str, e: &dyn std::fmt::Display) -> Done {
    tracing::warn!("{}: {what}: {e}", disk.name);
    Stats::add(&disk.stats.errors, 1);
    Done {
        status: VIRTIO_BLK_S_IOERR as u8,
        written: 0,
    }
}

/// The host view of a guest buffer. Fails if the buffer is not within one memory region.
fn host_slice(mem: &GuestMemoryMmap, s: &Seg) -> Option<(*mut u8, usize)> {
    let vs = mem.get_slice(GuestAddress(s.addr), s.len as usize).ok()?;
    Some((vs.ptr_guard_mut().as_ptr(), s.len as usize))
}

/// A write that found the pool full under policy `queue`: the caller waits for space, with
/// the disk's I/O gate released so that snapshots and shutdown are not held up, and runs
/// the request again.
pub struct NeedsSpace {
    pub error: Error,
    /// How long the policy holds a write (None: forever).
    pub timeout: Option<Duration>,
}

/// A FLUSH: commits the pool ([`Pool::flush`], which leaves the space the commit frees to
/// the pool's passdown thread), which makes every write completed before it durable, and
/// the mirror's pool when the disk is mirrored (a migration): whichever of the two a
/// restart finds the disk in then has the write. The mirror's failure is the mirror's to
/// judge ([`Mirror::commit`]). Callers run it without the disk's I/O gate (see
/// `BlkBackend::run`).
pub fn flush(disk: &Disk, pool: &Pool, mirror: Option<&Mirror>) -> Done {
    let r = pool
        .flush()
        .map_err(MirrorError::Primary)
        .and_then(|()| mirror.map_or(Ok(()), Mirror::commit));
    match r {
        Ok(()) => Done {
            status: VIRTIO_BLK_S_OK as u8,
            written: 0,
        },
        Err(e) => fail(disk, "flush", &e),
    }
}

/// Runs one request on `to` (the disk's target, from its I/O gate held by the caller). Err
/// only for a write to wait for space (see [`NeedsSpace`]).
pub fn execute(
    op: &Op,
    mem: &GuestMemoryMmap,
    disk: &Disk,
    to: &Target,
) -> Result<Done, NeedsSpace> {
    let ok = |written: u32| Done {
        status: VIRTIO_BLK_S_OK as u8,
        written,
    };
    Ok(match op {
        Op::Read { offset, data } => {
            // Straight into the slices the pool takes: one allocation per request, not two.
            let iov: Option<Vec<IoSliceMut<'_>>> = data
                .iter()
                .map(|s| {
                    let (p, n) = host_slice(mem, s)?;
                    // SAFETY: the pointer comes from vm-memory for a range it verified lies
                    // in a mapped region, which stays mapped while `mem` (a guard of the
                    // memory table) lives. The guest gave these buffers to the device for
                    // this request and must not touch them until it is completed (virtio's
                    // contract); the slices are used only for this call.
                    Some(IoSliceMut::new(unsafe {
                        std::slice::from_raw_parts_mut(p, n)
                    }))
                })
                .collect();
            let Some(mut iov) = iov else {
                return Ok(fail(disk, "read", &"buffer spans guest memory regions"));
            };
            let len: u64 = data.iter().map(|s| s.len as u64).sum();
            match to.pool.read_vectored(to.thin_id, *offset, &mut iov) {
                Ok(()) => {
                    Stats::add(&disk.stats.bytes_read, len);
                    ok(len as u32)
                }
                Err(e) => fail(disk, "read", &e),
            }
        }
        Op::Write { offset, data } => {
            let iov: Option<Vec<IoSlice<'_>>> = data
                .iter()
                .map(|s| {
                    let (p, n) = host_slice(mem, s)?;
                    // SAFETY: as for reads; the slices are only read from.
                    Some(IoSlice::new(unsafe {
                        std::slice::from_raw_parts(p as *const u8, n)
                    }))
                })
                .collect();
            let Some(iov) = iov else {
                return Ok(fail(disk, "write", &"buffer spans guest memory regions"));
            };
            let len: u64 = data.iter().map(|s| s.len as u64).sum();
            return match to.write_vectored(*offset, &iov) {
                Ok(()) => {
                    Stats::add(&disk.stats.bytes_written, len);
                    Ok(ok(0))
                }
                // Only the disk's own pool's space is waited for: a mirror's is the
                // migration's business (see `super::mirror`).
                Err(MirrorError::Primary(error @ Error::OutOfDataSpace { .. })) => {
                    match disk.space().mode() {
                        // Policy `queue`: the caller holds the write until space appears and
                        // runs it again. Rewriting the blocks already written is harmless.
                        OutOfSpace::Queue { timeout } => Err(NeedsSpace { error, timeout }),
                        OutOfSpace::Error => Ok(fail(disk, "write", &error)),
                    }
                }
                Err(e) => Ok(fail(disk, "write", &e)),
            };
        }
        Op::Flush => {
            let (pool, mirror) = to.flush_targets();
            flush(disk, &pool, mirror.as_deref())
        }
        Op::GetId { data } => {
            let mut written = 0usize;
            for s in data {
                let n = (s.len as usize).min(disk.serial.len() - written);
                if mem
                    .write_slice(&disk.serial[written..written + n], GuestAddress(s.addr))
                    .is_err()
                {
                    return Ok(fail(disk, "get-id", &"buffer outside guest memory"));
                }
                written += n;
            }
            ok(written as u32)
        }
        // Not offered (the pool ignores discards), so not done: what a device without
        // VIRTIO_BLK_F_DISCARD answers.
        Op::Discard(_) if !disk.discard => Done {
            status: VIRTIO_BLK_S_UNSUPP as u8,
            written: 0,
        },
        Op::Discard(ranges) => {
            for r in ranges {
                if let Err(e) = to.discard(r.offset, r.len) {
                    return Ok(fail(disk, "discard", &e));
                }
            }
            ok(0)
        }
        Op::WriteZeroes(ranges) => {
            for r in ranges {
                if let Err(e) = to.write_zeroes(r.offset, r.len, r.unmap) {
                    return Ok(fail(disk, "write-zeroes", &e));
                }
            }
            ok(0)
        }
    })
}
