#!/usr/bin/env bash
# Host-side benchmark of `vhost-thin serve` against qemu-storage-daemon (QSD), both driven
# over vhost-user-blk by the same load generator, with no VM: a guest benchmark under TCG
# measures the emulator, not the backend. The generator is bench/ (`vhost-thin-bench`, the
# project's own frontend), bench-blkio/ (`vhost-thin-blkio-bench`, on libblkio, the library
# behind QEMU's and fio's blkio drivers), or both, each case run with one after the other.
#
#   ci/bench-daemon.sh [--quick] [--runtime SECS] [--size SIZE] [--fresh-size SIZE] [--keep]
#                      [--generator ours|blkio|both] [--targets T,T...] [--cases REGEX]
#                      [--rounds N] [--ram | --ram-only] [--ram-rounds N]
#
#   --generator G  the load generator: ours (bench/, default), blkio, or both
#   --targets T,.. only these columns (ours-prov ours-fresh qsd-raw qsd-qcow2-pre
#                  qsd-qcow2-empty qsd-null; default all)
#   --cases REGEX  only the cases whose name matches (grep -E), e.g. 'QD32 1q'
#   --rounds N     run every target N times, in turn (ours, QSD, ours, QSD, ...: a slow spell
#                  of the machine falls on both sides), each round on a new disk; the tables
#                  give the median of the rounds, the ratios each round's too (default 1)
#   --ram          also the RAM-backed comparison the project targets: a provisioned pool on
#                  tmpfs (BENCH_RAM_DIR, default /dev/shm) against QSD null-co, 4k randread
#                  QD32 on 1 and 2 queues, both daemons up at once and the runs interleaved
#                  (ours, null-co, ours, ...) for --ram-rounds rounds (default 3), medians
#                  compared; no --verify on either side (null-co fills no buffers), so the
#                  generator does the same work for both
#   --ram-only     only the RAM-backed comparison
#                  BENCH_RAM_BASELINE=/path/to/an/older/vhost-thin adds a third backend to it:
#                  that binary serving its own RAM pool, interleaved with the two others
#                  (before/after figures for a change, from the same run)
#   --quick        1 s per case (default 5 s)
#   --runtime S    seconds per case
#   --size SIZE    disk size, e.g. 1GiB (default; also BENCH_SIZE)
#   --fresh-size SIZE  size of the fresh disks ("ours fresh", "QSD qcow2-empty"; default
#                  64GiB, also BENCH_FRESH_SIZE): large enough that 4 KiB writes at random
#                  offsets stay first writes of their 64 KiB block for the whole run (a 1 GiB
#                  disk is all provisioned after 16384 of them, and the rest are overwrites)
#   --keep         keep the work directory (pools, images, logs, JSON results)
#
# Environment: CARGO_TARGET_DIR (default: the project's target/), BENCH_DIR (parent of the
# temporary work directory, default /var/tmp), BENCH_SEED.
#
# Columns (disks are BENCH_SIZE, fresh ones BENCH_FRESH_SIZE; every file is on BENCH_DIR with
# buffered I/O):
#   ours prov      vhost-thin serve, device 0 fully provisioned by a sequential write pass
#   ours fresh     vhost-thin serve on a new pool before every case (first writes provision)
#   QSD raw        QSD file driver on a raw file, prefilled the same way
#   QSD qcow2-pre  QSD qcow2 (preallocation=full), prefilled the same way
#   QSD qcow2-empty QSD qcow2 with 64 KiB clusters, new and empty before every case (first
#                  writes allocate)
#   QSD null-co    QSD null-co: no storage at all, the ceiling of the transport
# Our daemon writes files through the page cache, so QSD runs with cache.direct=off.
set -euo pipefail
cd "$(dirname "$0")/.."

runtime=5
size=${BENCH_SIZE:-1GiB}
fresh_size=${BENCH_FRESH_SIZE:-64GiB}
keep=0
generator=ours
only_targets=
case_re=
ram=0
ram_rounds=3
rounds=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) runtime=1 ;;
    --runtime) runtime=$2; shift ;;
    --runtime=*) runtime=${1#*=} ;;
    --size) size=$2; shift ;;
    --size=*) size=${1#*=} ;;
    --fresh-size) fresh_size=$2; shift ;;
    --fresh-size=*) fresh_size=${1#*=} ;;
    --keep) keep=1 ;;
    --generator) generator=$2; shift ;;
    --generator=*) generator=${1#*=} ;;
    --targets) only_targets=$2; shift ;;
    --targets=*) only_targets=${1#*=} ;;
    --cases) case_re=$2; shift ;;
    --cases=*) case_re=${1#*=} ;;
    --rounds) rounds=$2; shift ;;
    --rounds=*) rounds=${1#*=} ;;
    --ram) ram=1 ;;
    --ram-only) ram=2 ;;
    --ram-rounds) ram_rounds=$2; shift ;;
    --ram-rounds=*) ram_rounds=${1#*=} ;;
    -h|--help) sed -n '2,53p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
