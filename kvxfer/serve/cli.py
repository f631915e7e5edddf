"""``kvxfer serve``: a local P/D-Serve deployment (gateway + N prefill + M decode processes)
with one command. Ctrl-C (SIGINT) or SIGTERM stops every process and exits 0.

    kvxfer serve                                   # 1 prefill, 1 decode, tiny model, shm, :8000
    kvxfer serve --model smollm2 --prefill 2 --decode 1
    kvxfer serve --aggregated 1 --prefill 0 --decode 0   # baseline (a)
    kvxfer serve --registry etcd://10.0.0.5:2379 --groups 2   # groups set up through etcd

Then any OpenAI client: ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from .config import BACKENDS, COMPUTE_MODES, POLICIES
from .kv_transfer import MODES


class _Stop(Exception):
    pass


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvxfer serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1)")
    p.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    p.add_argument("--aggregated", type=int, default=0, help="aggregated workers (baseline a)")
    p.add_argument("--backend", choices=BACKENDS, default="shm")
    p.add_argument("--model", choices=["tiny", "medium", "smollm2"], default="tiny")
    p.add_argument("--mode", choices=COMPUTE_MODES, default="real")
    p.add_argument("--policy", choices=POLICIES, default="reject-retry")
    p.add_argument("--transfer-mode", choices=MODES, default="block-free")
    p.add_argument("--per-layer", action="store_true", help="one kvxfer READ per layer")
    p.add_argument("--b-p", type=int, default=4, help="prefill slots")
    p.add_argument("--b-d", type=int, default=8, help="decode batch size")
    p.add_argument("--pending", type=int, default=2, help="decode pending-KV queue")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--ttft-slo", type=float, default=30.0, help="gateway's default TTFT deadline (s)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="gateway port (0 = any free port)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    reg_help = ("control plane: sqlite (a file in the log folder; default), sqlite:PATH, etcd (a private "
                "etcd server), etcd://HOST:PORT, or none (peers wired directly over HTTP)")  # fmt: skip
    p.add_argument("--registry", default="sqlite", help=reg_help)
    p.add_argument("--groups", type=int, default=1, help="P/D groups of --prefill + --decode workers each")
    p.add_argument(
        "--lease-ttl", type=float, default=2.0, help="health lease (s): removal bound of a dead worker"
    )
    p.add_argument("--log-dir", help="keep the workers' logs here (default: a temporary folder, removed)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    from .deployment import start_local
    from .errors import ServeError

    stop = threading.Event()

    def on_signal(signum, _frame):
        if not stop.is_set():
            stop.set()
            if starting:
                raise _Stop()

    starting = True
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    dep = None
    try:
        t0 = time.monotonic()
        print("kvxfer serve: starting workers ...", file=sys.stderr, flush=True)
        dep = start_local(
            args.prefill,
            args.decode,
            backend=args.backend,
            model=args.model,
            mode=args.mode,
            policy=args.policy,
            b_p=args.b_p,
            b_d=args.b_d,
            n_aggregated=args.aggregated,
            gateway_port=args.port,
            host=args.host,
            transfer_mode=args.transfer_mode,
            per_layer=args.per_layer,
            pending=args.pending,
            max_prompt_tokens=args.max_prompt_tokens,
            max_new_tokens=args.max_new_tokens,
            ttft_slo_s=args.ttft_slo,
            torch_threads=args.threads,
            log_dir=args.log_dir,
            registry="" if args.registry == "none" or args.aggregated else args.registry,
            groups=args.groups,
            lease_ttl_s=args.lease_ttl,
        )
        starting = False
        if stop.is_set():
            raise _Stop()
        print(f"kvxfer serve: ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        for name, p in dep.procs.items():
            print(f"  {name:<14} {p.url:<28} pid {p.popen.pid}  log {p.log}", file=sys.stderr)
        print(f"gateway: {dep.gateway_url}/v1  (OpenAI-compatible; Ctrl-C stops everything)", flush=True)
        while not stop.wait(0.5):
            dead = [n for n, p in dep.procs.items() if not p.alive]
            if dead:
                print(f"kvxfer serve: worker(s) exited: {', '.join(dead)}; stopping", file=sys.stderr)
                return 1
        return 0
    except _Stop:
        return 0
    except ServeError as e:
        print(f"kvxfer serve: {e}", file=sys.stderr)
        return 1
    finally:
        starting = False
        if dep is not None:
            print("kvxfer serve: stopping ...", file=sys.stderr, flush=True)
            dep.stop()
            print("kvxfer serve: stopped", file=sys.stderr, flush=True)
        for s, h in old.items():
            signal.signal(s, h)
