#!/usr/bin/env python3
# Is FALLOC_FL_ZERO_RANGE + a 4 KiB write cheaper than one vectored write of the 4 KiB and
# 60 KiB of zeroes, to provision a 64 KiB block that is not a hole (an old, written block)?
# What the pool does for a first write of such a block (thinpool/src/pool.rs,
# write_new_block). Buffered I/O on a 1 GiB file under FILE's directory, N blocks per
# round (at most 16384), 3 rounds; the fdatasync at the end of each round is counted.
#
#   ci/bench-zero-range.py FILE N
import ctypes, os, random, time, sys
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
ZERO_RANGE = 0x10
BS = 64 << 10
path = sys.argv[1]; blocks = 16384; n = min(int(sys.argv[2]), blocks)
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.ftruncate(fd, blocks * BS)
# A data file of old, written blocks (not holes).
chunk = os.urandom(1 << 20)
for off in range(0, blocks * BS, 1 << 20):
    os.pwrite(fd, chunk, off)
os.fdatasync(fd)
data = os.urandom(4096); zeros = bytes(BS - 4096)
def vec(b):
    os.pwritev(fd, [data, zeros], b * BS)
def zr(b):
    if libc.fallocate(fd, ZERO_RANGE, b * BS, BS) != 0:
        raise OSError(ctypes.get_errno(), "fallocate")
    os.pwrite(fd, data, b * BS)
res = {}
for rnd in range(3):
    for name, f in (("pwritev 4K+60K zeroes", vec), ("ZERO_RANGE 64K + pwrite 4K", zr)):
        bl = random.Random(rnd).sample(range(blocks), n)
        t = time.perf_counter()
        for b in bl:
            f(b)
        os.fdatasync(fd)
        dt = time.perf_counter() - t
        res.setdefault(name, []).append(n / dt)
for k, v in res.items():
    print(f"{k}: " + ", ".join(f"{x:.0f}" for x in v) + " blocks/s (incl. fdatasync)")
os.close(fd); os.unlink(path)