seed=${BENCH_SEED:-1}
case "$generator" in
  ours) gens=(ours) ;;
  blkio) gens=(blkio) ;;
  both) gens=(ours blkio) ;;
  *) echo "--generator must be ours, blkio or both" >&2; exit 2 ;;
esac
declare -A gen_title=([ours]="bench/ (vhost-thin-bench)" [blkio]="libblkio (vhost-thin-blkio-bench)")

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# apt may be busy (another install running): retry for a while.
apt_install() {
  for _ in $(seq 1 60); do
    if as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; then return 0; fi
    echo "apt-get install $* failed (locked?), retrying in 10 s" >&2
    sleep 10
  done
  return 1
}
missing=()
command -v qemu-storage-daemon >/dev/null 2>&1 || missing+=(qemu-system-common)
command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  as_root apt-get update -qq || true
  apt_install "${missing[@]}"
fi

echo "building release binaries"
cargo build --release --locked -q -p vhost-thin -p vhost-thin-bench -p vhost-thin-blkio-bench
# The target dir cargo used (CARGO_TARGET_DIR, a cargo config, or target/).
target=$(cargo metadata --format-version 1 --no-deps --locked |
  grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
echo "binaries in $target/release"
thin=$target/release/vhost-thin
bench=$target/release/vhost-thin-bench
declare -A gen_bin=([ours]=$bench [blkio]=$target/release/vhost-thin-blkio-bench)
# Sizes: plain bytes or k/M/G with or without "iB".
to_bytes() {
  local s=$1 n unit
  n=${s%%[!0-9]*}; unit=${s#"$n"}
  case "${unit,,}" in
    ""|b) echo "$n" ;;
    k|kb|kib) echo $((n << 10)) ;;
    m|mb|mib) echo $((n << 20)) ;;
    g|gb|gib) echo $((n << 30)) ;;
    t|tb|tib) echo $((n << 40)) ;;
    *) echo "bad size $s" >&2; exit 2 ;;
  esac
}
size_bytes=$(to_bytes "$size")
fresh_bytes=$(to_bytes "$fresh_size")

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vhost-thin-bench.XXXXXX")
daemon_pid=
cleanup() {
  if [ -n "$daemon_pid" ]; then kill "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; fi
  if [ "$keep" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
mkdir -p "$work/results"
failures=()

# ---- the cases ---------------------------------------------------------------------------
# name|rw|bs|iodepth|queues|more options
# "1-per-64k": one 4 KiB write at each 64 KiB-aligned offset, in random order, one pass: on
# an empty disk every write allocates a 64 KiB pool block / qcow2 cluster.
cases=(
  "4k randread QD1 1q|randread|4k|1|1|"
  "4k randread QD1 4q|randread|4k|1|4|"
  "4k randread QD32 1q|randread|4k|32|1|"
  "4k randread QD32 4q|randread|4k|32|4|"
  "4k randwrite QD32 1q|randwrite|4k|32|1|"
  "4k randwrite QD32 4q|randwrite|4k|32|4|"
  "4k randwrite 1-per-64k QD32 1q|randwrite|4k|32|1|--align 64k --single-pass"
  "4k randwrite 1-per-64k QD32 4q|randwrite|4k|32|4|--align 64k --single-pass"
  "128k read QD8 1q|read|128k|8|1|"
  "128k read QD8 4q|read|128k|8|4|"
  "128k write QD8 1q|write|128k|8|1|"
  "128k write QD8 4q|write|128k|8|4|"
)
targets=(ours-prov ours-fresh qsd-raw qsd-qcow2-pre qsd-qcow2-empty qsd-null)
if [ -n "$only_targets" ]; then
  IFS=, read -r -a targets <<<"$only_targets"
fi
if [ -n "$case_re" ]; then
  kept=()
  for c in "${cases[@]}"; do grep -qE -- "$case_re" <<<"${c%%|*}" && kept+=("$c"); done
  cases=("${kept[@]}")
fi
[ "$ram" = 2 ] && targets=()
declare -A title=(
  [ours-prov]="ours provisioned" [ours-fresh]="ours fresh" [qsd-raw]="QSD raw"
  [qsd-qcow2-pre]="QSD qcow2-prealloc" [qsd-qcow2-empty]="QSD qcow2-empty" [qsd-null]="QSD null-co"
)
slug() { echo "$1" | tr ' ' '_'; }

# ---- starting and stopping backends ------------------------------------------------------
sock=$work/disk.sock
wait_socket() {
  for _ in $(seq 1 200); do
    [ -S "$sock" ] && return 0
    kill -0 "$daemon_pid" 2>/dev/null || { echo "backend exited early; log:" >&2; cat "$1" >&2; return 1; }
    sleep 0.05
  done
  echo "backend did not create $sock; log:" >&2; cat "$1" >&2; return 1
}
stop_backend() {
  [ -n "$daemon_pid" ] || return 0
  kill -TERM "$daemon_pid" 2>/dev/null || true
  local rc=0
  wait "$daemon_pid" || rc=$?
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 143 ]; then
    echo "backend pid $daemon_pid exited with status $rc" >&2
    failures+=("backend exit status $rc (see $work/*.log)")
  fi
  daemon_pid=
  rm -f "$sock"
}
new_pool() { # [SIZE]
  local bytes=${1:-$size_bytes}
  rm -f "$work"/pool.*
  "$thin" pool create -m "$work/pool.meta" -d "$work/pool.data" --data-size "$bytes" >/dev/null
  "$thin" thin create -m "$work/pool.meta" -d "$work/pool.data" --id 0 --size "$bytes" --name bench >/dev/null
}
start_ours() {
  rm -f "$sock"
  RUST_LOG=warn "$thin" serve -m "$work/pool.meta" -d "$work/pool.data" \
    --disk "id=0,socket=$sock,num-queues=4" >>"$work/ours.log" 2>&1 &
  daemon_pid=$!
  wait_socket "$work/ours.log"
}
# start_qsd LOG BLOCKDEV-ARGS... (the exported node is named "top")
start_qsd() {
  local log=$1; shift
  rm -f "$sock"
  qemu-storage-daemon "$@" \
    --export "type=vhost-user-blk,id=e,node-name=top,addr.type=unix,addr.path=$sock,writable=on,num-queues=4" \
    >>"$log" 2>&1 &
  daemon_pid=$!
  wait_socket "$log"
}
file_node() { echo "driver=file,filename=$1,node-name=$2,cache.direct=off"; }
start_target() {
  case "$1" in
    ours-prov|ours-fresh) start_ours ;;
    qsd-raw) start_qsd "$work/qsd.log" --blockdev "$(file_node "$work/disk.raw" top)" ;;
    qsd-qcow2-pre) start_qsd "$work/qsd.log" --blockdev "$(file_node "$work/pre.qcow2" f)" \
                     --blockdev "driver=qcow2,file=f,node-name=top" ;;
    qsd-qcow2-empty) start_qsd "$work/qsd.log" --blockdev "$(file_node "$work/empty.qcow2" f)" \
                       --blockdev "driver=qcow2,file=f,node-name=top" ;;
    qsd-null) start_qsd "$work/qsd.log" --blockdev "driver=null-co,node-name=top,size=$size_bytes" ;;
  esac
}
# A new, empty image for the "fresh" targets.
new_image() {
  case "$1" in
    ours-fresh) new_pool "$fresh_bytes" ;;
    qsd-qcow2-empty) rm -f "$work/empty.qcow2"
      qemu-img create -q -f qcow2 -o cluster_size=65536 "$work/empty.qcow2" "$fresh_bytes" ;;
  esac
}

