#!/usr/bin/env bash
# Runs every test (as root: the end-to-end tests ptrace processes and build network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The end-to-end tests run the workspace's binaries (mitosisd, mitosis-stub, mitosis).
cargo build --workspace --bins
cargo test --workspace
