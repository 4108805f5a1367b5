#!/usr/bin/env bash
# Installs what mitosis needs on a fresh Debian machine (as root): iproute2 for the simulated
# hosts, a C compiler for the test fixtures, numpy for the Python demo seed, Pillow for the
# benchmark's image seed and its plot, Node.js, a headless JDK, Perl and Go for the runtime
# seeds of the tests (examples/node, examples/java, examples/perl, examples/go), etcd for the
# platform's shared store (its tests start their own) and protoc to build its client, DejaVu Sans for the load-spike plots, chromium
# and its driver for the dashboard's browser test (tests/tests/dashboard.rs), pandas and
# redis-server for the FINRA workflow (examples/python/finra), systemd-nspawn and debootstrap
# for the Debian package's test (tests/tests/package.rs; scripts/test.sh adds cargo-deb); then
# the Debian-based OCI bundle of the Python seeds for the containers (cached: a re-run only
# refreshes its seeds and config.json).
set -euo pipefail
need_apt=()
command -v ip >/dev/null || need_apt+=(iproute2)
command -v cc >/dev/null || need_apt+=(gcc libc6-dev)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
command -v node >/dev/null || need_apt+=(nodejs)
command -v javac >/dev/null || need_apt+=(default-jdk-headless)
# Perl with its threads and JSON::PP (examples/perl; perl-base alone has neither).
perl -Mthreads -MThread::Queue -MJSON::PP -e1 2>/dev/null || need_apt+=(perl)
# Go's own runtime (examples/go, built by tests/tests/runtimes.rs).
command -v go >/dev/null || need_apt+=(golang-go)
# musl's C library, for a test fixture built as an Alpine image's programs are.
command -v musl-gcc >/dev/null || need_apt+=(musl-tools)
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
# libseccomp, which compiles a bundle's seccomp profile (crates/mitosis-container).
[ -e /usr/include/seccomp.h ] || need_apt+=(libseccomp-dev)
# The FINRA workflow (examples/python/finra, `mitosis-bench workflow`, tests/tests/finra.rs):
# pandas, and Redis for its pickle-through-Redis baseline (the bench and tests start their
# own redis-server inside a testbed host; the system service is not used).
command -v redis-server >/dev/null || need_apt+=(redis-server)
/usr/bin/python3 -c 'import pandas' 2>/dev/null || need_apt+=(python3-pandas)
/usr/bin/python3 -c 'import redis' 2>/dev/null || need_apt+=(python3-redis)
# The font of `mitosis-bench loadspike`'s plots.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
# The platform dashboard's test drives a headless chromium through WebDriver.
[ -x /usr/lib/chromium/chromium ] || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
# The Debian package's test (tests/tests/package.rs) boots a fresh Debian root (debootstrap)
# with systemd as PID 1 in systemd-nspawn, and enters it with nsenter (util-linux).
command -v systemd-nspawn >/dev/null || need_apt+=(systemd-container)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  # Debian starts redis-server as a service on install where systemd runs: stop it, nothing
  # here uses it (the workflow benchmark and tests start their own, torn down with them).
  if [[ " ${need_apt[*]} " == *" redis-server "* ]] && command -v systemctl >/dev/null \
      && systemctl is-active --quiet redis-server 2>/dev/null; then
    systemctl disable --now redis-server || true
  fi
fi
if ! python3 -c 'import numpy' 2>/dev/null; then
  python3 -m pip install --quiet numpy 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages numpy
fi
if ! python3 -c 'import PIL' 2>/dev/null; then
  python3 -m pip install --quiet pillow 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages pillow
fi
# The library functions fork themselves with (clients/python: mitosis.fork_prepare).
python3 -m pip install --quiet --no-build-isolation "$(dirname "$0")/../clients/python" 2>/dev/null \
  || python3 -m pip install --quiet --break-system-packages "$(dirname "$0")/../clients/python" \
  || echo "setup: the mitosis Python library was not installed (pip failed); use PYTHONPATH=clients/python" >&2
"$(dirname "$0")/make-bundle.sh"