# ---- running the load generator ----------------------------------------------------------
# [GEN=ours|blkio] [SOCK=path] run_bench OUT.json ARGS...: records a failure instead of
# stopping the script.
run_bench() {
  local out=$1; shift
  local rc=0 bin=${gen_bin[${GEN:-ours}]}
  timeout $((${runtime%.*} + 300)) "$bin" --socket "${SOCK:-$sock}" --json --seed "$seed" "$@" \
    >"$out" 2>"$out.err" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "  FAILED (exit $rc): $(basename "$bin") $*" >&2
    sed 's/^/    /' "$out.err" >&2
    failures+=("$(basename "$out" .json): exit $rc: $(head -c 300 "$out.err" | tr '\n' ' ')")
    rm -f "$out"
  fi
  return 0
}
prefill() {
  echo "  prefill: sequential write pass over $size_bytes bytes"
  run_bench "$work/results/prefill-$1.json" --rw write --bs 128k --iodepth 8 --single-pass \
    --runtime 600 --verify
}
jget() { { grep -o "\"$2\":[^,}]*" "$1" || true; } | head -1 | cut -d: -f2 | tr -d '"'; }
result_file() { # TARGET GEN CASE ROUND [EXT]
  echo "$work/results/$1-$2-$(slug "$3")-r$4.${5:-json}"
}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) exit; if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

