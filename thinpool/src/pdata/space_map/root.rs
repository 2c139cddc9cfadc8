//! The 32-byte space-map root stored in the superblock (in a 128-byte field).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | nr_blocks |
//! | 8 | 8 | nr_allocated (blocks with a non-zero count) |
//! | 16 | 8 | bitmap_root: data sm → index B-tree root; metadata sm → index block |
//! | 24 | 8 | ref_count_root: overflow B-tree root |

use crate::pdata::block::{get_u64, put_u64};

pub const ROOT_FIELD_SIZE: usize = 128;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmRoot {
    pub nr_blocks: u64,
    pub nr_allocated: u64,
    pub bitmap_root: u64,
    pub ref_count_root: u64,
}

impl SmRoot {
    pub fn unpack(b: &[u8]) -> Self {
        SmRoot {
            nr_blocks: get_u64(b, 0),
            nr_allocated: get_u64(b, 8),
            bitmap_root: get_u64(b, 16),
            ref_count_root: get_u64(b, 24),
        }
    }

    pub fn pack(&self, b: &mut [u8]) {
        b[..ROOT_FIELD_SIZE].fill(0);
        put_u64(b, 0, self.nr_blocks);
        put_u64(b, 8, self.nr_allocated);
        put_u64(b, 16, self.bitmap_root);
        put_u64(b, 24, self.ref_count_root);
    }
}
