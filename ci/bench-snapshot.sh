#!/usr/bin/env bash
# Snapshots of a disk under write load, ours against qemu-storage-daemon (QSD):
#   ours  `snapshot-create` on `vhost-thin serve` (an internal dm-thin snapshot; the daemon
#         reports how long the guest's writes were held)
#   QSD   `blockdev-snapshot-sync` of the exported qcow2 image (an external qcow2 overlay;
#         the time the command took, QSD reports no pause of its own)
# Both while vhost-thin-bench writes 4 KiB at random offsets, QD32, with verification, on a
# fully written 1 GiB disk; after WARMUP s of load (dirty data piles up: the first snapshot
# of a busy disk is the one that used to be slow), COUNT snapshots, one every EVERY s.
# Printed: each snapshot's figure with the median, p99 and max, and the load generator's
# IOPS and latency (its max is the longest a write waited) with snapshots and without.
#
#   ci/bench-snapshot.sh [--size SIZE] [--count N] [--every SECS] [--warmup SECS] [--generator ours|blkio] [--keep]
# Defaults: 1GiB, 20 snapshots every 2 s after 10 s (a 92 s run per daemon).
# Environment: BENCH_DIR (parent of the work directory, default /var/tmp); BENCH_LOG (the
# daemon's RUST_LOG, default warn: "info" logs each snapshot's drain and pause).
set -euo pipefail
cd "$(dirname "$0")/.."

size=1GiB count=20 every=2 warmup=10 keep=0 generator=ours
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift ;;
    --count) count=$2; shift ;;
    --every) every=$2; shift ;;
    --warmup) warmup=$2; shift ;;
    --generator) generator=$2; shift ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for t in qemu-storage-daemon qemu-img; do
  command -v "$t" >/dev/null || { echo "bench-snapshot: $t is needed (qemu-system-common, qemu-utils)" >&2; exit 1; }
done
name=snap
# shellcheck source=ci/bench-lib.sh
. ci/bench-lib.sh
# Twice the schedule: a snapshot's reply waits for its commit (a second or more under this
# load), which delays the next one; every snapshot must still be taken under load.
runtime=$(python3 -c "print(int($warmup + 2 * $count * $every + 2))")
summary() { # FIGURES...: median, p99 (nearest rank) and max
  python3 -c '
import math, sys
v = sorted(int(x) for x in sys.argv[1:])
print(f"median {v[len(v) // 2]}  p99 {v[max(0, math.ceil(0.99 * len(v)) - 1)]}  max {v[-1]}")' "$@"
}

echo "machine: $(nproc) CPUs; disk $size_bytes bytes; 4 KiB random writes QD32 for $runtime s; $count snapshots, one every $every s after $warmup s"

# ---- ours -------------------------------------------------------------------------------
"$thin" pool create -m "$work/p.meta" -d "$work/p.data" --data-size $((size_bytes * (count + 2))) >/dev/null
"$thin" thin create -m "$work/p.meta" -d "$work/p.data" --id 0 --size "$size_bytes" --name disk0 >/dev/null
RUST_LOG=${BENCH_LOG:-warn} "$thin" serve -m "$work/p.meta" -d "$work/p.data" --disk "name=disk0,socket=$sock" \
  --qmp "$work/qmp.sock" >>"$work/ours.log" 2>&1 &
pid=$!
wait_socket "$sock" "$work/ours.log"
prefill
echo "== vhost-thin snapshot-create"
load "$work/ours-base.json"; report "without snapshots" "$work/ours-base.json"
load "$work/ours-snap.json" & lpid=$!
pauses=() took=()
sleep "$warmup"
for i in $(seq "$count"); do
  sleep "$every"
  t0=$(date +%s%N)
  "$thin" ctl -s "$work/qmp.sock" --json snapshot disk0 "s$i" >"$work/s$i.json"
  took+=($((($(date +%s%N) - t0) / 1000)))
  pauses+=("$(jget "$work/s$i.json" pause-us)")
done
wait "$lpid" || { cat "$work/ours-snap.json.err" >&2; exit 1; }
report "with snapshots" "$work/ours-snap.json"
echo "  writes held per snapshot (us): ${pauses[*]}"
echo "  writes held per snapshot (us): $(summary "${pauses[@]}")"
echo "  snapshot-create took (us, with ctl's start): ${took[*]}"
echo "  snapshot-create took (us, with ctl's start): $(summary "${took[@]}")"
stop

# ---- qemu-storage-daemon ----------------------------------------------------------------
qemu-img create -q -f qcow2 -o preallocation=full "$work/base.qcow2" "$size_bytes"
rm -f "$sock"
qemu-storage-daemon \
  --blockdev "driver=file,filename=$work/base.qcow2,node-name=f,cache.direct=off" \
  --blockdev "driver=qcow2,file=f,node-name=top" \
  --export "type=vhost-user-blk,id=e,node-name=top,addr.type=unix,addr.path=$sock,writable=on" \
  --chardev "socket,id=m,path=$work/qsd-qmp.sock,server=on,wait=off" --monitor chardev=m \
  >>"$work/qsd.log" 2>&1 &
pid=$!
wait_socket "$sock" "$work/qsd.log"
prefill
echo "== QSD blockdev-snapshot-sync (qcow2 overlays)"
load "$work/qsd-base.json"; report "without snapshots" "$work/qsd-base.json"
load "$work/qsd-snap.json" & lpid=$!
python3 - "$work/qsd-qmp.sock" "$work" "$count" "$every" "$warmup" >"$work/qsd-snaps.txt" <<'PY'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
def cmd(name, **args):
    f.write(json.dumps({"execute": name, "arguments": args}) + "\n"); f.flush()
    while True:
        m = json.loads(f.readline())
        if "return" in m: return m["return"]
        if "error" in m: sys.exit(f"{name}: {m['error']}")
json.loads(f.readline()); cmd("qmp_capabilities")
took = []
top = "top"
time.sleep(float(sys.argv[5]))
for i in range(1, int(sys.argv[3]) + 1):
    time.sleep(float(sys.argv[4]))
    t0 = time.monotonic()
    cmd("blockdev-snapshot-sync", **{"node-name": top, "snapshot-file": f"{sys.argv[2]}/s{i}.qcow2",
        "snapshot-node-name": f"s{i}", "format": "qcow2"})
    took.append(round((time.monotonic() - t0) * 1e6))
    top = f"s{i}"
print(" ".join(map(str, took)))
PY
wait "$lpid" || { cat "$work/qsd-snap.json.err" >&2; exit 1; }
report "with snapshots" "$work/qsd-snap.json"
echo "  blockdev-snapshot-sync took (us): $(cat "$work/qsd-snaps.txt")"
# shellcheck disable=SC2046  # one figure per word
echo "  blockdev-snapshot-sync took (us): $(summary $(cat "$work/qsd-snaps.txt"))"
stop
