#!/usr/bin/env bash
# Builds target/release/sluice, optimised with the profile in pgo/sluice.profdata.gz
# (profile-guided optimisation: the compiler lays out, inlines and orders branches by where a
# training load spent its time) when this rustc is the one that made it (pgo/rustc-version).
# Otherwise, or with SLUICE_PGO=0, the plain `cargo build --release --bin sluice`. Same time as
# a plain build; no instrumented build or rustup component needed: `make pgo`
# (scripts/build-pgo.sh) makes the profile again after the request path changes (a function
# whose code changed since then is optimised without the profile's guidance).
# docs/benchmarks.md has what the profile gains.
#
#   scripts/build-release.sh
#   SLUICE_PGO=0 scripts/build-release.sh     # plain
#
# The optimised build lives in target/pgo and is copied to target/release/sluice; a later
# `cargo build --release` that builds `sluice` puts its plain build back there.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=pgo/sluice.profdata.gz
plain() {
    exec cargo build --release --bin sluice
}
if [ "${SLUICE_PGO:-1}" = 0 ]; then
    plain
fi
if [ ! -f "$PROFILE" ]; then
    echo "build-release: no $PROFILE (make pgo makes one): plain release build" >&2
    plain
fi
made_by=$(cat pgo/rustc-version 2>/dev/null || echo "an unknown rustc")
if [ "$(rustc -V)" != "$made_by" ]; then
    echo "build-release: $PROFILE was made by $made_by, this is $(rustc -V): plain release build" >&2
    plain
fi
# The profile's flags would replace the user's (a `build.rustflags` in a cargo config file
# outside this repository is replaced too, unseen here).
if [ -n "${RUSTFLAGS:-}${CARGO_ENCODED_RUSTFLAGS:-}${CARGO_BUILD_RUSTFLAGS:-}" ]; then
    echo "build-release: RUSTFLAGS, CARGO_ENCODED_RUSTFLAGS or CARGO_BUILD_RUSTFLAGS is set: plain release build with them" >&2
    plain
fi
# cargo rebuilds when the flags change, not when the file they name does: the copy the flags
# name is named by its content, so a new profile rebuilds every crate with it.
USED=$PWD/target/pgo-use/sluice-$(sha256sum "$PROFILE" | cut -c1-16).profdata
if [ ! -f "$USED" ]; then
    mkdir -p "$(dirname "$USED")"
    gzip -dc "$PROFILE" > "$USED.tmp"
    mv "$USED.tmp" "$USED"
fi
HOST=$(rustc -vV | sed -n 's/^host: //p')
# --target, as for the instrumented build (scripts/build-pgo.sh): the profile names functions by
# their symbols, whose hashes differ between builds with and without it; and the flags apply to
# the server's code, not to build scripts and proc macros.
CARGO_ENCODED_RUSTFLAGS="-Cprofile-use=$USED" \
    cargo build --release --bin sluice --target "$HOST" --target-dir target/pgo
mkdir -p target/release
# Not written through: cargo's target/release/sluice is a hard link to its own build.
rm -f target/release/sluice
cp "target/pgo/$HOST/release/sluice" target/release/sluice
