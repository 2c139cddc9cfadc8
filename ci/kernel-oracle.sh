#!/usr/bin/env bash
# ci/kernel-oracle.sh: the Linux kernel as the oracle for pools written by our engine.
#
# Builds vhost-thin (release), writes a pool with the offline CLI (64 KiB blocks, 256 MiB of
# data) holding several thin devices with real content: an import of a 20 MiB file, a
# snapshot of it, overwrites of both (block-aligned, unaligned, beyond the imported extent,
# all-zero blocks over mapped ones), a snapshot of a snapshot, a device that is deleted again,
# a sparse device with a ragged size, a device of 640 mapped blocks (so that its mapping tree
# has internal nodes: a leaf holds at most 252 mappings), and an empty device with a large id.
# The script keeps a model of every device (plain sparse files changed with dd) and checks that
# `vhost-thin thin export` agrees with it; the export's sha256 is what the kernel must read.
# Then:
#   - the host's thin_check must pass on our metadata (and thin_dump must list our devices);
#   - ci/guest/dmthin-verify.sh boots the test guest (Debian 12, kernel 6.1, under QEMU), runs
#     the guest's thin_check, activates the pool read-only with the kernel's dm-thin-pool target
#     and sha256s every thin device over its full virtual size; every sha256 must match ours
#     and the kernel must see exactly our devices.
# Exit 0 only when all of that holds. The last line is a one-line summary.
#
# Environment:
#   CARGO_TARGET_DIR       cargo's target dir (default: target/ of the workspace)
#   VHOST_THIN_BIN         use this vhost-thin binary instead of building one
#   VHOST_THIN_DEPS_DONE   1: ci/guest/install-deps.sh has run already (ci/test sets it)
#   KERNEL_ORACLE_SEED     seed of the generated data (default: random; printed, so a failing
#                          run can be repeated with the same bytes; needs openssl)
#   KERNEL_ORACLE_MANY_DEVICES  add this many one-block devices (default 0; 130 gives the
#                          device-details tree internal nodes, 253 also the top-level mapping
#                          tree; the guest needs about 0.45 s per device under TCG)
#   KERNEL_ORACLE_KEEP     keep the pool, the model, the sha256.txt and the guest console log
#                          in this directory (default: a temp dir, removed at exit)
#   GUEST_DIR, GUEST_ACCEL, GUEST_BOOT   passed on to ci/guest/run-guest.sh (guest cache dir,
#                          default ~/.cache/vhost-thin-guest; accelerator; boot method)
# Host packages: ci/guest/install-deps.sh (run by this script when a tool is missing) and
# thin-provisioning-tools (installed here when missing, as ci/test does).
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

T0=$(date +%s)
export PATH="$PATH:/usr/sbin:/sbin"

