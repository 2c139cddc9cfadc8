# Second boot: the files of the first boot are intact; delete the big file and fstrim, which
# must return its blocks to the pool (the host checks the device's mapped blocks).
set -e
DISK=${DISK:-/dev/vda}
mkdir -p /mnt/t; mount -t ext4 "$DISK" /mnt/t
(cd /mnt/t && sha256sum -c sums > /tmp/check.out 2>&1) && echo "E2E: $(wc -l < /mnt/t/sums) files of boot 1 verified" || { echo "E2E: checksum MISMATCH"; grep -v OK /tmp/check.out | head; exit 1; }
rm /mnt/t/big
echo boot2 > /mnt/t/boot2
sync
echo "E2E: $(fstrim -v /mnt/t)"
umount /mnt/t
e2fsck -f -n "$DISK" > /tmp/fsck.out 2>&1 && echo "E2E: e2fsck clean" || { echo "E2E: e2fsck FAILED"; cat /tmp/fsck.out; exit 1; }
echo "E2E: PASS"
