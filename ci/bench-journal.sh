#!/usr/bin/env bash
# What crash-safe acknowledged writes cost on first writes: the daemon with its journal (this
# tree) against the daemon before the journal (a git revision), in the same run, rounds
# interleaved. Each round serves a fresh pool and a fresh, empty disk and writes 4 KiB at
# random offsets, QD32, with the project's load generator (every write provisions a block:
# the disk is 64 GiB, so a run touches a tiny fraction of its blocks).
#
#   ci/bench-journal.sh [--runtime SECS] [--rounds N] [--size SIZE] [--before REV] [--keep]
#
#   --runtime S   seconds per round (default 10)
#   --rounds N    rounds per binary (default 3)
#   --size SIZE   disk size (default 64GiB)
#   --before REV  the revision without the journal (default: the parent of the commit that
#                 added thinpool/src/journal.rs); BEFORE_BIN=path skips building it
#   --keep        keep the work directory
set -euo pipefail
cd "$(dirname "$0")/.."

name=journal runtime=10 rounds=3 size=64GiB keep=0 before=
while [ $# -gt 0 ]; do
  case "$1" in
    --runtime) runtime=$2; shift ;;
    --rounds) rounds=$2; shift ;;
    --size) size=$2; shift ;;
    --before) before=$2; shift ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# shellcheck source=ci/bench-lib.sh
. ci/bench-lib.sh

if [ -z "${BEFORE_BIN:-}" ]; then
  if [ -z "$before" ]; then
    added=$(git log --diff-filter=A --format=%H -- thinpool/src/journal.rs | tail -n 1)
    before=$added^
  fi
  echo "building the daemon at $before (before the journal)"
  git worktree add -q --detach "$work/before-src" "$before"
  (cd "$work/before-src" && CARGO_TARGET_DIR=$work/before-target \
    cargo build --release --locked -q -p vhost-thin)
  BEFORE_BIN=$work/before-target/release/vhost-thin
  git worktree remove --force "$work/before-src"
fi

# One round: a new pool, a new empty disk, the write load; prints IOPS.
round() { # BIN OUT
  rm -f "$work"/pool.* "$sock"
  "$1" pool create -m "$work/pool.meta" -d "$work/pool.data" --data-size "$size" >/dev/null
  "$1" thin create -m "$work/pool.meta" -d "$work/pool.data" --id 0 --size "$size" \
    --name disk0 >/dev/null
  RUST_LOG=warn "$1" serve -m "$work/pool.meta" -d "$work/pool.data" \
    --disk "id=0,socket=$sock" >"$work/daemon.log" 2>&1 &
  pid=$!
  wait_socket "$sock" "$work/daemon.log"
  load "$2"
  stop
  jget "$2" iops
}

echo "first writes: fresh $size disk, 4 KiB random writes, QD32, ${runtime}s, $rounds rounds each"
printf '  %-6s %12s %12s %8s\n' round before after ratio
ratios=()
for r in $(seq 1 "$rounds"); do
  b=$(round "$BEFORE_BIN" "$work/before-$r.json")
  a=$(round "$thin" "$work/after-$r.json")
  ratio=$(python3 -c "print(f'{$a / $b:.3f}')")
  ratios+=("$ratio")
  printf '  %-6s %12.0f %12.0f %8s\n' "$r" "$b" "$a" "$ratio"
done
python3 -c "import statistics, sys; print(f'  median after/before: {statistics.median(map(float, sys.argv[1:])):.3f}')" "${ratios[@]}"
