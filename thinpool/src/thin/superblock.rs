//! The dm-thin superblock (block 0; 364 bytes used, the rest zero).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | checksum (salt 160774) over bytes 4..4096 |
//! | 4 | 4 | flags: bit 0 = NEEDS_CHECK |
//! | 8 | 8 | own block number (0; a metadata snapshot copy holds its own location) |
//! | 16 | 16 | uuid (zero) |
//! | 32 | 8 | magic 27022010 |
//! | 40 | 4 | version (2) |
//! | 44 | 4 | time: snapshot counter |
//! | 48 | 8 | transaction id (set by userspace, compare-and-swap) |
//! | 56 | 8 | held_root: block of the metadata snapshot copy, 0 = none |
//! | 64 | 128 | data space map root |
//! | 192 | 128 | metadata space map root |
//! | 320 | 8 | mapping tree root (top level, keyed by thin id) |
//! | 328 | 8 | device details tree root |
//! | 336 | 4 | data block size in 512-byte sectors |
//! | 340 | 4 | metadata block size in sectors (8) |
//! | 344 | 8 | metadata device size in blocks at format time |
//! | 352 | 12 | compat, compat_ro, incompat flags (all zero) |
//!
//! The superblock fits in the first 512-byte sector, so a torn write of block 0 that got
//! its first sector to disk still leaves a whole, valid superblock.

use crate::pdata::block::{self, get_u32, get_u64, put_u32, put_u64, Block, BlockKind};
use crate::pdata::space_map::root::SmRoot;
use crate::{Error, Result};

pub const MAGIC: u64 = 27_022_010;
/// The version every commit writes.
pub const VERSION: u32 = 2;
/// The oldest version read.
pub const MIN_VERSION: u32 = 1;
pub const NEEDS_CHECK: u32 = 1;
pub const METADATA_BLOCK_SECTORS: u32 = 8;
pub const MIN_DATA_BLOCK_SECTORS: u32 = 128;
pub const MAX_DATA_BLOCK_SECTORS: u32 = 2_097_152;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Superblock {
    pub flags: u32,
    pub blocknr: u64,
    pub uuid: [u8; 16],
    pub version: u32,
    pub time: u32,
    pub trans_id: u64,
    pub held_root: u64,
    pub data_sm_root: SmRoot,
    pub metadata_sm_root: SmRoot,
    pub mapping_root: u64,
    pub details_root: u64,
    pub data_block_size: u32,
    pub metadata_block_size: u32,
    pub metadata_nr_blocks: u64,
    pub compat_flags: u32,
    pub compat_ro_flags: u32,
    pub incompat_flags: u32,
}

impl Superblock {
    pub fn needs_check(&self) -> bool {
        self.flags & NEEDS_CHECK != 0
    }

    /// Decodes and validates a superblock read from `location`.
    pub fn unpack(b: &Block, location: u64) -> Result<Self> {
        if get_u64(b, 32) != MAGIC {
            return Err(Error::NotThinMetadata(format!(
                "block {location} has magic {}, not {MAGIC}",
                get_u64(b, 32)
            )));
        }
        block::validate(b, location, BlockKind::Superblock)?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let sb = Superblock {
            flags: get_u32(b, 4),
            blocknr: get_u64(b, 8),
            uuid,
            version: get_u32(b, 40),
            time: get_u32(b, 44),
            trans_id: get_u64(b, 48),
            held_root: get_u64(b, 56),
            data_sm_root: SmRoot::unpack(&b[64..192]),
            metadata_sm_root: SmRoot::unpack(&b[192..320]),
            mapping_root: get_u64(b, 320),
            details_root: get_u64(b, 328),
            data_block_size: get_u32(b, 336),
            metadata_block_size: get_u32(b, 340),
            metadata_nr_blocks: get_u64(b, 344),
            compat_flags: get_u32(b, 352),
            compat_ro_flags: get_u32(b, 356),
            incompat_flags: get_u32(b, 360),
        };
        // Versions 1 and 2 differ only in the meaning of the needs_check flag; a later one
        // may mean anything. (The kernel has defined no feature flag: any incompatible one
        // makes it refuse the pool, as here; compat_ro ones refuse writing, see
        // ThinMetadata::open.)
        if !(MIN_VERSION..=VERSION).contains(&sb.version) {
            return Err(Error::Unsupported(format!(
                "metadata version {} (versions {MIN_VERSION} to {VERSION} are supported)",
                sb.version
            )));
        }
        if sb.incompat_flags != 0 {
            return Err(Error::Unsupported(format!(
                "incompatible feature flags {:#x}",
                sb.incompat_flags
            )));
        }
        if sb.metadata_block_size != METADATA_BLOCK_SECTORS {
            return Err(Error::corrupt(format!(
                "metadata block size is {} sectors, only 8 is supported",
                sb.metadata_block_size
            )));
        }
        if location == 0 {
            check_data_block_size(sb.data_block_size).map_err(|e| Error::corrupt(e.to_string()))?;
        }
        Ok(sb)
    }

