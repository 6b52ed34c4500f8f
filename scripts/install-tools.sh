#!/usr/bin/env bash
# Installs the Rust tools the checks need, from crates.io, pinned: cargo-machete (unused
# dependencies). Idempotent: skips a tool already installed at its version.
set -euo pipefail
want_machete="0.9.2"
if ! cargo machete --version 2>/dev/null | grep -q "$want_machete"; then
  echo "installing cargo-machete $want_machete" >&2
  cargo install --locked --quiet cargo-machete --version "$want_machete"
fi
