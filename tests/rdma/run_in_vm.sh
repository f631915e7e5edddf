#!/usr/bin/env bash
# Runs every RDMA test inside one soft-RoCE VM (tools/softroce/softroce-vm) and exits with
# their combined status. Build first (on the host):
#
#   cmake -S . -B build/dev -G Ninja -DKVXFER_BUILD_PYTHON=ON \
#         -Dpybind11_DIR=$(python3 -m pybind11 --cmakedir) && ninja -C build/dev
#   tests/rdma/run_in_vm.sh [extra pytest args for the main run]
#
# Inside the VM, in order:
#   1. pytest tests/rdma (the device-removal module skips itself here);
#   2. pytest tests/rdma/test_zz_device_removal.py in a pytest process of its own, with
#      KVXFER_RDMA_DEVICE_REMOVAL=1: it deletes rxe0, which the kernel completes only when
#      no process holds the device, so nothing else may run in that process or after it;
#   3. the C++ conformance and lifecycle suites' ibverbs instances, if those binaries were
#      built ($KVXFER_BUILD_DIR, default build/dev, with -DKVXFER_BUILD_TESTS=ON).
#
# Environment: KVXFER_PYTHON (default: the real path of the first python3, never a pyenv
# shim, which costs seconds per call under TCG), KVXFER_BUILD_DIR, SOFTROCE_* (see
# tools/softroce/softroce-vm; SOFTROCE_TIMEOUT defaults to 1800 s here).
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P) || exit 2
cd "$root" || exit 2
py=${KVXFER_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}
build=${KVXFER_BUILD_DIR:-build/dev}
export SOFTROCE_TIMEOUT=${SOFTROCE_TIMEOUT:-1800}

if ! "$py" -c 'import kvxfer' 2>/dev/null; then
  echo "run_in_vm.sh: kvxfer does not import from $root (build it first, see the header)" >&2
  exit 2
fi

# The script run in the guest. pytest's plugin autoload scans every entry point over 9p
# (tens of seconds under TCG), so it is off.
read -r -d '' guest <<'GUEST'
py=$1; build=$2; shift 2
export PYTHONDONTWRITEBYTECODE=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
rc=0
echo "== rdma 1/3: pytest tests/rdma" >&2
"$py" -m pytest -q -p no:cacheprovider tests/rdma "$@" || rc=1
conf=$build/tests/cpp/kvxfer_conformance_tests
if [ -x "$conf" ]; then
  echo "== rdma 2/3: C++ conformance suite, ibverbs instances" >&2
  "$conf" --gtest_brief=1 --gtest_filter='*ibverbs*' || rc=1
else
  echo "== rdma 2/3: C++ conformance suite not built ($conf): skipped" >&2
fi
life=$build/tests/cpp/kvxfer_lifecycle_tests
if [ -x "$life" ]; then
  echo "== rdma 2/3: C++ lifecycle suite (close joins every thread), ibverbs instances" >&2
  "$life" --gtest_brief=1 --gtest_filter='*ibverbs*' || rc=1
fi
echo "== rdma: kvxfer-bench --backend ibverbs against ib_write_bw (tests/python/test_bench.py)" >&2
"$py" -m pytest -q -p no:cacheprovider tests/python/test_bench.py -k ibverbs -rs || rc=1
echo "== rdma 3/3: device removal (own pytest process, last: it deletes the device)" >&2
KVXFER_RDMA_DEVICE_REMOVAL=1 "$py" -m pytest -q -p no:cacheprovider -s tests/rdma/test_zz_device_removal.py || rc=1
echo "== rdma: exit status $rc" >&2
exit $rc
GUEST

exec tools/softroce/softroce-vm bash -c "$guest" run_in_vm "$py" "$build" "$@"