log() { printf '\n=== kernel-oracle: %s\n' "$*"; }
die() { echo "kernel-oracle: FAIL: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# ---- host tools ------------------------------------------------------------------------------
if [ "${VHOST_THIN_DEPS_DONE:-}" != 1 ] && { ! command -v qemu-system-x86_64 >/dev/null \
   || ! command -v readelf >/dev/null || ! command -v xz >/dev/null \
   || ! command -v qemu-img >/dev/null; }; then
  log "installing the guest's host packages (ci/guest/install-deps.sh)"
  ci/guest/install-deps.sh
fi
if ! command -v thin_check >/dev/null; then
  log "installing thin-provisioning-tools"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq thin-provisioning-tools
fi
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi

# ---- build -----------------------------------------------------------------------------------
if [ -n "${VHOST_THIN_BIN:-}" ]; then
  bin=$(readlink -f "$VHOST_THIN_BIN")
  log "using $bin (VHOST_THIN_BIN)"
else
  log "cargo build --release -p vhost-thin"
  cargo build --release --locked -q -p vhost-thin
  bin=$(readlink -f "${CARGO_TARGET_DIR:-target}")/release/vhost-thin
fi
[ -x "$bin" ] || die "no vhost-thin binary at $bin"
T_BUILD=$(date +%s)

# ---- work dir --------------------------------------------------------------------------------
if [ -n "${KERNEL_ORACLE_KEEP:-}" ]; then
  W=$KERNEL_ORACLE_KEEP
  [ ! -e "$W" ] || [ -z "$(ls -A "$W")" ] || die "KERNEL_ORACLE_KEEP=$W is not empty"
  mkdir -p "$W"; W=$(readlink -f "$W")
else
  W=$(mktemp -d "${TMPDIR:-/tmp}/kernel-oracle.XXXXXX")
  trap 'rm -rf "$W"' EXIT
fi
mkdir -p "$W/in" "$W/model"
M=$W/pool.meta D=$W/pool.data
SEED=${KERNEL_ORACLE_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
if command -v openssl >/dev/null; then
  echo "kernel-oracle: data seed $SEED (KERNEL_ORACLE_SEED=$SEED repeats this run's bytes)"
else
  echo "kernel-oracle: openssl not found: data from /dev/urandom (not repeatable)"
fi

# gen NAME BYTES: a file of BYTES pseudo-random (non-zero) bytes in $W/in/NAME
gen() {
  if command -v openssl >/dev/null; then
    head -c "$2" /dev/zero \
      | openssl enc -aes-256-ctr -nosalt -pbkdf2 -pass "pass:$SEED-$1" > "$W/in/$1"
  else
    head -c "$2" /dev/urandom > "$W/in/$1"
  fi
  [ "$(stat -c %s "$W/in/$1")" = "$2" ] || die "gen $1: short file"
}

declare -A SIZE=()   # thin id -> virtual size in bytes (the model's, and the registry's)
vt() { echo "+ vhost-thin $*"; "$bin" "$@" --metadata "$M" --data "$D"; }
model() { echo "$W/model/$1.img"; }
# create ID SIZE [NAME]
create() {
  vt thin create --id "$1" --size "$2" ${3:+--name "$3"}
  SIZE[$1]=$2; truncate -s "$2" "$(model "$1")"
}
# snap ORIGIN ID
snap() {
  vt thin snapshot --origin "$1" --id "$2"
  SIZE[$2]=${SIZE[$1]}; cp --sparse=always "$(model "$1")" "$(model "$2")"
}
# put ID FILE OFFSET: import $W/in/FILE at byte OFFSET, and the same in the model
put() {
  vt thin import --id "$1" --input "$W/in/$2" --offset "$3"
  dd if="$W/in/$2" of="$(model "$1")" bs=64K seek="$3" oflag=seek_bytes conv=notrunc status=none
  [ "$(stat -c %s "$(model "$1")")" = "${SIZE[$1]}" ] || die "test bug: import past the end of $1"
}
del() { vt thin delete --id "$1"; unset "SIZE[$1]"; rm -f "$(model "$1")"; }

KiB=1024 MiB=$((1024 * 1024))
MANY=${KERNEL_ORACLE_MANY_DEVICES:-0}
case $MANY in ''|*[!0-9]*) die "KERNEL_ORACLE_MANY_DEVICES must be a number" ;; esac

# ---- the pool ----------------------------------------------------------------------------------
log "writing a pool with our engine in $W"
vt pool create --block-size 64KiB --data-size 256MiB

# 0: a 20 MiB image in a 64 MiB device
gen image20 $((20 * MiB))
create 0 $((64 * MiB)) base
put 0 image20 0
# 1: snapshot of 0; then both change (CoW of shared blocks and of shared tree nodes)
snap 0 1
gen p1 $((1 * MiB));       put 0 p1 $((3 * MiB))                  # aligned, shared blocks
gen p2 10000;              put 0 p2 $((5 * MiB + 777))            # unaligned, partial blocks
gen p3 $((256 * KiB));     put 1 p3 $((30 * MiB))                 # beyond the imported extent
gen p4 $((64 * KiB));      put 1 p4 0                             # first block
# all-zero blocks over mapped ones (the CLI unmaps them): 4 blocks, 2nd and 4th all zero
gen z1 $((64 * KiB))
{ cat "$W/in/z1"; head -c $((64 * KiB)) /dev/zero; cat "$W/in/z1"; head -c $((64 * KiB)) /dev/zero; } \
  > "$W/in/zeros"
put 1 zeros $((8 * MiB))
# 2: snapshot of the snapshot, changed across a block boundary
snap 1 2
gen p5 $((2 * MiB));       put 2 p5 $((10 * MiB + 4 * KiB))
# 3: snapshot of 2 with its own blocks, deleted again (frees its blocks, drops shared refs)
snap 2 3
gen p6 $((1 * MiB));       put 3 p6 $((12 * MiB))
gen p7 $((3 * MiB + 5));   put 3 p7 $((40 * MiB + 3))
del 3
# 1 changes once more after the delete (blocks freed by the delete may be reused)
gen p8 $((512 * KiB));     put 1 p8 $((16 * MiB + 512))
# 4: sparse, ragged size (not a whole number of blocks), a few scattered extents
create 4 $((96 * MiB + 12 * KiB)) sparse
gen s1 $((4 * KiB));       put 4 s1 0
gen s2 $((64 * KiB));      put 4 s2 $((47 * MiB))
gen s3 $((100 * KiB));     put 4 s3 $((80 * MiB + 30 * KiB))
gen s4 $((12 * KiB));      put 4 s4 $((96 * MiB))                 # the ragged last block
# 5: 40 MiB of non-zero data = 640 mapped blocks: the mapping tree needs internal nodes
gen big40 $((40 * MiB))
create 5 $((48 * MiB)) big
put 5 big40 0
gen p9 $((192 * KiB));     put 5 p9 $((40 * MiB - 64 * KiB))      # grow it across the end
# 77: empty (no mappings at all), a sparse id
create 77 $((16 * MiB)) empty
# optional: many small devices (ids 1001...), one mapped block each, so that the device-details
# tree (126 entries a leaf) and, from 253 devices, the top-level mapping tree get internal nodes
for i in $(seq 1 "$MANY"); do
  create $((1000 + i)) $((128 * KiB)) >/dev/null
  gen "m$i" $((64 * KiB)); put $((1000 + i)) "m$i" $(((i % 2) * 64 * KiB)) >/dev/null
done
vt thin ls
vt pool check

# ---- expected sha256: ours (export), checked against the model ---------------------------------
log "exporting every device"
: > "$W/sha256.txt"
ids=$(printf '%s\n' "${!SIZE[@]}" | sort -n)
for id in $ids; do
  size=${SIZE[$id]}
  [ $((size % 512)) = 0 ] || die "test bug: size of $id is not whole sectors"
  got=$("$bin" thin export --metadata "$M" --data "$D" --id "$id" --output - | sha256sum | cut -d' ' -f1)
  want=$(sha256sum < "$(model "$id")" | cut -d' ' -f1)
  [ "$got" = "$want" ] || die "vhost-thin thin export of device $id disagrees with the model (export $got, model $want)"
  echo "$id $((size / 512)) $got" >> "$W/sha256.txt"
  [ "$id" -gt 1000 ] || echo "device $id: $((size / 512)) sectors, export = model, sha256 $got"
done
ndev=$(wc -l < "$W/sha256.txt")

# ---- host thin_check / thin_dump -----------------------------------------------------------------
log "host thin_check ($(thin_check -V 2>/dev/null || echo '?'))"
thin_check "$M" || die "host thin_check failed on our metadata"
thin_dump "$M" > "$W/thin_dump.xml" || die "host thin_dump failed on our metadata"
# mapped blocks per device as thin_dump sees them
awk '
  /<device / { match($0, /dev_id="[0-9]+"/); id = substr($0, RSTART + 8, RLENGTH - 9); n[id] = 0 }
  /<single_mapping / { n[id]++ }
  /<range_mapping / { match($0, /length="[0-9]+"/); n[id] += substr($0, RSTART + 8, RLENGTH - 9) }
  END { for (i in n) print i, n[i] }' "$W/thin_dump.xml" | sort -n > "$W/dump-mapped.txt"
awk '$1 <= 1000 { print "thin_dump: device " $1 ": " $2 " mapped blocks" }' "$W/dump-mapped.txt"
[ "$(cut -d' ' -f1 "$W/dump-mapped.txt")" = "$ids" ] \
  || die "thin_dump lists devices $(cut -d' ' -f1 "$W/dump-mapped.txt" | xargs), expected $(echo "$ids" | xargs)"
big=$(awk '$1 == 5 { print $2 }' "$W/dump-mapped.txt")
[ "$big" -gt 252 ] || die "device 5 has only $big mappings: its tree has no internal node"

# ---- the kernel --------------------------------------------------------------------------------
log "the kernel: ci/guest/dmthin-verify.sh --expect sha256.txt (QEMU guest)"
T_GUEST=$(date +%s)
set +e
ci/guest/dmthin-verify.sh --expect "$W/sha256.txt" --keep "$W/verify" "$M" "$D" 2>&1 \
  | tee "$W/verify.out"
vrc=${PIPESTATUS[0]}
set -e
T_END=$(date +%s)
console=$W/verify/console.log
kver=$(tr -d '\r' < "$console" 2>/dev/null | sed -n 's/^GUEST-INIT: kernel \([^,]*\),.*/\1/p' | head -n1)
if [ "$vrc" != 0 ]; then
  echo "kernel-oracle: data seed $SEED; KERNEL_ORACLE_SEED=$SEED KERNEL_ORACLE_KEEP=DIR repeats this run and keeps the pool"
  echo "--- kernel messages (device-mapper, thin) from the guest console:"
  tr -d '\r' < "$console" 2>/dev/null | grep -a -i -E 'device-mapper|dm-thin|thin|bio|metadata|error' \
    | grep -a -v -E '^(VERIFY|thin_check:)' | tail -n 40 || true
  case $vrc in
    3) die "the guest's thin_check rejected our metadata (kernel ${kver:-?})" ;;
    1) die "the kernel read different data (or devices are missing) (kernel ${kver:-?})" ;;
    *) die "dmthin-verify.sh failed with status $vrc (guest/boot failure; see above)" ;;
  esac
fi
grep -q '^VERIFY-CHECK: 0$' "$W/verify.out" || die "no passing thin_check from the guest"
grep -q '^dmthin-verify: PASS$' "$W/verify.out" || die "dmthin-verify.sh did not report PASS"
nmatch=$(grep -c '^dmthin-verify: dev [0-9]*: sha256 matches' "$W/verify.out" || true)
[ "$nmatch" = "$ndev" ] || die "$nmatch of $ndev devices matched"
if grep -q 'devices not in the expect file' "$W/verify.out"; then
  die "the kernel sees devices we do not have: $(grep 'devices not in the expect file' "$W/verify.out")"
fi
grep -q '^VERIFY: thin_check after deactivation: exit 0$' "$W/verify.out" \
  || die "the guest's thin_check failed after the pool was deactivated"

echo
echo "kernel-oracle: timings: build $((T_BUILD - T0)) s, pool+export+host checks $((T_GUEST - T_BUILD)) s, guest $((T_END - T_GUEST)) s, total $((T_END - T0)) s"
echo "kernel-oracle: $ndev devices, all sha256 match (kernel ${kver:-?} dm-thin; guest and host thin_check pass)"
