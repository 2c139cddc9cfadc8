# shellcheck shell=bash disable=SC2034,SC2154  # bin is for the sourcing script, name from it
# Sourced by the guest scripts (ci/guest-e2e.sh, ci/guest-crash.sh), which set `name` for
# messages: installs the guest's dependencies unless ci/test did, and sets `bin` to the
# vhost-thin binary to test: VHOST_THIN_BIN, or a release build of this tree.
export PATH="$PATH:/usr/sbin:/sbin"
[ "${VHOST_THIN_DEPS_DONE:-}" = 1 ] || ci/guest/install-deps.sh >/dev/null
if [ -n "${VHOST_THIN_BIN:-}" ]; then
  bin=$(readlink -f "$VHOST_THIN_BIN")
else
  cargo build --release --locked -q -p vhost-thin
  bin=$(readlink -f "${CARGO_TARGET_DIR:-target}/release/vhost-thin")
fi
[ -x "$bin" ] || { echo "$name: no vhost-thin binary at $bin" >&2; exit 1; }
