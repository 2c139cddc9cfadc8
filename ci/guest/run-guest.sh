#!/usr/bin/env bash
# run-guest.sh [options] TEST_SCRIPT [-- EXTRA_QEMU_ARGS...]
#
# Boots the guest made by build-guest.sh (built on first use, then cached) under KVM with
# TEST_SCRIPT as /test.sh, and exits with the status that TEST_SCRIPT returned in the guest.
# The script is added as a second cpio archive appended to the initramfs (the kernel unpacks
# concatenated archives in order). Guest memory is a shared memfd (share=on, one NUMA node), as
# vhost-user needs.
#
# Options:
#   --guest-dir DIR     guest build (default: $GUEST_DIR, else $XDG_CACHE_HOME/vhost-thin-guest,
#                       else ~/.cache/vhost-thin-guest); built with build-guest.sh if missing
#   --log FILE          serial console log (default: a temp file, path printed)
#   --timeout SECS      kill QEMU after SECS (default: $GUEST_TIMEOUT or 300); exit 124
#   --mem SIZE          guest memory, e.g. 1G (default 1G)
#   --smp N             vCPUs (default 2)
#   --disk FILE         attach FILE (raw) through QEMU's built-in virtio-blk, cache=none,
#                       aio=native; repeatable; disks appear in the order given
#   --vhost-user-blk SOCK[,num-queues=N][,reconnect=SECS]
#                       attach a vhost-user-blk disk served on the unix socket SOCK
#                       (num-queues default 1; reconnect: QEMU reconnects after the server
#                       restarts); repeatable
#   --file SRC=DEST     copy host file SRC into the guest at DEST; repeatable
#   --env NAME=VALUE    export NAME=VALUE before TEST_SCRIPT runs; repeatable
#   --accel kvm|tcg|auto
#                       accelerator (default: $GUEST_ACCEL or auto). auto picks KVM when
#                       /dev/kvm is usable and is not the kvm_pvm module (a shadow-paging
#                       hypervisor under which an unmodified Linux guest boots far slower than
#                       under TCG), else TCG (multi-threaded, -cpu max)
#   --boot pvh|bzimage  pvh (default, $GUEST_BOOT): the uncompressed vmlinux through its PVH
#                       entry and the uncompressed initramfs, about 3 s faster per boot under
#                       TCG; bzimage: vmlinuz + initramfs.cpio.gz through SeaBIOS
#   --append ARGS       extra kernel command line
#   --quiet             do not echo the console while it runs (the log still has it)
# Disks and devices appear in the guest in command-line order (/dev/vda, /dev/vdb, ...), since
# each gets the next PCI slot; --disk/--vhost-user-blk come before EXTRA_QEMU_ARGS.
#
# Exit status: the guest's GUEST-EXIT=<code>; 124 on timeout; 125 if the guest printed none.
set -euo pipefail

HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
GDIR=${GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-thin-guest}
LOG="" TIMEOUT=${GUEST_TIMEOUT:-300} MEM=1G SMP=2 APPEND="" QUIET=0 ACCEL=${GUEST_ACCEL:-auto} BOOT=${GUEST_BOOT:-pvh}
DEV_ARGS=() FILES=() ENVS=() ndisk=0 nvub=0

die() { echo "run-guest: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --guest-dir) GDIR=$2; shift 2 ;;
    --log) LOG=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --mem) MEM=$2; shift 2 ;;
    --smp) SMP=$2; shift 2 ;;
    --disk)
      [ -e "$2" ] || die "no such disk: $2"
      DEV_ARGS+=(-blockdev "driver=file,filename=$2,node-name=hd$ndisk-file,cache.direct=on,aio=native"
                 -blockdev "driver=raw,file=hd$ndisk-file,node-name=hd$ndisk,cache.direct=on"
                 -device "virtio-blk-pci,drive=hd$ndisk")
      ndisk=$((ndisk + 1)); shift 2 ;;
    --vhost-user-blk)
      sock=${2%%,*} nq=1 rc_opt=""
      case $2 in *,num-queues=*) nq=${2##*,num-queues=}; nq=${nq%%,*} ;; esac
      case $2 in *,reconnect=*) rc_opt=${2##*,reconnect=}; rc_opt=",reconnect=${rc_opt%%,*}" ;; esac
      DEV_ARGS+=(-chardev "socket,id=vub$nvub,path=$sock$rc_opt"
                 -device "vhost-user-blk-pci,chardev=vub$nvub,num-queues=$nq")
      nvub=$((nvub + 1)); shift 2 ;;
    --file) FILES+=("$2"); shift 2 ;;
    --env) ENVS+=("$2"); shift 2 ;;
    --append) APPEND=$2; shift 2 ;;
    --accel) ACCEL=$2; shift 2 ;;
    --boot) BOOT=$2; shift 2 ;;
    --quiet) QUIET=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) die "TEST_SCRIPT must come before --" ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || die "usage: run-guest.sh [options] TEST_SCRIPT [-- EXTRA_QEMU_ARGS...]"
