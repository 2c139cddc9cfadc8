#!/usr/bin/env bash
# A live move of a disk under write load, ours against qemu-storage-daemon (QSD):
#   ours  `disk-migrate` of disk0 from pool a to pool b of one `vhost-thin serve`
#   QSD   `blockdev-mirror` (sync=full) of the exported raw file to a new raw file, then
#         `block-job-complete` once the mirror is ready: the export moves to the copy
# Both while vhost-thin-bench writes 4 KiB at random offsets, QD32, with verification
# (every write stamped, read back by later reads). Printed for each: how long the move took,
# for ours the pauses (writes held: at the mirror's start, at the switch, at the end of the
# backward mirror) that the daemon reports, and the load generator's IOPS and latency over a run with the move and a run
# without (its max latency includes whatever the guest waited during the switch).
#
#   ci/bench-migrate.sh [--size SIZE] [--runtime SECS] [--at SECS] [--generator ours|blkio]
#                       [--log-slow MS] [--keep]
#
#   --size SIZE    disk size (default 1GiB)
#   --runtime S    seconds of load per run (default 12)
#   --at S         start the move this many seconds into the run (default 3)
#   --log-slow MS  (generator ours only) after each run with a move, list every request that
#                  took longer than MS milliseconds, by the time it completed, beside what the
#                  daemon logged meanwhile (ours then logs at info): where the worst latencies
#                  fall among the move's steps
#   --keep         keep the work directory
# Environment: BENCH_DIR (parent of the work directory, default /var/tmp); THIN (a vhost-thin
# binary to measure instead of the one built here).
set -euo pipefail
cd "$(dirname "$0")/.."

size=1GiB runtime=12 at=3 keep=0 generator=ours log_slow=
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift ;;
    --runtime) runtime=$2; shift ;;
    --at) at=$2; shift ;;
    --generator) generator=$2; shift ;;
    --log-slow) log_slow=$2; shift ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

command -v qemu-storage-daemon >/dev/null || {
  echo "bench-migrate: qemu-storage-daemon is needed (apt-get install qemu-system-common)" >&2
  exit 1
}
if [ -n "$log_slow" ] && [ "$generator" != ours ]; then
  echo "bench-migrate: --log-slow needs --generator ours (libblkio's generator does not log requests)" >&2
  exit 2
fi
name=migrate
# shellcheck source=ci/bench-lib.sh
. ci/bench-lib.sh
echo "machine: $(nproc) CPUs; disk $size_bytes bytes; load: 4 KiB random writes, QD32, $runtime s; move at ${at} s"

# With --log-slow: the generator's slow requests (stderr: "slow: <unix time> ...") and the
# daemon's log lines (RFC 3339 time first), in time order.
slow_requests() { # GENERATOR-STDERR DAEMON-LOG SINCE (unix time: the run's start)
  [ -n "$log_slow" ] || return 0
  echo "  requests over $log_slow ms, beside the daemon's log (UTC):"
  python3 - "$1" "$2" "$3" <<'PY'
import datetime, re, sys
rows = []
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"slow: ([0-9.]+) (.*)", line)
    if m:
        rows.append((float(m.group(1)), "request " + m.group(2)))
for line in open(sys.argv[2], errors="replace"):
    m = re.match(r"(?:\x1b\[[0-9;]*m)*(\d{4}-\d\d-\d\dT[0-9:.]+)Z?\S*\s+(.*)", line)
    if m:
        t = datetime.datetime.fromisoformat(m.group(1)[:26]).replace(tzinfo=datetime.timezone.utc)
        if t.timestamp() >= float(sys.argv[3]):
            rows.append((t.timestamp(), "daemon  " + re.sub(r"\x1b\[[0-9;]*m", "", m.group(2))))
for t, what in sorted(rows):
    stamp = datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    print(f"    {stamp}  {what[:160]}")
PY
}

# ---- ours -----------------------------------------------------------------------------
cat >"$work/cfg.yaml" <<EOF
pools:
  - name: a
    metadata: $work/a.meta
    data: $work/a.data
    create: {data-size: $((size_bytes * 3))}
  - name: b
    metadata: $work/b.meta
    data: $work/b.data
    create: {data-size: $((size_bytes * 3))}
disks:
  - name: disk0
    pool: a
    size: $size_bytes
    socket: $sock
management:
  socket: $work/qmp.sock
logging:
  level: $(if [ -n "$log_slow" ]; then echo info; else echo warn; fi)
