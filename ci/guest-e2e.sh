#!/usr/bin/env bash
# End to end with a real Linux guest: QEMU (KVM when usable, else TCG) boots the test guest
# (ci/guest/) against `vhost-thin serve --config` with two pools, main and spare. Boot 1:
# size and serial, ext4 + files + e2fsck, then fio randwrite+verify rounds on 2 queues while
# `ctl migrate` moves the running disk from main to spare (its pause is printed), and the
# guest reads its files again, now from spare. Offline: pool check + thin_check of both
# pools, main left empty, the device exported from spare equals what the guest wrote, then a
# snapshot. Boot 2 (disk0 served from spare after a restart): `ctl resize` grows the disk
# while the guest runs and the guest kernel sees the new size at once (vhost-user config
# change) and grows ext4 online; boot 1's files intact, delete + fstrim returns the blocks
# (fewer mapped blocks), and the snapshot still holds boot 1's data.
# Environment: VHOST_THIN_BIN, use this vhost-thin binary instead of building one;
# VHOST_THIN_DEPS_DONE=1, ci/guest/install-deps.sh has run already (ci/test sets both).
set -euo pipefail
cd "$(dirname "$0")/.."
name=guest-e2e
# shellcheck source=ci/guest/binary.sh
. ci/guest/binary.sh
work=$(mktemp -d "${TMPDIR:-/var/tmp}/vhost-thin-e2e.XXXXXX")
dpid="" helper=""
cleanup() {
  [ -n "$helper" ] && kill "$helper" 2>/dev/null
  [ -n "$dpid" ] && kill -9 "$dpid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "guest-e2e: FAIL: $*" >&2; for f in "$work"/*.log; do echo "--- $f"; tail -n 30 "$f"; done >&2; exit 1; }

sock=$work/disk0.sock qmp=$work/qmp.sock cfg=$work/vhost-thin.yaml
for p in main spare; do
  "$bin" pool create -m "$work/$p.meta" -d "$work/$p.data" --data-size 2GiB >/dev/null
done
"$bin" thin create -m "$work/main.meta" -d "$work/main.data" --id 0 --size 1GiB --name disk0 >/dev/null
# The configuration keeps saying pool main after the migration: the registry, which says
# spare, wins when the daemon restarts for boot 2.
cat > "$cfg" <<YAML
pools:
  - name: main
    metadata: $work/main.meta
    data: $work/main.data
  - name: spare
    metadata: $work/spare.meta
    data: $work/spare.data
disks:
  - name: disk0
    pool: main
    size: 1GiB
    socket: $sock
    num-queues: 2
management:
  socket: $qmp
YAML
# json POOL NAME FIELD: a field of a thin device of a pool, by name, from `thin ls --json`.
json() {
  "$bin" thin ls -m "$work/$1.meta" -d "$work/$1.data" --json \
    | python3 -c "import json,sys; r={d['name']: d for d in json.load(sys.stdin)}; print(r['$2']['$3'])"
}
serial=$(json main disk0 serial)

start_daemon() {
  rm -f "$sock" "$qmp"
  "$bin" serve --config "$cfg" >>"$work/daemon.log" 2>&1 &
  dpid=$!
  for _ in $(seq 200); do [ -S "$sock" ] && [ -S "$qmp" ] && return; sleep 0.05; done
  fail "the daemon did not create $sock and $qmp"
}
stop_daemon() {
  kill -TERM "$dpid"
  local rc=0; wait "$dpid" || rc=$?
  dpid=""
  [ "$rc" = 0 ] || fail "the daemon exited with $rc after SIGTERM"
}
check_pools() {
  for p in main spare; do
    "$bin" pool check -m "$work/$p.meta" -d "$work/$p.data" >/dev/null || fail "vhost-thin pool check of $p"
    thin_check "$work/$p.meta" >/dev/null 2>&1 || fail "thin_check of $p"
  done
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
# waits_for N LINE: waits (up to 10 minutes) until boot N's console has LINE.
waits_for() {
  for _ in $(seq 3000); do
    [ -f "$work/boot$1.log" ] && tr -d '\r' < "$work/boot$1.log" | grep -aq "^$2" && return 0
    sleep 0.2
  done
  return 1
}

echo "guest-e2e: boot 1 (ext4, files, e2fsck; fio verify on 2 queues while disk0 moves from pool main to spare)"
start_daemon
# Once the guest runs fio: the migration, then 64 MiB more, which tells the guest that the
# migration is over.
migrated_sectors=$(( (1024 + 64) * 2048 ))
(
  waits_for 1 'E2E: MIGRATE-NOW' || exit 0
  "$bin" ctl --socket "$qmp" --json migrate disk0 spare >"$work/migrate.json" 2>>"$work/migrate.log"
  "$bin" ctl --socket "$qmp" resize disk0 1088MiB >>"$work/migrate.log" 2>&1
) &
helper=$!
boot 1 ci/guest/in-guest/e2e-boot1.sh --env EXPECT_SIZE=1073741824 --env "EXPECT_SERIAL=$serial" \
  --env FS_MB=512 --env NUMJOBS=2 --env "MIGRATED_SECTORS=$migrated_sectors"
wait "$helper" || fail "ctl migrate or the resize after it failed"
helper=""
python3 - "$work/migrate.json" <<'PY' || fail "disk-migrate's result: $(cat "$work/migrate.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["disk"] == "disk0" and r["from"] == "main" and r["to"] == "spare", r
print(f"  boot 1: disk-migrate main -> spare while fio ran: pause {r['pause-us']} us with writes held, "
      f"{r['live-passes']} live passes, pass bytes {r['pass-bytes']}, {r['data-bytes']} bytes copied")
PY
fs_sha=$(tr -d '\r' < "$work/boot1.log" | sed -n 's/^E2E: FS-SHA256 //p')
[ -n "$fs_sha" ] || fail "boot 1 printed no filesystem hash"
stop_daemon
check_pools
left=$("$bin" thin ls -m "$work/main.meta" -d "$work/main.data" --json | python3 -c "import json,sys; print(len(json.load(sys.stdin)))")
[ "$left" = 0 ] || fail "pool main still holds $left thin devices after the migration"
[ "$(json spare disk0 serial)" = "$serial" ] || fail "disk0's serial changed in the migration"
id0=$(json spare disk0 id)
got=$("$bin" thin export -m "$work/spare.meta" -d "$work/spare.data" --id "$id0" --size 512MiB -o - | sha256sum | cut -d' ' -f1)
[ "$got" = "$fs_sha" ] || fail "filesystem exported from spare $got differs from what the guest hashed, $fs_sha"
echo "  offline: pool check and thin_check of main and spare clean; main empty; export from spare matches the guest's sha256 $fs_sha"
mapped1=$(json spare disk0 mapped_blocks)
"$bin" thin snapshot -m "$work/spare.meta" -d "$work/spare.data" --origin "$id0" --id $((id0 + 1)) --name boot1 >/dev/null

echo "guest-e2e: boot 2 (disk0 served from spare: grown online, files intact, rm + fstrim)"
start_daemon
# Grows the disk to 1.5 GiB once the guest says it is waiting for it.
(
  waits_for 2 'E2E: WAITING-FOR-RESIZE' || exit 0
  "$bin" ctl --socket "$qmp" resize disk0 1536MiB >>"$work/resize.log" 2>&1
) &
helper=$!
boot 2 ci/guest/in-guest/e2e-boot2.sh --env EXPECT_GROWN_SECTORS=3145728
wait "$helper" || true
helper=""
sed 's/^/  boot 2: ctl resize: /' "$work/resize.log"
stop_daemon
check_pools
mapped2=$(json spare disk0 mapped_blocks)
# The 64 MiB file was 1024 blocks of 64 KiB; allow for metadata the filesystem rewrote.
[ $((mapped1 - mapped2)) -ge 900 ] || fail "fstrim returned too little: mapped blocks $mapped1 -> $mapped2"
snap=$("$bin" thin export -m "$work/spare.meta" -d "$work/spare.data" --id $((id0 + 1)) --size 512MiB -o - | sha256sum | cut -d' ' -f1)
[ "$snap" = "$fs_sha" ] || fail "the snapshot changed: $snap, boot 1 wrote $fs_sha"
echo "  offline: mapped blocks of disk0 $mapped1 -> $mapped2 after fstrim; snapshot keeps boot 1's data"
echo "guest-e2e: PASS"
