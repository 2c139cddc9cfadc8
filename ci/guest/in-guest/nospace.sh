# The guest's half of ci/guest-nospace.sh, on ${DISK:-/dev/vda} (one queue) in a pool of
# 32 MiB with policy `queue`: maps 16 MiB, then starts a write of 40 MiB that the full pool
# holds, and while it is held reads the mapped blocks back and overwrites some of them,
# timing both; prints HELD-NOW before and GROW-NOW after (the host then kills and restarts
# the daemon and grows the pool), then waits for the held write and verifies what it wrote
# and that the mapped blocks are unchanged.
set -e
DISK=${DISK:-/dev/vda}
up() { cut -d' ' -f1 /proc/uptime | tr -d .; } # centiseconds since boot
say() { echo "NOSPACE: $*"; }
sum() { sha256sum | cut -d' ' -f1; }
dd if=/dev/urandom of=/tmp/mapped bs=1M count=16 2>/dev/null
dd if=/dev/urandom of=/tmp/fill bs=1M count=40 2>/dev/null
dd if=/tmp/mapped of="$DISK" bs=1M count=16 oflag=direct 2>/dev/null
say "16 MiB mapped"
# 40 MiB at 200 MiB: more than the 16 MiB the pool has left.
(
  if dd if=/tmp/fill of="$DISK" bs=1M seek=200 oflag=direct 2>/tmp/fill.err; then
    echo ok >/tmp/fill.status
  else
    cat /tmp/fill.err >/tmp/fill.status
  fi
) &
fill=$!
# Held: the disk has writes in flight and its count of sectors written stops moving (the
# host checks the daemon's queued-writes too, before it grows the pool).
dev=$(basename "$DISK")
stalled=0 last=""
for _ in $(seq 240); do
  written=$(awk '{print $7}' /sys/block/$dev/stat)
  inflight=$(awk '{print $2}' /sys/block/$dev/inflight)
  if [ "$inflight" -gt 0 ] && [ "$written" = "$last" ]; then
    stalled=$((stalled + 1)); [ $stalled -ge 2 ] && break
  else
    stalled=0
  fi
  last=$written
  sleep 0.5
done
kill -0 $fill 2>/dev/null || { say "FAIL: the write that fills the pool was not held ($(cat /tmp/fill.status))"; exit 1; }
say "HELD-NOW"
t0=$(up)
got=$(dd if="$DISK" bs=1M count=16 iflag=direct 2>/dev/null | sum)
t1=$(up)
[ "$got" = "$(sum </tmp/mapped)" ] || { say "FAIL: the mapped blocks read back wrong"; exit 1; }
say "READ-CS $((t1 - t0))"
dd if=/dev/urandom of=/tmp/over bs=64k count=16 2>/dev/null
t0=$(up)
dd if=/tmp/over of="$DISK" bs=64k count=16 seek=32 oflag=direct 2>/dev/null
t1=$(up)
say "OVERWRITE-CS $((t1 - t0))"
got=$(dd if="$DISK" bs=64k count=16 skip=32 iflag=direct 2>/dev/null | sum)
[ "$got" = "$(sum </tmp/over)" ] || { say "FAIL: the overwrite reads back wrong"; exit 1; }
kill -0 $fill 2>/dev/null || { say "FAIL: the held write ended before the pool grew ($(cat /tmp/fill.status))"; exit 1; }
say "STILL-HELD"
say "GROW-NOW"
wait $fill || true
[ "$(cat /tmp/fill.status)" = ok ] || { say "FAIL: the held write failed: $(cat /tmp/fill.status)"; exit 1; }
got=$(dd if="$DISK" bs=1M skip=200 count=40 iflag=direct 2>/dev/null | sum)
[ "$got" = "$(sum </tmp/fill)" ] || { say "FAIL: the held write reads back wrong"; exit 1; }
say "the held write completed after the pool grew and reads back right"
got=$(dd if="$DISK" bs=64k count=16 skip=32 iflag=direct 2>/dev/null | sum)
[ "$got" = "$(sum </tmp/over)" ] || { say "FAIL: the overwrite changed after the restart"; exit 1; }
if dmesg | grep -qi "i/o error\|blocked for more"; then
  dmesg | grep -i "i/o error\|blocked for more" | head -5 | sed 's/^/NOSPACE: dmesg: /'
  exit 1
fi
say PASS
