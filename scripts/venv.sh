#!/usr/bin/env bash
# Creates .venv (gitignored) and installs a requirements file into it (default: everything,
# scripts/requirements.txt). Idempotent: reinstalls only when that file changed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
req="${1:-$root/scripts/requirements.txt}"
stamp="$venv/.stamp-$(basename "$req")"
want="$(cat "$req" "$(dirname "$req")"/requirements-test.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || { echo "creating Python venv in $venv" >&2; python3 -m venv "$venv"; }
echo "installing $(basename "$req") into $venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
