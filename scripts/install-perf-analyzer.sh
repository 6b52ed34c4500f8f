#!/usr/bin/env bash
# Installs Triton's perf_analyzer (the load tool users of Triton benchmark with) into
# .tools/perf_analyzer/, for tests/python/test_perf_analyzer.py: the binary from the last
# tritonclient wheel on PyPI that ships it (2.41.0, pinned), the CUDA runtime library it links
# (PyPI's nvidia-cuda-runtime-cu12, pinned; no GPU is needed) and, where apt and root are
# available, Debian's libb64-0d. Idempotent: skips what is already there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.tools/perf_analyzer"
client="2.41.0"
cudart="12.9.79"
if [ -x "$dest/perf_analyzer" ] && [ -f "$dest/lib/libcudart.so.12" ] &&
  [ "$(cat "$dest/.version" 2>/dev/null)" = "$client $cudart" ]; then
  exit 0
fi
# Debian's package, or the library where ldconfig finds it (ldconfig lives in /sbin, which a
# user's PATH may lack; its list is read whole, not through a pipe `grep -q` may close early).
has_libb64() {
  dpkg -s libb64-0d >/dev/null 2>&1 && return 0
  local libs
  libs="$(PATH="$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null || true)"
  [[ "$libs" == *libb64.so.0d* ]]
}
if ! has_libb64; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing libb64-0d (Debian's package, for perf_analyzer)" >&2
    log="$(mktemp)"
    get=(apt-get -o DPkg::Lock::Timeout=600)
    DEBIAN_FRONTEND=noninteractive "${get[@]}" install -y -q --no-install-recommends libb64-0d >"$log" 2>&1 || {
      "${get[@]}" update -q >>"$log" 2>&1 &&
        DEBIAN_FRONTEND=noninteractive "${get[@]}" install -y -q --no-install-recommends libb64-0d >>"$log" 2>&1
    } || { tail -n 20 "$log" >&2; rm -f "$log"; exit 1; }
    rm -f "$log"
  else
    echo "perf_analyzer needs libb64-0d (apt-get install libb64-0d)" >&2
    exit 1
  fi
fi
echo "installing perf_analyzer (tritonclient $client's wheel) into $dest" >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
pip=("$root/.venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$work")
"${pip[@]}" --platform manylinux1_x86_64 "tritonclient==$client"
"${pip[@]}" --platform manylinux2014_x86_64 "nvidia-cuda-runtime-cu12==$cudart"
rm -rf "$dest"
mkdir -p "$dest/lib"
# One member of each wheel (a zip), with Python's zipfile: no unzip needed.
"$root/.venv/bin/python" - "$work" "$dest" "$client" <<'PY'
import glob, os, sys, zipfile
work, dest, client = sys.argv[1:]
for pattern, member, out in [
    ("tritonclient-*.whl", f"tritonclient-{client}.data/data/bin/perf_analyzer", "perf_analyzer"),
    ("nvidia_cuda_runtime_cu12-*.whl", "nvidia/cuda_runtime/lib/libcudart.so.12", "lib/libcudart.so.12"),
]:
    (wheel,) = glob.glob(os.path.join(work, pattern))
    with zipfile.ZipFile(wheel) as z, open(os.path.join(dest, out), "wb") as f:
        f.write(z.read(member))
PY
chmod +x "$dest/perf_analyzer"
echo "$client $cudart" > "$dest/.version"
