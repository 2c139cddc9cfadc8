#!/usr/bin/env bash
# build-guest.sh OUTDIR
#
# Builds a small test guest from Debian packages only (apt-get download + dpkg -x, nothing is
# installed on the host):
#   OUTDIR/vmlinuz            the kernel of linux-image-6.1.*-amd64 (bzImage)
#   OUTDIR/vmlinux            the same kernel uncompressed (ELF with a PVH entry note): QEMU
#                             boots it directly, which saves the slow in-guest xz decompression
#   OUTDIR/initramfs.cpio.gz  busybox, the kernel modules for virtio-blk, dm-thin and ext4, fio, dmsetup, e2fsprogs
#                             and thin-provisioning-tools with their shared libraries, and /init
#   OUTDIR/initramfs.cpio     the same, uncompressed (faster to unpack under TCG)
#   OUTDIR/busybox            a static busybox for the host side (run-guest.sh uses its cpio)
#   OUTDIR/manifest.txt       package versions, modules, binaries, libraries
#
# /init mounts proc/sys/devtmpfs, loads the modules, runs /test.sh if present, prints
# GUEST-EXIT=<status of /test.sh> and powers off. Every line goes to the serial console (ttyS0).
# Test scripts are added at boot by run-guest.sh as a second cpio archive.
#
# Cached: when OUTDIR already holds outputs built by this very script (same content, same
# GUEST_KERNEL_PKG) it returns at once. FORCE=1 rebuilds.
#
# Environment:
#   GUEST_KERNEL_PKG  kernel package (default: what linux-image-amd64 depends on)
#   FORCE=1           rebuild even if cached
#   KEEP_WORK=1       keep the temporary work directory (printed)
#   TMPDIR            where the work directory goes
set -euo pipefail

