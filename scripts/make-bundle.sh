#!/usr/bin/env bash
# Builds the OCI runtime bundle of the Python functions (as root): a trimmed Debian bookworm
# rootfs with python3, numpy and Pillow, the repo's examples/python/*.py in /opt/mitosis, and a
# config.json. Usage: make-bundle.sh [BUNDLE_DIR]  (default /var/lib/mitosis/bundles/python)
# The rootfs is cached: debootstrap runs again only when BUNDLE_VERSION below changes (bump it
# whenever the rootfs recipe changes); the seeds and config.json are refreshed on every run.
set -euo pipefail

BUNDLE_VERSION=2
SUITE=bookworm
INCLUDE=python3-minimal,libpython3.11-stdlib,python3-numpy,python3-pil
MARKER_TEXT="mitosis-bundle $BUNDLE_VERSION $SUITE minbase $INCLUDE"

bundle=${1:-/var/lib/mitosis/bundles/python}
repo=$(cd "$(dirname "$0")/.." && pwd)
rootfs=$bundle/rootfs
marker=$rootfs/.mitosis-bundle-version

# apt_mirror, and the clean-up of "$tmp" on exit.
. "$(dirname "$0")/lib/debootstrap.sh"

mkdir -p "$bundle"
if [ "$(cat "$marker" 2>/dev/null)" != "$MARKER_TEXT" ]; then
  if ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
  fi
  mirror=$(apt_mirror)
  # Built next to the target (same filesystem), renamed into place only once complete.
  tmp=$(mktemp -d "$bundle/.rootfs.XXXXXX")
  chmod 755 "$tmp"
  if ! debootstrap_into make-bundle "$tmp" "$SUITE" "$mirror" --variant=minbase \
      --include="$INCLUDE"; then
    echo "make-bundle: debootstrap from $mirror failed (log: $tmp.log)" >&2
    exit 1
  fi
  # Trim what a function never needs (docs, caches, test suites). python3-pil depends on
  # mime-support, which pulls in mailcap and the full perl (~50 MB); Python's mimetypes only
  # reads /etc/mime.types (from media-types, kept). Purging them leaves dpkg's database
  # consistent except for that one dependency. The byte-compiled __pycache__ stays (the root
  # is read-only at run time, so a missing .pyc would be recompiled on every start), as does
  # C.UTF-8 in /usr/lib/locale.
  chroot "$tmp" dpkg --purge --force-depends mime-support mailcap perl libperl5.36 \
    perl-modules-5.36 >>"$tmp.log" 2>&1 || { tail -n 20 "$tmp.log" >&2; exit 1; }
  rm -f "$tmp.log"
  (
    cd "$tmp"
    find usr/lib/python3/dist-packages -depth -type d -name tests -exec rm -rf {} +
    find var/lib/apt/lists var/cache/apt var/log -type f -delete
    rm -rf usr/share/doc/* usr/share/man/* usr/share/info/* var/cache/debconf/*-old
    find usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  )
  echo "$MARKER_TEXT" >"$tmp/.mitosis-bundle-version"
  if [ -e "$rootfs" ]; then
    mv "$rootfs" "$tmp.old"
    rm -rf --one-file-system "$tmp.old"
  fi
  mv "$tmp" "$rootfs"
fi

# Always: the repo's current seeds, and what the runtime expects to find in the root.
rm -rf "$rootfs/opt/mitosis"
install -d "$rootfs/opt/mitosis"
install -m 644 "$repo"/examples/python/*.py "$rootfs/opt/mitosis/"
# The fork_prepare library (standard library only): `import mitosis` in the container.
py_site=$(ls -d "$rootfs"/usr/lib/python3/dist-packages | head -1)
rm -rf "$py_site/mitosis"
install -d "$py_site/mitosis"
install -m 644 "$repo"/clients/python/mitosis/*.py "$py_site/mitosis/"
install -d "$rootfs/proc" "$rootfs/dev" "$rootfs/sys"
install -d -m 1777 "$rootfs/tmp"
echo fn >"$rootfs/etc/hostname" # debootstrap copies the host's

# OCI runtime spec 1.0.2, trimmed from `runc spec`. The root is read-only, hence the tmpfs on
# /tmp; /dev is a tmpfs the runtime fills with the standard device nodes.
cat >"$bundle/config.json" <<'EOF'
{
  "ociVersion": "1.0.2",
  "process": {
    "terminal": false,
    "user": { "uid": 0, "gid": 0 },
    "args": ["python3", "/opt/mitosis/image_fn.py"],
    "env": [
      "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
      "HOME=/root",
      "LANG=C.UTF-8",
      "PYTHONDONTWRITEBYTECODE=1"
    ],
    "cwd": "/opt/mitosis"
  },
  "root": { "path": "rootfs", "readonly": true },
  "hostname": "fn",
  "mounts": [
    { "destination": "/proc", "type": "proc", "source": "proc" },
    { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
      "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
    { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
      "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
    { "destination": "/sys", "type": "sysfs", "source": "sysfs",
      "options": ["nosuid", "noexec", "nodev", "ro"] },
    { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
      "options": ["nosuid", "nodev", "mode=1777", "size=65536k"] }
  ],
  "linux": {
    "namespaces": [
      { "type": "pid" }, { "type": "mount" }, { "type": "uts" }, { "type": "ipc" },
      { "type": "network" }
    ],
    "resources": {
      "memory": { "limit": 268435456 },
      "pids": { "limit": 128 },
      "cpu": { "shares": 1024, "quota": 100000, "period": 100000 }
    },
    "maskedPaths": [
      "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
      "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
      "/proc/scsi"
    ],
    "readonlyPaths": [
      "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
    ]
  }
}
EOF

echo "$bundle $(du -sh "$bundle" | cut -f1)"
