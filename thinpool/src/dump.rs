//! `thin_dump` and `thin_restore` for our pools: [`dump`] writes a pool's metadata as
//! the XML that `thin_dump` (thin-provisioning-tools 0.9.0) prints for it, byte for
//! byte; [`restore`] formats a fresh pool from a parsed dump (see [`crate::xml`]).
//!
//! # What `dump` prints
//!
//! * The `<superblock>` attributes come from the superblock: `uuid` is always empty (as
//!   `thin_dump` 0.9.0 prints it), then `time`, `transaction`, `flags`, `version`,
//!   `data_block_size` and `nr_data_blocks` (the size of the data space map).
//! * With `metadata_snap` the superblock *copy* of the held metadata snapshot is used
//!   instead, with its own mapping and details trees. The copy carries no space maps
//!   (the kernel zeroes both roots when it makes it, and so do we), so its
//!   `nr_data_blocks` is printed as 0, exactly like `thin_dump -m`.
//! * One `<device>` per entry of the details tree, in ascending id, with the recorded
//!   `mapped_blocks`, transaction id and times, then its mappings in ascending virtual
//!   block order, folded into runs by [`XmlWriter`].
//!
//! The live view is the in-core state of `md`, uncommitted changes included; after a
//! commit it is what `thin_dump` prints for the metadata device. Mappings are streamed
//! leaf by leaf: memory use does not grow with the number of mappings.
//!
//! # What `restore` accepts
//!
//! Everything is validated before anything is written; the errors name the superblock,
//! device or device and virtual block at fault:
//!
//! * `version` 1 or 2 (the pool is written as version 2, like every commit of the
//!   engine), a `data_block_size` dm-thin accepts, `nr_data_blocks` ≤ 2^40, `time` <
//!   2^24, a `uuid` of at most 16 bytes;
//! * device ids < 2^24, device times not ahead of the pool's `time`, and a
//!   `mapped_blocks` equal to the number of mappings listed for the device;
//! * mapping times < 2^24 and data blocks < `nr_data_blocks` (hence < 2^40).
//!
//! A dump of a metadata snapshot (`thin_dump -m`) records `nr_data_blocks="0"`; like
//! `thin_restore` 0.9.0 ("mapping beyond end of data device"), `restore` refuses its
//! mappings. Set [`DumpSuperblock::nr_data_blocks`] of the parsed dump to the pool's real
//! size first (`thin_restore` has `--nr-data-blocks` for the same purpose).
//!
//! Data blocks shared between devices (snapshots) get one reference per mapping, so
//! the restored pool's reference counts are exactly those the kernel would have. The
//! B-tree shapes differ from the original's, which no tool can observe.

use crate::pdata::btree::{self, node, ValueKind};
use crate::storage::Storage;
use crate::thin::device::{DeviceDetails, Mapping, MAX_DATA_BLOCKS, MAX_THIN_ID, MAX_TIME};
use crate::thin::metadata::{MetadataOptions, ThinMetadata, DETAILS_VALUE};
use crate::thin::superblock::check_data_block_size;
use crate::xml::{DumpDevice, DumpMapping, DumpSuperblock, ParsedDump, XmlWriter};
use std::io::{self, BufWriter, Write};
use std::sync::Arc;

/// Why a dump failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DumpError {
    // The cause is in the message and not also a `source`: printed as a chain (anyhow's
    // `{:#}`), it would appear twice.
    #[error("reading the metadata: {0}")]
    Metadata(crate::Error),
    #[error("writing the dump: {0}")]
    Io(io::Error),
    #[error("the metadata is inconsistent: {0}")]
    Inconsistent(String),
}

impl From<crate::Error> for DumpError {
    fn from(e: crate::Error) -> Self {
        DumpError::Metadata(e)
    }
}

impl From<io::Error> for DumpError {
    fn from(e: io::Error) -> Self {
        DumpError::Io(e)
    }
}

/// Why a restore failed. Nothing usable is left on the metadata device after an error
/// (validation errors are found before anything is written).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    #[error("superblock: {0}")]
    Superblock(String),
    #[error("device {dev_id}: the id is above the maximum {MAX_THIN_ID}")]
    DeviceId { dev_id: u32 },
    #[error("device {dev_id}: {field} {value} is ahead of the pool's time {pool_time}")]
    DeviceTime {
        dev_id: u32,
        field: &'static str,
        value: u32,
        pool_time: u32,
    },
    #[error(
        "device {dev_id}: mapped_blocks is {recorded} but the dump lists {actual} mapped blocks"
    )]
    MappedBlocks {
        dev_id: u32,
        recorded: u64,
        actual: u64,
    },
    #[error("device {dev_id}, virtual block {vblock}: mapped twice (its runs overlap)")]
    Overlap { dev_id: u32, vblock: u64 },
    #[error("device {dev_id}, virtual block {vblock}: data block {data_block} is beyond the pool's {nr_data_blocks} data blocks")]
    DataBlock {
        dev_id: u32,
        vblock: u64,
        data_block: u64,
        nr_data_blocks: u64,
    },
    #[error(
        "device {dev_id}, virtual block {vblock}: time {time} is above the maximum {MAX_TIME}"
    )]
    MappingTime { dev_id: u32, vblock: u64, time: u32 },
    #[error("{context}: {source}")]
    Metadata {
        context: String,
        #[source]
        source: crate::Error,
    },
}