usage() { echo "usage: $0 OUTDIR" >&2; exit 2; }
[ $# -eq 1 ] || usage
OUTDIR=$1
SELF=$(readlink -f "${BASH_SOURCE[0]}")

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: error: $*" >&2; exit 1; }

# ---- cache check (must stay instant: no apt, no network) --------------------------------------
key="$(sha256sum "$SELF" | cut -d' ' -f1) kernel=${GUEST_KERNEL_PKG:-default}"
if [ "${FORCE:-0}" != 1 ] && [ -s "$OUTDIR/vmlinuz" ] && [ -s "$OUTDIR/initramfs.cpio.gz" ] \
   && [ -s "$OUTDIR/vmlinux" ] && [ -s "$OUTDIR/initramfs.cpio" ] \
   && [ -x "$OUTDIR/busybox" ] && [ -f "$OUTDIR/.build-key" ] \
   && [ "$(cat "$OUTDIR/.build-key")" = "$key" ]; then
  log "cached: $OUTDIR (FORCE=1 to rebuild)"
  exit 0
fi

# ---- host tools ---------------------------------------------------------------------------------
need_pkgs=()
command -v apt-get >/dev/null || die "apt-get not found: this script needs a Debian 12 host"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"
command -v readelf >/dev/null || need_pkgs+=(binutils)
command -v gzip >/dev/null || need_pkgs+=(gzip)
command -v xz >/dev/null || need_pkgs+=(xz-utils)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing host tools; install: ${need_pkgs[*]}"
  log "installing host tools: ${need_pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >&2
fi

mkdir -p "$OUTDIR"
OUTDIR=$(readlink -f "$OUTDIR")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/build-guest.XXXXXX")
if [ "${KEEP_WORK:-0}" = 1 ]; then log "work dir kept: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
DEBS=$WORK/debs PKGS=$WORK/pkgs ROOT=$WORK/root
mkdir -p "$DEBS" "$PKGS" "$ROOT"

declare -A HAVE_PKG=()    # package name -> 1 once downloaded and extracted into $PKGS/<name>
apt_updated=0
fetch_pkgs() {           # fetch_pkgs NAME... : download and extract the ones not already here
  local want=() p deb debs
  for p in "$@"; do [ -n "${HAVE_PKG[$p]:-}" ] || want+=("$p"); done
  [ ${#want[@]} -gt 0 ] || return 0
  if ! (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "${want[@]}" >/dev/null); then
    if [ $apt_updated = 0 ] && [ "$(id -u)" = 0 ]; then
      log "apt-get download failed; running apt-get update once"
      apt-get update -q >/dev/null; apt_updated=1
      (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "${want[@]}" >/dev/null) \
        || die "apt-get download ${want[*]} failed"
    else
      die "apt-get download ${want[*]} failed (try: apt-get update)"
    fi
  fi
  for p in "${want[@]}"; do
    debs=("$DEBS"/"${p}"_*.deb); deb=${debs[0]}
    [ -e "$deb" ] || die "downloaded no .deb for $p"
    mkdir -p "$PKGS/$p"
    dpkg-deb -x "$deb" "$PKGS/$p"
    echo "$p $(dpkg-deb -f "$deb" Version)" >> "$WORK/packages.txt"
    HAVE_PKG[$p]=1
  done
}

# Direct Depends/Pre-Depends of a package (real package names; virtual ones are skipped, their
# providers are listed by apt-cache on the following lines and are taken instead).
pkg_depends() {
  apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
    --no-enhances "$1" 2>/dev/null \
    | sed -n -e 's/^ *|\{0,1\}\(Pre\)\{0,1\}Depends: \([^< ][^ ]*\)$/\2/p' -e 's/^    \([^ <][^ ]*\)$/\1/p' \
    | sed 's/:any$//' | sort -u
}

# ---- kernel -----------------------------------------------------------------------------------
KPKG=${GUEST_KERNEL_PKG:-}
if [ -z "$KPKG" ]; then
  KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ <]*\)$/\1/p' | head -n1)
  if [ -z "$KPKG" ] && [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null; apt_updated=1
    KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ <]*\)$/\1/p' | head -n1)
  fi
  [ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 (run apt-get update)"
fi
log "kernel package: $KPKG"
fetch_pkgs "$KPKG" busybox-static fio dmsetup thin-provisioning-tools e2fsprogs

kvers=("$PKGS/$KPKG/lib/modules"/*); KVER=$(basename "${kvers[0]}")
if [ -z "$KVER" ] || [ ! -f "$PKGS/$KPKG/boot/vmlinuz-$KVER" ]; then die "no vmlinuz in $KPKG"; fi
BB=$PKGS/busybox-static/bin/busybox
[ -x "$BB" ] || die "busybox-static has no bin/busybox"

# ---- initramfs skeleton -----------------------------------------------------------------------
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib64,etc,proc,sys,dev,tmp,run,mnt,root,var/tmp}
chmod 1777 "$ROOT/tmp" "$ROOT/var/tmp"
cp "$BB" "$ROOT/bin/busybox"
"$BB" --list-full | while read -r applet; do
  [ -e "$ROOT/$applet" ] || [ -L "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done

# ---- kernel modules: closure from modules.dep (generated with busybox depmod) -----------------
MODULES=(virtio_pci virtio_blk dm_mod dm_bufio dm_persistent_data dm_bio_prison dm_thin_pool
         libcrc32c crc32c_generic crc32c_intel ext4)
KMOD=$PKGS/$KPKG/lib/modules/$KVER
[ -f "$KMOD/modules.dep" ] || "$BB" depmod -b "$PKGS/$KPKG" "$KVER"
builtin_mod() { grep -q -E "/${1}\.ko\$" "$KMOD/modules.builtin"; }
mod_path() {   # module name -> relative path in modules.dep (dashes and underscores are equivalent)
  local re=${1//[-_]/[-_]}
  sed -n -E "s@^([^:]*/${re}\.ko):.*@\1@p" "$KMOD/modules.dep" | head -n1
}
mod_deps() { grep -E "^$1:" "$KMOD/modules.dep" | cut -d: -f2; }
declare -A MOD_SEEN=()
LOAD_ORDER=()
add_mod() {    # add_mod RELPATH: dependencies first, then the module
  local m=$1 d
  [ -z "${MOD_SEEN[$m]:-}" ] || return 0
  MOD_SEEN[$m]=1
  for d in $(mod_deps "$m"); do add_mod "$d"; done
  LOAD_ORDER+=("$m")
}
for m in "${MODULES[@]}"; do
  mm=${m//_/[-_]}
  if builtin_mod "$mm"; then log "module $m is built in"; continue; fi
  p=$(mod_path "$m"); [ -n "$p" ] || die "module $m not found in $KPKG"
  add_mod "$p"
done
for m in "${LOAD_ORDER[@]}"; do
  mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$m")"
  cp "$KMOD/$m" "$ROOT/lib/modules/$KVER/$m"
done
cp "$KMOD/modules.builtin" "$KMOD/modules.order" "$ROOT/lib/modules/$KVER/" 2>/dev/null || true
"$BB" depmod -b "$ROOT" "$KVER"
printf '%s\n' "${LOAD_ORDER[@]}" > "$ROOT/etc/modules.load"

# ---- dynamically linked tools and their libraries ---------------------------------------------
cp -a "$PKGS/fio/usr/bin/fio" "$ROOT/usr/bin/fio"
cp -a "$PKGS/dmsetup/sbin/dmsetup" "$ROOT/sbin/dmsetup"
cp -a "$PKGS/thin-provisioning-tools/usr/sbin/." "$ROOT/usr/sbin/"
for t in thin_check thin_dump thin_restore thin_delta thin_ls thin_repair thin_rmap thin_trim; do
  [ -e "$ROOT/usr/sbin/$t" ] || die "thin-provisioning-tools has no $t"
done
for t in mke2fs e2fsck resize2fs; do cp -a "$PKGS/e2fsprogs/sbin/$t" "$ROOT/usr/sbin/$t"; done
ln -sf mke2fs "$ROOT/usr/sbin/mkfs.ext4"; ln -sf e2fsck "$ROOT/usr/sbin/fsck.ext4"
ELF_ROOTS=("$ROOT/usr/bin/fio" "$ROOT/sbin/dmsetup" "$ROOT/usr/sbin/pdata_tools" "$ROOT/usr/sbin/mke2fs" "$ROOT/usr/sbin/e2fsck" "$ROOT/usr/sbin/resize2fs")

LIBDIRS=(lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu lib64 usr/lib64 lib usr/lib)
needed_of() { readelf -d "$1" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
runpath_of() { readelf -d "$1" 2>/dev/null | sed -n 's/.*(\(RUNPATH\|RPATH\)).*\[\(.*\)\]/\2/p' | tr ':' ' '; }
owner_pkg() { local r=${1#"$PKGS"/}; echo "${r%%/*}"; }   # $PKGS/<pkg>/... -> <pkg>
find_lib() {   # find_lib SONAME REQUIRING_FILE -> path of the library inside $PKGS
  local so=$1 from=$2 dirs=() d p rp
  for rp in $(runpath_of "$from"); do
    rp=${rp//\$ORIGIN/$(dirname "$from")}
    dirs+=("${rp#/}")
  done
  for p in "$PKGS"/*; do
    for d in "${dirs[@]}" "${LIBDIRS[@]}"; do
      if [ -e "$p/$d/$so" ]; then echo "$p/$d/$so"; return 0; fi
    done
  done
  return 1
}
declare -A LIB_OF=()      # soname -> source path
resolve_libs() {          # fills LIB_OF; writes to $WORK/unresolved who has unresolved NEEDED
  local queue=("$@") f so path missing_from=()
  LIB_OF=()
  while [ ${#queue[@]} -gt 0 ]; do
    f=${queue[0]}; queue=("${queue[@]:1}")
    for so in $(needed_of "$f"); do
      [ -z "${LIB_OF[$so]:-}" ] || continue
      if path=$(find_lib "$so" "$f"); then
        LIB_OF[$so]=$path; queue+=("$path")
      else
        case $f in "$ROOT"/*) missing_from+=("$(basename "$f")") ;; *) missing_from+=("$(owner_pkg "$f")") ;; esac
      fi
    done
  done
  : > "$WORK/unresolved"
  [ ${#missing_from[@]} -eq 0 ] || printf '%s\n' "${missing_from[@]}" | sort -u > "$WORK/unresolved"
}
src_pkg_of_root_file() { case $1 in fio) echo fio ;; dmsetup) echo dmsetup ;; pdata_tools) echo thin-provisioning-tools ;; mke2fs|e2fsck|resize2fs) echo e2fsprogs ;; *) echo "$1" ;; esac; }
fetch_pkgs libc6
for round in $(seq 1 12); do
  resolve_libs "${ELF_ROOTS[@]}"
  unresolved=$(cat "$WORK/unresolved")
  [ -n "$unresolved" ] || break
  [ "$round" -lt 12 ] || die "shared libraries still unresolved after $round rounds (from: $unresolved)"
  next=()
  for u in $unresolved; do
    for d in $(pkg_depends "$(src_pkg_of_root_file "$u")"); do
      [ -n "${HAVE_PKG[$d]:-}" ] || next+=("$d")
    done
  done
  [ ${#next[@]} -gt 0 ] || die "unresolved libraries needed by: $unresolved (no more dependencies to fetch)"
  log "round $round: fetching dependencies: ${next[*]}"
  mapfile -t next < <(printf '%s\n' "${next[@]}" | sort -u)
  fetch_pkgs "${next[@]}"
done
for so in "${!LIB_OF[@]}"; do
  cp -L "${LIB_OF[$so]}" "$ROOT/lib/x86_64-linux-gnu/$so"
done
LDSO=$PKGS/libc6/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
[ -e "$LDSO" ] || die "libc6 has no ld-linux-x86-64.so.2"
cp -L "$LDSO" "$ROOT/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$ROOT/lib64/ld-linux-x86-64.so.2"
printf '/lib/x86_64-linux-gnu\n/usr/lib/x86_64-linux-gnu\n' > "$ROOT/etc/ld.so.conf"
echo 'root:x:0:0:root:/root:/bin/sh' > "$ROOT/etc/passwd"
echo 'root:x:0:' > "$ROOT/etc/group"

# ---- /init ------------------------------------------------------------------------------------
cat > "$ROOT/init" <<'INIT'
#!/bin/sh
# Guest init: mount, load modules, run /test.sh, report GUEST-EXIT=<status>, power off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
export DM_DISABLE_UDEV=1 HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run
KVER=$(uname -r)
echo "GUEST-INIT: kernel $KVER, uptime $(cut -d' ' -f1 /proc/uptime) s"
while read -r m; do
  out=$(insmod "/lib/modules/$KVER/$m" 2>&1) || case $out in
    *"File exists"*) ;;
    *) echo "GUEST-INIT: insmod $m: $out" ;;
  esac
done < /etc/modules.load
echo "GUEST-INIT: modules loaded, uptime $(cut -d' ' -f1 /proc/uptime) s"
for d in /sys/block/*; do
  [ -e "$d/size" ] && echo "GUEST-INIT: disk $(basename "$d") $(cat "$d/size") sectors"
done
if [ -f /test.sh ]; then
  echo "GUEST-INIT: running /test.sh"
  sh /test.sh
  rc=$?
else
  echo "GUEST-INIT: no /test.sh"
  rc=0
fi
sync
echo "GUEST-INIT: uptime $(cut -d' ' -f1 /proc/uptime) s"
echo "GUEST-EXIT=$rc"
poweroff -f
INIT
chmod 0755 "$ROOT/init"

# ---- pack ---------------------------------------------------------------------------------------
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | "$BB" cpio -o -H newc 2>/dev/null) \
  > "$WORK/initramfs.cpio"
gzip -9 -n -c "$WORK/initramfs.cpio" > "$WORK/initramfs.cpio.gz"
# vmlinux: the xz payload of the bzImage, decompressed (Debian's 6.1 kernels use KERNEL_XZ and
# have CONFIG_PVH=y, so QEMU's -kernel can boot the ELF through its PVH note).
VMLINUZ=$PKGS/$KPKG/boot/vmlinuz-$KVER
xzoff=$(LC_ALL=C grep -abo $'\xfd7zXZ\x00' "$VMLINUZ" | head -n1 | cut -d: -f1)
[ -n "$xzoff" ] || die "no xz payload in $VMLINUZ"
# (busybox's xz lacks the x86 BCJ filter the kernel uses, so the host's xz does this; it stops
# with an error at the bytes after the stream, hence the check below instead of its status.)
tail -c +$((xzoff + 1)) "$VMLINUZ" | xz -dc > "$WORK/vmlinux" 2>/dev/null || true
readelf -n "$WORK/vmlinux" 2>/dev/null | grep -q 'Xen' || die "extracted vmlinux has no PVH/Xen ELF note"
{
  echo "kernel: $KPKG ($KVER)"
  echo "packages (name version):"; sort -u "$WORK/packages.txt" | sed 's/^/  /'
  echo "modules (load order):"; sed 's/^/  /' "$ROOT/etc/modules.load"
  echo "binaries: fio dmsetup pdata_tools($(cd "$ROOT/usr/sbin" && find . -type l -printf '%f ' ))"
  echo "libraries:"; for so in $(printf '%s\n' "${!LIB_OF[@]}" | sort); do echo "  $so <- $(owner_pkg "${LIB_OF[$so]}")"; done
  echo "initramfs: $(stat -c %s "$WORK/initramfs.cpio.gz") bytes gzip, $(du -sb "$ROOT" | cut -f1) bytes unpacked"
} > "$WORK/manifest.txt"
cp "$VMLINUZ" "$OUTDIR/vmlinuz"
cp "$WORK/vmlinux" "$OUTDIR/vmlinux"
cp "$WORK/initramfs.cpio.gz" "$OUTDIR/initramfs.cpio.gz"
cp "$WORK/initramfs.cpio" "$OUTDIR/initramfs.cpio"
cp "$BB" "$OUTDIR/busybox"
cp "$WORK/manifest.txt" "$OUTDIR/manifest.txt"
echo "$key" > "$OUTDIR/.build-key"
log "done: $OUTDIR ($(head -n1 "$OUTDIR/manifest.txt"); $(tail -n1 "$OUTDIR/manifest.txt"))"
