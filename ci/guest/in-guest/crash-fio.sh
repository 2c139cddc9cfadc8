# shellcheck shell=sh
# The guest half of ci/guest-crash.sh: fio rounds on ${DISK:-/dev/vda} while the host kills
# and restarts the daemon that serves it.
#
# ROUNDS is a list of signal names (e.g. "KILL KILL TERM"), one fio round each, every round
# on its own fresh region of the disk (fresh: its writes provision new pool blocks, the
# mapping changes that a daemon killed before its next commit must not lose). A round:
#   1. "CRASH: ROUND <n> <SIG> writing": the host waits for this line; then, at random points
#      of the round's progress, it sends the daemon SIG and starts it again, and QEMU
#      (reconnect=1) connects again.
#   2. fio random writes of 4k..64k with crc32c verification headers, O_DIRECT, no fsync and
#      no end_fsync: the guest is told each write is done, and nothing asks for a flush, so
#      what the daemon acknowledged since its last commit is exactly what a kill can lose.
#      The writes must all complete: requests in flight at the kill must not hang.
#   3. "CRASH: ROUND <n> <SIG> written", then fio --verify_only reads the region back and
#      checks every block's header and crc32c (a lost write reads as zeroes:
#      "verify: bad magic header 0"). A negative control first shows that the check fails
#      on blocks never written.
# Each fio run is bounded by FIO_LIMIT seconds; a run that exceeds it is reported as a hang
# with the disk's requests in flight and the kernel's messages, and the test fails.
# At the end: the sha256 of all the rounds' regions, for the host to compare with the pool.
DISK=${DISK:-/dev/vda}
dev=${DISK#/dev/}
JOBS=${NUMJOBS:-2} MB=${ROUND_MB:-32} LIMIT=${FIO_LIMIT:-240}
[ -b "$DISK" ] || { echo "CRASH: no block device $DISK"; exit 1; }
echo "CRASH: $DISK $(blockdev --getsize64 "$DISK") bytes, $(find "/sys/block/$dev/mq" -mindepth 1 -maxdepth 1 | wc -l) queues, rounds: $ROUNDS"

# bounded NAME OUT CMD...: runs CMD with output to OUT; fails (without waiting for CMD) if it
# runs longer than LIMIT seconds.
bounded() {
  name=$1 out=$2; shift 2
  "$@" > "$out" 2>&1 &
  pid=$! t=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$t" -ge "$LIMIT" ]; then
      echo "CRASH: HANG: $name still running after $LIMIT s; in flight (reads writes): $(cat "/sys/block/$dev/inflight")"
      dmesg | tail -n 8 | sed 's/^/CRASH: dmesg: /'
      tail -n 5 "$out" | sed 's/^/CRASH: fio: /'
      return 1
    fi
    sleep 1; t=$((t + 1))
  done
  wait "$pid"
}

# verify NAME FIO_ARGS...: fio --verify_only, which reads back what a write job with these
# arguments wrote and checks each block's header and crc32c; status 2 and $bad, the count
# of bad blocks, when it finds any. --continue_on_error=verify
# lets it count every bad block, and then fio exits 0 whatever it found: so the verdict
# is its "verify:" lines.
verify() {
  name=$1; shift
  if ! bounded "$name fio verify" /tmp/verify.out fio "$@" --verify_only --continue_on_error=verify; then
    echo "CRASH: $name: fio verify FAILED to run"; tail -n 20 /tmp/verify.out; return 1
  fi
  bad=$(grep -c 'verify: ' /tmp/verify.out)
  [ "$bad" = 0 ] || return 2
}
read_line() { grep -m1 -E '^ +read: ' /tmp/verify.out | sed 's/^ *//'; }

# A negative control: the verification of blocks nobody wrote yet (the start of round 1's
# region) must fail, or a pass below would prove nothing.
verify "control" --name=control --filename="$DISK" --ioengine=libaio --direct=1 --rw=randwrite \
  --bs=4k --iodepth=16 --size=1M --verify=crc32c --verify_state_save=0
[ $? = 2 ] || { echo "CRASH: control: verifying blocks never written did not fail"; exit 1; }
echo "CRASH: control: verifying blocks never written fails, as it must ($bad bad blocks)"

n=0
for sig in $ROUNDS; do
  n=$((n + 1))
  # Each round its own region (JOBS contiguous slices of MB MiB) and its own seed.
  set -- --name=crash --filename="$DISK" --ioengine=libaio --direct=1 --rw=randwrite \
    --bsrange=4k-64k --iodepth=16 --numjobs="$JOBS" --size="${MB}M" \
    --offset=$(( (n - 1) * JOBS * MB ))M --offset_increment="${MB}M" \
    --verify=crc32c --randseed="$n" --verify_state_save=0 --group_reporting
  echo "CRASH: ROUND $n $sig writing"
  t0=$(cut -d' ' -f1 /proc/uptime)
  if ! bounded "round $n fio write" /tmp/write.out fio "$@" --do_verify=0; then
    echo "CRASH: ROUND $n $sig fio write FAILED"; tail -n 20 /tmp/write.out; exit 1
  fi
  t1=$(cut -d' ' -f1 /proc/uptime)
  # The write line (IOPS, bandwidth) and the worst completion latency: the pause while the
  # daemon was down and QEMU reconnected shows there.
  echo "CRASH: ROUND $n $sig written in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s:" \
    "$(grep -m1 -E '^ +write: ' /tmp/write.out | sed 's/^ *//')," \
    "$(grep -m1 -E '^ +clat \(' /tmp/write.out | sed 's/^ *//')"
  verify "round $n" "$@"
  case $? in
    0) ;;
    2) echo "CRASH: ROUND $n $sig VERIFY FAILED: $bad bad blocks ($(read_line)), the first:"
       grep -m5 'verify: ' /tmp/verify.out | sed 's/^/CRASH:   /'
       exit 1 ;;
    *) exit 1 ;;
  esac
  echo "CRASH: ROUND $n $sig verified: every block correct ($(read_line))"
done
# The guest kernel's view of the outages: any I/O error, hung task or timeout is reported.
if dmesg | grep -aiE 'error|blocked for more|hung|timed? ?out|reset' > /tmp/dmesg.bad; then
  sed 's/^/CRASH: dmesg: /' /tmp/dmesg.bad | tail -n 10
else
  echo "CRASH: dmesg: no I/O error, hung task or timeout"
fi
echo "CRASH: SHA256 $(head -c $((n * JOBS * MB * 1048576)) "$DISK" | sha256sum | cut -d' ' -f1)"
echo "CRASH: PASS"
