#!/usr/bin/env bash
# The daemon killed under a running guest loses no write the guest was told was done, and
# the guest does not hang. QEMU (KVM when usable, else TCG) boots the test guest (ci/guest/)
# with a fresh disk served by `vhost-thin serve` over vhost-user-blk with reconnect=1 (QEMU
# connects again after the daemon comes back). In the guest, fio rounds (in-guest/crash-fio.sh):
# random writes with crc32c headers, O_DIRECT and never a flush, each round on fresh blocks,
# then a separate --verify_only pass over the round's region. While each round writes, this
# script sends the daemon a signal at random points of the round (twice by default) and
# starts it again on the same files each time:
#   SIGKILL  a crash: nothing committed since the last periodic commit (every second) but
#            the journal of mapping changes; the restarted daemon must replay it (its log
#            says how many changes it replayed, and this script requires that it did);
#   SIGTERM  a clean stop, as for an upgrade: drain, commit, exit 0; nothing to replay.
# Requests in flight at the signal: QEMU, finding the connection gone, takes the used index
# in guest memory as the point to resume from, and the new daemon executes the requests
# after it again; each fio run must finish within FIO_LIMIT seconds or the guest reports a
# hang. Afterwards, offline: `pool check`, thin_check, and the thin device's contents equal
# the sha256 that the guest computed of everything it wrote.
#
# Environment: VHOST_THIN_BIN, the vhost-thin binary to test (else one is built);
# VHOST_THIN_DEPS_DONE=1, ci/guest/install-deps.sh has run already (ci/test sets both);
# CRASH_ROUNDS, the signal of each round (default "KILL KILL TERM");
# CRASH_SIGNALS_PER_ROUND, how many times each round sends it (default 2);
# CRASH_SEED, the seed of the random kill moments (default: random; printed);
# CRASH_KEEP=1, keep the work directory (pool, logs, the guest's console).
set -euo pipefail
cd "$(dirname "$0")/.."
name=guest-crash
# shellcheck source=ci/guest/binary.sh
. ci/guest/binary.sh

rounds=${CRASH_ROUNDS:-KILL KILL TERM}
per_round=${CRASH_SIGNALS_PER_ROUND:-2}
seed=${CRASH_SEED:-$(( $(date +%s%N) % 32768 ))}
RANDOM=$seed
# Per round 2 fio jobs (one per queue) of 48 MiB each, on blocks no round wrote before.
# The signals of a round come at random points of its progress, measured as the blocks
# the pool allocated in its (sparse) data file: between 10% and 85% of the round's blocks,
# so the writes are under way whatever the speed (TCG or KVM), at a random moment of the
# daemon's one-second commit cycle.
jobs=2 round_mb=48 fio_limit=240
work=$(mktemp -d "${TMPDIR:-/var/tmp}/vhost-thin-crash.XXXXXX")
dpid="" gpid="" shown=""
cleanup() {
  if [ -n "$gpid" ]; then
    # run-guest.sh runs QEMU under timeout(1), which has a process group of its own and
    # passes SIGTERM on to QEMU: so the guest's children first, then the script itself.
    pkill -TERM -P "$gpid" 2>/dev/null || true
    kill "$gpid" 2>/dev/null || true
    wait "$gpid" 2>/dev/null || true
  fi
  [ -z "$dpid" ] || { kill -9 "$dpid"; wait "$dpid"; } 2>/dev/null || true
  if [ "${CRASH_KEEP:-}" = 1 ]; then echo "guest-crash: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
log() { echo "guest-crash: $*"; }
fail() {
  echo "guest-crash: FAIL: $*" >&2
  [ -n "$shown" ] || console | grep -a '^CRASH:' | sed 's/^/  guest: /' >&2
  for f in "$work/daemon.log" "$work/run-guest.log"; do [ -f "$f" ] && { echo "--- $f"; tail -n 30 "$f"; }; done >&2
  exit 1
}
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

meta=$work/pool.meta data=$work/pool.data sock=$work/disk0.sock
nrounds=$(wc -w <<<"$rounds")
round_bytes=$(( jobs * round_mb << 20 ))
disk_mb=$(( (nrounds * jobs * round_mb + 63) / 64 * 64 ))
"$bin" pool create -m "$meta" -d "$data" --data-size 1GiB >/dev/null
"$bin" thin create -m "$meta" -d "$data" --id 0 --size "${disk_mb}MiB" --name disk0 >/dev/null

# Each start of the daemon opens a section of its log, "=== guest-crash: start N (why)".
starts=0
start_daemon() {
  starts=$((starts + 1))
  echo "=== guest-crash: start $starts ($1)" >> "$work/daemon.log"
  rm -f "$sock"
  "$bin" serve -m "$meta" -d "$data" --disk "id=0,socket=$sock,num-queues=$jobs" \
    >>"$work/daemon.log" 2>&1 &
  dpid=$!
  for _ in $(seq 400); do [ -S "$sock" ] && return; sleep 0.05; done
  fail "the daemon did not create $sock"
}
# section N: the log of start N.
section() {
  awk -v h="=== guest-crash: start $1 " \
    'index($0, h) == 1 {on = 1; next} /^=== guest-crash: start / {on = 0} on' "$work/daemon.log"
}
# Waits until QEMU has connected to the current daemon (it retries every second).
wait_connected() {
  for _ in $(seq 300); do
    section "$starts" | grep -q 'event DISK_CONNECTED' && return
    sleep 0.1
  done
  fail "QEMU did not connect to the restarted daemon within 30 s"
}
console() { [ ! -f "$work/boot.log" ] || tr -d '\r' < "$work/boot.log"; }
# Waits until the guest's console has a line starting with $1; false if the guest ended.
waits_for() {
  while kill -0 "$gpid" 2>/dev/null; do
    console | grep -aq "^$1" && return 0
    sleep 0.1
  done
  return 1
}
allocated() { echo $(( $(stat -c %b "$data") * 512 )); }
# Waits until the data file has grown to $1 bytes (the pool wrote that much), or the round
# $2 has finished writing (false), or the guest ended (false).
waits_for_progress() {
  while kill -0 "$gpid" 2>/dev/null; do
    [ "$(allocated)" -ge "$1" ] && return 0
    console | grep -aq "^CRASH: ROUND $2 [A-Z]* written" && return 1
    sleep 0.02
  done
  return 1
}

t_start=$(date +%s)
log "binary $bin; rounds: $rounds, $per_round signals each; seed $seed; disk ${disk_mb} MiB, $jobs queues"
start_daemon "fresh pool"
ci/guest/run-guest.sh --quiet --timeout 900 --log "$work/boot.log" \
  --vhost-user-blk "$sock,num-queues=$jobs,reconnect=1" \
  --env "ROUNDS=$rounds" --env "NUMJOBS=$jobs" --env "ROUND_MB=$round_mb" --env "FIO_LIMIT=$fio_limit" \
  ci/guest/in-guest/crash-fio.sh 2>>"$work/run-guest.log" &
gpid=$!

n=0
sent=()      # per signal: "start-after-it sig landed" (landed: during the round's writes)
for sig in $rounds; do
  n=$((n + 1))
  waits_for "CRASH: ROUND $n $sig writing" || break
  base=$(allocated)
  # The random points, per mille of the round's blocks: one in each of per_round equal
  # slices of 100..850, so that they come in order and apart.
  slice=$(( 750 / per_round )) points=()
  for i in $(seq 0 $((per_round - 1))); do points+=($(( 100 + i * slice + RANDOM % slice ))); done
  for at in "${points[@]}"; do
    landed=1
    waits_for_progress $(( base + round_bytes * at / 1000 )) "$n" || landed=0
    kill -0 "$gpid" 2>/dev/null || break 2
    t0=$(now_ms)
    kill "-$sig" "$dpid"
    # (Braces and 2>/dev/null: no "Killed" line from bash.)
    rc=0; { wait "$dpid"; } 2>/dev/null || rc=$?
    dpid=""
    t1=$(now_ms)
    case $sig in
      KILL) [ "$rc" = 137 ] || fail "round $n: the daemon exited with $rc, not by SIGKILL" ;;
      TERM) [ "$rc" = 0 ] || fail "round $n: the daemon exited with $rc after SIGTERM" ;;
    esac
    start_daemon "after SIG$sig in round $n"
    wait_connected
    t2=$(now_ms)
    sent+=("$starts $sig $landed")
    if [ "$landed" = 1 ]; then
      where="at $((at / 10))% of the round's blocks"
    else
      where="after the round's writes had ended"
    fi
    log "round $n: SIG$sig $where; the daemon was gone in $((t1 - t0)) ms, QEMU connected again $((t2 - t1)) ms later"
  done