TEST=$1; shift
[ -f "$TEST" ] || die "no such test script: $TEST"
if [ $# -gt 0 ]; then [ "$1" = "--" ] || die "unexpected argument: $1 (QEMU args go after --)"; shift; fi
EXTRA=("$@")

kvm_ok() { [ -r /dev/kvm ] && [ -w /dev/kvm ]; }
case $ACCEL in
  auto) if kvm_ok && [ ! -d /sys/module/kvm_pvm ]; then ACCEL=kvm; else ACCEL=tcg; fi ;;
  kvm) kvm_ok || die "/dev/kvm is not usable" ;;
  tcg) ;;
  *) die "--accel must be kvm, tcg or auto" ;;
esac
if [ "$ACCEL" = kvm ]; then
  # -cpu host minus arch-capabilities: some nested hosts refuse to set MSR 0x10a, and QEMU 7.2
  # then aborts at start-up.
  # shellcheck disable=SC2054 # the commas are QEMU option syntax
  ACCEL_ARGS=(-enable-kvm -cpu host,-arch-capabilities)
else
  # shellcheck disable=SC2054 # the commas are QEMU option syntax
  ACCEL_ARGS=(-accel tcg,thread=multi -cpu max)
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
"$HERE/build-guest.sh" "$GDIR" >&2
GDIR=$(readlink -f "$GDIR")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/run-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
[ -n "$LOG" ] || LOG=$(mktemp "${TMPDIR:-/tmp}/guest-console.XXXXXX")

# ---- the test cpio: /test.sh (+ env), extra files ------------------------------------------------
mkdir -p "$WORK/extra"
{
  echo '#!/bin/sh'
  for e in ${ENVS[@]+"${ENVS[@]}"}; do
    n=${e%%=*} v=${e#*=}
    printf "export %s='%s'\n" "$n" "$(printf '%s' "$v" | sed "s/'/'\\\\''/g")"
  done
  cat "$TEST"
} > "$WORK/extra/test.sh"
chmod 0755 "$WORK/extra/test.sh"
for f in ${FILES[@]+"${FILES[@]}"}; do
  src=${f%%=*} dst=${f#*=}
  [ -f "$src" ] || die "--file: no such file: $src"
  case $dst in /*) ;; *) die "--file: DEST must be absolute: $dst" ;; esac
  mkdir -p "$WORK/extra$(dirname "$dst")"
  cp "$src" "$WORK/extra$dst"
done
(cd "$WORK/extra" && find . -mindepth 1 | LC_ALL=C sort | "$GDIR/busybox" cpio -o -H newc 2>/dev/null) \
  | gzip -1 > "$WORK/extra.cpio.gz"
case $BOOT in
  pvh) KERNEL=$GDIR/vmlinux BASE_INITRD=$GDIR/initramfs.cpio ;;
  bzimage) KERNEL=$GDIR/vmlinuz BASE_INITRD=$GDIR/initramfs.cpio.gz ;;
  *) die "--boot must be pvh or bzimage" ;;
esac
cat "$BASE_INITRD" "$WORK/extra.cpio.gz" > "$WORK/initrd"

# ---- boot --------------------------------------------------------------------------------------
# shellcheck disable=SC2054 # the commas are QEMU option syntax
QEMU=(qemu-system-x86_64 "${ACCEL_ARGS[@]}" -machine q35 -smp "$SMP" -m "$MEM"
      -object "memory-backend-memfd,id=mem0,size=$MEM,share=on" -numa "node,memdev=mem0"
      -nodefaults -no-user-config -display none -no-reboot
      -chardev stdio,id=ser0,signal=off -serial chardev:ser0
      -kernel "$KERNEL" -initrd "$WORK/initrd"
      -append "console=ttyS0 panic=-1 loglevel=5 $APPEND"
      ${DEV_ARGS[@]+"${DEV_ARGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"})
echo "run-guest: accel $ACCEL, boot $BOOT, log $LOG" >&2
start=$(date +%s.%N)
set +e
if [ "$QUIET" = 1 ]; then
  timeout -k 10 "$TIMEOUT" "${QEMU[@]}" </dev/null >"$LOG" 2>&1
  qrc=$?
else
  timeout -k 10 "$TIMEOUT" "${QEMU[@]}" </dev/null 2>&1 | tee "$LOG"
  qrc=${PIPESTATUS[0]}
fi
set -e
end=$(date +%s.%N)
wall=$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.2f", b-a}')
rc=$(tr -d '\r' < "$LOG" | sed -n 's/^GUEST-EXIT=\([0-9][0-9]*\)$/\1/p' | tail -n1)
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
  echo "run-guest: timed out after ${TIMEOUT}s (wall ${wall}s); log $LOG" >&2
  exit 124
fi
if [ -z "$rc" ]; then
  echo "run-guest: guest printed no GUEST-EXIT line (qemu exit $qrc, wall ${wall}s); log $LOG" >&2
  exit 125
fi
echo "run-guest: guest exit $rc, qemu exit $qrc, wall ${wall}s" >&2
exit "$rc"
