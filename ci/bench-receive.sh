#!/usr/bin/env bash
# A guest's write latency while a snapshot stream is received into its pool: the receive
# writes into the same data file as the guest (and so takes the same inode lock).
#   1. pool a holds disk src, filled once (128 KiB sequential) and snapshotted as src@s,
#      which is sent to a stream file; pool b holds disk0, filled once as well;
#   2. vhost-thin-bench (or libblkio's generator) writes 4 KiB at random offsets of disk0,
#      QD32, verified, for a run without a receive, a run with one (`ctl receive` of the
#      stream into pool b, started --at seconds into the run), and a run in which the
#      received snapshot is deleted (--at seconds in): once its commit is durable, the
#      daemon gives its blocks back to the host (discard passdown: holes punched in the data
#      file, which also takes the file's inode lock);
#   3. in the runs without a receive and with the deletion, a FLUSH probe on another disk of
#      pool b (disk probe) does short write runs of its own, each ending in a FLUSH, which
#      needs a commit of pool b: from --at seconds in to the end of the load. A FLUSH there
#      also writes back what disk0's load wrote, so the stream is received once more and
#      deleted with the probe alone: its FLUSHes then wait only for the deletion's work.
# Printed: the generator's IOPS and latency for each run, the probe's FLUSH times, how long
# the receive and the deletion took and when the space was back, and how much of pool b's
# data file was allocated before and after it.
# There is no peer for this in qemu-storage-daemon: the run without the receive is the
# comparison, and THIN= runs another build of the daemon against the same load (to compare
# two versions, interleave their runs).
#
#   ci/bench-receive.sh [--size SIZE] [--runtime SECS] [--at SECS] [--generator ours|blkio]
#                       [--keep]
#
#   --size SIZE    size of each disk, and so of the stream (default 1GiB)
#   --runtime S    seconds of load per run (default 20)
#   --at S         start the receive, and the deletion, this many seconds into their runs
#                  (default 3)
#   --keep         keep the work directory
# Environment: BENCH_DIR (parent of the work directory, default /var/tmp); THIN (a vhost-thin
# binary to measure instead of the one built here).
set -euo pipefail
cd "$(dirname "$0")/.."

# (log_slow: read by bench-lib's load; this script lists no slow requests.)
size=1GiB runtime=20 at=3 keep=0 generator=ours log_slow=
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift ;;
    --runtime) runtime=$2; shift ;;
    --at) at=$2; shift ;;
    --generator) generator=$2; shift ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

name=receive
# shellcheck source=ci/bench-lib.sh
. ci/bench-lib.sh
echo "machine: $(nproc) CPUs; disk $size_bytes bytes; load: 4 KiB random writes, QD32, $runtime s; receive at ${at} s"

cat >"$work/cfg.yaml" <<EOF
pools:
  - name: a
    metadata: $work/a.meta
    data: $work/a.data
    create: {data-size: $((size_bytes * 2))}
  - name: b
    metadata: $work/b.meta
    data: $work/b.data
    create: {data-size: $((size_bytes * 3))}
disks:
  - name: src
    pool: a
    size: $size_bytes
    socket: $work/src.sock
  - name: disk0
    pool: b
    size: $size_bytes
    socket: $sock
  - name: probe
    pool: b
    size: 256MiB
    socket: $work/probe.sock
management:
  socket: $work/qmp.sock
logging:
  level: warn
EOF
ctl() { "$thin" ctl -s "$work/qmp.sock" "$@"; }
"$thin" serve --config "$work/cfg.yaml" >>"$work/ours.log" 2>&1 &
pid=$!
wait_socket "$sock" "$work/ours.log"
"$bench" --socket "$work/src.sock" --rw write --bs 128k --iodepth 8 --single-pass --runtime 600 \
  --verify >/dev/null