fn ctx<T>(r: crate::Result<T>, context: impl FnOnce() -> String) -> Result<T, RestoreError> {
    r.map_err(|source| RestoreError::Metadata {
        context: context(),
        source,
    })
}

/// Writes `md` (or, with `metadata_snap`, its held metadata snapshot) in `thin_dump`
/// 0.9.0 XML to `out`. See the [module documentation](self) for what is printed.
pub fn dump(md: &mut ThinMetadata, metadata_snap: bool, out: impl Write) -> Result<(), DumpError> {
    let (sb, mapping_root, details): (DumpSuperblock, u64, Vec<(u64, DeviceDetails)>) =
        if metadata_snap {
            let copy = md.metadata_snap()?;
            let details = btree::entries(md.tm(), copy.details_root, DETAILS_VALUE)?
                .into_iter()
                .map(|(k, v)| (k, DeviceDetails::unpack(&v)))
                .collect();
            (
                DumpSuperblock {
                    uuid: String::new(),
                    time: copy.time,
                    transaction: copy.trans_id,
                    flags: copy.flags,
                    version: copy.version,
                    data_block_size: copy.data_block_size,
                    nr_data_blocks: copy.data_sm_root.nr_blocks,
                },
                copy.mapping_root,
                details,
            )
        } else {
            let sb = md.superblock();
            let fields = DumpSuperblock {
                uuid: String::new(),
                time: sb.time,
                transaction: sb.trans_id,
                flags: sb.flags,
                version: sb.version,
                data_block_size: sb.data_block_size,
                nr_data_blocks: md.usage().data_blocks,
            };
            let root = sb.mapping_root;
            let details = md.devices().iter().map(|(&k, &v)| (k as u64, v)).collect();
            (fields, root, details)
        };
    // One entry per device: small next to the mappings, which are streamed.
    let tops = btree::entries(md.tm(), mapping_root, ValueKind::Subtree)?;
    let top_ids: Vec<u64> = tops.iter().map(|(k, _)| *k).collect();
    let detail_ids: Vec<u64> = details.iter().map(|(k, _)| *k).collect();
    if top_ids != detail_ids {
        return Err(DumpError::Inconsistent(format!(
            "devices in the details tree {detail_ids:?} differ from those in the mapping tree {top_ids:?}"
        )));
    }

    let mut w = XmlWriter::new(BufWriter::new(out));
    w.begin_superblock(&sb)?;
    for ((id, d), (_, root)) in details.iter().zip(&tops) {
        let dev_id = u32::try_from(*id).map_err(|_| {
            DumpError::Inconsistent(format!("device id {id} does not fit in 32 bits"))
        })?;
        let root = u64::from_le_bytes(root[..8].try_into().expect("8-byte value"));
        w.begin_device(&DumpDevice {
            dev_id,
            mapped_blocks: d.mapped_blocks,
            transaction: d.transaction_id,
            creation_time: d.creation_time,
            snap_time: d.snapshotted_time,
        })?;
        let mut write_err: Option<io::Error> = None;
        let walked = btree::for_each_leaf(md.tm(), root, ValueKind::Data, &mut |n| {
            for i in 0..node::nr_entries(n) {
                let m = Mapping::unpack(node::value_u64(n, i));
                let r = w.mapping(DumpMapping {
                    vblock: node::key(n, i),
                    data_block: m.data_block,
                    time: m.time,
                });
                if let Err(e) = r {
                    write_err = Some(e);
                    // Stops the walk; replaced by `write_err` below.
                    return Err(crate::Error::InvalidArgument("dump output failed".into()));
                }
            }
            Ok(())
        });
        if let Some(e) = write_err {
            return Err(if e.kind() == io::ErrorKind::InvalidInput {
                // The writer refuses mappings out of order: a damaged tree.
                DumpError::Inconsistent(format!("mapping tree of device {dev_id}: {e}"))
            } else {
                DumpError::Io(e)
            });
        }
        walked?;
        w.end_device()?;
    }
    w.end_superblock()?;
    Ok(())
}

