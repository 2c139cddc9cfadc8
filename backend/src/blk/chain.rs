//! A descriptor chain read from its head index, for the requests a new backend executes
//! again from the inflight records (their heads are no longer at avail ring positions it
//! pops). virtio-queue builds chains only from the avail ring (`DescriptorChain::new` is
//! crate-private), so the table is walked here, with the limits its parser applies and a
//! typed error where it would stop short: the chain is the guest's, and a hostile guest
//! must get an error, never a panic or an endless walk.

use super::request::Desc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// One descriptor: addr u64, len u32, flags u16, next u16 (little-endian).
const DESC_LEN: u64 = 16;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("head {head} is not below the queue size {size}")]
    Head { head: u16, size: u16 },
    #[error("descriptor {index} is not below the table size {size}")]
    Next { index: u16, size: u16 },
    #[error("descriptor {index} at {addr:#x} is not in guest memory")]
    Unreadable { index: u16, addr: u64 },
    #[error("the chain is longer than its table ({size} entries): a loop")]
    Loop { size: u16 },
    #[error("an indirect table inside an indirect table")]
    NestedIndirect,
    #[error("an indirect table of {len} bytes (a multiple of 16, 16 bytes to 512 KiB)")]
    IndirectLen { len: u32 },
    #[error("the indirect table at {addr:#x} ({len} bytes) is not in guest memory")]
    IndirectOutside { addr: u64, len: u32 },
    #[error("the chain's buffers add up to more than 4 GiB")]
    TooLong,
}

/// The descriptors of the chain at `head` in the table at `table` of a queue of `size`
/// entries.
pub fn walk(
    mem: &GuestMemoryMmap,
    table: u64,
    size: u16,
    head: u16,
) -> Result<Vec<Desc>, ChainError> {
    if head >= size {
        return Err(ChainError::Head { head, size });
    }
    let mut out = Vec::new();
    let (mut table, mut size, mut index) = (table, size, head);
    // Descriptors left before the chain must have ended: each table holds each of its
    // entries once at most, so a longer chain goes round a loop.
    let mut ttl = size;
    let mut indirect = false;
    let mut total: u32 = 0;
    loop {
        if index >= size {
            return Err(ChainError::Next { index, size });
        }
        if ttl == 0 {
            return Err(ChainError::Loop { size });
        }
        ttl -= 1;
        let addr = table
            .checked_add(u64::from(index) * DESC_LEN)
            .ok_or(ChainError::Unreadable { index, addr: table })?;
        let mut raw = [0u8; DESC_LEN as usize];
        mem.read_slice(&mut raw, GuestAddress(addr))
            .map_err(|_| ChainError::Unreadable { index, addr })?;
        let d_addr = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes(raw[12..14].try_into().expect("2 bytes"));
        let next = u16::from_le_bytes(raw[14..16].try_into().expect("2 bytes"));
        if flags & F_INDIRECT != 0 {
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            // At most a whole queue's worth of descriptors (virtio 1.2, 2.7.5.3.1: a
            // driver must not make a table longer than the queue; 32768 is the largest).
            if len == 0 || len % DESC_LEN as u32 != 0 || len / DESC_LEN as u32 > 32768 {
                return Err(ChainError::IndirectLen { len });
            }
            if !GuestMemoryBackend::check_range(mem, GuestAddress(d_addr), len as usize) {
                return Err(ChainError::IndirectOutside { addr: d_addr, len });
            }
            indirect = true;
            table = d_addr;
            size = (len / DESC_LEN as u32) as u16; // 1 to 32768: fits
            ttl = size;
            index = 0;
            continue;
        }
        total = total.checked_add(len).ok_or(ChainError::TooLong)?;
        out.push(Desc {
            addr: d_addr,
            len,
            writable: flags & F_WRITE != 0,
        });
        if flags & F_NEXT == 0 {
            return Ok(out);
        }
        index = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(mem: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn a_chain_is_read_from_its_head_through_an_indirect_table() {
        let m = mem();
        put(&m, 0x1000, 3, 0x10000, 16, F_NEXT, 5);
        put(&m, 0x1000, 5, 0x2000, 32, F_INDIRECT, 0);
        put(&m, 0x2000, 0, 0x11000, 512, F_NEXT, 1);
        put(&m, 0x2000, 1, 0x12000, 1, F_WRITE, 0);
        let d = walk(&m, 0x1000, 8, 3).unwrap();
        assert_eq!(
            d,
            vec![
                Desc {
                    addr: 0x10000,
                    len: 16,
                    writable: false
                },
                Desc {
                    addr: 0x11000,
                    len: 512,
                    writable: false
                },
                Desc {
                    addr: 0x12000,
                    len: 1,
                    writable: true
                },
            ]
        );
    }

    #[test]
    fn hostile_chains_are_errors() {
        let m = mem();
        assert_eq!(
            walk(&m, 0x1000, 8, 8),
            Err(ChainError::Head { head: 8, size: 8 })
        );
        // A loop: 0 → 1 → 0.
        put(&m, 0x1000, 0, 0x10000, 16, F_NEXT, 1);
        put(&m, 0x1000, 1, 0x10000, 16, F_NEXT, 0);
        assert_eq!(walk(&m, 0x1000, 8, 0), Err(ChainError::Loop { size: 8 }));
        // Next beyond the table.
        put(&m, 0x1000, 1, 0x10000, 16, F_NEXT, 9);
        assert_eq!(
            walk(&m, 0x1000, 8, 0),
            Err(ChainError::Next { index: 9, size: 8 })
        );
        // A table outside guest memory.
        assert!(matches!(
            walk(&m, (1 << 20) - 16, 8, 2),
            Err(ChainError::Unreadable { .. })
        ));
        // Indirect tables: nested, of a bad length, outside memory, looping.
        put(&m, 0x1000, 2, 0x2000, 32, F_INDIRECT, 0);
        put(&m, 0x2000, 0, 0x3000, 16, F_INDIRECT, 0);
        assert_eq!(walk(&m, 0x1000, 8, 2), Err(ChainError::NestedIndirect));
        put(&m, 0x1000, 2, 0x2000, 24, F_INDIRECT, 0);
        assert_eq!(
            walk(&m, 0x1000, 8, 2),
            Err(ChainError::IndirectLen { len: 24 })
        );
        put(&m, 0x1000, 2, (1 << 20) - 16, 32, F_INDIRECT, 0);
        assert!(matches!(
            walk(&m, 0x1000, 8, 2),
            Err(ChainError::IndirectOutside { .. })
        ));
        put(&m, 0x1000, 2, 0x2000, 32, F_INDIRECT, 0);
        put(&m, 0x2000, 0, 0x3000, 16, F_NEXT, 1);
        put(&m, 0x2000, 1, 0x3000, 16, F_NEXT, 0);
        assert_eq!(walk(&m, 0x1000, 8, 2), Err(ChainError::Loop { size: 2 }));
        // More than 4 GiB of buffers.
        put(&m, 0x1000, 4, 0x10000, u32::MAX, F_NEXT, 5);
        put(&m, 0x1000, 5, 0x10000, 2, 0, 0);
        assert_eq!(walk(&m, 0x1000, 8, 4), Err(ChainError::TooLong));
    }
}
