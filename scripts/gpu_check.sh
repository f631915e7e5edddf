#!/bin/bash
# One command for a GPU machine: print the machine, build kvxfer's Python module if the
# one at hand does not import, run tests/gpu, run the GPU benchmarks, and write every
# output under $OUT (default ./gpu-out). Usage:
#   bash scripts/gpu_check.sh [all|build|test|sweep|bench|tcp|equivalence|forwarding|quick]
# The build prefers CMake; where there is no cmake/pybind11 it compiles the sources with
# one g++ command per file (pybind11 headers from PYBIND11_INCLUDE or build/pybind11-include).
# BUILD_TYPE (default Release) and CXXFLAGS_EXTRA (e.g. -g) shape the build. Where the machine
# has libcrypto but not its headers (libssl-dev), OPENSSL_INCLUDE_DIR names a folder holding
# OpenSSL 3 headers and OPENSSL_CRYPTO_LIBRARY the libcrypto.so.3 to link.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
log() { echo "== $*" | tee -a "$OUT/steps.log"; }

machine() {
  log "machine"
  {
    date -u; uname -a; nproc
    nvidia-smi || true
    nvidia-smi topo -m || true
    nvcc --version 2>&1 | tail -1 || true
    $PY --version
    $PY -c "import sys; print(sys.executable)"
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())" 2>&1
    $PY -c "import numpy; print('numpy', numpy.__version__)" 2>&1
    $PY -c "import pytest; print('pytest', pytest.__version__)" 2>&1
    $PY -c "import pybind11; print('pybind11', pybind11.__version__)" 2>&1
    which cmake ninja g++ c++ 2>&1
    ldd --version | head -1
  } 2>&1 | tee "$OUT/machine.txt"
}

imports() { $PY -c "import kvxfer, kvxfer._native as n; print('kvxfer imports; cuda:', n.cuda_status() or 'OK')"; }

