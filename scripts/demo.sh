#!/usr/bin/env bash
# Sets up, builds, and runs the demo: a warmed numpy function remote-forked across two
# simulated hosts, beside a local fork and a cold start (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --workspace --bins
exec target/release/mitosis-demo "$@"
