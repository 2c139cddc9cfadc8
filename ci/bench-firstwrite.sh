#!/usr/bin/env bash
# First writes that really provision, ours against qemu-storage-daemon (QSD), and the
# space a discard gives back to the host. Both backends are driven over vhost-user-blk by
# the same load generator (bench/, `vhost-thin-bench`), no VM.
#
#   ci/bench-firstwrite.sh [--runtime SECS] [--rounds N] [--size SIZE] [--discard SIZE] [--keep]
#
#   --runtime S    seconds per round and backend (default 5)
#   --rounds N     rounds, ours and QSD interleaved (default 3; 0: the discard line only)
#   --size SIZE    the fresh disk of each round (default 64GiB: with 64 KiB blocks and
#                  4 KiB writes at random offsets almost every write is the first of its
#                  block; on 1 GiB every block is provisioned after 16384 writes)
#   --discard SIZE written, then discarded, for the discard line (default 1GiB)
#   --keep         keep the work directory
#
# Each round: a new pool (`pool create`, a sparse data file) and a new qcow2 image with 64
# KiB clusters (`qemu-img create -f qcow2 -o cluster_size=65536`), each served with one
# queue and written with 4 KiB at random offsets, QD32, verified, ending with a FLUSH.
# QSD runs with cache.direct=off (our daemon does buffered I/O too). Then the discard line:
# SIZE written sequentially on a fresh disk, FLUSH, `du` of the data file; DISCARD of it,
# FLUSH, `du` again once the space is back or 30 s have passed (ours gives it back after
# the commit, on a thread of its own), with how long after the FLUSH that was (QSD: qcow2
# and file nodes with discard=unmap).
# Environment: CARGO_TARGET_DIR, BENCH_DIR (parent of the work directory, default
# /var/tmp), BENCH_SEED.
set -euo pipefail
cd "$(dirname "$0")/.."

name=firstwrite
size=64GiB
runtime=5
rounds=3
discard=1GiB
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --runtime) runtime=$2; shift ;;
    --rounds) rounds=$2; shift ;;
    --size) size=$2; shift ;;
    --discard) discard=$2; shift ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
seed=${BENCH_SEED:-1}
for t in qemu-storage-daemon qemu-img; do
  command -v "$t" >/dev/null || { echo "bench-firstwrite: $t is missing (apt-get install qemu-system-common qemu-utils)" >&2; exit 2; }
done

# shellcheck source=ci/bench-lib.sh
. ci/bench-lib.sh
discard_bytes=$(python3 -c "
import re, sys; m = re.fullmatch(r'(\d+)\s*([kKmMgGtT]?)(i?[bB])?', sys.argv[1]) or sys.exit('bad size ' + sys.argv[1])
print(int(m.group(1)) << {'': 0, 'k': 10, 'm': 20, 'g': 30, 't': 40}[m.group(2).lower()])" "$discard")

new_ours() {
  rm -f "$work"/pool.*
  "$thin" pool create -m "$work/pool.meta" -d "$work/pool.data" --data-size "$size_bytes" >/dev/null
  "$thin" thin create -m "$work/pool.meta" -d "$work/pool.data" --id 0 --size "$size_bytes" --name bench >/dev/null
}
start_ours() {
  rm -f "$sock"
  RUST_LOG=warn "$thin" serve -m "$work/pool.meta" -d "$work/pool.data" \
    --disk "id=0,socket=$sock,num-queues=1" >>"$work/ours.log" 2>&1 &
  pid=$!
  wait_socket "$sock" "$work/ours.log"
}
new_qsd() {
  rm -f "$work/empty.qcow2"
  qemu-img create -q -f qcow2 -o cluster_size=65536 "$work/empty.qcow2" "$size_bytes"
}
start_qsd() { # [discard=unmap]
  local d=${1:+,$1}
  rm -f "$sock"
  qemu-storage-daemon \
    --blockdev "driver=file,filename=$work/empty.qcow2,node-name=f,cache.direct=off$d" \
    --blockdev "driver=qcow2,file=f,node-name=top$d" \
    --export "type=vhost-user-blk,id=e,node-name=top,addr.type=unix,addr.path=$sock,writable=on,num-queues=1" \
    >>"$work/qsd.log" 2>&1 &
  pid=$!
  wait_socket "$sock" "$work/qsd.log"
}
first_writes() { # OUT
  "$bench" --socket "$sock" --json --seed "$seed" --rw randwrite --bs 4k --iodepth 32 \
    --queues 1 --runtime "$runtime" --verify --end-fsync >"$1" 2>"$1.err" ||
    { echo "bench-firstwrite: the load failed:" >&2; cat "$1.err" >&2; exit 1; }
}
line() { # NAME OUT [EXTRA]
  printf '  %-6s %8.0f IOPS  mean %7.1f us  p99 %8.1f us  FLUSH %7.1f ms%s\n' "$1" \
    "$(jget "$2" iops)" "$(jget "$2" lat_mean_us)" "$(jget "$2" lat_p99_us)" "$(jget "$2" flush_ms)" "${3:-}"
}

echo "machine: $(nproc) CPUs, $(uname -r); load:$(uptime | sed 's/.*load average//')"
echo "work dir $work on $(df -T "$work" | awk 'NR == 2 { print $2 }'); QSD $(qemu-storage-daemon --version | head -1)"
echo "first writes: fresh $size_bytes-byte disk each round, 4 KiB random writes, QD32, 1 queue, $runtime s, verified"
for r in $(seq "$rounds"); do
  echo "round $r"
  new_ours; start_ours
  first_writes "$work/ours-$r.json"
  stop
  mapped=$("$thin" thin ls -m "$work/pool.meta" -d "$work/pool.data" --json |
    grep -o '"mapped_blocks": *[0-9]*' | grep -o '[0-9]*$')
  writes=$(jget "$work/ours-$r.json" writes)
  line ours "$work/ours-$r.json" "$(awk -v m="$mapped" -v w="$writes" 'BEGIN {
    printf "  (%d writes, %d blocks provisioned: %.1f%% first writes)", w, m, 100 * m / w }')"
  new_qsd; start_qsd
  first_writes "$work/qsd-$r.json"
  stop
  line QSD "$work/qsd-$r.json" "  (image $(du -h "$work/empty.qcow2" | cut -f1))"
