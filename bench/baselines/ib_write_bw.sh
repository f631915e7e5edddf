#!/usr/bin/env bash
# Baseline: perftest's ib_write_bw (or ib_read_bw with --read) between two
# processes on one RDMA device, e.g. rxe0 inside tools/softroce/softroce-vm:
#
#   tools/softroce/softroce-vm bash bench/baselines/ib_write_bw.sh 1048576
#   bench/baselines/ib_write_bw.sh --read 65536 1000
#
# Prints one line:  ib_write_bw size=<bytes> iters=<n> bw_MBps=<average>
#
# Units: bw_MBps is perftest's "BW average[MB/sec]" column, copied as is.
# perftest computes it as bytes / 2^20 per second (its --help says "MiB=2^20
# byte"; the source divides by 0x100000), so despite the label it is MiB/s,
# not 10^6 bytes/s.  Multiply by 1.048576 for 10^6 bytes/s.  --report_gbits
# is never used.
#
# Environment: KVXFER_IB_DEVICE (default rxe0), KVXFER_IB_GID (GID index,
# default 1 = ::ffff:198.18.0.1 on the harness's rxe0), KVXFER_IB_PORT (TCP
# port for perftest's out-of-band exchange, default 18515),
# KVXFER_IB_TIMEOUT (seconds each perftest process may run, default 300).
set -uo pipefail

tool=ib_write_bw
if [ "${1:-}" = --read ]; then tool=ib_read_bw; shift; fi
case "${1:-}" in
  ''|-h|--help)
    sed -n '2,20s/^# \{0,1\}//p' "$0" >&2
    echo "usage: $0 [--read] SIZE [ITERS]" >&2
    exit 2 ;;
esac
size=$1
case "$size" in *[!0-9]*|'') echo "$0: SIZE must be a byte count" >&2; exit 2 ;; esac
# Default iterations: about 128 MiB in all, between 100 and 5000 messages.
if [ -n "${2:-}" ]; then
  iters=$2
else
  iters=$(( (128 * 1048576) / size ))
  [ "$iters" -lt 100 ] && iters=100
  [ "$iters" -gt 5000 ] && iters=5000
fi
case "$iters" in *[!0-9]*|'') echo "$0: ITERS must be a number" >&2; exit 2 ;; esac

dev=${KVXFER_IB_DEVICE:-rxe0}
gid=${KVXFER_IB_GID:-1}
port=${KVXFER_IB_PORT:-18515}
tmo=${KVXFER_IB_TIMEOUT:-300}

command -v "$tool" >/dev/null || { echo "$0: $tool not found (Debian package perftest)" >&2; exit 127; }

work=$(mktemp -d "${TMPDIR:-/tmp}/ib_bw.XXXXXX") || exit 1
srv_pid=
cleanup() {
  [ -n "$srv_pid" ] && kill "$srv_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

args=(-d "$dev" -x "$gid" -s "$size" -n "$iters" -p "$port" -F)

timeout "$tmo" "$tool" "${args[@]}" >"$work/server.log" 2>&1 &
srv_pid=$!

listening() {
  command -v ss >/dev/null || return 0   # no ss: rely on the client retries
  ss -Hltn "sport = :$port" 2>/dev/null | grep -q .
}

# Wait until the server listens (bounded), then run the client; retry it
# while the server is alive and the client only failed to connect.
deadline=$(( $(date +%s) + 120 ))
until listening; do
  if ! kill -0 "$srv_pid" 2>/dev/null; then
    echo "$0: $tool server exited before listening:" >&2
    cat "$work/server.log" >&2
    exit 1
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "$0: $tool server not listening on port $port after 120 s" >&2
    cat "$work/server.log" >&2
    exit 1
  fi
  sleep 0.2
done

ok=
for attempt in 1 2 3 4 5 6 7 8 9 10; do
  if timeout "$tmo" "$tool" "${args[@]}" 127.0.0.1 >"$work/client.log" 2>&1; then
    ok=1
    break
  fi
  if grep -qi "couldn't connect" "$work/client.log" && kill -0 "$srv_pid" 2>/dev/null; then
    sleep "0.$attempt"
    continue
  fi
  break
done
if [ -z "$ok" ]; then
  echo "$0: $tool client failed:" >&2
  cat "$work/client.log" >&2
  echo "--- server ---" >&2
  cat "$work/server.log" >&2
  exit 1
fi
wait "$srv_pid" 2>/dev/null
srv_pid=

# Find the "BW average[...]" column in the header, then read that column on
# the data row that starts with the message size.
bw=$(awk -v size="$size" '
  /#bytes/ && /BW average/ {
    n = split($0, h, /  +/); col = 0; k = 0
    for (i = 1; i <= n; i++) {
      if (h[i] == "") continue
      k++
      if (h[i] ~ /^BW average/) { col = k; unit = h[i] }
    }
    next
  }
  col && $1 == size { print $col, unit; exit }
' "$work/client.log")
read -r value unit <<<"$bw"
case "$unit" in
  *'[MB/sec]'*|*'[MiB/sec]'*) ;;
  *)
    echo "$0: could not parse $tool output (unit '${unit:-?}'):" >&2
    cat "$work/client.log" >&2
    exit 1 ;;
esac
case "$value" in
  ''|*[!0-9.]*) echo "$0: bad bandwidth value '$value':" >&2; cat "$work/client.log" >&2; exit 1 ;;
esac
echo "$tool size=$size iters=$iters bw_MBps=$value"