    /// Tells one committed superblock from another: a hash of every field but the flags
    /// (which change outside commits: needs_check). Two commits that changed anything
    /// differ, as a commit shadows its roots into blocks free at the one before.
    pub fn ident(&self) -> u64 {
        let mut copy = self.clone();
        copy.flags = 0;
        copy.pack().iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
    }

    pub fn pack(&self) -> Box<Block> {
        let mut b = block::zeroed();
        put_u32(&mut b[..], 4, self.flags);
        put_u64(&mut b[..], 8, self.blocknr);
        b[16..32].copy_from_slice(&self.uuid);
        put_u64(&mut b[..], 32, MAGIC);
        put_u32(&mut b[..], 40, self.version);
        put_u32(&mut b[..], 44, self.time);
        put_u64(&mut b[..], 48, self.trans_id);
        put_u64(&mut b[..], 56, self.held_root);
        self.data_sm_root.pack(&mut b[64..192]);
        self.metadata_sm_root.pack(&mut b[192..320]);
        put_u64(&mut b[..], 320, self.mapping_root);
        put_u64(&mut b[..], 328, self.details_root);
        put_u32(&mut b[..], 336, self.data_block_size);
        put_u32(&mut b[..], 340, self.metadata_block_size);
        put_u64(&mut b[..], 344, self.metadata_nr_blocks);
        put_u32(&mut b[..], 352, self.compat_flags);
        put_u32(&mut b[..], 356, self.compat_ro_flags);
        put_u32(&mut b[..], 360, self.incompat_flags);
        b
    }
}

/// Data block sizes dm-thin accepts: 64 KiB to 1 GiB, a multiple of 64 KiB.
pub fn check_data_block_size(sectors: u32) -> Result<()> {
    if !(MIN_DATA_BLOCK_SECTORS..=MAX_DATA_BLOCK_SECTORS).contains(&sectors)
        || sectors % MIN_DATA_BLOCK_SECTORS != 0
    {
        return Err(Error::InvalidArgument(format!(
            "data block size {} bytes: must be 64 KiB to 1 GiB and a multiple of 64 KiB",
            sectors as u64 * 512
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_pool_bytes_match_the_spec_example() {
        // §20.1 of the format notes: a 4 MiB metadata device, 64 KiB blocks, k = 1.
        let sb = Superblock {
            version: 2,
            data_sm_root: SmRoot {
                nr_blocks: 0,
                nr_allocated: 0,
                bitmap_root: 4,
                ref_count_root: 5,
            },
            metadata_sm_root: SmRoot {
                nr_blocks: 1024,
                nr_allocated: 8,
                bitmap_root: 1,
                ref_count_root: 2,
            },
            mapping_root: 6,
            details_root: 7,
            data_block_size: 128,
            metadata_block_size: 8,
            metadata_nr_blocks: 1024,
            ..Default::default()
        };
        let mut b = sb.pack();
        block::seal(&mut b, 0, BlockKind::Superblock);
        assert_eq!(get_u32(&b[..], 0), 0xCAFF_9186);
        assert_eq!(Superblock::unpack(&b, 0).unwrap(), sb);
        b[40] = 9;
        assert!(matches!(
            Superblock::unpack(&b, 0),
            Err(Error::Checksum { .. })
        ));
    }
}
