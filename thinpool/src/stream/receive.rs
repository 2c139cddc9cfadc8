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
use crate::pool::Pool;
use crate::registry::{make_serial, DeviceEntry, Migration, PartialReceive, Registry};
use std::io::Read;
use std::sync::{Mutex, MutexGuard};

/// The registry is locked only around its own changes, not while data is written: a daemon
/// receiving in the background keeps answering queries and making other changes.
fn locked(reg: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    reg.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// The received snapshot's name (default: the sender's).
    pub name: Option<String>,
    /// Keep what arrived when the stream is cut off, to resume later.
    pub resumable: bool,
    /// A resumable receive commits after this many device bytes.
    pub commit_every: u64,
    /// A mark the device's entry carries from its first commit on (a copy made by a
    /// migration): a crash at any point leaves it recognisable as the migration's.
    pub migration: Option<Migration>,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            name: None,
            resumable: false,
            commit_every: 256 << 20,
            migration: None,
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
fn target(
    pool: &Pool,
    reg: &mut Registry,
    h: &StreamHeader,
    opts: &ReceiveOptions,
) -> Result<(u32, Option<u32>, String), StreamError> {
    let guid = &h.snapshot.guid;
    let base = match &h.base {
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
    };
    let base_guid = h.base.as_ref().map(|b| b.guid.clone());
    if let Some(id) = reg.find_guid(guid) {
        let e = &reg.devices[&id];
        let token = |offset| ResumeToken {
            guid: guid.clone(),
            offset,
        };
        return match &e.receiving {
            None => Err(refused(format!(
                "this snapshot is already in the pool as {} (thin device {id})",
                e.name.as_deref().unwrap_or("(unnamed)")
            ))),
            // Not interrupted: a receive of this process is writing into it now (the
            // registry is unlocked while data goes in). Writing the same stream into it a
            // second time would mix two receives, and the one that fails would delete
            // what the other completed.
            Some(_) if reg.receiving_now.contains(&id) => Err(refused(format!(
                "a receive of this snapshot into thin device {id} is under way: wait for it or cancel it"
            ))),
            // Where the interrupted receive stopped (0 too, when it stopped in its first
            // record): go on.
            Some(p) if p.next_offset == h.resume_offset => {
                if p.base_guid != base_guid {
                    return Err(refused(
                        "the resumed stream has another base than the interrupted one: send it with the same --base",
                    ));
                }
                Ok((id, base, p.name.clone()))
            }
            Some(p) if h.resume_offset == 0 => Err(refused(format!(
                "an interrupted receive of this snapshot is in the pool (thin device {id}): resume it with `send --resume {}`, or drop it with `receive --abort`",
                token(p.next_offset)
            ))),
            Some(p) => Err(refused(format!(
                "the stream resumes at byte {}, this pool has everything before byte {}: resume with `send --resume {}`",
                h.resume_offset,
                p.next_offset,
                token(p.next_offset)
            ))),
        };
    }
    if h.resume_offset > 0 {
        return Err(refused(format!(
            "the stream resumes at byte {} a receive of snapshot {guid} that this pool does not have: send the whole stream again (without --resume)",
            h.resume_offset
        )));
    }
    let name = opts
        .name
        .clone()
        .or_else(|| h.snapshot.name.clone())
        .ok_or_else(|| refused("the stream's snapshot has no name: give one (--name)"))?;
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
    let ids: Vec<u32> = pool.devices().iter().map(|(id, _)| *id).collect();
    let id = reg.next_id(&ids);
    // No other commit may make the new device durable before the registry names it.
    let hold = pool.hold_commits();
    match base {
        Some(b) => pool.create_snap(id, b)?,
        None => pool.create_thin(id)?,
    }
    let salt = u64::from_str_radix(&guid[..16.min(guid.len())], 16).unwrap_or(0);
    reg.insert(
        id,
        DeviceEntry {
            name: None,
            size: h.snapshot.size,
            read_only: true,
            serial: make_serial(id, h.snapshot.created, salt),
            snapshot: true,
            origin: base,
            created: h.snapshot.created,
            guid: Some(guid.clone()),
            // A snapshot of the base reads the base's external origin where it is
            // unmapped (the stream's records go on top of that); a full stream is a
            // standalone copy.
            external_origin: base
                .and_then(|b| reg.devices.get(&b))
                .and_then(|e| e.external_origin.clone()),
            receiving: Some(PartialReceive {
                name: name.clone(),
                base_guid,
                next_offset: 0,
                resumable: opts.resumable,
            }),
            merge_offset: None,
            migration: opts.migration.clone(),
            replication: None,
        },
    )?;
    // The device exists durably and marked as receiving before any data goes in: after a
    // crash it is found (and resumed or dropped), never taken for a snapshot.
    if let Err(e) = reg.commit(&hold) {
        reg.devices.remove(&id);
        let _ = pool.delete(id);
        return Err(e.into());
    }
    Ok((id, base, name))
}

/// Receives a stream into `pool`. Errors before any device was made change nothing; later
/// ones drop the device, or keep it for resuming (`Interrupted`, when resumable).
pub fn receive<R: Read>(
    pool: &Pool,
    reg: &Mutex<Registry>,
    input: R,
    opts: &ReceiveOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Received, ReceiveError> {
    let mut reader = StreamReader::new(input)?;
    let h = reader.header().clone();
    // The device is marked as being written in the same lock that found or made it.
    let (id, base, name, resumable) = {
        let mut g = locked(reg);
        let (id, base, name) = target(pool, &mut g, &h, opts)?;
        g.receiving_now.insert(id);
        let resumable = g
            .devices
            .get(&id)
            .and_then(|e| e.receiving.as_ref())
            .is_some_and(|p| p.resumable);
        (id, base, name, resumable)
    };
    let _writing = Writing { reg, id };
    let mut next = h.resume_offset;
    let mut committed = next;
    let result = (|| -> Result<(), StreamError> {
        while let Some(rec) = reader.next_record()? {
            match &rec {
                Record::Data { offset, data } => pool.write(id, *offset, data)?,
                Record::Zero { offset, length } => pool.write_zeroes(id, *offset, *length, true)?,
            }
            next = rec.end();
            progress(next, h.snapshot.size);
            if resumable && next - committed >= opts.commit_every {
                let mut reg = locked(reg);
                set_progress(&mut reg, id, next);
                reg.commit(&pool.hold_commits())?;
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
            let mut reg = locked(reg);
            let mut e = reg.devices.get(&id).cloned().ok_or_else(|| {
                refused(format!(
                    "thin device {id} was deleted while it was being received"
                ))
            })?;
            e.receiving = None;
            e.name = Some(name.clone());
            reg.insert(id, e).map_err(StreamError::from)?;
            reg.commit(&pool.hold_commits())
                .map_err(StreamError::from)?;
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
            let mut reg = locked(reg);
            set_progress(&mut reg, id, next);
            if let Err(e) = reg.commit(&pool.hold_commits()) {
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
            drop_device(pool, &mut locked(reg), id);
            Err(ReceiveError::Failed(cause))
        }
    }
}

/// Unmarks a device as being written by this receive when it ends, however it ends.
struct Writing<'a> {
    reg: &'a Mutex<Registry>,
    id: u32,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        locked(self.reg).receiving_now.remove(&self.id);
    }
}

fn set_progress(reg: &mut Registry, id: u32, next: u64) {
    if let Some(p) = reg.devices.get_mut(&id).and_then(|e| e.receiving.as_mut()) {
        p.next_offset = next;
    }
}

/// Deletes a receiving device and commits, so nothing half-made stays behind.
fn drop_device(pool: &Pool, reg: &mut Registry, id: u32) {
    if let Err(e) = delete_device(pool, reg, id) {
        tracing::warn!("cannot drop the partly received thin device {id}: {e}");
    }
}

/// Deletes a device and its registry entry, durably.
fn delete_device(pool: &Pool, reg: &mut Registry, id: u32) -> Result<(), StreamError> {
    let hold = pool.hold_commits();
    reg.devices.remove(&id);
    pool.delete(id)?;
    reg.commit(&hold)?;
    Ok(())
}

/// Drops an interrupted receive (by the guid of its token).
pub fn abort(pool: &Pool, reg: &mut Registry, guid: &str) -> Result<u32, StreamError> {
    let id = reg
        .find_guid(guid)
        .filter(|id| reg.devices[id].receiving.is_some())
        .ok_or_else(|| {
            refused(format!(
                "no interrupted receive of snapshot {guid} in this pool"
            ))
        })?;
    delete_device(pool, reg, id)?;
    Ok(id)
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Failed(#[from] StreamError),
    #[error(transparent)]
    Interrupted(Interrupted),
}
