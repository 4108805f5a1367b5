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

# apt_mirror, and the clean-up of "$tmp" on exit.
. "$(dirname "$0")/lib/debootstrap.sh"

command -v debootstrap >/dev/null \
  || { echo "make-machine: debootstrap is missing (scripts/setup.sh installs it)" >&2; exit 69; }
mirror=$(apt_mirror)
mkdir -p "$(dirname "$root")"
# Built next to the target (same filesystem), renamed into place only once complete.
tmp=$(mktemp -d "$root.XXXXXX")
chmod 755 "$tmp"
if ! debootstrap_into make-machine "$tmp" "$SUITE" "$mirror" --variant=minbase \
    --include="$INCLUDE"; then
  echo "make-machine: debootstrap from $mirror failed (log: $tmp.log)" >&2
  exit 1
fi
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
