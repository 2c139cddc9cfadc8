# In-guest half of dmthin-verify.sh. Disks: /dev/vda metadata, /dev/vdb data.
# Optional files: /verify/sizes.txt ("dev_id size_sectors [anything]" lines).
# Environment: BLOCK_SECTORS (else from thin_dump), POOL_RW=1 (activate the pool read-write;
# default read_only), FORCE_ACTIVATE=1 (activate even if thin_check fails).
# Prints "VERIFY-CHECK: <exit status>", one "VERIFY-DEV: <id> <size_sectors> <sha256>
# <mapped_sectors> <size_source>" per device, and "VERIFY-DONE".
# shellcheck shell=sh   # run-guest.sh prepends #!/bin/sh (busybox sh in the guest)
set -eu
META=/dev/vda DATA=/dev/vdb
rc=0; thin_check $META > /tmp/check.txt 2>&1 || rc=$?
sed 's/^/thin_check: /' /tmp/check.txt
echo "VERIFY-CHECK: $rc"
if [ "$rc" != 0 ] && [ "${FORCE_ACTIVATE:-0}" != 1 ]; then
  echo "VERIFY: thin_check failed; not activating (FORCE_ACTIVATE=1 to try anyway)"
  exit 3
fi
thin_dump $META > /tmp/dump.xml
sb=$(grep -m1 '<superblock ' /tmp/dump.xml)
echo "VERIFY: $sb"
bs=${BLOCK_SECTORS:-$(echo "$sb" | sed -n 's/.* data_block_size="\([0-9]*\)".*/\1/p')}
nblocks=$(echo "$sb" | sed -n 's/.* nr_data_blocks="\([0-9]*\)".*/\1/p')
data_sectors=$(blockdev --getsz $DATA)
pool_len=$((nblocks * bs))
[ "$pool_len" -le "$data_sectors" ] || { echo "VERIFY: data device ($data_sectors sectors) smaller than nr_data_blocks*block ($pool_len)"; exit 4; }
# per device: id and the end of its highest mapping in blocks (from the dump)
awk '
  /<device / { match($0, /dev_id="[0-9]+"/); id = substr($0, RSTART + 8, RLENGTH - 9); ends[id] = 0; order[++n] = id }
  /<single_mapping / { match($0, /origin_block="[0-9]+"/); b = substr($0, RSTART + 14, RLENGTH - 15) + 1; if (b > ends[id]) ends[id] = b }
  /<range_mapping / { match($0, /origin_begin="[0-9]+"/); b = substr($0, RSTART + 14, RLENGTH - 15)
                      match($0, /length="[0-9]+"/); b += substr($0, RSTART + 8, RLENGTH - 9); if (b > ends[id]) ends[id] = b }
  END { for (i = 1; i <= n; i++) print order[i], ends[order[i]] }' /tmp/dump.xml > /tmp/devs.txt
feat=1; feats="read_only"
[ "${POOL_RW:-0}" = 1 ] && { feat=0; feats=""; }
table="0 $pool_len thin-pool $META $DATA $bs 0 $feat $feats"
[ "$feat" = 0 ] && table="0 $pool_len thin-pool $META $DATA $bs 0"
echo "VERIFY: pool table: $table"
dmsetup create vpool --table "$table"
echo "VERIFY: pool status: $(dmsetup status vpool)"
while read -r id end_blocks; do
  size=$(awk -v id="$id" '$1 == id { print $2 }' /verify/sizes.txt 2>/dev/null | head -n1)
  src=given
  if [ -z "$size" ]; then size=$((end_blocks * bs)); src="mapped-extent"; fi
  if [ "$size" = 0 ]; then echo "VERIFY-DEV: $id 0 - 0 empty"; continue; fi
  dmsetup create "vthin$id" --table "0 $size thin /dev/mapper/vpool $id"
  sum=$(sha256sum "/dev/mapper/vthin$id" | cut -d' ' -f1)
  mapped=$(dmsetup status "vthin$id" | awk '{print $4}')
  echo "VERIFY-DEV: $id $size $sum $mapped $src"
  dmsetup remove "vthin$id"
done < /tmp/devs.txt
echo "VERIFY: pool status before removal: $(dmsetup status vpool)"
dmsetup remove vpool
rc=0; thin_check $META > /tmp/check2.txt 2>&1 || rc=$?
echo "VERIFY: thin_check after deactivation: exit $rc"
echo "VERIFY-DONE"
