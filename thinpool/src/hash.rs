//! A cheap keyed hasher for the maps on the data path whose keys are integers: the metadata
//! block cache (block numbers) and the cell table (device, block). The standard library's
//! SipHash-1-3 cost about 130 instructions a key, and a 4 KiB read of a mapped block
//! hashed 7 or 8 keys (one per B-tree node visited, three in the cell table): a quarter
//! of the engine's instructions per read (callgrind, `cargo bench -p thinpool --bench
//! readpath`). This one is a multiply and xor-shifts, keyed per map from the standard
//! library's random keys, so which keys collide cannot be chosen from outside the process
//! (a guest picks the blocks it reads, which become cell-table keys). Not a cryptographic
//! hash: the maps it serves are small (the cache holds its capacity, the cell table the
//! requests in flight), so a poor spread would cost time, never correctness.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// Builds [`IntHasher`]s with one random key per map.
#[derive(Clone, Debug)]
pub struct IntHashBuilder {
    key: u64,
}

impl Default for IntHashBuilder {
    fn default() -> Self {
        IntHashBuilder {
            // Fresh random keys per RandomState (seeded once per thread, then incremented).
            key: RandomState::new().hash_one(0u64) | 1,
        }
    }
}

impl BuildHasher for IntHashBuilder {
    type Hasher = IntHasher;
    fn build_hasher(&self) -> IntHasher {
        IntHasher { h: self.key }
    }
}

/// Folds each integer in with a multiply by an odd constant; `finish` mixes the high bits
/// down (hashbrown takes its bucket from the low bits and its tag from the top 7).
#[derive(Clone, Debug)]
pub struct IntHasher {
    h: u64,
}

const K: u64 = 0x9e37_79b9_7f4a_7c15;

impl IntHasher {
    #[inline]
    fn add(&mut self, v: u64) {
        self.h = (self.h.rotate_left(26) ^ v).wrapping_mul(K);
    }
}

impl Hasher for IntHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Not reached by the integer keys it is for; correct for anything else.
        for c in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            self.add(u64::from_le_bytes(b) ^ ((c.len() as u64) << 56));
        }
    }
    #[inline]
    fn write_u32(&mut self, v: u32) {
        self.add(v as u64);
    }
    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // splitmix64's finaliser: every input bit reaches every output bit.
        let mut z = self.h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    #[test]
    fn a_map_with_it_behaves_like_any_map() {
        let mut m: HashMap<(u32, u64), u64, IntHashBuilder> = HashMap::default();
        for d in 0..4u32 {
            for b in 0..1000u64 {
                m.insert((d, b * 16), b);
            }
        }
        assert_eq!(m.len(), 4000);
        assert_eq!(m.get(&(3, 16 * 999)), Some(&999));
        assert_eq!(m.get(&(3, 1)), None);
    }

    #[test]
    fn sequential_and_strided_keys_spread_over_buckets() {
        // Block numbers come sequential or strided; the low 10 bits (the bucket of a
        // 1024-bucket table) of their hashes must still take most values.
        let b = IntHashBuilder::default();
        for stride in [1u64, 16, 1 << 12, 1 << 32] {
            let low: HashSet<u64> = (0..1024u64)
                .map(|i| b.hash_one(i * stride) & 1023)
                .collect();
            assert!(low.len() > 550, "stride {stride}: {} of 1024", low.len());
        }
    }

    #[test]
    fn the_key_differs_between_maps() {
        let (a, b) = (IntHashBuilder::default(), IntHashBuilder::default());
        assert_ne!(a.hash_one(7u64), b.hash_one(7u64));
    }
}
