//! Applying a stream to a pool: a new thin device (full stream) or a snapshot of the base
//! (incremental), written record by record, which becomes a snapshot only when the end
//! record has arrived and checked. Until then its registry entry says `receiving`, so it is
//! never mistaken for a snapshot.
//!
//! A failed receive deletes its device, unless it is resumable: then what arrived is kept
//! (it was checksummed), progress is committed, and the error carries a resume token for
//! the sender (`send --resume`). Resumable receives also commit every `commit_every` bytes,
//! so a crash loses at most that much.

use super::format::{Record, StreamHeader, StreamReader};
use super::{ResumeToken, StreamError};
use crate::catalog::Catalog;
use crate::pool::{block_pieces, BlockPiece};
use crate::registry::{PartialReceive, Registry};
use std::io::Read;

#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// The received snapshot's name (default: the sender's).
    pub name: Option<String>,
    /// Keep what arrived when the stream is cut off, to resume later.
    pub resumable: bool,
    /// A resumable receive commits after this many device bytes.
    pub commit_every: u64,
    /// The caller's state the device's entry carries from its first commit on
    /// (`DeviceEntry::daemon_state`; the daemon marks a copy made by a migration so): a
    /// crash at any point leaves it recognisable as the caller's.
    pub daemon_state: Option<serde_json::Value>,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            name: None,
            resumable: false,
            commit_every: 256 << 20,
            daemon_state: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Received {
    pub id: u32,
    pub name: String,
    pub guid: String,
    /// The base's thin id in this pool (incremental streams).
    pub base: Option<u32>,
    pub records: u64,
    pub stream_bytes: u64,
    /// Where this stream started (non-zero when it resumed an interrupted receive).
    pub resumed_from: u64,
}

/// Why a resumable receive stopped, and how to go on.
#[derive(Debug, thiserror::Error)]
#[error("{cause}; what arrived is kept: resume with `send --resume {token}`, or drop it with `receive --abort {token}`")]
pub struct Interrupted {
    pub token: ResumeToken,
    #[source]
    pub cause: Box<StreamError>,
}

fn refused(msg: impl Into<String>) -> StreamError {
    StreamError::Refused(msg.into())
}

/// Finds or makes the device the stream goes into; returns (id, base id, final name).
/// The registry is the catalog's, locked by the caller. A snapshot the pool holds already
/// is received again only under another name: a second copy, with the same guid.
fn target(
    cat: &Catalog,
    reg: &mut Registry,
    h: &StreamHeader,
    opts: &ReceiveOptions,
) -> Result<(u32, Option<u32>, String), StreamError> {
    let guid = &h.snapshot.guid;
    let base = base_device(reg, h)?;
    let base_guid = h.base.as_ref().map(|b| b.guid.clone());
    // A receive of this snapshot under way or interrupted. Its token names the snapshot,
    // not the copy, so there is one at a time: a stream without a name of its own, or with
    // the name that receive was given, goes on into it (as the token says); one for
    // another name is refused until it is resumed or dropped.
    if let Some(id) = reg.find_receiving(guid) {
        let name = resume_into(reg, id, h, opts, &base_guid)?;
        return Ok((id, base, name));
    }
    let name = new_copy_name(reg, h, opts)?;
    // The device exists durably and marked as receiving before any data goes in: after a
    // crash it is found (and resumed or dropped), never taken for a snapshot.
    let id = cat.change_locked(reg, |devices, reg| -> Result<u32, StreamError> {
        let id = devices.next_id(reg);
        match base {
            Some(b) => devices.create_snap(id, b).map(|_| ())?,
            None => devices.create_thin(id)?,
        }
        let s = &h.snapshot;
        let entry = cat.new_received_entry(reg, id, base, s.size, s.created, guid);
        reg.insert(
            id,
            crate::registry::DeviceEntry {
                receiving: Some(PartialReceive {
                    name: name.clone(),
                    base_guid,
                    next_offset: 0,
                    resumable: opts.resumable,
                }),
                daemon_state: opts.daemon_state.clone(),
                ..entry
            },
        )?;
        Ok(id)
    })?;
    Ok((id, base, name))
}

/// The pool's copy of the stream's base (for an incremental stream): a complete snapshot
/// of the sender's size.
fn base_device(reg: &Registry, h: &StreamHeader) -> Result<Option<u32>, StreamError> {
    Ok(match &h.base {
        None => None,
        Some(b) => {
            let label = b.name.as_deref().unwrap_or("(unnamed)");
            let id = reg.find_guid(&b.guid).ok_or_else(|| {
                refused(format!(
                    "the stream is incremental on snapshot {label} (guid {}), which this pool does not have: receive that snapshot first, or send a full stream",
                    b.guid
                ))
            })?;
            let e = &reg.devices[&id];
            if e.receiving.is_some() || !e.snapshot || e.size != b.size {
                return Err(refused(format!(
                    "this pool's copy of the base {label} (thin device {id}) differs from the sender's: {}",
                    if e.receiving.is_some() {
                        "it is itself still being received".to_string()
                    } else if !e.snapshot {
                        "it is a disk, not a snapshot, and may have been written".to_string()
                    } else {
                        format!("{} bytes here, {} at the sender", e.size, b.size)
                    }
                )));
            }
            Some(id)
        }
    })
}

