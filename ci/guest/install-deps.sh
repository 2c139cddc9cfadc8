#!/usr/bin/env bash
# ci/guest/install-deps.sh: the host packages that the test guest scripts in this folder need,
# on Debian 12, installed with apt-get when missing (as root, else through sudo). Idempotent:
# nothing is installed when everything is there already.
#   qemu-system-x86   qemu-system-x86_64 (QEMU 7.2; TCG is enough, no /dev/kvm needed)
#   qemu-utils        qemu-img (and the same release as qemu-system-x86: see below)
#   binutils          readelf (build-guest.sh)
#   xz-utils          xz (build-guest.sh unpacks the kernel's xz payload)
# --no-install-recommends keeps qemu-system-x86 to a few dozen packages instead of a large GUI,
# audio and GStreamer closure.
#
# Pitfall handled here: on Debian 12, installing qemu-system-x86 (7.2) removes a newer
# qemu-utils (e.g. 10.0 from bookworm-backports), which leaves no qemu-img. So qemu-utils is
# installed afterwards, at the version of the installed qemu-system-common.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  echo "install-deps: apt-get install --no-install-recommends $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

missing=()
for p in qemu-system-x86 binutils xz-utils; do installed "$p" || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

# qemu-img, from the qemu-utils of the same release as qemu-system-x86
if ! installed qemu-utils || ! qemu-img --version >/dev/null 2>&1; then
  v=$(dpkg-query -W -f='${Version}' qemu-system-common 2>/dev/null || true)
  apt_install "qemu-utils${v:+=$v}"
fi

qemu-system-x86_64 --version | head -n1
qemu-img --version | head -n1
readelf --version | head -n1
xz --version | head -n1
echo "install-deps: ok"