run_case() { # TARGET CASE GEN
  local t=$1 c=$2 g=$3 name rw bs qd nq opts extra=()
  IFS='|' read -r name rw bs qd nq opts <<<"$c"
  # shellcheck disable=SC2206 # options are plain words
  extra=($opts)
  # null-co does not touch read buffers: nothing to verify.
  [ "$t" = qsd-null ] || extra+=(--verify)
  # Write cases end with a FLUSH, timed apart from the run.
  [ "$rw" = read ] || [ "$rw" = randread ] || extra+=(--end-fsync)
  # On an empty disk a sequential write case is one pass over it, so every write is a
  # first write (shorter than --runtime when the disk is small and fast).
  if [ "$rw" = write ] && { [ "$t" = ours-fresh ] || [ "$t" = qsd-qcow2-empty ]; } &&
    [[ " ${extra[*]} " != *" --single-pass "* ]]; then
    extra+=(--single-pass)
  fi
  local out
  out=$(result_file "$t" "$g" "$name" "$round")
  GEN=$g run_bench "$out" --rw "$rw" --bs "$bs" --iodepth "$qd" --queues "$nq" --runtime "$runtime" "${extra[@]}"
  if [ -f "$out" ]; then
    local fl
    fl=$(jget "$out" flush_ms)
    printf '  %-32s %-5s %9.0f IOPS %8.1f MiB/s  mean %8.1f us  p99 %8.1f us%s\n' "$name" "$g" \
      "$(jget "$out" iops)" "$(jget "$out" mib_s)" "$(jget "$out" lat_mean_us)" "$(jget "$out" lat_p99_us)" \
      "$(if [ -n "$fl" ] && [ "$fl" != null ]; then printf '  FLUSH %.1f ms' "$fl"; fi)"
  fi
}

echo "machine: $(nproc) CPUs; load at start:$(uptime | sed 's/.*load average//')"
echo "disk size $size_bytes bytes (fresh disks $fresh_bytes), $runtime s per case, seed $seed, work dir $work"
echo "load generator(s): $(for g in "${gens[@]}"; do printf '%s; ' "${gen_title[$g]}"; done)"
echo "all files use the page cache: our daemon does buffered I/O, QSD runs with cache.direct=off (aio=threads)"
load_start=$(uptime)

for round in $(seq 1 "$rounds"); do
for t in "${targets[@]}"; do
  echo "== ${title[$t]}$([ "$rounds" = 1 ] || echo ", round $round of $rounds")"
  case "$t" in
    ours-prov) new_pool; start_target "$t"; prefill "$t" ;;
    qsd-raw) truncate -s "$size_bytes" "$work/disk.raw"; start_target "$t"; prefill "$t" ;;
    qsd-qcow2-pre)
      qemu-img create -q -f qcow2 -o preallocation=full "$work/pre.qcow2" "$size_bytes"
      start_target "$t"; prefill "$t" ;;
    qsd-null) start_target "$t" ;;
  esac
  for c in "${cases[@]}"; do
    for g in "${gens[@]}"; do
      if [ "$t" = ours-fresh ] || [ "$t" = qsd-qcow2-empty ]; then
        new_image "$t"; start_target "$t"
        run_case "$t" "$c" "$g"
        stop_backend
        if [ "$t" = ours-fresh ]; then
          # How many writes were first writes: pool blocks mapped after the case.
          mapped=$("$thin" thin ls -m "$work/pool.meta" -d "$work/pool.data" --json |
            grep -o '"mapped_blocks": *[0-9]*' | grep -o '[0-9]*$')
          echo "$mapped" >"$(result_file "$t" "$g" "${c%%|*}" "$round" mapped)"
        fi
      else
        run_case "$t" "$c" "$g"
      fi
    done
  done
  stop_backend
  # Free the page cache and disk of this target's files before the next one.
  rm -f "$work/disk.raw" "$work/pre.qcow2"
