//! Raw access to a whole metadata image, for the tests and the fuzzer that damage metadata
//! on purpose: tell a block's kind by its checksum, change fields, and seal the block
//! again, so that the damage gets past the checksum to the code that has to catch it.
//! The engine itself never uses this module.
//!
//! It also defines the fuzzer's input format ([`from_fuzz_input`], [`to_fuzz_input`]): a
//! table of block kinds, then the first blocks of a metadata device. Every block the table
//! names is sealed as that kind before the image is used, so that a mutated block is
//! judged by its contents rather than thrown out for its checksum.

use super::superblock::Superblock;
use crate::pdata::block::{self, Block, BlockKind, BLOCK_SIZE};
use crate::pdata::checksum;
use crate::{Error, Result};

/// A metadata device's bytes, block by block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image(pub Vec<u8>);

impl Image {
    pub fn nr_blocks(&self) -> u64 {
        (self.0.len() / BLOCK_SIZE) as u64
    }

    fn range(&self, b: u64) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(b).ok()?.checked_mul(BLOCK_SIZE)?;
        let end = start.checked_add(BLOCK_SIZE)?;
        (end <= self.0.len()).then_some(start..end)
    }

    pub fn block(&self, b: u64) -> Option<&Block> {
        let r = self.range(b)?;
        self.0[r].try_into().ok()
    }

    pub fn block_mut(&mut self, b: u64) -> Option<&mut Block> {
        let r = self.range(b)?;
        (&mut self.0[r]).try_into().ok()
    }

    /// The kind whose salt the block's checksum carries: None for a block whose checksum
    /// is not valid for any kind (free space, damage).
    pub fn kind(&self, b: u64) -> Option<BlockKind> {
        let blk = self.block(b)?;
        KINDS.into_iter().find(|k| checksum::verify(blk, k.salt()))
    }

    /// Stamps block `b`'s location and checksum as a block of `kind`.
    pub fn seal(&mut self, b: u64, kind: BlockKind) -> Result<()> {
        let blk = self.block_mut(b).ok_or_else(|| beyond(b))?;
        block::seal(blk, b, kind);
        Ok(())
    }

    /// Changes block `b` with `f`, then seals it again as the kind it was; the block must
    /// have a valid checksum to start with (its kind is told by it).
    pub fn edit(&mut self, b: u64, f: impl FnOnce(&mut Block)) -> Result<BlockKind> {
        let kind = self
            .kind(b)
            .ok_or_else(|| Error::corrupt(format!("block {b} has no valid checksum to keep")))?;
        f(self.block_mut(b).ok_or_else(|| beyond(b))?);
        self.seal(b, kind)?;
        Ok(kind)
    }

    /// The superblock at block 0.
    pub fn superblock(&self) -> Result<Superblock> {
        Superblock::unpack(self.block(0).ok_or_else(|| beyond(0))?, 0)
    }

    /// Writes `sb` at block 0, sealed (any field value is written as given).
    pub fn set_superblock(&mut self, sb: &Superblock) -> Result<()> {
        let packed = sb.pack();
        let blk = self.block_mut(0).ok_or_else(|| beyond(0))?;
        blk.copy_from_slice(&packed[..]);
        self.seal(0, BlockKind::Superblock)
    }
}

fn beyond(b: u64) -> Error {
    Error::InvalidArgument(format!("block {b} is beyond the image"))
}

const KINDS: [BlockKind; 4] = [
    BlockKind::Superblock,
    BlockKind::Node,
    BlockKind::Bitmap,
    BlockKind::Index,
];

/// Blocks a fuzz input can give (the kind table has one byte for each), and the size of
/// the metadata device it describes: small, so that an execution copies little. (The
/// engine formats devices of 512 blocks at least, but opens any size; the seeds are pools
/// whose metadata space map was cut to this size.)
pub const FUZZ_MAX_BLOCKS: usize = 64;
pub const FUZZ_DEVICE_BLOCKS: usize = FUZZ_MAX_BLOCKS;