EOF
"$thin" serve --config "$work/cfg.yaml" >>"$work/ours.log" 2>&1 &
pid=$!
wait_socket "$sock" "$work/ours.log"
prefill
echo "== vhost-thin disk-migrate (pool a -> pool b, same daemon, both pools on $(df --output=source "$work" | tail -1))"
load "$work/ours-base.json"
report "without a move" "$work/ours-base.json"
since=$(date +%s.%N)
load "$work/ours-move.json" &
lpid=$!
sleep "$at"
t0=$(date +%s.%N)
"$thin" ctl -s "$work/qmp.sock" --json migrate disk0 b >"$work/ours-migrate.json"
t1=$(date +%s.%N)
wait "$lpid" || { echo "bench-migrate: the load failed during our move:" >&2; cat "$work/ours-move.json.err" >&2; exit 1; }
report "with the move" "$work/ours-move.json"
slow_requests "$work/ours-move.json.err" "$work/ours.log" "$since"
printf '  move took %.2f s; writes held %s us (each hold %s); live passes %s; bytes per pass %s (the last: the copy while mirrored); mirrored %s bytes\n' \
  "$(python3 -c "print($t1 - $t0)")" "$(jget "$work/ours-migrate.json" pause-us)" \
  "$(jget "$work/ours-migrate.json" holds-us)" \
  "$(jget "$work/ours-migrate.json" live-passes)" "$(jget "$work/ours-migrate.json" pass-bytes)" \
  "$(jget "$work/ours-migrate.json" mirrored-bytes)"
stop
"$thin" pool check -m "$work/b.meta" -d "$work/b.data" >/dev/null || { echo "bench-migrate: pool b does not check clean" >&2; exit 1; }

# ---- qemu-storage-daemon --------------------------------------------------------------
truncate -s "$size_bytes" "$work/disk.raw"
start_qsd() {
  rm -f "$sock" "$work/qsd-qmp.sock"
  qemu-storage-daemon \
    --blockdev "driver=file,filename=$work/disk.raw,node-name=top,cache.direct=off" \
    --export "type=vhost-user-blk,id=e,node-name=top,addr.type=unix,addr.path=$sock,writable=on" \
    --chardev "socket,id=m,path=$work/qsd-qmp.sock,server=on,wait=off" --monitor chardev=m \
    >>"$work/qsd.log" 2>&1 &
  pid=$!
  wait_socket "$sock" "$work/qsd.log"
}
start_qsd
prefill
echo "== QSD blockdev-mirror + block-job-complete (raw file -> new raw file, same file system)"
load "$work/qsd-base.json"
report "without a move" "$work/qsd-base.json"
truncate -s "$size_bytes" "$work/copy.raw"
since=$(date +%s.%N)
load "$work/qsd-move.json" &
lpid=$!
sleep "$at"
python3 - "$work/qsd-qmp.sock" "$work/copy.raw" >"$work/qsd-mirror.txt" <<'PY'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
def recv():
    return json.loads(f.readline())
def cmd(name, **args):
    f.write(json.dumps({"execute": name, "arguments": args}) + "\n"); f.flush()
    while True:
        m = recv()
        if "return" in m: return m["return"]
        if "error" in m: sys.exit(f"{name}: {m['error']}")
def event(name):
    while True:
        m = recv()
        if m.get("event") == name: return m
recv(); cmd("qmp_capabilities")
t0 = time.monotonic()
cmd("blockdev-add", driver="file", **{"node-name": "copy"}, filename=sys.argv[2], cache={"direct": False})
cmd("blockdev-mirror", **{"job-id": "m"}, device="top", target="copy", sync="full")
event("BLOCK_JOB_READY"); t1 = time.monotonic()
cmd("block-job-complete", device="m")
event("BLOCK_JOB_COMPLETED"); t2 = time.monotonic()
print(f"{t2 - t0:.2f} {1e6 * (t2 - t1):.0f}")
PY
wait "$lpid" || { echo "bench-migrate: the load failed during the QSD move:" >&2; cat "$work/qsd-move.json.err" >&2; exit 1; }
report "with the move" "$work/qsd-move.json"
slow_requests "$work/qsd-move.json.err" "$work/qsd.log" "$since"
read -r took switch <"$work/qsd-mirror.txt"
printf '  move took %s s; block-job-complete to BLOCK_JOB_COMPLETED %s us (QSD reports no pause of its own)\n' "$took" "$switch"
stop
