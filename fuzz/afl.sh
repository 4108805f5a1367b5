#!/usr/bin/env bash
# Runs an AFL++ campaign on one target: ./fuzz/afl.sh TARGET [SECONDS] (default 60).
# Needs cargo-afl (`cargo install cargo-afl`); see fuzz/README.md. Findings land in
# target/afl/out/TARGET/default/{crashes,hangs,queue}.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: fuzz/afl.sh TARGET [SECONDS]}
secs=${2:-60}
export CARGO_TARGET_DIR=target/afl   # instrumented builds apart from the normal ones
cargo afl build --release -p mitosis-fuzz --features afl --bin "afl_$target"
dict=()
[[ -f fuzz/dict/$target.dict ]] && dict=(-x "fuzz/dict/$target.dict")
mkdir -p target/afl/out
# No UI (a log instead), a time limit, no tuning of the host's core_pattern or CPU governor,
# and a second run goes on from the first one's queue.
AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_AUTORESUME=1 \
    cargo afl fuzz -i "fuzz/corpus/$target" -o "target/afl/out/$target" -V "$secs" "${dict[@]}" \
    "target/afl/release/afl_$target" > "target/afl/out/$target.log"
grep -E '^(run_time|execs_done|execs_per_sec|corpus_count|saved_crashes|saved_hangs) ' \
    "target/afl/out/$target/default/fuzzer_stats"
