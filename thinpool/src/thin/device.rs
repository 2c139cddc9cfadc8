//! Device details (24-byte values of the details tree, keyed by thin id) and the packed
//! mapping value of the bottom-level mapping trees.
//!
//! Details: | 0 | 8 | mapped_blocks | 8 | 8 | transaction_id | 16 | 4 | creation_time |
//! | 20 | 4 | snapshotted_time |.
//!
//! Mapping value: `data_block << 24 | time` (data block < 2^40, time < 2^24).

use crate::pdata::block::{get_u32, get_u64, put_u32, put_u64};

pub const DETAILS_SIZE: usize = 24;
pub const MAX_THIN_ID: u32 = (1 << 24) - 1;
pub const MAX_TIME: u32 = (1 << 24) - 1;
pub use crate::pdata::space_map::disk::MAX_DATA_BLOCKS;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceDetails {
    pub mapped_blocks: u64,
    pub transaction_id: u64,
    pub creation_time: u32,
    pub snapshotted_time: u32,
}

impl DeviceDetails {
    pub fn unpack(b: &[u8]) -> Self {
        DeviceDetails {
            mapped_blocks: get_u64(b, 0),
            transaction_id: get_u64(b, 8),
            creation_time: get_u32(b, 16),
            snapshotted_time: get_u32(b, 20),
        }
    }

    pub fn pack(&self) -> [u8; DETAILS_SIZE] {
        let mut b = [0u8; DETAILS_SIZE];
        put_u64(&mut b, 0, self.mapped_blocks);
        put_u64(&mut b, 8, self.transaction_id);
        put_u32(&mut b, 16, self.creation_time);
        put_u32(&mut b, 20, self.snapshotted_time);
        b
    }
}

/// One mapping of a virtual block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub data_block: u64,
    pub time: u32,
}

impl Mapping {
    pub fn pack(&self) -> u64 {
        (self.data_block << 24) | (self.time as u64 & 0xFF_FFFF)
    }

    pub fn unpack(v: u64) -> Self {
        Mapping {
            data_block: v >> 24,
            time: (v & 0xFF_FFFF) as u32,
        }
    }

    /// The block may be shared with a snapshot: it was mapped before the device's last
    /// snapshot (dm-thin's test; conservative, never wrong in the unsafe direction).
    pub fn maybe_shared(&self, details: &DeviceDetails) -> bool {
        details.snapshotted_time > self.time
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing() {
        let m = Mapping {
            data_block: (1 << 40) - 1,
            time: 0xABCDEF,
        };
        assert_eq!(Mapping::unpack(m.pack()), m);
        let d = DeviceDetails {
            mapped_blocks: 10,
            transaction_id: 42,
            creation_time: 1,
            snapshotted_time: 3,
        };
        assert_eq!(DeviceDetails::unpack(&d.pack()), d);
    }
}