/// Checks everything about `parsed` that can be checked without writing.
fn validate(parsed: &ParsedDump) -> Result<(), RestoreError> {
    let sb = &parsed.superblock;
    if sb.version != 1 && sb.version != 2 {
        return Err(RestoreError::Superblock(format!(
            "metadata version {} is not supported (only 1 and 2)",
            sb.version
        )));
    }
    check_data_block_size(sb.data_block_size)
        .map_err(|e| RestoreError::Superblock(format!("data_block_size: {e}")))?;
    if sb.nr_data_blocks > MAX_DATA_BLOCKS {
        return Err(RestoreError::Superblock(format!(
            "nr_data_blocks {} is above the format's maximum of 2^40",
            sb.nr_data_blocks
        )));
    }
    if sb.time > MAX_TIME {
        return Err(RestoreError::Superblock(format!(
            "time {} is above the maximum {MAX_TIME}",
            sb.time
        )));
    }
    if sb.uuid.len() > 16 {
        return Err(RestoreError::Superblock(format!(
            "uuid {:?} is longer than 16 bytes",
            sb.uuid
        )));
    }
    for dev in &parsed.devices {
        let d = &dev.device;
        let dev_id = d.dev_id;
        if dev_id > MAX_THIN_ID {
            return Err(RestoreError::DeviceId { dev_id });
        }
        for (field, value) in [
            ("creation_time", d.creation_time),
            ("snap_time", d.snap_time),
        ] {
            if value > sb.time {
                return Err(RestoreError::DeviceTime {
                    dev_id,
                    field,
                    value,
                    pool_time: sb.time,
                });
            }
        }
        let actual = dev.block_count();
        if actual != d.mapped_blocks {
            return Err(RestoreError::MappedBlocks {
                dev_id,
                recorded: d.mapped_blocks,
                actual,
            });
        }
        // Runs may come in any order, but no block twice: then the count above is the
        // number of blocks the device will map.
        let mut spans: Vec<(u64, u64)> = dev.runs.iter().map(|r| (r.vbegin, r.length)).collect();
        spans.sort_unstable();
        let mut next = 0u64;
        for (begin, length) in spans {
            if begin < next {
                return Err(RestoreError::Overlap {
                    dev_id,
                    vblock: begin,
                });
            }
            next = begin.saturating_add(length);
        }
        for run in &dev.runs {
            if run.time > MAX_TIME {
                return Err(RestoreError::MappingTime {
                    dev_id,
                    vblock: run.vbegin,
                    time: run.time,
                });
            }
            // The parser guarantees non-empty runs that fit in 64 bits.
            let last = run.last_data_block().unwrap_or(u64::MAX);
            if last >= sb.nr_data_blocks {
                let skip = sb.nr_data_blocks.saturating_sub(run.data_begin);
                return Err(RestoreError::DataBlock {
                    dev_id,
                    vblock: run.vbegin.saturating_add(skip),
                    data_block: run.data_begin.saturating_add(skip),
                    nr_data_blocks: sb.nr_data_blocks,
                });
            }
        }
    }
    Ok(())
}

/// Formats a fresh pool on `metadata` holding exactly what `parsed` describes, and
/// commits it. See the [module documentation](self) for what is accepted.
pub fn restore(
    parsed: &ParsedDump,
    metadata: Arc<dyn Storage>,
    opts: MetadataOptions,
) -> Result<ThinMetadata, RestoreError> {
    validate(parsed)?;
    let sb = &parsed.superblock;
    let mut md = ctx(
        ThinMetadata::format(metadata, sb.data_block_size, sb.nr_data_blocks, opts),
        || "formatting the metadata device".to_string(),
    )?;
    let mut uuid = [0u8; 16];
    uuid[..sb.uuid.len()].copy_from_slice(sb.uuid.as_bytes());
    ctx(
        md.restore_superblock_fields(sb.time, sb.transaction, sb.flags, uuid),
        || "setting the superblock fields".to_string(),
    )?;
    for dev in &parsed.devices {
        let d = &dev.device;
        let dev_id = d.dev_id;
        ctx(md.create_thin(dev_id), || {
            format!("creating device {dev_id}")
        })?;
        for m in dev.mappings() {
            ctx(
                md.insert_mapping_ref(
                    dev_id,
                    m.vblock,
                    Mapping {
                        data_block: m.data_block,
                        time: m.time,
                    },
                ),
                || {
                    format!(
                        "device {dev_id}, virtual block {}: mapping it to data block {}",
                        m.vblock, m.data_block
                    )
                },
            )?;
        }
        ctx(
            md.restore_device_details(dev_id, d.transaction, d.creation_time, d.snap_time),
            || format!("setting the details of device {dev_id}"),
        )?;
    }
    ctx(md.commit(), || {
        "committing the restored metadata".to_string()
    })?;
    Ok(md)
}

#[cfg(test)]
mod tests;
