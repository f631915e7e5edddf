"""``kvxfer experiment recovery``: kill a prefill or a decode under load; the control plane
removes it and exactly one replacement joins [paper, P/D-Serve section 3.4, Fig. 13c].

A registry deployment (``--registry``: sqlite by default, or etcd) of two P/D groups, each of
``--prefills`` + ``--decodes`` real worker processes (profiled SmolLM2 by default: they sleep
for the profile's TTFT/TPOT and move real KV bytes), serving two scenarios, ``a`` (group g0)
and ``b`` (group g1), behind one gateway. Closed-loop users send requests of both scenarios;
after a warm-up one worker of group g0 is SIGKILLed; the load goes on until the replacement is
healthy and ``--after`` seconds more.

JSON line per role::

  {"experiment":"recovery","role":"prefill"|"decode","replacements":..,"failed_other":..,
   "failed_on_instance":..,"recover_s":..,"removal_s":..,"hung":..,"requests":..,...}

``replacements``: worker processes spawned after the kill; ``failed_on_instance``: requests of
the victim's group that ended with an error (those in flight on the killed worker);
``failed_other``: errors in the other group; ``hung``: requests that did not end by the load
generator's timeout (zombie streams; must be 0); ``removal_s``: kill -> logically removed;
``recover_s``: kill -> the replacement confirmed healthy and routed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any


def log(msg: str) -> None:
    print(f"[recovery] {msg}", file=sys.stderr, flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvxfer experiment recovery", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="decode kill only, short phases")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE")
    p.add_argument("--roles", nargs="+", choices=("prefill", "decode"), help="default both (--quick: decode)")
    p.add_argument("--registry", default="sqlite", help="sqlite | etcd | sqlite:PATH | etcd://HOST:PORT")
    p.add_argument("--prefills", type=int, default=2)
    p.add_argument("--decodes", type=int, default=2)
    p.add_argument("--users", type=int, default=6, help="closed-loop users per scenario")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--output", type=int, default=8)
    p.add_argument("--warmup", type=float, help="seconds of load before the kill (8; --quick 4)")
    p.add_argument("--after", type=float, help="seconds of load after the recovery (5; --quick 2)")
    p.add_argument("--lease-ttl", type=float, default=2.0)
    p.add_argument("--mode", choices=("profiled", "real"), default="profiled")
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    a = p.parse_args(argv)
    a.roles = a.roles or (["decode"] if a.quick else ["prefill", "decode"])
    a.warmup = a.warmup or (4.0 if a.quick else 8.0)
    a.after = a.after or (2.0 if a.quick else 5.0)
    return a


async def _run_role(dep: Any, args: argparse.Namespace, role: str) -> dict[str, Any]:
    from kvxfer.serve import loadgen
    from kvxfer.serve.workload import Fixed, Scenario, Workload

    scen = [Scenario(s, 16, Fixed(args.prompt - 16), Fixed(args.output)) for s in ("a", "b")]
    wl = Workload(scen, seed=1, unit="char")
    ctl = dep.controllers["g0"]
    others = [c for g, c in dep.controllers.items() if g != "g0"]
    victim = sorted(n for n, r in ctl.members.items() if r == role)[0]
    stop = asyncio.Event()
    t0 = time.monotonic()
    client = loadgen._client(dep.gateway_url, 60.0)
    res: list[Any] = []

    async def user(u: int) -> None:  # closed loop until told to stop; every request ends
        await asyncio.sleep(u / (2 * args.users))
        for req in wl.user_stream(u):
            if stop.is_set():
                return
            res.append(await loadgen.send(client, req, ttft_slo_s=60.0, t0=t0, user=u))

    load = asyncio.gather(*(user(u) for u in range(2 * args.users)))
    await asyncio.sleep(args.warmup)
    before = set(dep.procs)
    n_removals = len(ctl.removals)
    t_kill = time.time()
    log(f"SIGKILL {role} {victim} of group g0")
    await asyncio.to_thread(dep.kill, victim)
    while not (len(ctl.removals) > n_removals and ctl.removals[-1].replaced):
        if time.time() - t_kill > 120:
            log("no replacement within 120 s")
            break
        await asyncio.sleep(0.1)
    rm = ctl.removals[-1] if len(ctl.removals) > n_removals else None
    await asyncio.sleep(args.after)
    stop.set()
    try:
        await asyncio.wait_for(load, 90.0)  # the requests in flight end (or time out in the client)
    finally:
        await client.close()
    return {
        "res": res,
        "rm": rm,
        "victim": victim,
        "t_kill": t_kill,
        "t0": t0,
        "spawned": set(dep.procs) - before,
        "other_removals": sum(len(c.removals) for c in others),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from kvxfer.serve.deployment import start_local
    from kvxfer.serve.machine import machine

    rows = []
    for role in args.roles:
        t_start = time.monotonic()
        with start_local(
            args.prefills,
            args.decodes,
            mode=args.mode,
            model=args.model,
            b_p=2,
            b_d=8,
            pending=2,
            registry=args.registry,
            groups=2,
            scenario=["a", "b"],
            lease_ttl_s=args.lease_ttl,
            tokenizer="bytes:49152" if args.model == "smollm2" else "",
            max_prompt_tokens=args.prompt + 16,
            max_new_tokens=args.output + 8,
            ttft_slo_s=60.0,
        ) as dep:
            up = time.monotonic() - t_start
            log(f"{len(dep.procs)} processes up in {up:.1f} s; registry {dep.registry.url}")
            out = asyncio.run(_run_role_wrapped(dep, args, role))
        res, rm = out["res"], out["rm"]
        by = {s: [r for r in res if r.scenario == s] for s in ("a", "b")}
        hung = [r for r in res if r.error == "client_timeout"]
        row = {
            "experiment": "recovery",
            "role": role,
            "replacements": len(out["spawned"]),
            "failed_other": sum(1 for r in by["b"] if r.error),
            "failed_on_instance": sum(1 for r in by["a"] if r.error),
            "recover_s": (rm.replaced - out["t_kill"]) if rm and rm.replaced else None,
            "removal_s": (rm.detected - out["t_kill"]) if rm else None,
            "hung": len(hung),
            "requests": len(res),
            "requests_victim_group": len(by["a"]),
            "requests_other_group": len(by["b"]),
            "errors": sorted({r.error for r in res if r.error}),
            "victim": out["victim"],
            "replacement": rm.replacement if rm else None,
            "other_group_removals": out["other_removals"],
            "registry": args.registry,
            "lease_ttl_s": args.lease_ttl,
            "mode": args.mode,
            "model": args.model,
            "machine": machine(),
        }
        log(
            f"{role}: replacements {row['replacements']}, failed on instance {row['failed_on_instance']}, "
            f"failed other {row['failed_other']}, hung {row['hung']}, removal {row['removal_s']}, "
            f"recover {row['recover_s']}"
        )
        rows.append(row)
    return rows


async def _run_role_wrapped(dep: Any, args: argparse.Namespace, role: str) -> dict[str, Any]:
    return await _run_role(dep, args, role)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    rows = run(args)
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            print(
                f"{r['role']:>8}: replacements {r['replacements']}, "
                f"failed_on_instance {r['failed_on_instance']}, "
                f"failed_other {r['failed_other']}, hung {r['hung']}, removal {r['removal_s']:.2f} s, "
                f"recover {r['recover_s']:.2f} s"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
