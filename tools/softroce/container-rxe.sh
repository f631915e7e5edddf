#!/usr/bin/env bash
# container-rxe.sh: give a container a soft-RoCE (rdma_rxe) device, on a
# host whose kernel has the rdma_rxe module (ordinary Linux hosts, most CI
# runners).  Not for hosts without rdma_rxe: use tools/softroce/softroce-vm.
#
#   sudo tools/softroce/container-rxe.sh [OPTIONS] [IMAGE [COMMAND...]]
#
# 1. modprobe rdma_rxe
# 2. rdma link add rxe0 type rxe netdev NETDEV   (skipped if an rxe device
#    already sits on NETDEV)
# 3. prints, then runs, a `docker run` (or podman) command line that passes
#    the RDMA character devices, lifts the memlock limit, adds IPC_LOCK and
#    uses the host's network namespace.
#
# Options:
#   --dry-run          print what would be done and the container command line;
#                      change nothing, run nothing
#   --netdev DEV       netdev for rxe (default: $RXE_NETDEV, else the first
#                      non-loopback interface that is up)
#   --name NAME        rxe device name (default rxe0)
#   --runtime RT       docker or podman (default: docker if found, else podman)
#   --workdir DIR      directory mounted read-write at the same path and used as
#                      the working directory (default: the current directory)
#   -h, --help         this text
# IMAGE defaults to debian:bookworm, COMMAND to "bash".  The image needs the
# rdma-core user space (libibverbs1 + ibverbs-providers, which holds the rxe
# provider), e.g. apt-get install ibverbs-providers ibverbs-utils.
#
# Why --net=host: an rxe device's GID table is built from the IP addresses of
# its netdev, and RoCE v2 traffic and rdma_cm address resolution go through
# the IP stack of the network namespace the process is in.  In a container's
# own namespace the host netdev and its addresses are not there, so GIDs and
# rdma_cm addresses would not match anything reachable.  Sharing the host's
# namespace makes the netdev, its addresses and hence the GIDs usable.
set -euo pipefail

dry=0
netdev=${RXE_NETDEV:-}
name=rxe0
runtime=
workdir=$(pwd -P)

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//p}' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --netdev) netdev=${2:?--netdev needs a value}; shift 2 ;;
    --netdev=*) netdev=${1#*=}; shift ;;
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --name=*) name=${1#*=}; shift ;;
    --runtime) runtime=${2:?--runtime needs a value}; shift 2 ;;
    --runtime=*) runtime=${1#*=}; shift ;;
    --workdir) workdir=${2:?--workdir needs a value}; shift 2 ;;
    --workdir=*) workdir=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "container-rxe.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
image=${1:-debian:bookworm}
[ $# -gt 0 ] && shift
cmd=("$@")
[ ${#cmd[@]} -gt 0 ] || cmd=(bash)

say() { printf 'container-rxe.sh: %s\n' "$*" >&2; }
run() {  # run a command, or only show it with --dry-run
  if [ "$dry" = 1 ]; then
    printf '# would run:'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

if [ -z "$netdev" ]; then
  netdev=$(ip -o link show up 2>/dev/null |
           awk -F': ' '{sub(/@.*/, "", $2); if ($2 != "lo") {print $2; exit}}')
  [ -n "$netdev" ] || { say "no non-loopback interface is up; use --netdev"; exit 1; }
fi
if ! ip link show dev "$netdev" >/dev/null 2>&1; then
  say "no such interface: $netdev"
  [ "$dry" = 1 ] || exit 1
fi

if [ "$dry" = 0 ] && [ "$(id -u)" -ne 0 ]; then
  say "must run as root (modprobe, rdma link add); try --dry-run"
  exit 1
fi

if ! run modprobe rdma_rxe; then
  say "this kernel has no rdma_rxe module; use tools/softroce/softroce-vm instead"
  exit 1
fi
# Skip "rdma link add" when an rxe device already sits on the netdev.
existing=$(rdma link show 2>/dev/null |
           awk -v nd="$netdev" '$0 ~ ("netdev " nd "( |$)") {split($2, a, "/"); print a[1]; exit}' || true)
if [ -n "$existing" ]; then
  say "$existing already on $netdev; not adding $name"
  name=$existing
else
  run rdma link add "$name" type rxe netdev "$netdev"
fi

# The character devices a verbs / rdma_cm program opens.
devices=()
if [ -d /dev/infiniband ]; then
  for d in /dev/infiniband/uverbs* /dev/infiniband/rdma_cm; do
    [ -c "$d" ] && devices+=("$d")
  done
fi
if [ ${#devices[@]} -eq 0 ]; then
  [ "$dry" = 1 ] || { say "no /dev/infiniband devices after rdma link add"; exit 1; }
  devices=(/dev/infiniband/uverbs0 /dev/infiniband/rdma_cm)
  say "no /dev/infiniband yet; assuming ${devices[*]}"
fi

if [ -z "$runtime" ]; then
  if command -v docker >/dev/null 2>&1; then runtime=docker
  elif command -v podman >/dev/null 2>&1; then runtime=podman
  else runtime=docker; [ "$dry" = 1 ] || { say "neither docker nor podman found"; exit 1; }
  fi
fi

ctr=("$runtime" run --rm -i)
[ -t 0 ] && [ -t 1 ] && ctr+=(-t)
ctr+=(--net=host)
for d in "${devices[@]}"; do ctr+=(--device "$d"); done
ctr+=(--ulimit memlock=-1:-1 --cap-add IPC_LOCK)
ctr+=(-e "KVXFER_IBVERBS_DEVICE=$name" -e "KVXFER_IBVERBS_GID_INDEX=${KVXFER_IBVERBS_GID_INDEX:-1}")
ctr+=(-v "$workdir:$workdir" -w "$workdir")
ctr+=("$image" "${cmd[@]}")

say "rxe device $name on $netdev; devices: ${devices[*]}"
printf '%q ' "${ctr[@]}"; printf '\n'
[ "$dry" = 1 ] && exit 0
exec "${ctr[@]}"
