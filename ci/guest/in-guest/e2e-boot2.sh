# Second boot: the host grows the disk while the guest runs (vhost-user config change: the
# guest kernel must see the new size without a reboot, and ext4 grows online into it); the
# files of the first boot are intact; delete the big file and fstrim, which must return its
# blocks to the pool (the host checks the device's mapped blocks).
set -e
DISK=${DISK:-/dev/vda}
dev=${DISK#/dev/}
if [ -n "${EXPECT_GROWN_SECTORS:-}" ]; then
  echo "E2E: WAITING-FOR-RESIZE at $(cat /sys/block/$dev/size) sectors"
  for _ in $(seq 1200); do
    [ "$(cat /sys/block/$dev/size)" = "$EXPECT_GROWN_SECTORS" ] && break
    sleep 0.1
  done
  got=$(cat /sys/block/$dev/size)
  [ "$got" = "$EXPECT_GROWN_SECTORS" ] || { echo "E2E: the disk did not grow: $got sectors, want $EXPECT_GROWN_SECTORS"; exit 1; }
  echo "E2E: grown online to $got sectors ($(dmesg | grep -a 'new size' | tail -n1 | sed 's/^\[[^]]*\] //'))"
fi
mkdir -p /mnt/t; mount -t ext4 "$DISK" /mnt/t
(cd /mnt/t && sha256sum -c sums > /tmp/check.out 2>&1) && echo "E2E: $(wc -l < /mnt/t/sums) files of boot 1 verified" || { echo "E2E: checksum MISMATCH"; grep -v OK /tmp/check.out | head; exit 1; }
rm /mnt/t/big
echo boot2 > /mnt/t/boot2
if [ -n "${EXPECT_GROWN_SECTORS:-}" ]; then
  fs_kib() { df -k /mnt/t | awk 'NR==2 {print $2}'; }
  before=$(fs_kib)
  resize2fs "$DISK" > /tmp/resize.out 2>&1 || { echo "E2E: online resize2fs FAILED"; cat /tmp/resize.out; exit 1; }
  echo "E2E: ext4 grown online from ${before} KiB to $(fs_kib) KiB"
fi
sync
echo "E2E: $(fstrim -v /mnt/t)"
umount /mnt/t
e2fsck -f -n "$DISK" > /tmp/fsck.out 2>&1 && echo "E2E: e2fsck clean" || { echo "E2E: e2fsck FAILED"; cat /tmp/fsck.out; exit 1; }
echo "E2E: PASS"