done
done

# ---- the tables --------------------------------------------------------------------------
# One field of a case's results in round ROUND (empty if that run failed).
round_value() { # TARGET CASE FIELD ROUND
  local f v
  f=$(result_file "$1" "${G:-ours}" "$2" "$4")
  [ -f "$f" ] || return 0
  v=$(jget "$f" "$3")
  [ "$v" = null ] || echo "$v"
}
# The field in each round that has it, one per line.
rounds_of() { # TARGET CASE FIELD
  local r
  for r in $(seq 1 "$rounds"); do round_value "$1" "$2" "$3" "$r"; done | grep . || true
}
# The field's median over the rounds (empty if no round has it).
result() { rounds_of "$@" | median; }
fmt_tp() { # throughput cell: IOPS for 4k cases, MiB/s for the others
  local t=$1 name=$2 v p
  if [[ $name == 4k* ]]; then v=$(result "$t" "$name" iops); else v=$(result "$t" "$name" mib_s); fi
  p=$(result "$t" "$name" lat_p99_us)
  if [ -z "$v" ]; then echo "FAIL"; return; fi
  if [[ $name == 4k* ]]; then
    awk -v v="$v" -v p="$p" 'BEGIN { printf "%.1fk (%.0f)", v / 1000, p }'
  else
    awk -v v="$v" -v p="$p" 'BEGIN { printf "%.0f MiB/s (%.0f)", v, p }'
  fi
}
ratio() { # ratio of the median throughputs of two cells; with rounds, each round's after it
  local a b each=""
  a=$(result "$1" "$2" mib_s); b=$(result "$3" "$4" mib_s)
  if [ -z "$a" ] || [ -z "$b" ]; then echo "n/a"; return; fi
  if [ "$rounds" -gt 1 ]; then
    each=$(for r in $(seq 1 "$rounds"); do
        echo "$(round_value "$1" "$2" mib_s "$r") $(round_value "$3" "$4" mib_s "$r")"
      done | awk 'NF == 2 && $2 > 0 { printf "%s%.2f", (n++ ? ", " : " ("), $1 / $2 } END { if (n) printf ")" }')
  fi
  awk -v a="$a" -v b="$b" -v e="$each" 'BEGIN { if (b > 0) printf "%.2f%s", a / b, e; else print "n/a" }'
}

