# shellcheck shell=bash disable=SC2034,SC2154  # variables set by and for the sourcing script
# Shared by ci/bench-migrate.sh, ci/bench-snapshot.sh and ci/bench-receive.sh (sourced, not
# run): release binaries, a work directory removed at exit unless --keep, the disk size in
# bytes, and the 4 KiB random-write load whose latency they report.
#
# The sourcing script sets: name (for messages and the work directory), size, runtime,
# keep, generator (ours: bench/'s vhost-thin-bench; blkio: bench-blkio/'s
# vhost-thin-blkio-bench, on libblkio). It gets: thin, bench (bench/, which also fills the
# disk), loadgen (the generator of the measured load), work, sock, size_bytes, pid (the
# daemon under test).
#
# Environment: THIN, a vhost-thin binary to measure instead of the one built here (to run
# two versions interleaved, each run with its own peer run).

echo "building release binaries"
case "${generator:-ours}" in
  ours) gen_pkg=() ;;
  blkio) gen_pkg=(-p vhost-thin-blkio-bench) ;;
  *) echo "bench-$name: --generator must be ours or blkio" >&2; exit 2 ;;
esac
cargo build --release --locked -q -p vhost-thin -p vhost-thin-bench "${gen_pkg[@]}"
target=$(cargo metadata --format-version 1 --no-deps --locked |
  grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
thin=${THIN:-$target/release/vhost-thin}
[ -x "$thin" ] || { echo "bench-$name: THIN=$thin is not an executable" >&2; exit 2; }
echo "vhost-thin: $thin"
bench=$target/release/vhost-thin-bench
case "${generator:-ours}" in
  ours) loadgen=$bench ;;
  blkio) loadgen=$target/release/vhost-thin-blkio-bench ;;
esac
echo "load generator: $(basename "$loadgen")"

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vhost-thin-$name.XXXXXX")
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [ "$keep" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
sock=$work/disk0.sock
size_bytes=$(python3 -c "
import re, sys; m = re.fullmatch(r'(\d+)\s*([kKmMgGtT]?)(i?[bB])?', sys.argv[1]) or sys.exit('bad size ' + sys.argv[1])
print(int(m.group(1)) << {'': 0, 'k': 10, 'm': 20, 'g': 30, 't': 40}[m.group(2).lower()])" "$size")

wait_socket() { # SOCKET LOG
  for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done
  echo "bench-$name: no socket $1" >&2; tail -n 20 "$2" >&2; exit 1
}
stop() { kill -TERM "$pid"; wait "$pid" || true; pid=; }
jget() { python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))[sys.argv[2]]))' "$1" "$2"; }
load() { # OUT: 4 KiB random writes, QD32, verified, for $runtime s (requests slower than
  # $log_slow ms, when set, to OUT.err)
  "$loadgen" --socket "$sock" --json --rw randwrite --bs 4k --iodepth 32 --queues 1 \
    --runtime "$runtime" --verify ${log_slow:+--log-slow-ms "$log_slow"} >"$1" 2>"$1.err"
}
report() { # NAME OUT
  printf '  %-28s %8.0f IOPS  mean %7.1f us  p99 %8.1f us  p99.9 %9.1f us  max %9.1f us\n' "$1" \
    "$(jget "$2" iops)" "$(jget "$2" lat_mean_us)" "$(jget "$2" lat_p99_us)" \
    "$(jget "$2" lat_p999_us)" "$(jget "$2" lat_max_us)"
}
prefill() { # one sequential pass over the whole disk
  "$bench" --socket "$sock" --rw write --bs 128k --iodepth 8 --single-pass --runtime 600 \
    --verify >/dev/null
}
