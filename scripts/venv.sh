#!/usr/bin/env bash
# Creates a Python venv (gitignored) and installs a requirements file into it. Idempotent:
# reinstalls only when that file changed.
#   scripts/venv.sh [REQUIREMENTS [VENV]]   default: scripts/requirements.txt into .venv
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
req="${1:-$root/scripts/requirements.txt}"
venv="${2:-$root/.venv}"
stamp="$venv/.stamp-$(basename "$req")"
# -r includes and -c constraints count: hash the file together with the files it names (one
# level of -r, and the constraints of the files it includes).
includes=$(sed -n 's/^-[rc][[:space:]]*//p' "$req" | sed "s|^|$(dirname "$req")/|")
for f in $includes; do
  includes="$includes $(sed -n 's/^-[rc][[:space:]]*//p' "$f" | sed "s|^|$(dirname "$f")/|")"
done
want="$(cat "$req" $includes | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# A venv whose creation failed half-way (python3-venv missing: `bin/python` but no pip) is made
# again, not kept broken.
if [ ! -x "$venv/bin/pip" ]; then
  echo "creating Python venv in $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv" || { rm -rf "$venv"; echo "python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
fi
echo "installing $(basename "$req") into $venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
