#!/usr/bin/env bash
# Builds the root of a fresh Debian machine (as root): a minbase of the host's release with
# systemd (to boot as PID 1 in systemd-nspawn) and curl, nothing of mitosis.
# tests/tests/package.rs installs the Debian package in it and starts its units; it boots it
# with --volatile=overlay, so the tree itself never changes. Usage: make-machine.sh DIR
# Cached: debootstrap runs again only when the recipe below changes (bump MACHINE_VERSION when
# anything but the suite or the packages changes). Needs debootstrap (scripts/setup.sh
# installs it) and a Debian mirror.
set -euo pipefail

MACHINE_VERSION=1
# The host's own release: the package built here depends on its libc, and the test's fixtures
# run in the machine too.
SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
INCLUDE=systemd,systemd-sysv,curl
MARKER_TEXT="mitosis-machine $MACHINE_VERSION $SUITE minbase $INCLUDE"

root=${1:?usage: make-machine.sh DIR}
marker=$root/.mitosis-machine-version
[ "$(cat "$marker" 2>/dev/null)" = "$MARKER_TEXT" ] && exit 0

# The first http(s) Debian mirror of the machine's apt sources (one-line and deb822 formats),
# skipping the security archive, which has no plain suite (as scripts/make-bundle.sh).
apt_mirror() {
  local uri
  uri=$( {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | sed -nE 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p'
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | sed -nE 's/^URIs:[[:space:]]*//p' | tr ' ' '\n'
  } | grep -E '^https?://' | grep -v -- '-security' | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

tmp=
cleanup() {
  [ -n "$tmp" ] && [ -d "$tmp" ] || return 0
  # A failed debootstrap can leave /proc and /sys mounted in the half-built tree.
  awk -v t="$tmp/" 'index($2, t) == 1 { print $2 }' /proc/mounts | sort -r \
    | xargs -r -n1 umount -l || true
  rm -rf --one-file-system "$tmp"
}
trap cleanup EXIT

command -v debootstrap >/dev/null \
  || { echo "make-machine: debootstrap is missing (scripts/setup.sh installs it)" >&2; exit 69; }
mirror=$(apt_mirror)
mkdir -p "$(dirname "$root")"
# Built next to the target (same filesystem), renamed into place only once complete.
tmp=$(mktemp -d "$root.XXXXXX")
chmod 755 "$tmp"
if ! debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$tmp" "$mirror" \
    >"$tmp.log" 2>&1; then
  tail -n 20 "$tmp.log" >&2
  echo "make-machine: debootstrap from $mirror failed (log: $tmp.log)" >&2
  exit 1
fi
rm -f "$tmp.log"
find "$tmp"/var/lib/apt/lists "$tmp"/var/cache/apt -type f -delete
# A machine of its own: its own name, and a machine id systemd makes up at each boot.
echo mitosis-machine >"$tmp/etc/hostname"
: >"$tmp/etc/machine-id"
echo "$MARKER_TEXT" >"$tmp/.mitosis-machine-version"
if [ -e "$root" ]; then
  mv "$root" "$tmp.old"
  rm -rf --one-file-system "$tmp.old"
fi
mv "$tmp" "$root"
tmp=
echo "$root $(du -sh "$root" | cut -f1)"