fn kind_code(k: Option<BlockKind>) -> u8 {
    match k {
        None => 0,
        Some(BlockKind::Superblock) => 1,
        Some(BlockKind::Node) => 2,
        Some(BlockKind::Bitmap) => 3,
        Some(BlockKind::Index) => 4,
    }
}

fn code_kind(c: u8) -> Option<BlockKind> {
    match c % 5 {
        1 => Some(BlockKind::Superblock),
        2 => Some(BlockKind::Node),
        3 => Some(BlockKind::Bitmap),
        4 => Some(BlockKind::Index),
        _ => None,
    }
}

/// The metadata device a fuzz input describes: `FUZZ_MAX_BLOCKS` kind bytes (0: leave the
/// block as it is; 1 to 4: seal it as superblock, node, bitmap or index; taken modulo 5),
/// then up to `FUZZ_MAX_BLOCKS` blocks of 4 KiB, zero-filled to a device of
/// `FUZZ_DEVICE_BLOCKS` blocks.
pub fn from_fuzz_input(data: &[u8]) -> Image {
    let (kinds, blocks) = data.split_at(data.len().min(FUZZ_MAX_BLOCKS));
    let mut img = Image(vec![0u8; FUZZ_DEVICE_BLOCKS * BLOCK_SIZE]);
    let n = blocks.len().min(FUZZ_MAX_BLOCKS * BLOCK_SIZE);
    img.0[..n].copy_from_slice(&blocks[..n]);
    for (b, &k) in kinds.iter().enumerate() {
        if let Some(kind) = code_kind(k) {
            // In range: b < FUZZ_MAX_BLOCKS <= FUZZ_DEVICE_BLOCKS.
            let _ = img.seal(b as u64, kind);
        }
    }
    img
}

/// The fuzz input for a metadata image whose blocks past the first `FUZZ_MAX_BLOCKS` are
/// all zero (None otherwise): the inverse of [`from_fuzz_input`] for a valid image of
/// `FUZZ_DEVICE_BLOCKS` blocks, with trailing zero blocks left out.
pub fn to_fuzz_input(img: &Image) -> Option<Vec<u8>> {
    let used = (0..img.nr_blocks())
        .rev()
        .find(|&b| img.block(b).is_some_and(|blk| blk.iter().any(|&x| x != 0)))
        .map_or(0, |b| b as usize + 1);
    if used > FUZZ_MAX_BLOCKS {
        return None;
    }
    let mut out = vec![0u8; FUZZ_MAX_BLOCKS];
    for (b, code) in out.iter_mut().enumerate().take(used) {
        *code = kind_code(img.kind(b as u64));
    }
    out.extend_from_slice(&img.0[..used * BLOCK_SIZE]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_input_round_trip_reseals_damaged_blocks() {
        let mut img = Image(vec![0u8; FUZZ_DEVICE_BLOCKS * BLOCK_SIZE]);
        img.block_mut(3).unwrap()[100] = 7;
        img.seal(3, BlockKind::Bitmap).unwrap();
        img.block_mut(5).unwrap()[200] = 9;
        img.seal(5, BlockKind::Node).unwrap();
        let mut input = to_fuzz_input(&img).unwrap();
        assert_eq!(input.len(), FUZZ_MAX_BLOCKS + 6 * BLOCK_SIZE);
        assert_eq!(from_fuzz_input(&input), img);
        // Damage past the checksum is sealed again, as the same kind.
        input[FUZZ_MAX_BLOCKS + 5 * BLOCK_SIZE + 300] = 1;
        let back = from_fuzz_input(&input);
        assert_eq!(back.kind(5), Some(BlockKind::Node));
        assert_eq!(back.block(5).unwrap()[300], 1);
        assert_eq!(from_fuzz_input(&[]).nr_blocks(), FUZZ_DEVICE_BLOCKS as u64);
    }
}
