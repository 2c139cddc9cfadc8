//! CRC-32C block checksums with dm-thin's per-block-type salts.
//!
//! The stored checksum of a 4096-byte metadata block is the CRC-32C register run over bytes
//! 4..4096 from 0xFFFFFFFF *without* the final inversion, XOR the block type's salt. With a
//! standard (inverting) CRC-32C that is `crc32c(bytes[4..]) ^ 0xFFFFFFFF ^ salt`.

pub const SUPERBLOCK_SALT: u32 = 160_774;
pub const BTREE_NODE_SALT: u32 = 121_107;
pub const BITMAP_SALT: u32 = 240_779;
pub const INDEX_SALT: u32 = 160_478;

/// The raw (non-inverted) CRC-32C register over the block body.
pub fn raw_crc(block: &[u8]) -> u32 {
    crc32c::crc32c(&block[4..]) ^ 0xFFFF_FFFF
}

/// The checksum to store at offset 0 of a block of the type with `salt`.
pub fn block_checksum(block: &[u8], salt: u32) -> u32 {
    raw_crc(block) ^ salt
}

pub fn stored_checksum(block: &[u8]) -> u32 {
    u32::from_le_bytes(block[0..4].try_into().unwrap())
}

/// Fills in the checksum field of `block`.
pub fn seal(block: &mut [u8], salt: u32) {
    let c = block_checksum(block, salt);
    block[0..4].copy_from_slice(&c.to_le_bytes());
}

pub fn verify(block: &[u8], salt: u32) -> bool {
    stored_checksum(block) == block_checksum(block, salt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_from_the_format_spec() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let zero = [0u8; 4096];
        assert_eq!(raw_crc(&zero), 0x58CD_A791);
        assert_eq!(block_checksum(&zero, SUPERBLOCK_SALT), 0x58CF_D397);
        assert_eq!(block_checksum(&zero, BTREE_NODE_SALT), 0x58CC_7E82);
        assert_eq!(block_checksum(&zero, BITMAP_SALT), 0x58CE_0B1A);
        assert_eq!(block_checksum(&zero, INDEX_SALT), 0x58CF_D54F);
    }

    #[test]
    fn seal_then_verify() {
        let mut b = [7u8; 4096];
        seal(&mut b, BITMAP_SALT);
        assert!(verify(&b, BITMAP_SALT));
        assert!(!verify(&b, INDEX_SALT));
        b[100] ^= 1;
        assert!(!verify(&b, BITMAP_SALT));
    }
}