# The tables of one generator ($G).
print_tables() {
echo
echo "### vhost-user-blk backends, load generator ${gen_title[$G]}, $runtime s per case, disk $size_bytes bytes, fresh disks $fresh_bytes bytes"
echo
echo "Throughput: 4k rows in thousands of IOPS, 128k rows in MiB/s; (p99 latency in us)."
[ "$rounds" = 1 ] || echo "Every figure is the median of $rounds rounds; ratios give each round's in brackets."
echo "Load before: ${load_start##*load average: }; after: $(uptime | sed 's/.*load average: //'); $(nproc) CPUs shared."
echo
header="| case |"; sep="|---|"
for t in "${targets[@]}"; do header+=" ${title[$t]} |"; sep+="---|"; done
echo "$header"; echo "$sep"
for c in "${cases[@]}"; do
  name=${c%%|*}; row="| $name |"
  for t in "${targets[@]}"; do row+=" $(fmt_tp "$t" "$name") |"; done
  echo "$row"
done
echo
echo "Mean latency (us):"
echo
echo "$header"; echo "$sep"
for c in "${cases[@]}"; do
  name=${c%%|*}; row="| $name |"
  for t in "${targets[@]}"; do
    v=$(result "$t" "$name" lat_mean_us)
    if [ -n "$v" ]; then row+=" $(awk -v v="$v" 'BEGIN { printf "%.1f", v }') |"; else row+=" FAIL |"; fi
  done
  echo "$row"
done
echo
is_write_case() { local rw; rw=$(cut -d'|' -f2 <<<"$1"); [ "$rw" != read ] && [ "$rw" != randread ]; }
# Throughput counting the final FLUSH in the elapsed time (bytes per second), median of the
# rounds.
durable() {
  local f b s fl r
  for r in $(seq 1 "$rounds"); do
    f=$(result_file "$1" "${G:-ours}" "$2" "$r")
    [ -f "$f" ] || continue
    b=$(jget "$f" bytes); s=$(jget "$f" seconds); fl=$(jget "$f" flush_ms)
    [ -n "$fl" ] && [ "$fl" != null ] || continue
    awk -v b="$b" -v s="$s" -v fl="$fl" 'BEGIN { printf "%f\n", b / (s + fl / 1000) }'
  done | median
}
ratio_durable() {
  local a b
  a=$(durable "$1" "$2"); b=$(durable "$3" "$2")
  if [ -z "$a" ] || [ -z "$b" ]; then echo "n/a"; return; fi
  awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'
}

echo "Final FLUSH after each write case (ms; not counted in the throughput above):"
echo
echo "$header"; echo "$sep"
for c in "${cases[@]}"; do
  is_write_case "$c" || continue
  name=${c%%|*}; row="| $name |"
  for t in "${targets[@]}"; do
    v=$(result "$t" "$name" flush_ms)
    if [ -n "$v" ] && [ "$v" != null ]; then row+=" $(awk -v v="$v" 'BEGIN { printf "%.1f", v }') |"; else row+=" - |"; fi
  done
  echo "$row"
done
echo
echo "Ratios the project targets (throughput; 'with FLUSH' counts the final FLUSH in the time):"
echo
echo "| case | ours provisioned / QSD raw | ours fresh / QSD qcow2-empty | ours fresh / QSD qcow2-empty, with FLUSH |"
echo "|---|---|---|---|"
for c in "${cases[@]}"; do
  name=${c%%|*}
  d="-"; is_write_case "$c" && d=$(ratio_durable ours-fresh "$name" qsd-qcow2-empty)
  echo "| $name | $(ratio ours-prov "$name" qsd-raw "$name") | $(ratio ours-fresh "$name" qsd-qcow2-empty "$name") | $d |"
done
echo
for qd in 1 32; do
  echo "- ours provisioned, 4k randread QD$qd, 4 queues / 1 queue: $(ratio ours-prov "4k randread QD$qd 4q" ours-prov "4k randread QD$qd 1q")"
done
for nq in 1 4; do
  c="4k randwrite 1-per-64k QD32 ${nq}q"
  echo "- first writes ($c, every write allocates), ours fresh / QSD qcow2-empty: $(ratio ours-fresh "$c" qsd-qcow2-empty "$c") (with FLUSH: $(ratio_durable ours-fresh "$c" qsd-qcow2-empty))"
done
echo
echo "Notes:"
echo "- 'fresh' and 'qcow2-empty' start from a new, empty disk before every case: their read rows read"
echo "  unallocated space (zeroes); their sequential-write rows stop after one pass over the disk."
echo "- '1-per-64k' rows write 4 KiB at every 64 KiB-aligned offset once, in random order (--align 64k"
echo "  --single-pass): on the empty disks each write allocates a block/cluster, elsewhere it overwrites."
blk=65536
for c in "${cases[@]}"; do
  is_write_case "$c" || continue
  c=${c%%|*}
  f=$(result_file ours-fresh "$G" "$c" 1 json); fm=$(result_file ours-fresh "$G" "$c" 1 mapped)
  if [ -f "$f" ] && [ -f "$fm" ]; then
    w=$(jget "$f" writes); m=$(cat "$fm"); bsz=$(jget "$f" bs)
    awk -v w="$w" -v m="$m" -v c="$c" -v bs="$bsz" -v blk=$blk -v total=$((fresh_bytes / blk)) 'BEGIN {
      per = (bs > blk ? bs / blk : 1)
      printf "- ours fresh, %s: %d writes, %d of %d pool blocks provisioned: %.0f%% of the writes allocated\n",
        c, w, m, total, (w > 0 ? 100 * m / (w * per) : 0) }'
  fi
done
echo "- ours commits the pool at least every second while mappings change (fdatasync of the data file,"
echo "  then the metadata), also during the runs; QSD syncs only on FLUSH."
echo "- QSD null-co does not fill read buffers (read-zeroes=off): it is the transport ceiling."
# A FLUSH that returns much faster than QSD's on the same overwrite pattern did not sync the data.
for c in "4k randwrite QD32 1q" "4k randwrite QD32 4q"; do
  o=$(result ours-prov "$c" flush_ms); q=$(result qsd-raw "$c" flush_ms)
  if [ -n "$o" ] && [ -n "$q" ] && [ "$o" != null ] && [ "$q" != null ] &&
    awk -v o="$o" -v q="$q" 'BEGIN { exit !(o < 1 && q > 10 * o) }'; then
    awk -v o="$o" -v q="$q" -v c="$c" 'BEGIN {
      printf "- WARNING: ours provisioned, %s: the final FLUSH took %.3f ms against %.1f ms for QSD raw;\n", c, o, q }'
    echo "  overwrites of provisioned blocks change no metadata, and a FLUSH that finds no metadata"
    echo "  change returns without fdatasync of the data file: the overwritten data is not durable."
  fi
