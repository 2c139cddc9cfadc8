//! Metadata blocks: 4096 bytes, each starting with a checksum (offset 0) and its own block
//! number (offset 8). Little-endian helpers for the packed on-disk structures.

use super::checksum;
use std::fmt;

pub const BLOCK_SIZE: usize = 4096;
pub const SECTOR_SIZE: u64 = 512;

pub type Block = [u8; BLOCK_SIZE];

pub fn zeroed() -> Box<Block> {
    Box::new([0u8; BLOCK_SIZE])
}

/// The four kinds of metadata block, told apart by their checksum salt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockKind {
    Superblock,
    Node,
    Bitmap,
    Index,
}

impl BlockKind {
    pub fn salt(self) -> u32 {
        match self {
            BlockKind::Superblock => checksum::SUPERBLOCK_SALT,
            BlockKind::Node => checksum::BTREE_NODE_SALT,
            BlockKind::Bitmap => checksum::BITMAP_SALT,
            BlockKind::Index => checksum::INDEX_SALT,
        }
    }
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockKind::Superblock => "superblock",
            BlockKind::Node => "btree node",
            BlockKind::Bitmap => "space map bitmap",
            BlockKind::Index => "space map index",
        })
    }
}

#[inline]
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

#[inline]
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

#[inline]
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

#[inline]
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Stamps the block's own location and checksum, as done at write-out.
pub fn seal(block: &mut Block, location: u64, kind: BlockKind) {
    put_u64(block, 8, location);
    checksum::seal(block, kind.salt());
}

/// Validates checksum and self-location of a block read from `location`.
pub fn validate(block: &Block, location: u64, kind: BlockKind) -> crate::Result<()> {
    if !checksum::verify(block, kind.salt()) {
        return Err(crate::Error::Checksum {
            block: location,
            kind,
        });
    }
    let found = get_u64(block, 8);
    if found != location {
        return Err(crate::Error::WrongLocation {
            block: location,
            kind,
            found,
        });
    }
    Ok(())
}
