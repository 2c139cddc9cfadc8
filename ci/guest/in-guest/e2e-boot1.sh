# First boot of the vhost-thin end-to-end test, on ${DISK:-/dev/vda} served by vhost-thin:
# size and serial as configured, ext4 on the first FS_MB MiB with files and checksums,
# e2fsck clean, remount and verify, fio randwrite+verify on NUMJOBS queues after the
# filesystem, and the sha256 of the filesystem region for the host to compare.
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
fio --name=verify --filename="$DISK" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
    --numjobs=${NUMJOBS:-1} --size=16M --offset=$((FS_MB + 64))M --offset_increment=32M --verify=crc32c --verify_fatal=1 \
    --group_reporting --output-format=terse --terse-version=3 > /tmp/fio.out 2>&1 \
  && echo "E2E: fio randwrite+verify crc32c on ${NUMJOBS:-1} jobs OK" || { echo "E2E: fio verify FAILED"; cat /tmp/fio.out; exit 1; }
echo "E2E: FS-SHA256 $(head -c $((FS_MB * 1048576)) "$DISK" | sha256sum | cut -d' ' -f1)"
echo "E2E: PASS"
