#!/usr/bin/env bash
# Installs the tools the checks need: cargo-machete (unused dependencies) from crates.io,
# pinned; and, where apt and root are available, Debian's prometheus package for `promtool`
# (the alert rules' check) and Debian's chromium (the status page's headless browser test).
# Idempotent: skips what is already installed.
set -euo pipefail
want_machete="0.9.2"
if ! cargo machete --version 2>/dev/null | grep -q "$want_machete"; then
  echo "installing cargo-machete $want_machete" >&2
  cargo install --locked --quiet cargo-machete --version "$want_machete"
fi
# Debian packages, with the package lists refreshed once if they are missing or stale.
# Waits up to 10 minutes for the package lock (a fresh machine's unattended upgrades hold it);
# on failure the end of apt's output is shown.
apt_install() {
  local log
  log="$(mktemp)"
  local get=(apt-get -o DPkg::Lock::Timeout=600)
  DEBIAN_FRONTEND=noninteractive "${get[@]}" install -y -q --no-install-recommends "$@" >"$log" 2>&1 || {
    "${get[@]}" update -q >>"$log" 2>&1 &&
      DEBIAN_FRONTEND=noninteractive "${get[@]}" install -y -q --no-install-recommends "$@" >>"$log" 2>&1
  } || {
    tail -n 20 "$log" >&2
    rm -f "$log"
    return 1
  }
  rm -f "$log"
}
if ! command -v promtool >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing promtool (Debian's prometheus package)" >&2
  apt_install prometheus || echo "could not install prometheus; the alert rules are checked without promtool" >&2
fi
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing chromium (Debian's package)" >&2
  apt_install chromium ||
    echo "could not install chromium; tests/python/test_status_page.py will fail (SLUICE_REQUIRE_CHROMIUM=1)" >&2
fi
