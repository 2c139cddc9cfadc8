//! Space-map bitmap blocks and index entries.
//!
//! Bitmap block layout (4096 bytes):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | checksum (salt 240779) |
//! | 4 | 4 | unused, zero |
//! | 8 | 8 | own block number |
//! | 16 | 4080 | 16320 two-bit reference counts |
//!
//! Entry `j` lives in byte `16 + j/4`; bit `2*(j%4)` holds the *high* bit of the count and
//! bit `2*(j%4)+1` the low bit. 0 = free, 1, 2, 3 = "3 or more, see the overflow tree".
//!
//! Index entry (16 bytes): bitmap block number (u64), number of zero entries counted over
//! all 16320 (u32), and a lower bound of the first free entry (u32).

use crate::pdata::block::{get_u32, get_u64, put_u32, put_u64, Block};

pub const ENTRIES_PER_BITMAP: u64 = 16320;
pub const BITMAP_BYTES: usize = 4080;
pub const BITMAP_HEADER: usize = 16;
pub const INDEX_ENTRY_SIZE: usize = 16;

/// Two-bit counts of one bitmap, as 64-bit words (32 entries per word, 510 words).
pub type Words = [u64; BITMAP_BYTES / 8];

pub fn zero_words() -> Box<Words> {
    Box::new([0u64; BITMAP_BYTES / 8])
}

#[inline]
pub fn get(words: &Words, j: usize) -> u8 {
    let w = words[j / 32];
    let shift = 2 * (j % 32);
    let hi = (w >> shift) & 1;
    let lo = (w >> (shift + 1)) & 1;
    ((hi << 1) | lo) as u8
}

#[inline]
pub fn set(words: &mut Words, j: usize, v: u8) {
    let shift = 2 * (j % 32);
    let w = &mut words[j / 32];
    *w &= !(3u64 << shift);
    let hi = ((v >> 1) & 1) as u64;
    let lo = (v & 1) as u64;
    *w |= (hi << shift) | (lo << (shift + 1));
}

/// Mask with bit `2k` set for every entry `k` of the word that is non-zero.
#[inline]
pub fn used_mask(w: u64) -> u64 {
    (w | (w >> 1)) & 0x5555_5555_5555_5555
}

pub fn unpack(block: &Block) -> Box<Words> {
    let mut words = zero_words();
    for (i, w) in words.iter_mut().enumerate() {
        *w = get_u64(block, BITMAP_HEADER + i * 8);
    }
    words
}

pub fn pack(words: &Words, block: &mut Block) {
    block.fill(0);
    for (i, w) in words.iter().enumerate() {
        put_u64(block, BITMAP_HEADER + i * 8, *w);
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexEntry {
    pub blocknr: u64,
    pub nr_free: u32,
    pub none_free_before: u32,
}

impl IndexEntry {
    pub fn unpack(b: &[u8]) -> Self {
        IndexEntry {
            blocknr: get_u64(b, 0),
            nr_free: get_u32(b, 8),
            none_free_before: get_u32(b, 12),
        }
    }

    pub fn pack(&self) -> [u8; INDEX_ENTRY_SIZE] {
        let mut b = [0u8; INDEX_ENTRY_SIZE];
        put_u64(&mut b, 0, self.blocknr);
        put_u32(&mut b, 8, self.nr_free);
        put_u32(&mut b, 12, self.none_free_before);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_order_matches_the_kernel() {
        // Four entries with count 1 pack to 0xAA; count 2 to 0x55; (1,0,0,0) to 0x02.
        let mut w = zero_words();
        for j in 0..4 {
            set(&mut w, j, 1);
        }
        let mut b = [0u8; 4096];
        pack(&w, &mut b);
        assert_eq!(b[16], 0xAA);
        let mut w = zero_words();
        for j in 0..4 {
            set(&mut w, j, 2);
        }
        pack(&w, &mut b);
        assert_eq!(b[16], 0x55);
        let mut w = zero_words();
        set(&mut w, 0, 1);
        pack(&w, &mut b);
        assert_eq!(b[16], 0x02);
        set(&mut w, 0, 2);
        pack(&w, &mut b);
        assert_eq!(b[16], 0x01);
        let w2 = unpack(&b);
        assert_eq!(get(&w2, 0), 2);
        for v in 0..4 {
            set(&mut w, 16319, v);
            assert_eq!(get(&w, 16319), v);
        }
    }
}
