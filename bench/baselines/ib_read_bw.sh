#!/usr/bin/env bash
# ib_read_bw baseline: same as ib_write_bw.sh with --read (see there).
exec bash "$(dirname -- "${BASH_SOURCE[0]}")/ib_write_bw.sh" --read "$@"
