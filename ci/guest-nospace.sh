#!/usr/bin/env bash
# A write held for pool space holds only itself: QEMU (KVM when usable, else TCG) boots the
# test guest (ci/guest/) on one vhost-user-blk queue of a disk in a 32 MiB pool with policy
# `queue`. In the guest (in-guest/nospace.sh) a write fills the pool and is held; meanwhile
# a read of 16 MiB of mapped blocks and an overwrite of mapped blocks, on the same queue,
# must complete within READ_LIMIT seconds (the policy's timeout is 60 s: a queue held by
# the write would make them wait that long and the write fail). Then the daemon is
# SIGKILLed with the write held and started again: the new daemon must execute that write
# again from the inflight records (QEMU resumes the queue at the used index, which the
# completed read and overwrite passed), and nothing else. Then the host grows the pool
# (`pool-grow`), and the held write must complete and read back right. This needs inflight
# tracking, which QEMU's vhost-user-blk negotiates: the daemon's log must say so.
# Environment: VHOST_THIN_BIN, the vhost-thin binary to test (else one is built);
# VHOST_THIN_DEPS_DONE=1, ci/guest/install-deps.sh has run already (ci/test sets both);
# READ_LIMIT (default 20); NOSPACE_KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
name=guest-nospace
# shellcheck source=ci/guest/binary.sh
. ci/guest/binary.sh
limit=${READ_LIMIT:-20}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/vhost-thin-nospace.XXXXXX")
dpid="" gpid=""
cleanup() {
  if [ -n "$gpid" ]; then
    pkill -TERM -P "$gpid" 2>/dev/null || true
    kill "$gpid" 2>/dev/null || true
    wait "$gpid" 2>/dev/null || true
  fi
  [ -z "$dpid" ] || { kill -9 "$dpid"; wait "$dpid"; } 2>/dev/null || true
  if [ "${NOSPACE_KEEP:-}" = 1 ]; then echo "$name: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
console() { [ ! -f "$work/boot.log" ] || tr -d '\r' < "$work/boot.log"; }
fail() {
  echo "$name: FAIL: $*" >&2
  console | grep -a '^NOSPACE:' | sed 's/^/  guest: /' >&2
  for f in "$work/daemon.log" "$work/run-guest.log"; do [ -f "$f" ] && { echo "--- $f"; tail -n 30 "$f"; }; done >&2
  exit 1
}
sock=$work/disk0.sock qmp=$work/qmp.sock cfg=$work/vhost-thin.yaml
"$bin" pool create -m "$work/p.meta" -d "$work/p.data" --data-size 32MiB >/dev/null
"$bin" thin create -m "$work/p.meta" -d "$work/p.data" --id 0 --size 1GiB --name disk0 >/dev/null
cat > "$cfg" <<YAML
pools:
  - name: main
    metadata: $work/p.meta
    data: $work/p.data
    out-of-space:
      policy: queue
      timeout: 60
disks:
  - name: disk0
    pool: main
    size: 1GiB
    socket: $sock
    num-queues: 1
management:
  socket: $qmp
YAML
start_daemon() {
  rm -f "$sock" "$qmp"
  RUST_LOG=${RUST_LOG:-info,vhost_thin::blk::backend=debug} "$bin" serve --config "$cfg" >>"$work/daemon.log" 2>&1 &
  dpid=$!
  for _ in $(seq 200); do [ -S "$sock" ] && [ -S "$qmp" ] && return; sleep 0.05; done
  fail "the daemon did not create $sock and $qmp"
}
start_daemon
ci/guest/run-guest.sh --quiet --timeout 600 --log "$work/boot.log" --smp 1 \
  --vhost-user-blk "$sock,num-queues=1,reconnect=1" \
  ci/guest/in-guest/nospace.sh 2>>"$work/run-guest.log" &
gpid=$!
grown=""
while kill -0 "$gpid" 2>/dev/null; do
  if [ -z "$grown" ] && console | grep -aq '^NOSPACE: GROW-NOW'; then
    queued=$(VHOST_THIN_QMP=$qmp "$bin" ctl --json pools | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["queued-writes"])')
    [ "$queued" -ge 1 ] || fail "no write was held for space when the guest read and overwrote (queued-writes $queued)"
    kill -9 "$dpid"
    wait "$dpid" 2>/dev/null || true
    echo "--- SIGKILL" >>"$work/daemon.log"
    start_daemon
    # QEMU connects again within a second or two (reconnect=1).
    for _ in $(seq 300); do
      sed -n '/^--- SIGKILL/,$p' "$work/daemon.log" | grep -aq 'taken up' && break
      sleep 0.1
    done
    sed -n '/^--- SIGKILL/,$p' "$work/daemon.log" | grep -aq 'queue 0: 1 request(s) left in flight by the previous backend executed again' \
      || fail "the restarted daemon did not execute exactly the held write again"
    truncate -s 128MiB "$work/p.data"
    VHOST_THIN_QMP=$qmp "$bin" ctl exec pool-grow '{"pool": "main"}' >/dev/null || fail "pool-grow"
    grown=1
  fi
  sleep 0.2
done
rc=0; wait "$gpid" || rc=$?
gpid=""
console | grep -a '^NOSPACE:' | sed 's/^/  guest: /'
[ "$rc" = 0 ] || fail "the guest test failed (exit $rc)"
grep -aq 'inflight tracking on' "$work/daemon.log" || fail "QEMU did not negotiate inflight tracking: the test proves nothing"
read_cs=$(console | sed -n 's/^NOSPACE: READ-CS //p')
over_cs=$(console | sed -n 's/^NOSPACE: OVERWRITE-CS //p')
[ -n "$read_cs" ] && [ -n "$over_cs" ] || fail "no timings from the guest"
[ "$read_cs" -lt $((limit * 100)) ] || fail "the read took ${read_cs} cs with a write held (limit ${limit} s)"
[ "$over_cs" -lt $((limit * 100)) ] || fail "the overwrite took ${over_cs} cs with a write held (limit ${limit} s)"
kill -TERM "$dpid"; wait "$dpid" || fail "the daemon's clean stop failed"
dpid=""
"$bin" pool check -m "$work/p.meta" -d "$work/p.data" >/dev/null || fail "pool check"
thin_check "$work/p.meta" >/dev/null 2>&1 || fail "thin_check"
echo "$name: read of mapped blocks ${read_cs} cs, overwrite ${over_cs} cs while a write was held; after a SIGKILL the new daemon executed it again, and it completed after pool-grow"
echo "$name: PASS"
