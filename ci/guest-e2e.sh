#!/usr/bin/env bash
# End to end with a real Linux guest: QEMU (KVM when usable, else TCG) boots the test guest
# (ci/guest/) against `vhost-thin serve`. Boot 1: size and serial, ext4 + files + e2fsck,
# fio randwrite+verify on 2 queues. Offline: pool check + thin_check, the exported device
# equals what the guest wrote, then a snapshot. Boot 2: `ctl resize` grows the disk while the
# guest runs and the guest kernel sees the new size at once (vhost-user config change) and
# grows ext4 online; boot 1's files intact, delete + fstrim returns the blocks (fewer mapped
# blocks), and the snapshot still holds boot 1's data.
# Environment: VHOST_THIN_BIN, use this vhost-thin binary instead of building one;
# VHOST_THIN_DEPS_DONE=1, ci/guest/install-deps.sh has run already (ci/test sets both).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

[ "${VHOST_THIN_DEPS_DONE:-}" = 1 ] || ci/guest/install-deps.sh >/dev/null
if [ -n "${VHOST_THIN_BIN:-}" ]; then
  bin=$(readlink -f "$VHOST_THIN_BIN")
else
  cargo build --release --locked -q -p vhost-thin
  bin=$(readlink -f "${CARGO_TARGET_DIR:-target}/release/vhost-thin")
fi
[ -x "$bin" ] || { echo "guest-e2e: no vhost-thin binary at $bin" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/var/tmp}/vhost-thin-e2e.XXXXXX")
dpid=""
cleanup() { [ -n "$dpid" ] && kill -9 "$dpid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
fail() { echo "guest-e2e: FAIL: $*" >&2; for f in "$work"/*.log; do echo "--- $f"; tail -n 30 "$f"; done >&2; exit 1; }

m=$work/pool.meta d=$work/pool.data sock=$work/disk0.sock qmp=$work/qmp.sock
"$bin" pool create -m "$m" -d "$d" --data-size 2GiB >/dev/null
"$bin" thin create -m "$m" -d "$d" --id 0 --size 1GiB --name disk0 >/dev/null
json() { "$bin" thin ls -m "$m" -d "$d" --json | python3 -c "import json,sys; r={d['id']: d for d in json.load(sys.stdin)}; print(r[$1]['$2'])"; }
serial=$(json 0 serial)

start_daemon() {
  rm -f "$sock"
  "$bin" serve -m "$m" -d "$d" --disk "name=disk0,socket=$sock,num-queues=2" --qmp "$qmp" >>"$work/daemon.log" 2>&1 &
  dpid=$!
  for _ in $(seq 200); do [ -S "$sock" ] && return; sleep 0.05; done
  fail "the daemon did not create $sock"
}
stop_daemon() {
  kill -TERM "$dpid"
  local rc=0; wait "$dpid" || rc=$?
  dpid=""
  [ "$rc" = 0 ] || fail "the daemon exited with $rc after SIGTERM"
}
check_pool() {
  "$bin" pool check -m "$m" -d "$d" >/dev/null || fail "vhost-thin pool check"
  thin_check "$m" >/dev/null 2>&1 || fail "thin_check"
}
boot() {
  local n=$1 script=$2; shift 2
  local t0; t0=$(date +%s)
  ci/guest/run-guest.sh --quiet --timeout 600 --log "$work/boot$n.log" \
    --vhost-user-blk "$sock,num-queues=2,reconnect=1" "$@" "$script" 2>>"$work/run-guest.log" \
    || fail "boot $n: guest test failed"
  tr -d '\r' < "$work/boot$n.log" | grep -a '^E2E:' | sed "s/^/  boot $n: /"
  echo "  boot $n: $(( $(date +%s) - t0 )) s"
}

echo "guest-e2e: boot 1 (ext4, files, e2fsck, fio verify on 2 queues)"
start_daemon
boot 1 ci/guest/in-guest/e2e-boot1.sh --env EXPECT_SIZE=1073741824 --env "EXPECT_SERIAL=$serial" \
  --env FS_MB=512 --env NUMJOBS=2
fs_sha=$(tr -d '\r' < "$work/boot1.log" | sed -n 's/^E2E: FS-SHA256 //p')
[ -n "$fs_sha" ] || fail "boot 1 printed no filesystem hash"
stop_daemon
check_pool
got=$("$bin" thin export -m "$m" -d "$d" --id 0 --size 512MiB -o - | sha256sum | cut -d' ' -f1)
[ "$got" = "$fs_sha" ] || fail "exported filesystem $got differs from what the guest hashed, $fs_sha"
echo "  offline: pool check and thin_check clean; export matches the guest's sha256 $fs_sha"
mapped1=$(json 0 mapped_blocks)
"$bin" thin snapshot -m "$m" -d "$d" --origin 0 --id 1 --name boot1 >/dev/null

echo "guest-e2e: boot 2 (grown online, files intact, rm + fstrim)"
start_daemon
# Grows the disk to 1.5 GiB once the guest says it is waiting for it.
(
  for _ in $(seq 3000); do
    if [ -f "$work/boot2.log" ] && tr -d '\r' < "$work/boot2.log" | grep -aq '^E2E: WAITING-FOR-RESIZE'; then
      "$bin" ctl --socket "$qmp" resize disk0 1536MiB >>"$work/resize.log" 2>&1
      exit
    fi
    sleep 0.2
  done
) &
resizer=$!
boot 2 ci/guest/in-guest/e2e-boot2.sh --env EXPECT_GROWN_SECTORS=3145728
wait "$resizer" || true
sed 's/^/  boot 2: ctl resize: /' "$work/resize.log"
stop_daemon
check_pool
mapped2=$(json 0 mapped_blocks)
# The 64 MiB file was 1024 blocks of 64 KiB; allow for metadata the filesystem rewrote.
[ $((mapped1 - mapped2)) -ge 900 ] || fail "fstrim returned too little: mapped blocks $mapped1 -> $mapped2"
snap=$("$bin" thin export -m "$m" -d "$d" --id 1 --size 512MiB -o - | sha256sum | cut -d' ' -f1)
[ "$snap" = "$fs_sha" ] || fail "the snapshot changed: $snap, boot 1 wrote $fs_sha"
echo "  offline: mapped blocks of disk0 $mapped1 -> $mapped2 after fstrim; snapshot keeps boot 1's data"
echo "guest-e2e: PASS"