done

grc=0; wait "$gpid" || grc=$?
gpid=""
console | grep -a '^CRASH:' | sed 's/^/  guest: /'
shown=1
[ "$grc" = 0 ] || fail "the guest test failed (exit $grc)"
[ "$n" = "$nrounds" ] || fail "the guest ended after $n of $nrounds rounds"
kill -TERM "$dpid"
rc=0; wait "$dpid" || rc=$?
dpid=""
[ "$rc" = 0 ] || fail "the daemon exited with $rc after the final SIGTERM"

# The daemon's log after each signal: after a SIGKILL during the writes it must say that
# it replayed journaled changes (the test went through the journal); after a SIGTERM it
# must not (the clean stop committed all it acknowledged).
kills_replayed=0
for e in "${sent[@]}"; do
  read -r st sig landed <<<"$e"
  got=$(section "$st" | sed -n 's/.*replayed \([0-9][0-9]*\) journaled mapping changes.*/\1/p' | head -n1)
  case $sig in
    KILL)
      if [ -n "$got" ] && [ "$got" -gt 0 ]; then
        kills_replayed=$((kills_replayed + 1))
      elif [ "$landed" = 1 ]; then
        fail "start $st: SIGKILL while the guest wrote, and the restarted daemon replayed nothing"
      fi ;;
    TERM) [ -z "$got" ] || fail "start $st: the daemon replayed $got changes after a clean stop" ;;
  esac
done
case " $rounds " in
  *" KILL "*) [ "$kills_replayed" -gt 0 ] || fail "no SIGKILL landed while the guest wrote" ;;
esac
log "the daemon replayed journaled changes after $kills_replayed SIGKILLs:" \
  "$(grep -o 'replayed [0-9]* journaled' "$work/daemon.log" | cut -d' ' -f2 | paste -sd, -) changes;" \
  "after the SIGTERMs it had nothing to replay"

"$bin" pool check -m "$meta" -d "$data" >/dev/null || fail "vhost-thin pool check"
thin_check "$meta" >/dev/null 2>&1 || fail "thin_check"
want=$(console | sed -n 's/^CRASH: SHA256 //p')
[ -n "$want" ] || fail "the guest printed no sha256"
got=$("$bin" thin export -m "$meta" -d "$data" --id 0 --size "$(( nrounds * jobs * round_mb ))MiB" -o - | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "the thin device holds $got, the guest read $want"
log "offline: pool check and thin_check clean; the thin device equals what the guest read ($got)"
log "PASS in $(( $(date +%s) - t_start )) s"