done
rm -f "$work"/pool.* "$work/empty.qcow2"
[ "$rounds" -gt 0 ] && python3 - "$work" "$rounds" <<'PY'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
get = lambda t, r: json.load(open(f"{work}/{t}-{r}.json"))["iops"]
ours = [get("ours", r) for r in range(1, rounds + 1)]
qsd = [get("qsd", r) for r in range(1, rounds + 1)]
print("first writes, IOPS per round: ours " + ", ".join(f"{v:.0f}" for v in ours)
      + "; QSD qcow2 " + ", ".join(f"{v:.0f}" for v in qsd))
print(f"median: ours {statistics.median(ours):.0f}, QSD qcow2 {statistics.median(qsd):.0f}, "
      f"ours / QSD {statistics.median(ours) / statistics.median(qsd):.2f} "
      f"(per round: {', '.join(f'{o / q:.2f}' for o, q in zip(ours, qsd))})")
PY

echo "discard: $discard_bytes bytes written sequentially (128 KiB, QD8), FLUSH, then discarded, FLUSH"
du_b() { du -B1 "$1" | cut -f1; }
discard_line() { # NAME FILE
  local before after t0 t1
  before=$(du_b "$2")
  if ! "$bench" --socket "$sock" --json --discard "$discard_bytes" >"$work/discard.json" 2>"$work/discard.err"; then
    echo "  $1: the discard failed: $(tr '\n' ' ' <"$work/discard.err")"
    return 0
  fi
  t0=$(date +%s%N)
  while after=$(du_b "$2"); [ $((before - after)) -lt "$discard_bytes" ] && [ $(($(date +%s%N) - t0)) -lt 30000000000 ]; do
    sleep 0.02
  done
  t1=$(date +%s%N)
  awk -v n="$1" -v b="$before" -v a="$after" -v d="$(jget "$work/discard.json" discard_ms)" \
    -v f="$(jget "$work/discard.json" flush_ms)" -v w="$(( (t1 - t0) / 1000000 ))" 'BEGIN {
    printf "  %-6s du before %6.1f MiB, after %6.1f MiB (%.1f MiB given back, %d ms after the FLUSH); DISCARD %.1f ms, FLUSH %.1f ms\n",
      n, b / 1048576, a / 1048576, (b - a) / 1048576, w, d, f }'
}
prefill_discard() {
  "$bench" --socket "$sock" --rw write --bs 128k --iodepth 8 --single-pass --size "$discard_bytes" \
    --runtime 600 --end-fsync >/dev/null
}
new_ours; start_ours; prefill_discard; discard_line ours "$work/pool.data"; stop
new_qsd; start_qsd discard=unmap; prefill_discard; discard_line QSD "$work/empty.qcow2"; stop