build_gxx() {
  local pyinc pybinc ext objdir srcs
  pyinc=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  pybinc=${PYBIND11_INCLUDE:-$($PY -c "import pybind11; print(pybind11.get_include())" 2>/dev/null || echo build/pybind11-include)}
  ext=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  objdir=build/gxx; mkdir -p "$objdir"
  srcs=$(ls native/src/core/*.cc native/src/util/*.cc native/src/cuda/*.cc native/src/backends/registry.cc \
    native/src/backends/loopback/*.cc native/src/backends/shm/*.cc native/src/backends/fault/*.cc \
    native/src/backends/tcp/*.cc native/src/backends/cuda_ipc/*.cc native/bindings/*.cc)
  local flags="-std=c++20 -O2 ${CXXFLAGS_EXTRA:-} ${OPENSSL_INCLUDE_DIR:+-I$OPENSSL_INCLUDE_DIR} -fPIC -fvisibility=hidden -DNDEBUG -DKVXFER_HAVE_FAULT=1 -DKVXFER_HAVE_TCP=1 \
    -DKVXFER_HAVE_CUDA_IPC=1 -Inative/include -Inative/src -Inative/bindings -I$pyinc -I$pybinc"
  echo "$srcs" | tr ' ' '\n' | xargs -P "$(nproc)" -I{} sh -c \
    'o='"$objdir"'/$(echo {} | tr / _).o; g++ '"$flags"' -c {} -o $o || exit 255'
  g++ -shared -o "kvxfer/_native$ext" "$objdir"/*.o "${OPENSSL_CRYPTO_LIBRARY:--lcrypto}" -lpthread -ldl
}

build() {
  log "build"
  # Always from scratch: a build folder kept from an earlier checkout can hold objects
  # compiled against older headers (the device machine keeps ignored folders between runs).
  if [ -n "${SKIP_BUILD:-}" ] && imports 2>&1 | tee -a "$OUT/build.log"; then return 0; fi
  rm -rf build/gpu build/gxx kvxfer/_native*.so
  local ssl=()
  [ -n "${OPENSSL_INCLUDE_DIR:-}" ] && ssl+=("-DOPENSSL_INCLUDE_DIR=$OPENSSL_INCLUDE_DIR")
  [ -n "${OPENSSL_CRYPTO_LIBRARY:-}" ] && ssl+=("-DOPENSSL_CRYPTO_LIBRARY=$OPENSSL_CRYPTO_LIBRARY")
  if command -v cmake >/dev/null && $PY -c "import pybind11" 2>/dev/null; then
    cmake -S . -B build/gpu -DKVXFER_BUILD_PYTHON=ON -DKVXFER_WITH_IBVERBS=OFF -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" \
      -DCMAKE_CXX_FLAGS="${CXXFLAGS_EXTRA:-}" "${ssl[@]}" \
      -DPython_EXECUTABLE="$(command -v $PY)" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" >>"$OUT/build.log" 2>&1 &&
      cmake --build build/gpu -j "$(nproc)" >>"$OUT/build.log" 2>&1 && cp build/gpu/native/_native*.so kvxfer/
  else
    build_gxx >>"$OUT/build.log" 2>&1
  fi
  tail -5 "$OUT/build.log"
  # The 2 x H200 image sets CXX=/opt/gcc/bin/g++, whose modules carry a static libstdc++
  # (no libstdc++.so.6 in ldd): say so, it matters for anything using iostreams (docs/gpu.md).
  echo "compiler: ${CXX:-c++ from PATH} ($(${CXX:-c++} --version 2>/dev/null | head -1))" | tee -a "$OUT/build.log"
  ldd kvxfer/_native*.so 2>/dev/null | grep -q "libstdc++" ||
    echo "note: kvxfer/_native links libstdc++ statically" | tee -a "$OUT/build.log"
  imports 2>&1 | tee -a "$OUT/build.log"
}

tests() {
  log "tests/gpu"
  $PY -m pytest tests/gpu -v -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests-gpu.txt" | tail -40
}

sweep() {
  log "kernel sweep"
  PYTHONPATH=bench $PY -m kvxfer_bench.gpu_sweep ${SWEEP_ARGS:-} > "$OUT/gpu-sweep.jsonl" 2> "$OUT/gpu-sweep.txt"
  cat "$OUT/gpu-sweep.txt" | tail -20
}

bench() {
  log "bench"
  PYTHONPATH=bench $PY -m kvxfer_bench --memory cuda:0 --target-memory cuda:1 --op both --gpu-pack \
    --repeat "${REPEAT:-5}" --json > "$OUT/bench-gpu.jsonl" 2> "$OUT/bench-gpu.txt"
  echo "rc=$?" >> "$OUT/bench-gpu.txt"
  cat "$OUT/bench-gpu.txt"
  bench_tcp
}

bench_tcp() {
  log "bench tcp host-staged"
  PYTHONPATH=bench $PY -m kvxfer_bench --memory cuda:0 --target-memory cuda:1 --backend tcp \
    --repeat "${REPEAT_TCP:-3}" --json > "$OUT/bench-gpu-tcp.jsonl" 2> "$OUT/bench-gpu-tcp.txt"
  echo "rc=$?" >> "$OUT/bench-gpu-tcp.txt"
  cat "$OUT/bench-gpu-tcp.txt"
}

equivalence() {
  # Issue 11 on two GPUs: prefill on cuda:0, decode on cuda:1, KV over cuda_ipc.
  log "equivalence (cuda_ipc, prefill cuda:0, decode cuda:1)"
  $PY -m kvxfer.cli experiment equivalence --backend cuda_ipc --prefill-device cuda:0 --decode-device cuda:1 \
    --json ${EQUIV_ARGS:-} > "$OUT/equivalence.jsonl" 2> "$OUT/equivalence.txt"
  echo "rc=$?" >> "$OUT/equivalence.txt"
  tail -5 "$OUT/equivalence.txt"; cat "$OUT/equivalence.jsonl"
}

py_deps() {
  # The serving layer's client-side packages (openai, aiohttp) where the machine lacks them:
  # pip installs them from the wheels in $WHEELS (a folder that travelled with the tree) into
  # a scratch folder put first on PYTHONPATH.
  $PY -c "import openai, aiohttp" 2>/dev/null && return 0
  [ -n "${WHEELS:-}" ] || { echo "openai/aiohttp missing and no WHEELS folder"; return 1; }
  local site=${TMPDIR:-/tmp}/kvxfer-pydeps
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  $PY -c "import openai, aiohttp" 2>/dev/null ||
    $PY -m pip install -q --no-index --find-links "$WHEELS" --target "$site" openai aiohttp >>"$OUT/steps.log" 2>&1 ||
    return 1
  $PY -c "import openai, aiohttp; print('openai', openai.__version__, 'aiohttp', aiohttp.__version__)"
}

forwarding() {
  # Issue 11, forwarding in real mode on the 32-core machine: the workers run the seeded
  # "medium" model (about 25M parameters) on the CPU, one torch thread each, so that a prefill
  # takes hundreds of milliseconds (docs/pd-serve-forwarding.md says why not the tiny model,
  # and why not the GPUs). A compute profile taken here first sizes the decodes by Eq. 1.
  # Each worker runs on a core of its own (--pin-cpus). FWD_RUNS runs (seeds 0, 1, ...);
  # FWD_ARGS adds to or overrides the experiment's flags.
  log "forwarding, real mode, medium model (profile here, decodes by Eq. 1)"
  py_deps || return 1
  local f="$OUT/forwarding-real" plot=() seed
  $PY -m kvxfer.serve.profile --model medium --prompt-lens 16 64 128 256 512 1024 --batches 1 2 4 8 \
    --context 512 --out "$OUT/medium-profile.json" 2> "$f.txt"
  for seed in $(seq 0 $(( ${FWD_RUNS:-1} - 1 ))); do
    plot=(); $PY -c "import matplotlib" 2>/dev/null && plot=(--plot "$f-$seed.png")
    log "forwarding run, seed $seed"
    $PY -m kvxfer.cli experiment forwarding --json --mode real --model medium --profile "$OUT/medium-profile.json" \
      --prefills 4 --decodes 0 --b-d 4 --scale 0.0625 --output-tokens 48 --duration 8 --pin-cpus --seed "$seed" \
      --budget-s "${FWD_BUDGET_S:-400}" "${plot[@]}" ${FWD_ARGS:-} > "$f-$seed.jsonl" 2>> "$f.txt"
    echo "rc=$? (seed $seed)" >> "$f.txt"
    cat "$f-$seed.jsonl"
  done
  tail -60 "$f.txt"
}

case "$what" in
  all) machine; build && tests; sweep; bench ;;
  sweep) build && sweep ;;
  build) machine; build ;;
  test) build && tests ;;
  bench) build && bench ;;
  tcp) build && bench_tcp ;;
  equivalence) build && equivalence ;;
  forwarding) machine; build && forwarding ;;
  quick) machine; build && tests ;;
  *) echo "usage: $0 [all|build|test|sweep|bench|tcp|equivalence|forwarding|quick]"; exit 2 ;;
esac
