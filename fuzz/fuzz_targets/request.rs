//! Structured fuzzing of the virtio-blk request parser: arbitrary descriptor chains over
//! arbitrary guest memory contents (the shape of cloud-hypervisor's block fuzzer).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vhost_thin::blk::request::{parse, Desc, GuestView, Limits, Op};

#[derive(Arbitrary, Debug)]
struct Input {
    descs: Vec<(u64, u32, bool)>,
    memory: Vec<u8>,
    capacity_sectors: u16,
    read_only: bool,
}

struct Mem<'a>(&'a [u8]);

impl GuestView for Mem<'_> {
    fn contains(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len)
            .is_some_and(|e| e <= self.0.len() as u64)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        if !self.contains(addr, buf.len() as u64) {
            return false;
        }
        buf.copy_from_slice(&self.0[addr as usize..addr as usize + buf.len()]);
        true
    }
}

fuzz_target!(|input: Input| {
    let descs: Vec<Desc> = input
        .descs
        .iter()
        .take(64)
        .map(|&(addr, len, writable)| Desc {
            addr,
            len,
            writable,
        })
        .collect();
    let mem = Mem(&input.memory);
    let limits = Limits {
        capacity_sectors: input.capacity_sectors as u64,
        read_only: input.read_only,
        max_discard_seg: 16,
        max_discard_sectors: 1 << 21,
        max_write_zeroes_seg: 16,
        max_write_zeroes_sectors: 1 << 21,
    };
    let parsed = parse(&descs, &mem, &limits);
    if let Ok(req) = parsed.request {
        assert!(mem.contains(req.status, 1));
        if let Op::Read { offset, data } | Op::Write { offset, data } = &req.op {
            let len: u64 = data.iter().map(|s| s.len as u64).sum();
            assert!(offset + len <= limits.capacity_sectors * 512);
            assert!(data.iter().all(|s| mem.contains(s.addr, s.len as u64)));
        }
    }
});
