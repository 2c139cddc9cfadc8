//! Space accounting per device: mapped, exclusive (no other device maps the data block)
//! and shared blocks, as `thin_ls` reports them.

use super::metadata::ThinMetadata;
use crate::Result;
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceUsage {
    pub id: u32,
    pub mapped_blocks: u64,
    pub exclusive_blocks: u64,
    pub shared_blocks: u64,
    /// Highest mapped virtual block, if any.
    pub highest_mapped: Option<u64>,
}

/// Walks every device's mappings twice: once to count how many devices map each data
/// block, once to classify. Cost is proportional to the sum of all devices' mappings.
pub fn device_usage(md: &mut ThinMetadata) -> Result<Vec<DeviceUsage>> {
    let ids: Vec<u32> = md.devices().keys().copied().collect();
    let mut owners: HashMap<u64, u32> = HashMap::new();
    for &id in &ids {
        md.for_each_mapping(id, 0, u64::MAX, &mut |_, m| {
            *owners.entry(m.data_block).or_default() += 1;
            Ok(())
        })?;
    }
    let mut out = Vec::with_capacity(ids.len());
    for &id in &ids {
        let mut u = DeviceUsage {
            id,
            ..Default::default()
        };
        md.for_each_mapping(id, 0, u64::MAX, &mut |vb, m| {
            u.mapped_blocks += 1;
            if owners.get(&m.data_block).copied().unwrap_or(0) > 1 {
                u.shared_blocks += 1;
            } else {
                u.exclusive_blocks += 1;
            }
            u.highest_mapped = Some(vb);
            Ok(())
        })?;
        out.push(u);
    }
    Ok(out)
}
