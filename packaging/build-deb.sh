#!/usr/bin/env bash
# Builds the Debian package of mitosis into target/debian/: the release binaries, their man
# pages and shell completions (generated from the clap definitions into target/release/assets),
# the default config files and the systemd units. Needs cargo-deb (scripts/test.sh installs
# 3.8.0, the version it is tested with). Arguments go to `cargo deb` (e.g. --output FILE, --fast).
#
#   packaging/build-deb.sh            # release build
#   PROFILE=dev packaging/build-deb.sh   # faster, for checking the packaging itself
#                                        # (tests/tests/package.rs; cargo-deb warns about it)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
cargo deb --version >/dev/null 2>&1 \
    || { echo "build-deb: cargo-deb is missing (cargo install --locked cargo-deb --version 3.8.0)" >&2
         exit 69; }
cargo build --profile "$profile" -p mitosis-cli -p mitosisd -p mitosis-stub -p mitosis-container \
    -p mitosis-platform --bins
# Cargo's target directory (CARGO_TARGET_DIR or build.target-dir, if set): the binaries, and
# the generated files beside them, where [package.metadata.deb] names them
# (target/release/... stands for the profile's directory there).
target=$(cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin=$target/$dir
assets=$bin/assets
rm -rf "$assets"
mkdir -p "$assets"/man/man1 "$assets"/man/man8 "$assets"/completions/{bash,zsh,fish}
"$bin"/mitosis man --dir "$assets"/man/man1
"$bin"/mitosisd --man > "$assets"/man/man8/mitosisd.8
"$bin"/mitosis-platform man > "$assets"/man/man8/mitosis-platform.8
for shell in bash zsh fish; do
    case $shell in
        bash) name() { echo "$1"; } ;;
        zsh) name() { echo "_$1"; } ;;
        fish) name() { echo "$1.fish"; } ;;
    esac
    "$bin"/mitosis completions "$shell" > "$assets/completions/$shell/$(name mitosis)"
    "$bin"/mitosisd --completions "$shell" > "$assets/completions/$shell/$(name mitosisd)"
    "$bin"/mitosis-platform completions "$shell" \
        > "$assets/completions/$shell/$(name mitosis-platform)"
done
cargo deb -p mitosis-cli --no-build --profile "$profile" "$@"
