#!/usr/bin/env bash
# Checks that the libblkio load generator (bench-blkio/, `vhost-thin-blkio-bench`) reads and
# writes the data its figures claim, against `vhost-thin serve` and QSD raw: a benchmark
# that completed requests without moving data would report fine figures.
#
#   ci/bench-blkio-check.sh [--size SIZE] [--keep]     (default 256MiB)
#
# Against our daemon (a new pool):
#   1. blkio writes the whole disk once (128 KiB sequential, bench/'s stamps: every 512-byte
#      sector holds its number and a magic);
#   2. with the daemon stopped, `vhost-thin thin ls` counts every pool block mapped;
#   3. bench/ (the other generator) reads it all back and verifies every sector;
#   4. blkio reads at random with --expect-written: every sector must hold its own stamp
#      (zeroes fail), and the count of verified sectors must match the bytes read;
#   5. blkio overwrites at random for 2 s (another seed), then bench/ reads the whole disk
#      once and verifies it (stamps carry the sector number: a misdirected write fails).
# Against QSD raw (a new file): blkio writes it once, then the raw file itself is checked
# at 4096 random sectors without any vhost-user frontend.
set -euo pipefail
cd "$(dirname "$0")/.."

size=256MiB
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

cargo build --release --locked -q -p vhost-thin -p vhost-thin-bench -p vhost-thin-blkio-bench
target=$(cargo metadata --format-version 1 --no-deps --locked |
  grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
thin=$target/release/vhost-thin
bench=$target/release/vhost-thin-bench
blkio=$target/release/vhost-thin-blkio-bench
size_bytes=$(python3 -c "
import re, sys; m = re.fullmatch(r'(\d+)\s*([kKmMgGtT]?)(i?[bB])?', sys.argv[1]) or sys.exit('bad size ' + sys.argv[1])
print(int(m.group(1)) << {'': 0, 'k': 10, 'm': 20, 'g': 30, 't': 40}[m.group(2).lower()])" "$size")

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vhost-thin-blkio-check.XXXXXX")
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [ "$keep" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
sock=$work/disk.sock
wait_socket() {
  for _ in $(seq 400); do [ -S "$sock" ] && return 0; sleep 0.05; done
  echo "no socket $sock" >&2; cat "$1" >&2; exit 1
}
stop() { kill -TERM "$pid"; wait "$pid" || true; pid=; rm -f "$sock"; }
jget() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
step() { echo "-- $*"; }
pool() { echo -m "$work/pool.meta" -d "$work/pool.data"; }
start_ours() {
  # shellcheck disable=SC2046 # two options and their paths
  RUST_LOG=warn "$thin" serve $(pool) --disk "id=0,socket=$sock,num-queues=2" >>"$work/ours.log" 2>&1 &
  pid=$!
  wait_socket "$work/ours.log"
}

echo "== vhost-thin serve, $size_bytes bytes"
# shellcheck disable=SC2046
"$thin" pool create $(pool) --data-size "$size_bytes" >/dev/null
# shellcheck disable=SC2046
"$thin" thin create $(pool) --id 0 --size "$size_bytes" --name check >/dev/null
start_ours

step "1. blkio: one sequential 128 KiB write pass over the disk, 2 queues"
"$blkio" --socket "$sock" --json --rw write --bs 128k --iodepth 8 --queues 2 --single-pass \
  --runtime 600 --verify --end-fsync >"$work/1.json"
w=$(jget "$work/1.json" bytes)
[ "$w" = "$size_bytes" ] || fail "blkio wrote $w bytes, not $size_bytes"
echo "   wrote $w bytes"

step "2. every pool block is mapped"
stop
# shellcheck disable=SC2046
mapped=$("$thin" thin ls $(pool) --json | grep -o '"mapped_bytes": *[0-9]*' | grep -o '[0-9]*$')
[ "$mapped" = "$size_bytes" ] || fail "the pool maps $mapped bytes after the pass, not $size_bytes"
echo "   mapped_bytes $mapped"
start_ours

step "3. bench/ reads the whole disk and verifies every sector"
"$bench" --socket "$sock" --json --rw read --bs 128k --iodepth 8 --single-pass --runtime 600 \
  --verify >"$work/3.json" || fail "bench/ verification failed (see above)"
[ "$(jget "$work/3.json" bytes)" = "$size_bytes" ] || fail "bench/ read $(jget "$work/3.json" bytes) bytes"
echo "   read and verified $(jget "$work/3.json" bytes) bytes"

step "4. blkio reads at random, 2 queues, every sector must carry its stamp"
"$blkio" --socket "$sock" --json --rw randread --bs 4k --iodepth 32 --queues 2 --runtime 2 \
  --verify --expect-written >"$work/4.json" || fail "blkio read verification failed"
b=$(jget "$work/4.json" bytes); v=$(jget "$work/4.json" verified_sectors); z=$(jget "$work/4.json" zero_sectors)
[ "$z" = 0 ] && [ "$v" = $((b / 512)) ] && [ "$b" -gt 0 ] ||
  fail "blkio read $b bytes: $v sectors verified, $z zero sectors"
echo "   $b bytes read, all $v sectors held their own stamp"

step "5. blkio overwrites at random for 2 s, bench/ verifies the whole disk"
"$blkio" --socket "$sock" --json --rw randwrite --bs 4k --iodepth 32 --queues 2 --runtime 2 \
  --seed 99 --verify --end-fsync >"$work/5.json"
echo "   blkio wrote $(jget "$work/5.json" writes) x 4 KiB"
"$bench" --socket "$sock" --json --rw read --bs 128k --iodepth 8 --single-pass --runtime 600 \
  --verify >"$work/5r.json" || fail "bench/ verification after blkio's random writes failed"
echo "   bench/ verified $(jget "$work/5r.json" bytes) bytes"
stop

echo "== QSD raw, $size_bytes bytes"
truncate -s "$size_bytes" "$work/disk.raw"
qemu-storage-daemon --blockdev "driver=file,filename=$work/disk.raw,node-name=top,cache.direct=off" \
  --export "type=vhost-user-blk,id=e,node-name=top,addr.type=unix,addr.path=$sock,writable=on,num-queues=2" \
  >>"$work/qsd.log" 2>&1 &
pid=$!
wait_socket "$work/qsd.log"
step "blkio: one sequential 4 KiB write pass, QD32, 2 queues"
"$blkio" --socket "$sock" --json --rw write --bs 4k --iodepth 32 --queues 2 --single-pass \
  --runtime 600 --verify --end-fsync >"$work/q.json"
stop
step "the raw file holds the stamps (read with Python, no frontend)"
python3 - "$work/disk.raw" "$size_bytes" <<'EOF'
import random, struct, sys
path, size = sys.argv[1], int(sys.argv[2])
magic = 0x7668_6f73_7462_656e
rng = random.Random(1)
with open(path, "rb") as f:
    for _ in range(4096):
        s = rng.randrange(size // 512)
        f.seek(s * 512)
        n, m = struct.unpack("<QQ", f.read(16))
        if (n, m) != (s, magic):
            sys.exit(f"FAIL: sector {s} holds {n:#x} {m:#x}")
print("   4096 random sectors of the raw file hold their stamp")
EOF
echo "all checks passed"
