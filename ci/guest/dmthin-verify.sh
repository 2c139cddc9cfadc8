#!/usr/bin/env bash
# dmthin-verify.sh [options] METADATA DATA
#
# Oracle: can the real Linux kernel (6.1 dm-thin-pool, in the test guest) read this pool, and
# what does each thin device contain? METADATA and DATA are files (raw, or .gz/.zst, which are
# decompressed); COPIES are attached read-write through QEMU's built-in virtio-blk, so the
# inputs are never modified. In the guest: thin_check; thin_dump gives the data block size and
# the device list; the pool is activated (read_only by default) with dmsetup; each thin device
# is activated and the sha256 of its full contents printed; all is removed again.
#
# Options:
#   --expect FILE       lines "dev_id size_sectors sha256" (a fixture's sha256.txt): gives the
#                       device sizes, and every listed device must match; exit 1 otherwise
#   --sizes FILE        lines "dev_id size_sectors ...": device sizes only
#   --dev-size ID=SECTORS   one device's size (repeatable; wins over files)
#                       A device with no given size is activated over its mapped extent
#                       (end of its highest mapping), which is NOT its full virtual size.
#   --block-size SECTORS    data block size (default: from thin_dump)
#   --rw                activate the pool read-write (default: read_only feature)
#   --force             activate even if thin_check fails
#   --keep DIR          keep the copies and the console log in DIR
# Other options go to run-guest.sh (--timeout, --guest-dir, --accel, ...).
# Exit: 0 all good; 1 sha256 mismatch or a listed device missing; 2 usage; 3 thin_check failed
# in the guest; other: guest/boot failure.
set -euo pipefail
HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
EXPECT="" SIZES="" KEEP="" RG=() DEVSIZES=() ENVS=()
while [ $# -gt 0 ]; do
  case $1 in
    --expect) EXPECT=$2; shift 2 ;;
    --sizes) SIZES=$2; shift 2 ;;
    --dev-size) DEVSIZES+=("$2"); shift 2 ;;
    --block-size) ENVS+=(--env "BLOCK_SECTORS=$2"); shift 2 ;;
    --rw) ENVS+=(--env POOL_RW=1); shift ;;
    --force) ENVS+=(--env FORCE_ACTIVATE=1); shift ;;
    --keep) KEEP=$2; shift 2 ;;
    --timeout|--guest-dir|--accel|--boot|--smp|--mem|--append) RG+=("$1" "$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "dmthin-verify: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -eq 2 ] || { echo "usage: dmthin-verify.sh [options] METADATA DATA" >&2; exit 2; }
if [ -n "$KEEP" ]; then mkdir -p "$KEEP"; W=$(readlink -f "$KEEP"); else
  W=$(mktemp -d "${TMPDIR:-/tmp}/dmthin-verify.XXXXXX"); trap 'rm -rf "$W"' EXIT; fi
copy_in() {   # copy_in SRC DST: decompress or copy, keeping holes
  # shellcheck disable=SC2216 # cp reads the pipe through /dev/stdin
  case $1 in
    *.gz) gzip -dc "$1" | cp --sparse=always /dev/stdin "$2" ;;
    *.zst) zstd -q -dc "$1" | cp --sparse=always /dev/stdin "$2" ;;
    *) cp --sparse=always "$1" "$2" ;;
  esac
}
copy_in "$1" "$W/meta.img"
copy_in "$2" "$W/data.img"
# virtio-blk sizes are whole sectors; pad a ragged file (the pool only uses what fits)
for f in meta data; do
  s=$(stat -c %s "$W/$f.img"); [ $((s % 512)) = 0 ] || truncate -s $(( (s / 512 + 1) * 512 )) "$W/$f.img"
done
: > "$W/sizes.txt"
[ -z "$SIZES" ] || awk 'NF >= 2 && $1 ~ /^[0-9]+$/ { print $1, $2 }' "$SIZES" >> "$W/sizes.txt"
[ -z "$EXPECT" ] || awk 'NF >= 2 && $1 ~ /^[0-9]+$/ { print $1, $2 }' "$EXPECT" >> "$W/sizes.txt"
for ds in ${DEVSIZES[@]+"${DEVSIZES[@]}"}; do echo "${ds%%=*} ${ds#*=}"; done > "$W/given.txt"
cat "$W/sizes.txt" >> "$W/given.txt"        # first match wins in the guest: --dev-size first
set +e
"$HERE/run-guest.sh" --quiet --timeout 900 --log "$W/console.log" \
  --disk "$W/meta.img" --disk "$W/data.img" --file "$W/given.txt=/verify/sizes.txt" \
  ${ENVS[@]+"${ENVS[@]}"} ${RG[@]+"${RG[@]}"} "$HERE/in-guest/dmthin-verify.sh"
rc=$?
set -e
tr -d '\r' < "$W/console.log" | grep -a -E '^(VERIFY|thin_check:)' || true
if [ "$rc" = 3 ]; then echo "dmthin-verify: thin_check failed in the guest" >&2; exit 3; fi
[ "$rc" = 0 ] || { tail -n 30 "$W/console.log" >&2; echo "dmthin-verify: guest run failed ($rc)" >&2; exit "$rc"; }
tr -d '\r' < "$W/console.log" | sed -n 's/^VERIFY-DEV: //p' > "$W/got.txt"
if [ -n "$EXPECT" ]; then
  bad=0
  while read -r id size sum _; do
    case $id in ''|\#*) continue ;; esac
    got=$(awk -v id="$id" '$1 == id { print $2, $3 }' "$W/got.txt")
    if [ "$got" = "$size $sum" ]; then echo "dmthin-verify: dev $id: sha256 matches ($size sectors)"
    elif [ -z "$got" ]; then echo "dmthin-verify: dev $id: MISSING from the metadata"; bad=1
    else echo "dmthin-verify: dev $id: MISMATCH: got '$got', expected '$size $sum'"; bad=1; fi
  done < "$EXPECT"
  extra=$(awk 'NR == FNR { want[$1] = 1; next } !($1 in want) { print $1 }' "$EXPECT" "$W/got.txt")
  [ -z "$extra" ] || echo "dmthin-verify: note: devices not in the expect file: $extra"
  [ $bad = 0 ] || { echo "dmthin-verify: FAIL"; exit 1; }
  echo "dmthin-verify: PASS"
fi
