//! Changed blocks between two thin devices, in `thin_delta`'s terms: runs of virtual blocks
//! that both map to the same data block (`same`), to different ones (`different`), or that
//! only one maps (`left_only`, `right_only`). Computed from the mapping trees alone — no
//! data is read — on the live metadata or on the held metadata snapshot.
//!
//! Output: the XML of `thin_delta` 0.9.0 (non-verbose), or the runs for programs.

use crate::pdata::btree::{self, node, ValueKind};
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

/// (virtual block, data block) of every mapping of `dev`, in order.
fn mappings(md: &mut ThinMetadata, top_root: u64, dev: u32) -> Result<Vec<(u64, u64)>> {
    let root = btree::lookup_u64(md.tm(), top_root, dev as u64, ValueKind::Subtree)?
        .ok_or(Error::NoSuchDevice(dev))?;
    let mut out = Vec::new();
    btree::for_each_leaf(md.tm(), root, ValueKind::Data, &mut |n| {
        for i in 0..node::nr_entries(n) {
            out.push((node::key(n, i), node::value_u64(n, i) >> 24));
        }
        Ok(())
    })?;
    Ok(out)
}

/// The runs between `left` and `right`, from the live trees or the held metadata snapshot.
pub fn delta(
    md: &mut ThinMetadata,
    left: u32,
    right: u32,
    metadata_snap: bool,
) -> Result<Vec<DeltaRun>> {
    let top = if metadata_snap {
        md.metadata_snap()?.mapping_root
    } else {
        md.superblock().mapping_root
    };
    let a = mappings(md, top, left)?;
    let b = mappings(md, top, right)?;
    let mut runs: Vec<DeltaRun> = Vec::new();
    let mut push = |kind: DeltaKind, vb: u64| match runs.last_mut() {
        Some(r) if r.kind == kind && r.begin + r.length == vb => r.length += 1,
        _ => runs.push(DeltaRun {
            kind,
            begin: vb,
            length: 1,
        }),
    };
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(&(va, da)), Some(&(vb, db))) if va == vb => {
                push(
                    if da == db {
                        DeltaKind::Same
                    } else {
                        DeltaKind::Different
                    },
                    va,
                );
                i += 1;
                j += 1;
            }
            (Some(&(va, _)), Some(&(vb, _))) if va < vb => {
                push(DeltaKind::LeftOnly, va);
                i += 1;
            }
            (Some(&(va, _)), None) => {
                push(DeltaKind::LeftOnly, va);
                i += 1;
            }
            (_, Some(&(vb, _))) => {
                push(DeltaKind::RightOnly, vb);
                j += 1;
            }
            (None, None) => unreachable!("loop condition"),
        }
    }
    Ok(runs)
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
    let io = |e: std::io::Error| Error::InvalidArgument(format!("writing the delta: {e}"));
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
mod tests {
    use super::*;
    use crate::storage::MemStorage;
    use crate::thin::metadata::MetadataOptions;
    use std::sync::Arc;

    #[test]
    fn runs_break_at_kind_changes_and_gaps() {
        let mut md = ThinMetadata::format(
            Arc::new(MemStorage::new(4 << 20)),
            128,
            100,
            MetadataOptions::default(),
        )
        .unwrap();
        md.create_thin(0).unwrap();
        for vb in [0u64, 1, 2, 5, 6] {
            let d = md.alloc_data_block().unwrap();
            md.insert_mapping(0, vb, d).unwrap();
        }
        md.create_snap(1, 0).unwrap();
        for vb in [1u64, 2, 9] {
            let d = md.alloc_data_block().unwrap();
            md.insert_mapping(1, vb, d).unwrap();
        }
        md.remove_range(1, 6, 7).unwrap();
        let runs = delta(&mut md, 0, 1, false).unwrap();
        let k = |kind, begin, length| DeltaRun {
            kind,
            begin,
            length,
        };
        assert_eq!(
            runs,
            vec![
                k(DeltaKind::Same, 0, 1),
                k(DeltaKind::Different, 1, 2),
                k(DeltaKind::Same, 5, 1),
                k(DeltaKind::LeftOnly, 6, 1),
                k(DeltaKind::RightOnly, 9, 1),
            ]
        );
        assert!(matches!(
            delta(&mut md, 0, 7, false),
            Err(Error::NoSuchDevice(7))
        ));
    }
}