/// The name of the interrupted receive (thin device `id`) this stream goes on with, if it
/// does: the same snapshot and base, resuming where that one stopped, not under way.
fn resume_into(
    reg: &Registry,
    id: u32,
    h: &StreamHeader,
    opts: &ReceiveOptions,
    base_guid: &Option<String>,
) -> Result<String, StreamError> {
    let token = |offset| ResumeToken {
        guid: h.snapshot.guid.clone(),
        offset,
    };
    let Some(p) = reg.devices.get(&id).and_then(|e| e.receiving.clone()) else {
        return Err(refused(format!(
            "thin device {id} is no longer being received"
        )));
    };
    // Named when it is not the stream's own name (it was given with --name).
    let named = if h.snapshot.name.as_deref() == Some(p.name.as_str()) {
        String::new()
    } else {
        format!(" as {:?}", p.name)
    };
    // Not interrupted: a receive of this process is writing into it now (the registry
    // is unlocked while data goes in). Writing the same stream into it a second time
    // would mix two receives, and the one that fails would delete what the other
    // completed.
    if reg.receiving_now.contains(&id) {
        return Err(refused(format!(
            "a receive of this snapshot into thin device {id}{named} is under way: wait for it or cancel it"
        )));
    }
    if opts.name.as_ref().is_some_and(|n| *n != p.name) {
        return Err(refused(format!(
            "an interrupted receive of this snapshot is in the pool as {:?} (thin device {id}), and a snapshot is received as one copy at a time: resume that one with `send --resume {}` (received with --name {:?}, or without --name), or drop it with `receive --abort {}`",
            p.name,
            token(p.next_offset),
            p.name,
            token(p.next_offset)
        )));
    }
    // Where the interrupted receive stopped (0 too, when it stopped in its first
    // record): go on.
    if p.next_offset == h.resume_offset {
        if p.base_guid != *base_guid {
            return Err(refused(
                "the resumed stream has another base than the interrupted one: send it with the same --base",
            ));
        }
        return Ok(p.name);
    }
    Err(refused(if h.resume_offset == 0 {
        format!(
            "an interrupted receive of this snapshot is in the pool{named} (thin device {id}): resume it with `send --resume {}`, or drop it with `receive --abort`",
            token(p.next_offset)
        )
    } else {
        format!(
            "the stream resumes at byte {}, this pool has everything before byte {}: resume with `send --resume {}`",
            h.resume_offset,
            p.next_offset,
            token(p.next_offset)
        )
    }))
}

/// The name of a new copy of the stream's snapshot (the receiver's, else the sender's),
/// checked: a second copy of a snapshot the pool holds needs a name of its own.
fn new_copy_name(
    reg: &Registry,
    h: &StreamHeader,
    opts: &ReceiveOptions,
) -> Result<String, StreamError> {
    let guid = &h.snapshot.guid;
    let name = opts.name.clone().or_else(|| h.snapshot.name.clone());
    // The snapshot is here already: a second copy (as zfs allows) needs a name of its own.
    let copies: Vec<u32> = reg
        .devices
        .iter()
        .filter(|(_, e)| e.guid.as_deref() == Some(guid.as_str()))
        .map(|(&id, _)| id)
        .collect();
    let same_name = copies
        .iter()
        .find(|id| name.is_some() && reg.devices[id].name == name);
    if let Some(&id) = same_name.or(copies.first().filter(|_| opts.name.is_none())) {
        return Err(refused(format!(
            "this snapshot is already in the pool as {} (thin device {id}): to receive a second copy, give it another name (--name)",
            reg.devices[&id].name.as_deref().unwrap_or("(unnamed)")
        )));
    }
    if h.resume_offset > 0 {
        return Err(refused(format!(
            "the stream resumes at byte {} a receive of snapshot {guid} that this pool does not have: send the whole stream again (without --resume)",
            h.resume_offset
        )));
    }
    let name =
        name.ok_or_else(|| refused("the stream's snapshot has no name: give one (--name)"))?;
    // Checked before the device is made (the registry would refuse it only after).
    crate::names::check_name(&name).map_err(|why| {
        refused(format!(
            "{name:?} is not a valid name: {why}; a name is {}",
            crate::names::NAME_RULE
        ))
    })?;
    if let Some(other) = reg.holder_of(&name) {
        return Err(refused(format!(
            "a device named {name:?} exists (thin device {other}): give the received snapshot another name"
        )));
    }
    Ok(name)
}