ctl snapshot src@s >/dev/null
ctl send src@s --file "$work/s.stream" >/dev/null
echo "stream: $(stat -c %s "$work/s.stream") bytes ($work/s.stream, on $(df --output=source "$work" | tail -1))"
prefill
# FLUSH probe: short runs of 4 KiB writes (one pool block each, so each run maps new blocks
# and its FLUSH needs a commit) on disk probe until OUT.stop exists; each FLUSH's ms to OUT.
probe() { # OUT
  : >"$1"
  while [ ! -e "$1.stop" ]; do
    "$bench" --socket "$work/probe.sock" --json --rw randwrite --bs 4k --align 64k \
      --iodepth 1 --runtime 0.05 --end-fsync --seed "$RANDOM" | python3 -c \
      'import json, sys; print(json.load(sys.stdin)["flush_ms"])' >>"$1"
  done
}
probe_report() { # OUT
  python3 -c "
import sys; ms = sorted(float(l) for l in open(sys.argv[1]) if l.strip() not in ('', 'None'))
print(f'  FLUSH probe on disk probe:   {len(ms)} FLUSHes, median {ms[len(ms) // 2]:.1f} ms, max {ms[-1]:.1f} ms' if ms else '  FLUSH probe: no FLUSH completed')
" "$1"
}
with_probe() { # OUT PROBE_OUT: the load, the probe from --at seconds in to the end
  load "$1" &
  local l=$!
  sleep "$at"
  probe "$2" &
  local p=$!
  wait "$l" || { echo "bench-receive: the load failed:" >&2; cat "$1.err" >&2; exit 1; }
  touch "$2.stop"
  wait "$p"
}
echo "== vhost-thin: guest writes on pool b, with and without a receive into pool b"
with_probe "$work/base.json" "$work/base.probe"
report "without a receive" "$work/base.json"
probe_report "$work/base.probe"
load "$work/recv.json" &
lpid=$!
sleep "$at"
t0=$(date +%s.%N)
ctl receive "$work/s.stream" --pool b --name r >/dev/null
t1=$(date +%s.%N)
wait "$lpid" || { echo "bench-receive: the load failed during the receive:" >&2; cat "$work/recv.json.err" >&2; exit 1; }
report "with the receive" "$work/recv.json"
python3 -c "
import sys; t = float(sys.argv[2]) - float(sys.argv[1]); n = int(sys.argv[3])
print(f'  the receive took {t:.2f} s ({n / t / 2**20:.0f} MiB/s of stream)')
if t > float(sys.argv[4]) - float(sys.argv[5]):
    print('  (it outlasted the load: the run above saw only part of it; raise --runtime)')
" "$t0" "$t1" "$(stat -c %s "$work/s.stream")" "$runtime" "$at"
alloc() { echo $(( $(stat -c %b "$work/b.data") * $(stat -c %B "$work/b.data") >> 20 )); }
before=$(alloc)
with_probe "$work/del.json" "$work/del.probe" &
wpid=$!
sleep "$at"
t0=$(date +%s.%N)
ctl delete-snapshot r >/dev/null
t1=$(date +%s.%N)
# Back: the data file down by nine tenths of the snapshot (the load keeps writing).
while [ $(( (before - $(alloc)) * 10 )) -lt $(( (size_bytes >> 20) * 9 )) ] && kill -0 "$wpid" 2>/dev/null; do
  sleep 0.05
done
t2=$(date +%s.%N)
wait "$wpid"
report "with the receive deleted" "$work/del.json"
probe_report "$work/del.probe"
echo "  pool b's data file: $before MiB allocated before the deletion, $(alloc) MiB after the run (its blocks given back to the host: discard passdown)"
python3 -c "
import sys; t0, t1, t2 = map(float, sys.argv[1:4])
print(f'  delete-snapshot took {t1 - t0:.3f} s; the space was back {t2 - t0:.2f} s after it began')" "$t0" "$t1" "$t2"
echo "== the same deletion with no load on pool b but the FLUSH probe"
ctl receive "$work/s.stream" --pool b --name r2 >/dev/null
before=$(alloc)
probe "$work/idle.probe" &
ppid=$!
sleep 1
t0=$(date +%s.%N)
ctl delete-snapshot r2 >/dev/null
t1=$(date +%s.%N)
while [ $(( (before - $(alloc)) * 10 )) -lt $(( (size_bytes >> 20) * 9 )) ] && [ "$(date +%s)" -lt $(( ${t0%.*} + 60 )) ]; do
  sleep 0.05
done
t2=$(date +%s.%N)
sleep 1
touch "$work/idle.probe.stop"
wait "$ppid"
probe_report "$work/idle.probe"
python3 -c "
import sys; t0, t1, t2 = map(float, sys.argv[1:4])
print(f'  delete-snapshot took {t1 - t0:.3f} s; the space was back {t2 - t0:.2f} s after it began')" "$t0" "$t1" "$t2"
stop
"$thin" pool check -m "$work/b.meta" -d "$work/b.data" >/dev/null || { echo "bench-receive: pool b does not check clean" >&2; exit 1; }
