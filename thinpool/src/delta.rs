//! Changed blocks between two thin devices, in `thin_delta`'s terms: runs of virtual blocks
//! that both map to the same data block (`same`), to different ones (`different`), or that
//! only one maps (`left_only`, `right_only`). Computed from the mapping trees alone — no
//! data is read — on the live metadata or on the held metadata snapshot, walking both
//! trees at once so that subtrees the devices share are not compared (see `delta/walk.rs`).
//!
//! Output: the XML of `thin_delta` 0.9.0 (non-verbose), or the runs for programs.

mod walk;

pub use walk::WalkStats;

use crate::pdata::btree::{self, ValueKind};
use crate::thin::metadata::ThinMetadata;
use crate::{Error, Result};
use std::io::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaKind {
    Same,
    Different,
    LeftOnly,
    RightOnly,
}

impl DeltaKind {
    fn tag(self) -> &'static str {
        match self {
            DeltaKind::Same => "same",
            DeltaKind::Different => "different",
            DeltaKind::LeftOnly => "left_only",
            DeltaKind::RightOnly => "right_only",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeltaRun {
    pub kind: DeltaKind,
    pub begin: u64,
    pub length: u64,
}

/// Runs as they are found, in key order: a block extends the last run when it continues
/// it in kind and position.
#[derive(Default)]
struct Runs(Vec<DeltaRun>);

impl Runs {
    fn add(&mut self, kind: DeltaKind, begin: u64, length: u64) {
        match self.0.last_mut() {
            // checked: keys in corrupt metadata may sit at the top of the range
            Some(r) if r.kind == kind && r.begin.checked_add(r.length) == Some(begin) => {
                r.length += length
            }
            _ => self.0.push(DeltaRun {
                kind,
                begin,
                length,
            }),
        }
    }
}

/// The root of `dev`'s mapping tree, live or in the held metadata snapshot.
fn device_root(md: &mut ThinMetadata, dev: u32, metadata_snap: bool) -> Result<u64> {
    let top = if metadata_snap {
        md.metadata_snap()?.mapping_root
    } else {
        md.superblock().mapping_root
    };
    btree::lookup_u64(md.tm(), top, dev as u64, ValueKind::Subtree)?.ok_or(Error::NoSuchDevice(dev))
}

/// What to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaMode {
    /// All four kinds, as `thin_delta` prints them. `same` runs need the keys under
    /// subtrees the devices share, so those leaves are read (once, not compared).
    Exact,
    /// `different`, `left_only` and `right_only` only (what an incremental backup needs):
    /// subtrees the devices share are skipped without reading them. The runs are exactly
    /// the exact mode's other runs.
    ChangedOnly,
}

/// The runs between `left` and `right` in `mode`, and how many tree nodes the walk read.
pub fn delta_with_stats(
    md: &mut ThinMetadata,
    left: u32,
    right: u32,
    metadata_snap: bool,
    mode: DeltaMode,
) -> Result<(Vec<DeltaRun>, WalkStats)> {
    let a = device_root(md, left, metadata_snap)?;
    let b = device_root(md, right, metadata_snap)?;
    let mut runs = Runs::default();
    let stats = walk::walk(md.tm(), a, b, mode == DeltaMode::Exact, &mut runs)?;
    Ok((runs.0, stats))
}

/// The runs between `left` and `right` in `mode`, from the live trees or the held
/// metadata snapshot.
pub fn runs(
    md: &mut ThinMetadata,
    left: u32,
    right: u32,
    metadata_snap: bool,
    mode: DeltaMode,
) -> Result<Vec<DeltaRun>> {
    Ok(delta_with_stats(md, left, right, metadata_snap, mode)?.0)
}

/// `thin_delta`'s runs: [`runs`] in [`DeltaMode::Exact`].
pub fn delta(
    md: &mut ThinMetadata,
    left: u32,
    right: u32,
    metadata_snap: bool,
) -> Result<Vec<DeltaRun>> {
    runs(md, left, right, metadata_snap, DeltaMode::Exact)
}

/// Writes the runs as `thin_delta` 0.9.0 prints them. On the live trees the header is the
/// live superblock's, with `metadata_snap` when one is held; on the metadata snapshot it is
/// the snapshot copy's (whose data space map is not published: `nr_data_blocks="0"`).
pub fn write_xml(
    md: &mut ThinMetadata,
    left: u32,
    right: u32,
    metadata_snap: bool,
    runs: &[DeltaRun],
    mut out: impl Write,
) -> Result<()> {
    let io = Error::Output;
    let (sb, held) = if metadata_snap {
        (md.metadata_snap()?, None)
    } else {
        (md.superblock().clone(), md.held_root())
    };
    let mut head = format!(
        "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" data_block_size=\"{}\" nr_data_blocks=\"{}\"",
        sb.time, sb.trans_id, sb.data_block_size, sb.data_sm_root.nr_blocks
    );
    if let Some(h) = held {
        head.push_str(&format!(" metadata_snap=\"{h}\""));
    }
    writeln!(out, "{head}>").map_err(io)?;
    writeln!(out, "  <diff left=\"{left}\" right=\"{right}\">").map_err(io)?;
    for r in runs {
        writeln!(
            out,
            "    <{} begin=\"{}\" length=\"{}\"/>",
            r.kind.tag(),
            r.begin,
            r.length
        )
        .map_err(io)?;
    }
    writeln!(out, "  </diff>\n</superblock>").map_err(io)?;
    out.flush().map_err(io)
}

#[cfg(test)]
mod tests;
