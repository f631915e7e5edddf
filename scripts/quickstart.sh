#!/usr/bin/env bash
# README command 1: set everything up on a fresh machine, then run the main job: two
# processes on this host move a Llama-3-8B-shaped paged KV transfer (and 1 GiB
# contiguous) through the shared-memory backend, checked byte for byte, and print
# the result table with memcpy baselines measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvxfer-bench "$@"
