#!/usr/bin/env bash
# Sets up, builds, and runs the demo (as root): a Python function from the Debian bundle
# deployed on mitosis-platform over three simulated hosts and called by concurrent clients
# through Fn's API, beside a cold start of the same bundle (`--primitive`: the remote fork
# itself through the mitosis CLI, beside a local fork and a cold start).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --workspace --bins
exec target/release/mitosis-demo "$@"