done
}

if [ ${#targets[@]} -gt 0 ] && [ ${#cases[@]} -gt 0 ]; then
  for G in "${gens[@]}"; do print_tables; done
fi
if [ ${#gens[@]} -gt 1 ] && [ ${#targets[@]} -gt 0 ] && [ ${#cases[@]} -gt 0 ]; then
  # The two generators on the same cell: far from 1.00 means one of them, not the backend,
  # limits the figure (both share the 2 CPUs with the backend).
  echo
  echo "### libblkio / bench/ throughput on the same case and backend (same run)"
  echo
  header="| case |"; sep="|---|"
  for t in "${targets[@]}"; do header+=" ${title[$t]} |"; sep+="---|"; done
  echo "$header"; echo "$sep"
  for c in "${cases[@]}"; do
    name=${c%%|*}; row="| $name |"
    for t in "${targets[@]}"; do
      a=$(G=blkio result "$t" "$name" mib_s); b=$(G=ours result "$t" "$name" mib_s)
      if [ -n "$a" ] && [ -n "$b" ]; then
        row+=" $(awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }') |"
      else row+=" n/a |"; fi
    done
    echo "$row"
  done
fi

# ---- the RAM-backed comparison -----------------------------------------------------------
# A provisioned pool on tmpfs against QSD null-co: what is left is the per-request cost of
# the daemon (vhost-user, the engine's lookup, a copy from the page cache of tmpfs), not the
# storage. Both backends stay up on their own sockets, so the runs interleave.
if [ "$ram" != 0 ]; then
  ram_dir=$(mktemp -d "${BENCH_RAM_DIR:-/dev/shm}/vhost-thin-ram.XXXXXX")
  ram_sock=$work/ram.sock; null_sock=$work/null.sock; base_sock=$work/base.sock
  baseline=${BENCH_RAM_BASELINE:-}
  ram_targets=(ours null); [ -n "$baseline" ] && ram_targets=(ours base null)
  ram_pids=()
  ram_cleanup() {
    for p in "${ram_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$ram_dir"
  }
  trap 'ram_cleanup; cleanup' EXIT
  echo
  echo "== RAM-backed: pool in $ram_dir (tmpfs) against QSD null-co, $ram_rounds rounds, $runtime s a run"
  "$thin" pool create -m "$ram_dir/pool.meta" -d "$ram_dir/pool.data" --data-size "$size_bytes" >/dev/null
  "$thin" thin create -m "$ram_dir/pool.meta" -d "$ram_dir/pool.data" --id 0 --size "$size_bytes" --name ram >/dev/null
  RUST_LOG=warn "$thin" serve -m "$ram_dir/pool.meta" -d "$ram_dir/pool.data" \
    --disk "id=0,socket=$ram_sock,num-queues=4" >>"$work/ours-ram.log" 2>&1 &
  ram_pids+=($!)
  socks=("$ram_sock" "$null_sock")
  if [ -n "$baseline" ]; then
    "$baseline" pool create -m "$ram_dir/base.meta" -d "$ram_dir/base.data" --data-size "$size_bytes" >/dev/null
    "$baseline" thin create -m "$ram_dir/base.meta" -d "$ram_dir/base.data" --id 0 --size "$size_bytes" --name ram >/dev/null
    RUST_LOG=warn "$baseline" serve -m "$ram_dir/base.meta" -d "$ram_dir/base.data" \
      --disk "id=0,socket=$base_sock,num-queues=4" >>"$work/base-ram.log" 2>&1 &
    ram_pids+=($!)
    socks+=("$base_sock")
  fi
  qemu-storage-daemon --blockdev "driver=null-co,node-name=top,size=$size_bytes" \
    --export "type=vhost-user-blk,id=e,node-name=top,addr.type=unix,addr.path=$null_sock,writable=on,num-queues=4" \
    >>"$work/qsd-null-ram.log" 2>&1 &
  ram_pids+=($!)
  for s in "${socks[@]}"; do
    for _ in $(seq 1 200); do [ -S "$s" ] && break; sleep 0.05; done
    [ -S "$s" ] || { echo "no socket $s" >&2; cat "$work"/ours-ram.log "$work"/qsd-null-ram.log >&2; exit 1; }
  done
  # Every block mapped: the reads go through the mapping and the data file, not the
  # zero-fill of unmapped blocks. The fill is verified; the timed runs are not (see above).
  echo "  prefill: sequential write pass over $size_bytes bytes (verified)"
  SOCK=$ram_sock run_bench "$work/results/ram-prefill.json" --rw write --bs 128k --iodepth 8 \
    --single-pass --runtime 600 --verify
  if [ -n "$baseline" ]; then
    SOCK=$base_sock run_bench "$work/results/ram-prefill-base.json" --rw write --bs 128k --iodepth 8 \
      --single-pass --runtime 600 --verify
  fi
  declare -A ram_title=([ours]="ours RAM" [base]="baseline RAM" [null]="QSD null-co")
  ram_json() { echo "$work/results/ram-$1-$2-$3q-r$4.json"; } # TARGET GEN QUEUES ROUND
  for r in $(seq 1 "$ram_rounds"); do
    for g in "${gens[@]}"; do
      for nq in 1 2; do
        for t in "${ram_targets[@]}"; do
          case $t in ours) s=$ram_sock ;; base) s=$base_sock ;; null) s=$null_sock ;; esac
          f=$(ram_json "$t" "$g" "$nq" "$r")
          GEN=$g SOCK=$s run_bench "$f" --rw randread --bs 4k --iodepth 32 --queues "$nq" --runtime "$runtime"
          [ -f "$f" ] && printf '  round %d %-5s %dq %-12s %9.0f IOPS  mean %7.1f us  p99 %8.1f us\n' "$r" "$g" "$nq" \
            "${ram_title[$t]}" "$(jget "$f" iops)" "$(jget "$f" lat_mean_us)" "$(jget "$f" lat_p99_us)"
        done
      done
    done
  done
  ram_cleanup; ram_pids=()
  trap cleanup EXIT
  echo
  echo "### RAM-backed pool (tmpfs) vs QSD null-co: 4k randread QD32, $runtime s a run, median of $ram_rounds interleaved rounds"
  echo
  echo "Load after: $(uptime | sed 's/.*load average: //'); $(nproc) CPUs shared. Target: ours / null-co >= 0.80."
  echo
  header="| generator | queues |"; sep="|---|---|"
  for t in "${ram_targets[@]}"; do header+=" ${ram_title[$t]} IOPS (rounds) |"; sep+="---|"; done
  header+=" ours / null-co (medians) | >= 0.80 |"; sep+="---|---|"
  [ -n "$baseline" ] && { header+=" ours / baseline |"; sep+="---|"; }
  echo "$header"; echo "$sep"
  for g in "${gens[@]}"; do
    for nq in 1 2; do
      row="| $g | $nq |"
      declare -A med=()
      for t in "${ram_targets[@]}"; do
        vals=$(for r in $(seq 1 "$ram_rounds"); do f=$(ram_json "$t" "$g" "$nq" "$r"); [ -f "$f" ] && jget "$f" iops; done)
        med[$t]=$(median <<<"$vals")
        row+=" $(awk -v v="${med[$t]:-0}" 'BEGIN { printf "%.1fk", v / 1000 }') ($(awk '{ printf "%s%.0f", (NR > 1 ? ", " : ""), $1 / 1000 }' <<<"$vals")) |"
      done
      rat=$(awk -v a="${med[ours]}" -v b="${med[null]}" 'BEGIN { if (a != "" && b > 0) printf "%.2f", a / b; else print "n/a" }')
      met=$(awk -v r="$rat" 'BEGIN { if (r == "n/a") print "n/a"; else print (r >= 0.80 ? "yes" : "no") }')
      row+=" $rat | $met |"
      if [ -n "$baseline" ]; then
        row+=" $(awk -v a="${med[ours]}" -v b="${med[base]}" 'BEGIN { if (a != "" && b > 0) printf "%.2f", a / b; else print "n/a" }') |"
      fi
      echo "$row"
      unset med
    done
  done
fi

if [ ${#failures[@]} -gt 0 ]; then
  echo
  echo "FAILURES:"
  printf -- '- %s\n' "${failures[@]}"
  keep=1
  exit 1
fi
