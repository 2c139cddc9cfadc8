# First boot of the vhost-thin end-to-end test, on ${DISK:-/dev/vda} served by vhost-thin:
# size and serial as configured, ext4 on the first FS_MB MiB with files and checksums,
# e2fsck clean, remount and verify, fio randwrite+verify on NUMJOBS queues after the
# filesystem, and the sha256 of the filesystem region for the host to compare.
# With MIGRATED_SECTORS: fio rounds run and, once they write, MIGRATE-NOW is printed (the
# host then moves the disk to another pool); the rounds go on until the disk grows to
# MIGRATED_SECTORS, the host's sign that the migration is over (a config change is the one
# thing a vhost-user disk can tell its guest); then the files are read again, from the new
# pool.
set -e
DISK=${DISK:-/dev/vda}
dev=${DISK#/dev/}
[ -b "$DISK" ] || { echo "E2E: no block device $DISK"; exit 1; }
size=$(blockdev --getsize64 "$DISK")
serial=$(cat /sys/block/$dev/serial 2>/dev/null || true)
echo "E2E: $DISK $size bytes, serial '$serial', queues $(ls /sys/block/$dev/mq | wc -l), discard granularity $(cat /sys/block/$dev/queue/discard_granularity), physical block $(cat /sys/block/$dev/queue/physical_block_size)"
[ "$size" = "$EXPECT_SIZE" ] || { echo "E2E: size $size, expected $EXPECT_SIZE"; exit 1; }
[ "$serial" = "$EXPECT_SERIAL" ] || { echo "E2E: serial '$serial', expected '$EXPECT_SERIAL'"; exit 1; }
mkfs.ext4 -q -F -E discard "$DISK" "${FS_MB}M"
mkdir -p /mnt/t; mount -t ext4 "$DISK" /mnt/t
dd if=/dev/urandom of=/mnt/t/big bs=1M count=64 2>/dev/null
mkdir /mnt/t/small; i=0; while [ $i -lt 200 ]; do head -c $((i * 97 + 1)) /dev/urandom > /mnt/t/small/f$i; i=$((i + 1)); done
(cd /mnt/t && find . -type f | sort | xargs sha256sum) > /tmp/sums
cp /tmp/sums /mnt/t/sums
sync; umount /mnt/t
e2fsck -f -n "$DISK" > /tmp/fsck.out 2>&1 && echo "E2E: e2fsck clean" || { echo "E2E: e2fsck FAILED"; cat /tmp/fsck.out; exit 1; }
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 "$DISK" /mnt/t
(cd /mnt/t && sha256sum -c /tmp/sums > /tmp/check.out 2>&1) && echo "E2E: $(wc -l < /tmp/sums) files verified after remount" || { echo "E2E: checksum MISMATCH"; grep -v OK /tmp/check.out | head; exit 1; }
umount /mnt/t
fio_round() {
  fio --name=verify --filename="$DISK" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
      --numjobs=${NUMJOBS:-1} --size=16M --offset=$((FS_MB + 64))M --offset_increment=32M --verify=crc32c --verify_fatal=1 \
      --randseed=$1 --group_reporting --output-format=terse --terse-version=3 > /tmp/fio.out 2>&1 \
    || { echo "E2E: fio verify FAILED (round $1)"; cat /tmp/fio.out; exit 1; }
}
if [ -z "${MIGRATED_SECTORS:-}" ]; then
  fio_round 1
  echo "E2E: fio randwrite+verify crc32c on ${NUMJOBS:-1} jobs OK"
else
  # Each round writes new data (another seed) and verifies it; a round is a few seconds,
  # so the cap is far beyond any migration and only stops a test whose host never answers.
  (
    rounds=0
    while [ "$(cat /sys/block/$dev/size)" != "$MIGRATED_SECTORS" ]; do
      rounds=$((rounds + 1))
      [ $rounds -le 300 ] || { echo "E2E: the disk never grew to $MIGRATED_SECTORS sectors: no sign of the migration's end"; exit 1; }
      fio_round $rounds
    done
    echo $rounds > /tmp/rounds
  ) &
  writer=$!
  # The host starts the migration once fio writes (the disk's count of completed writes,
  # field 5 of its stat, moves), so that the copy runs under the guest's writes, not
  # under fio's start-up.
  writes() { awk '{print $5}' /sys/block/$dev/stat; }
  w0=$(writes); i=0
  while [ "$(writes)" -lt $((w0 + 256)) ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
  echo "E2E: MIGRATE-NOW ($(( $(writes) - w0 )) writes done)"
  wait $writer || exit 1
  echo "E2E: fio randwrite+verify crc32c on ${NUMJOBS:-1} jobs OK: $(cat /tmp/rounds) rounds while the host migrated the disk"
  echo 3 > /proc/sys/vm/drop_caches
  mount -t ext4 "$DISK" /mnt/t
  (cd /mnt/t && sha256sum -c /tmp/sums > /tmp/check.out 2>&1) && echo "E2E: $(wc -l < /tmp/sums) files verified after the migration" || { echo "E2E: checksum MISMATCH after the migration"; grep -v OK /tmp/check.out | head; exit 1; }
  umount /mnt/t
fi
echo "E2E: FS-SHA256 $(head -c $((FS_MB * 1048576)) "$DISK" | sha256sum | cut -d' ' -f1)"
echo "E2E: PASS"
