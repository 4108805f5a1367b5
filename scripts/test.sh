#!/usr/bin/env bash
# Runs every test (as root: the end-to-end tests ptrace processes and build network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# cargo-deb, which packaging/build-deb.sh builds the .deb with for the package's test
# (tests/tests/package.rs): pinned, built once from crates.io (about two minutes).
CARGO_DEB_VERSION=3.8.0
cargo deb --version >/dev/null 2>&1 || cargo install --locked cargo-deb --version "$CARGO_DEB_VERSION"
# The end-to-end tests run the workspace's binaries (mitosisd, mitosis-stub, mitosis).
cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace 2>&1 | tee "$log" || status=$?
# One closing line with the totals over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
