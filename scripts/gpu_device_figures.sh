#!/bin/bash
# The P/D-Device figures of docs/pd-device.md (table 1, the ratio table) on a 2-GPU host, in one
# go: six `kvxfer experiment device` processes side by side, three per GPU, each with its own
# cloud helper (tiny model on that GPU), link proxy and device process (CPU, throttled).
#   bash scripts/gpu_device_figures.sh   # JSON lines, logs, --save files: $OUT/pd-device-figures.tgz
# (one archive: the device tool brings back only a few files from $OUT)
# The longest process (phone-npu-1b, 512-token answers, 8192-token prompt) takes about 4 min.
# Where the host's Python cannot import the tree's native module (built for another Python
# version), a sitecustomize.py installs an empty `kvxfer` package over the tree: kvxfer.device
# and kvxfer.experiments.device need nothing from the native core.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
RES=$(mktemp -d)
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ! $PY -c "import kvxfer" 2>/dev/null; then
  shim=$(mktemp -d)
  cat >"$shim/sitecustomize.py" <<EOF
import sys, types
try:
    import kvxfer  # noqa: F401
except Exception:
    for k in [k for k in sys.modules if k == "kvxfer" or k.startswith("kvxfer.")]:
        del sys.modules[k]
    m = types.ModuleType("kvxfer")
    m.__path__ = ["$PWD/kvxfer"]
    sys.modules["kvxfer"] = m
EOF
  export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "native module does not import here: kvxfer is an empty package over the tree" >"$RES/shim.txt"
fi
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv; $PY --version
  $PY -c "import torch; print('torch', torch.__version__)"; } >"$RES/machine.txt" 2>&1

common=(--cloud-device cuda --repeats 3 --regret-rows 0 --json)
run() { # name gpu args...
  local name=$1 gpu=$2
  shift 2
  CUDA_VISIBLE_DEVICES=$gpu $PY -m kvxfer.experiments.device "${common[@]}" "$@" --save "$RES/$name.json" \
    >"$RES/$name.jsonl" 2>"$RES/$name.log" &
}
run npu1b_g256_a 0 --profile phone-npu-1b --answer 256 --buckets 1024,8192
run npu1b_g512_a 0 --profile phone-npu-1b --answer 512 --buckets 2048
run npu135m_g256 0 --profile phone-npu-135m --answer 256 --buckets 2048,4096,8192 --ttft-slo 0.3
run npu1b_g256_b 1 --profile phone-npu-1b --answer 256 --buckets 2048,4096
run npu1b_g512_b 1 --profile phone-npu-1b --answer 512 --buckets 4096
run npu1b_g512_c 1 --profile phone-npu-1b --answer 512 --buckets 8192
wait
tail -n 3 "$RES"/*.log
tar -czf "$OUT/pd-device-figures.tgz" -C "$RES" .
