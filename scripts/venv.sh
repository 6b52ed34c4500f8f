#!/usr/bin/env bash
# Creates a Python venv (gitignored) and installs a requirements file into it. Idempotent:
# reinstalls only when that file changed.
#   scripts/venv.sh [REQUIREMENTS [VENV]]   default: scripts/requirements.txt into .venv
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
req="${1:-$root/scripts/requirements.txt}"
venv="${2:-$root/.venv}"
stamp="$venv/.stamp-$(basename "$req")"
# -r includes count: hash the file together with the files it includes.
includes=$(sed -n 's/^-r[[:space:]]*//p' "$req" | sed "s|^|$(dirname "$req")/|")
want="$(cat "$req" $includes | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || { echo "creating Python venv in $venv" >&2; python3 -m venv "$venv"; }
echo "installing $(basename "$req") into $venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