/// Receives a stream into the catalog's pool. Errors before any device was made change nothing; later
/// ones drop the device, or keep it for resuming (`Interrupted`, when resumable).
/// `progress(done, total)` is called in device bytes after each block of data written and
/// each run of zeros, with no lock held (a caller may pause there).
pub fn receive<R: Read>(
    cat: &Catalog,
    input: R,
    opts: &ReceiveOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Received, ReceiveError> {
    let mut reader = StreamReader::new(input)?;
    let h = reader.header().clone();
    // The device is marked as being written in the same lock that found or made it.
    let (id, base, name, resumable) = {
        let mut g = cat.lock_registry();
        let (id, base, name) = target(cat, &mut g, &h, opts)?;
        g.receiving_now.insert(id);
        let resumable = g
            .devices
            .get(&id)
            .and_then(|e| e.receiving.as_ref())
            .is_some_and(|p| p.resumable);
        (id, base, name, resumable)
    };
    let _writing = Writing { cat, id };
    let pool = cat.pool();
    let mut next = h.resume_offset;
    let mut committed = next;
    let result = (|| -> Result<(), StreamError> {
        while let Some(rec) = reader.next_record()? {
            match &rec {
                // A block at a time, each followed by `progress`: a caller that pauses there
                // (to let the pool's guests at its data file) does so as often as a block.
                Record::Data { offset, data } => {
                    let pieces = block_pieces(pool.block_bytes(), *offset, data.len() as u64);
                    for BlockPiece { pos, len, .. } in pieces {
                        let (at, end) = (pos as usize, (pos + len) as usize);
                        pool.write(id, offset + pos, &data[at..end])?;
                        progress(offset + pos + len, h.snapshot.size);
                    }
                }
                Record::Zero { offset, length } => {
                    pool.write_zeroes(id, *offset, *length, true)?;
                    progress(rec.end(), h.snapshot.size);
                }
            }
            next = rec.end();
            if resumable && next - committed >= opts.commit_every {
                set_progress(cat, id, next)?;
                committed = next;
            }
        }
        // The end record vouches for the whole device: what no record covered reads as
        // zeros, so the progress ends complete rather than at the last record.
        progress(h.snapshot.size, h.snapshot.size);
        Ok(())
    })();
    match result {
        Ok(()) => {
            cat.change(|_, reg| -> Result<(), StreamError> {
                let mut e = reg.devices.get(&id).cloned().ok_or_else(|| {
                    refused(format!(
                        "thin device {id} was deleted while it was being received"
                    ))
                })?;
                e.receiving = None;
                e.name = Some(name.clone());
                reg.insert(id, e)?;
                Ok(())
            })?;
            Ok(Received {
                id,
                name,
                guid: h.snapshot.guid,
                base,
                records: reader.records(),
                stream_bytes: reader.consumed(),
                resumed_from: h.resume_offset,
            })
        }
        Err(cause) if resumable => {
            // Everything applied was checksummed: keep it and say where to go on.
            if let Err(e) = set_progress(cat, id, next) {
                return Err(ReceiveError::Failed(StreamError::Refused(format!(
                    "{cause}; and keeping what arrived failed too: {e}"
                ))));
            }
            Err(ReceiveError::Interrupted(Interrupted {
                token: ResumeToken {
                    guid: h.snapshot.guid,
                    offset: next,
                },
                cause: Box::new(cause),
            }))
        }
        Err(cause) => {
            drop_device(cat, id);
            Err(ReceiveError::Failed(cause))
        }
    }
}

/// Unmarks a device as being written by this receive when it ends, however it ends.
struct Writing<'a> {
    cat: &'a Catalog,
    id: u32,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.cat.lock_registry().receiving_now.remove(&self.id);
    }
}

/// Records, durably, that the device's bytes before `next` have arrived.
fn set_progress(cat: &Catalog, id: u32, next: u64) -> Result<(), StreamError> {
    cat.change(|_, reg| -> Result<(), StreamError> {
        if let Some(p) = reg.devices.get_mut(&id).and_then(|e| e.receiving.as_mut()) {
            p.next_offset = next;
        }
        Ok(())
    })
}

/// Deletes a receiving device and commits, so nothing half-made stays behind.
fn drop_device(cat: &Catalog, id: u32) {
    if let Err(e) = delete_device(cat, id) {
        tracing::warn!("cannot drop the partly received thin device {id}: {e}");
    }
}

/// Deletes a device and its registry entry, durably.
fn delete_device(cat: &Catalog, id: u32) -> Result<(), StreamError> {
    cat.change(|devices, reg| -> Result<(), StreamError> {
        reg.devices.remove(&id);
        devices.delete(id)?;
        Ok(())
    })
}

/// Drops an interrupted receive (by the guid of its token).
pub fn abort(cat: &Catalog, guid: &str) -> Result<u32, StreamError> {
    // The receiving copy, when the pool holds complete ones of the same snapshot too.
    let id = {
        let reg = cat.registry();
        reg.find_receiving(guid).ok_or_else(|| {
            refused(format!(
                "no interrupted receive of snapshot {guid} in this pool"
            ))
        })?
    };
    delete_device(cat, id)?;
    Ok(id)
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Failed(#[from] StreamError),
    #[error(transparent)]
    Interrupted(Interrupted),
}
