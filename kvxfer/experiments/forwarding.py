"""``kvxfer experiment forwarding``: TTFT-SLO success rate as closed-loop users grow, gateway
reject-retry (on-demand forwarding) vs the local-queue baseline [paper, P/D-Serve Fig. 14a].

Setup (one run, one machine):

* ONE local deployment (:func:`kvxfer.serve.deployment.start_local`): ``--prefills`` prefill
  workers with ``--b-p`` slots each and ``--decodes`` decode workers, compute ``--mode``
  (``profiled``: sleeps for the SmolLM2 profile's TTFT/TPOT and still moves real KV bytes;
  ``real``: the model runs). Both policies use these SAME worker processes.
* Two gateway processes in front of them: policy ``reject-retry`` and policy ``local-queue``
  (push to the prefill with the fewest open streams; the prefill queues in FIFO order). The
  policy travels per request (header ``X-Kvxfer-Policy``), so the workers are shared.
* One scenario mixing long and short prompts, after the paper's example of one 8k prompt among
  2k ones, scaled to the model (``--scale``; default 1/16: 512 and 128 tokens), one long per
  three short; ``--output-tokens`` generated per request.
* Decode workers by Eq. 1 (``--decodes`` 0, the default): at least the prefills' capacity, so
  that the test measures prefill admission, not a full decode side [inferred].
* The TTFT SLO of a request is its prompt length's TTFT measured alone (calibrated at the start
  of the run, median of 5) plus ``--slack`` times the long prompt's plus the calibration's
  timing noise: the paper sets thresholds per prompt length [paper 3.3] (the rule is ours
  [inferred]).
* Every point (the A search's too) measures at least ``--min-requests`` requests (100).
* As in the paper: A = the most users (1, 2, ...) at which the local-queue baseline meets the SLO
  for every request; then A, 2A .. 5A users for both policies (``load`` = users / A).

JSON lines (one per policy and load)::

  {"experiment":"forwarding","policy":"reject-retry"|"local-queue","load":x,"users":..,
   "success_rate":..,"ttft_p50_s":..,"ttft_p99_s":..,"retries_p99":..,
   "requests":..,"errors":{..},"A":..,"mode":..,"machine":..}

then one ``"summary"`` line with the success-rate gap at each load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from typing import Any

LOADS = (1, 2, 3, 4, 5)
# Defaults. Full: SmolLM2's profile, 6 one-slot prefills, 512/128-token prompts, 16 tokens out.
# Quick (under a minute): the tiny model's profile (milliseconds), 4 prefills, 2048/512-token
# prompts and long answers, so that decoding still dominates a user's cycle; loads 1 and 4.
# Full: SmolLM2's profile at 1/4 of its times, 4 one-slot prefills, decodes by Eq. 1 with 4 slots
# each, 512/128-token prompts, 64 tokens out (a decode-dominated request), >= 100 requests a point.
FULL = {"model": "smollm2", "prefills": 4, "scale": 1 / 16, "output_tokens": 64, "duration": 20.0,
        "loads": "1,2,3,4,5", "min_requests": 100, "decodes": 0, "b_d": 4, "time_scale": 0.25,
        "cal_samples": 5}  # fmt: skip
QUICK = {
    "model": "tiny",
    "prefills": 4,
    "scale": 1 / 4,
    "output_tokens": 128,
    "duration": 3.0,
    "loads": "1,4",
    "min_requests": 0,
    "decodes": 2,
    "b_d": 16,
    "time_scale": 1.0,
    "cal_samples": 3,
}


def log(msg: str) -> None:
    print(f"[forwarding] {msg}", file=sys.stderr, flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvxfer experiment forwarding", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (under a minute here)")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout (else a table)")
    p.add_argument("--plot", metavar="FILE", help="write the success-rate curves to FILE (png/svg/pdf)")
    p.add_argument("--mode", choices=("profiled", "real"), default="profiled")
    p.add_argument(
        "--model",
        choices=("smollm2", "tiny", "medium"),
        help="default: smollm2 (--quick: tiny); tiny and medium have seeded random weights",
    )
    p.add_argument("--profile", default="", help="profiled mode: profile JSON (default: the model's)")
    p.add_argument("--prefills", type=int, help="prefill workers (default 4; --quick 4)")
    p.add_argument(
        "--decodes", type=int, help="decode workers (default: Eq. 1 from the profile; --quick 2); 0 = Eq. 1"
    )
    p.add_argument("--b-p", type=int, default=1, help="prefill slots (the paper's example: 1)")
    p.add_argument("--b-d", type=int, help="decode batch per decode worker (4; --quick 16)")
    p.add_argument("--scale", type=float, help="prompt lengths 8192/2048 times this (1/16; --quick 1/4)")
    p.add_argument("--output-tokens", type=int, help="tokens per answer (64; --quick 128)")
    p.add_argument("--slack", type=float, default=0.5, help="SLO = alone TTFT + slack x long TTFT")
    p.add_argument(
        "--slo-floor",
        type=float,
        help="seconds added to every SLO for timing noise (default: the calibration's spread)",
    )
    p.add_argument("--duration", type=float, help="seconds per (policy, load) point at least (20; --quick 3)")
    p.add_argument(
        "--min-requests",
        type=int,
        help="measured requests per point at least, A search included (100; --quick 0)",
    )
    p.add_argument("--max-point-s", type=float, default=900.0, help="a point ends after this in any case")
    p.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="stop starting points once this many seconds of the run are spent (0: no limit); "
        "the rows measured so far are already on stdout",
    )
    p.add_argument("--cal-samples", type=int, help="calibration requests per prompt length (5; --quick 3)")
    p.add_argument(
        "--time-scale",
        type=float,
        help="profiled mode: every time of the profile times this (0.25; --quick 1)",
    )
    p.add_argument("--max-a", type=int, default=64, help="largest user count tried for A")
    p.add_argument("--a", type=int, default=0, help="use this A instead of searching for it")
    p.add_argument("--loads", help="loads to run (1,2,3,4,5; --quick 1,4)")
    p.add_argument("--backend", choices=("shm", "tcp"), default="shm")
    p.add_argument(
        "--gateways",
        type=int,
        default=1,
        help="gateways per policy, each with its own load generator process (users split evenly)",
    )
    p.add_argument(
        "--pin-cpus",
        action="store_true",
        help="each worker on a physical core of its own; gateways and load generators on the rest",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def default_profile(model: str, mode: str) -> str:
    """``""`` (the serving layer's own profile of ``model``) when it exists; else, for SmolLM2
    in profiled mode, the contended-machine profile behind docs/pd-serve-forwarding.md."""
    from pathlib import Path

    import kvxfer.serve

    serve = Path(kvxfer.serve.__file__).parent
    if mode != "profiled" or model != "smollm2" or (serve / "profiles" / "smollm2.json").exists():
        return ""
    log("no kvxfer/serve/profiles/smollm2.json: using data/profiles/smollm2-2core-contended.json")
    return str(serve / "data" / "profiles" / "smollm2-2core-contended.json")


def tokenizer_spec(model: str, mode: str) -> tuple[str, str, int]:
    """(tokenizer spec for the gateways, workload token unit, vocab size).

    Profiled workers need no weights: the gateways then use the byte tokenizer over the model's
    vocabulary, which gives exact prompt lengths; real SmolLM2 needs its own tokenizer."""
    if model in ("tiny", "medium"):
        from kvxfer.serve.runtime import TINY_VOCAB

        return f"bytes:{TINY_VOCAB}", "char", TINY_VOCAB
    if mode == "profiled":
        return "bytes:49152", "char", 49152
    return "smollm2", "word", 49152


async def _calibrate(
    url: str, workload: Any, lengths: list[int], output_tokens: int, samples: int = 5
) -> tuple[dict, float, float]:
    """TTFT of each prompt length alone (one user, median of ``samples`` after a warm-up),
    through the gateway; the decode time of one answer alone (the first request, full length);
    and the timing noise: the largest spread (slowest - median) of one length's samples."""
    import numpy as np

    from kvxfer.serve import loadgen

    scen = workload.scenarios[0]
    client = loadgen._client(url, 600.0)
    out: dict[int, float] = {}
    decode_s = 0.0
    noise = 0.0
    try:
        for n in lengths:
            ts = []
            for k in range(samples + 1):
                rng = np.random.default_rng([7, n, k])
                want = output_tokens if (k == 0 and n == lengths[-1]) else 1  # else TTFT only
                req = workload.make(scen.name, n - scen.setting_tokens, want, rng, f"cal-{n}-{k}")
                r = await loadgen.send(client, req, ttft_slo_s=600.0, t0=time.monotonic())
                if r.error:
                    raise RuntimeError(f"calibration request failed: {r.error}")
                if k:  # the first one warms the scenario's prefix cache
                    ts.append(r.ttft_s)
                elif want > 1:
                    decode_s = r.e2e_s - r.ttft_s
            out[n] = statistics.median(ts)
            noise = max(noise, max(ts) - out[n])
    finally:
        await client.close()
    return out, decode_s, noise


async def _point(
    url: str,
    workload: Any,
    users: int,
    slo: Any,
    ramp: float,
    duration: float,
    min_requests: int = 0,
    max_s: float = 900.0,
    user_ids: list[int] | None = None,
    start_at: float = 0.0,
) -> list[Any]:
    """``users`` closed-loop users (or the share ``user_ids`` of them): started evenly over
    ``ramp`` s, then run for ``duration`` s and until at least ``min_requests`` requests that
    started after the ramp have ended (at most ``max_s``). ``start_at``: wall-clock time to
    begin (several load generator processes start together). Returns the loadgen results."""
    from kvxfer.serve import loadgen

    if start_at:
        await asyncio.sleep(max(0.0, start_at - time.time()))
    t0 = time.monotonic()

    def enough(res: list) -> bool:
        if time.monotonic() - t0 < ramp + duration:
            return False
        return sum(1 for r in res if r.start_s >= ramp) >= min_requests

    return await loadgen.closed_loop(
        url, workload, users, ttft_slo_s=slo, duration_s=ramp + max(duration, max_s), ramp_s=ramp,
        until=enough, user_ids=user_ids,
    )  # fmt: skip


def _point_part(url: str, workload: Any, users: int, slo: Any, ramp: float, duration: float,
                min_requests: int, max_s: float, user_ids: list[int],
                start_at: float) -> list[dict[str, Any]]:  # fmt: skip
    """One load generator process's share of a point (run in a pool process)."""
    from dataclasses import asdict

    res = asyncio.run(
        _point(url, workload, users, slo, ramp, duration, min_requests, max_s, user_ids, start_at)
    )
    return [asdict(r) for r in res]


class _Loadgens:
    """Where a point's users run: in this process (one gateway per policy), or, with
    ``--gateways K`` > 1, in K load generator processes, user u in process u % K talking to
    gateway u % K [inferred: one Python process parsing every streamed token through the
    ``openai`` client became the bottleneck of the real-mode run on 32 cores]."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.started = 0.0  # wall clock at which the last point's users began
        self.pool: Any = None
        if k > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(k, mp_context=multiprocessing.get_context("spawn"))

    def point(
        self, urls: list[str], workload: Any, users: int, slo: Any, ramp: float, duration: float,
        min_requests: int, max_s: float,
    ) -> dict:  # fmt: skip
        from kvxfer.serve import loadgen

        if self.pool is None:
            self.started = time.time()
            res = asyncio.run(_point(urls[0], workload, users, slo, ramp, duration, min_requests, max_s))
        else:
            start_at = self.started = time.time() + 2.0
            futs = [
                self.pool.submit(_point_part, urls[i], workload, users, slo, ramp, duration,
                                 -(-min_requests // self.k), max_s, list(range(i, users, self.k)), start_at)
                for i in range(min(self.k, users))
            ]  # fmt: skip
            res = [loadgen.Result(**d) for f in futs for d in f.result()]
        wall = max(r.start_s for r in res) - ramp if res else duration
        return loadgen.summarize([r for r in res if r.start_s >= ramp], wall_s=max(duration, wall))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


class SloRule:
    """A request's TTFT SLO by its prompt class (picklable: it travels to load generator
    processes): see :func:`slo_of`."""

    def __init__(
        self, alone: dict[int, float], long_n: int, short_n: int, slack: float, floor: float
    ) -> None:
        self.alone, self.long_n, self.short_n, self.slack, self.floor = alone, long_n, short_n, slack, floor

    def __call__(self, req: Any) -> float:
        n = self.long_n if req.prompt_tokens >= self.long_n else self.short_n
        return slo_of(self.alone, n, self.slack, self.alone[self.long_n], self.floor)


def run(args: argparse.Namespace, emit: Any = None) -> list[dict[str, Any]]:
    """Measures every (load, policy) point; ``emit(row)`` is called as each row is ready
    (the JSON lines go out as they come, so a run stopped later keeps them)."""
    from kvxfer.serve.deployment import start_local
    from kvxfer.serve.gateway import GatewayProcess
    from kvxfer.serve.machine import machine
    from kvxfer.serve.workload import Workload, paper_mix

    loads = [float(x) for x in args.loads.split(",") if x]
    tok, unit, _vocab = tokenizer_spec(args.model, args.mode)
    scen = paper_mix(scale=args.scale, output_tokens=args.output_tokens)
    long_n = scen.setting_tokens + max(scen.query.values)
    short_n = scen.setting_tokens + min(scen.query.values)
    workload = Workload([scen], seed=args.seed, unit=unit)
    opts: dict[str, Any] = {
        "max_prompt_tokens": long_n + 64,
        "max_new_tokens": args.output_tokens + 8,
        "pending": 4,
        "ttft_slo_s": 300.0,
    }
    args.profile = args.profile or default_profile(args.model, args.mode)
    if args.profile:
        opts["profile"] = args.profile
    scaled_dir = None
    if args.mode == "profiled" and args.time_scale != 1.0:
        import tempfile

        scaled_dir = tempfile.TemporaryDirectory(prefix="kvxfer-forwarding-")
        opts["profile"] = scaled_profile(args.profile or args.model, args.time_scale, scaled_dir.name)
        log(f"profile times x {args.time_scale:g}: {opts['profile']}")
    if not args.decodes:
        reused = scen.setting_tokens if scen.setting_tokens >= 16 else 0  # the prefix cache's minimum
        args.decodes = eq1_decodes(opts.get("profile") or args.model, args, long_n, short_n, reused)
    log(
        f"starting {args.prefills} prefill (b_p={args.b_p}) + {args.decodes} decode, {args.model} {args.mode}"
    )
    t_start = time.monotonic()
    rows: list[dict[str, Any]] = []
    with start_local(
        n_prefill=args.prefills,
        n_decode=args.decodes,
        backend=args.backend,
        model=args.model,
        mode=args.mode,
        b_p=args.b_p,
        b_d=args.b_d,
        gateway=False,
        seed=args.seed,
        pin_cpus=args.pin_cpus,
        **opts,
    ) as dep:
        own_cpus = os.sched_getaffinity(0)
        if args.pin_cpus and dep.free_cpus:  # gateways (started below) and load generators
            os.sched_setaffinity(0, dep.free_cpus)
            log(f"workers pinned one per physical core; gateways and load generators on CPUs {dep.free_cpus}")
        if args.pin_cpus:
            log("worker CPUs: " + ", ".join(f"{n} {dep.status(n)['cpus']}" for n in dep.procs))
        gws = {pol: [GatewayProcess(dep.prefill_urls, policy=pol, ttft_slo_s=300.0, tokenizer=tok,
                                    log_path=str(dep.log_dir / f"gateway-{pol}-{i}.log"))
                     for i in range(args.gateways)]
               for pol in ("reject-retry", "local-queue")}  # fmt: skip
        log(f"worker and gateway logs in {dep.log_dir}")
        lg = _Loadgens(args.gateways)
        try:
            for g in (g for gs in gws.values() for g in gs):
                g.start()
            urls = {pol: [g.url for g in gs] for pol, gs in gws.items()}
            alone, decode_s, noise = asyncio.run(
                _calibrate(
                    urls["reject-retry"][0], workload, [long_n, short_n], args.output_tokens, args.cal_samples
                )  # fmt: skip
            )
            t_long = alone[long_n]
            floor = noise if args.slo_floor is None else args.slo_floor
            # one user's cycle alone: the mix's mean TTFT + an answer's decode; users ramp up over it
            ramp = 0.25 * alone[long_n] + 0.75 * alone[short_n] + decode_s
            duration = max(args.duration, 2 * ramp)

            slo = SloRule(alone, long_n, short_n, args.slack, floor)

            log(f"timing noise alone (slowest - median of {args.cal_samples}): {noise * 1e3:.1f} ms; "
                f"SLO floor {floor * 1e3:.1f} ms")  # fmt: skip
            log(
                f"alone: long {long_n} tok {alone[long_n] * 1e3:.0f} ms, short {short_n} tok "
                f"{alone[short_n] * 1e3:.0f} ms; SLO long {slo(_Len(long_n)):.3f} s, "
                f"short {slo(_Len(short_n)):.3f} s"
            )
            log(
                f"one user's cycle alone {ramp:.2f} s: users ramp up over it, then {duration:.0f} s "
                "measured per point"
            )
            budget = Budget(args.budget_s, t_start)
            a_capped = False
            if args.a:
                a = args.a
            else:
                a, a_capped = find_a(urls["local-queue"], workload, slo, ramp, duration, args, budget, lg)
            capped = " (search stopped by --budget-s: A is a lower bound)" if a_capped else ""
            log(f"A = {a} users{capped}")
            slos = {str(n): slo_of(alone, n, args.slack, t_long, floor) for n in (long_n, short_n)}
            common = {
                "A": a,
                "a_search_capped": a_capped,
                "mode": args.mode,
                "model": args.model,
                "machine": machine(),
                "prefills": args.prefills,
                "gateways": args.gateways,
                "pinned_cpus": args.pin_cpus,
                "b_p": args.b_p,
                "decodes": args.decodes,
                "prompt_tokens": [long_n, short_n],
                "slo_s": slos,
                "slo_floor_s": floor,
                "alone_ttft_s": {str(n): alone[n] for n in (long_n, short_n)},
                "min_requests": args.min_requests,
                "time_scale": args.time_scale if args.mode == "profiled" else None,
                "duration_s": duration,
                "ramp_s": ramp,
                "profile": args.profile or (f"{args.model} (default)" if args.mode == "profiled" else None),
            }
            for load in loads:
                users = max(1, round(load * a))
                for pol in ("local-queue", "reject-retry"):
                    if not budget.allows():
                        log(f"--budget-s {args.budget_s:g} spent: load {load:g} {pol} not measured")
                        continue
                    budget.start_point()
                    st = lg.point(urls[pol], workload, users, slo, ramp, duration, args.min_requests,
                                  args.max_point_s)  # fmt: skip
                    row = {
                        "experiment": "forwarding",
                        "policy": pol,
                        "load": load,
                        "users": users,
                        "success_rate": st["success_rate"],
                        "ttft_p50_s": st["ttft_p50_s"],
                        "ttft_p99_s": st["ttft_p99_s"],
                        "retries_p99": st["retries_p99"],
                        "requests": st["requests"],
                        "errors": st["errors"],
                        "throughput_rps": st.get("throughput_rps"),
                        "load_average_1m": round(os.getloadavg()[0], 2),  # the machine's, after the point
                        "where": where_time_goes(urls[pol], lg.started + ramp, long_n),
                        "prefill_compute": prefill_times(
                            dep.prefill_urls, lg.started + ramp, long_n, short_n
                        ),
                        **common,
                    }
                    rows.append(row)
                    budget.end_point()
                    if emit is not None:
                        emit(row)
                    log(f"{pol:>12} load {load:g} ({users} users): success {_f(st['success_rate'])}, "
                        f"TTFT p50 {_f(st['ttft_p50_s'])} p99 {_f(st['ttft_p99_s'])} s, retries p99 "
                        f"{_f(st['retries_p99'])}, {st['requests']} requests, "
                        f"errors {st['errors']}")  # fmt: skip
                    pc = row["prefill_compute"]
                    log("    prefill compute (s): " + "; ".join(
                        f"{c} n {v['n']} p50 {_f(v['p50_s'])} p90 {_f(v['p90_s'])} p99 {_f(v['p99_s'])} "
                        f"max {_f(v['max_s'])}" for c, v in pc.items()))  # fmt: skip
                    for cls, w in row["where"].items():
                        log(f"    {cls}: {w['failed']}/{w['requests']} failed ({w['not_admitted']} not "
                            f"admitted, {w['late']} late); wait p50 {_f(w['wait_p50_s'])} s, serve p50 "
                            f"{_f(w['serve_p50_s'])} s; failed: wait {_f(w['failed_wait_p50_s'])} s, "
                            f"serve {_f(w['failed_serve_p50_s'])} s")  # fmt: skip
        finally:
            lg.close()
            for g in (g for gs in gws.values() for g in gs):
                g.stop()
            os.sched_setaffinity(0, own_cpus)
            if scaled_dir is not None:
                scaled_dir.cleanup()
    log(f"done in {time.monotonic() - t_start:.0f} s")
    return rows


class Budget:
    """``--budget-s``: a point starts only if the run's time so far plus the longest point
    measured so far fits in the budget (0: no limit). The A search may use half of it."""

    def __init__(self, budget_s: float, t0: float) -> None:
        self.budget_s, self.t0, self.longest, self._p0 = budget_s, t0, 0.0, 0.0

    def allows(self, share: float = 1.0) -> bool:
        if self.budget_s <= 0:
            return True
        return time.monotonic() - self.t0 + self.longest <= share * self.budget_s

    def start_point(self) -> None:
        self._p0 = time.monotonic()

    def end_point(self) -> None:
        self.longest = max(self.longest, time.monotonic() - self._p0)


def find_a(
    urls: list[str], workload: Any, slo: Any, ramp: float, duration: float, args: argparse.Namespace,
    budget: Budget | None = None, lg: _Loadgens | None = None,
) -> tuple[int, bool]:  # fmt: skip
    """The most closed-loop users at which local-queue meets every request's SLO, and whether
    the budget stopped the search upwards (then A is a lower bound).

    The search starts at prefills x b_p users: up to that many, ranking by fewest open streams
    always finds a prefill with a free slot (at most users - 1 streams are open elsewhere), so
    nothing queues; it goes up from there while every request succeeds (down if one fails)."""
    budget = budget or Budget(0.0, time.monotonic())
    lg = lg or _Loadgens(1)

    def ok(users: int) -> bool:
        budget.start_point()
        st = lg.point(urls, workload, users, slo, ramp, duration, args.min_requests, args.max_point_s)
        budget.end_point()
        log(
            f"A search: local-queue, {users} users: success {_f(st['success_rate'])} "
            f"({st['requests']} requests, errors {st['errors']})"
        )
        return st["success_rate"] == 1.0

    users = min(args.prefills * args.b_p, args.max_a)
    if ok(users):
        while users < args.max_a:
            if not budget.allows(0.5):
                return users, True
            if not ok(users + 1):
                break
            users += 1
        return users, False
    while users > 1:
        users -= 1
        if ok(users):
            return users, False
    raise RuntimeError("local-queue misses the SLO even with one user: raise --slack or --slo-floor")


def where_time_goes(urls: list[str], since: float, long_n: int) -> dict[str, Any]:
    """From the gateway's own records of the requests that arrived after ``since`` (wall
    clock): per prompt class (``long``/``short``), how many there were and failed, and the
    medians of the two parts of their TTFT: ``wait`` (arrival -> a prefill accepted: gateway
    retries) and ``serve`` (accept -> first token: a local queue, then the prefill itself), for
    all requests and for the failed ones; failures also by kind (``not_admitted``: no prefill
    accepted before the deadline; ``late``: admitted, first token after the deadline)."""
    import urllib.request

    recs = []
    for url in urls:  # every gateway of the policy
        with urllib.request.urlopen(url.rstrip("/") + "/v1/kvxfer/requests", timeout=30) as resp:
            recs += [
                r for r in json.loads(resp.read()) if r["arrival"] >= since and r["outcome"] != "running"
            ]

    def med(xs: list[float]) -> float | None:
        return round(statistics.median(xs), 4) if xs else None

    out: dict[str, Any] = {}
    for cls in ("long", "short"):
        mine = [r for r in recs if (r["prompt_tokens"] >= long_n) == (cls == "long")]
        ok = [r for r in mine if r["first_token"] is not None and r["first_token"] <= r["deadline"]]
        bad = [r for r in mine if r not in ok]
        acc = [r for r in mine if r["accept"] is not None]
        acc_bad = [r for r in bad if r["accept"] is not None]
        out[cls] = {
            "requests": len(mine),
            "failed": len(bad),
            "not_admitted": sum(1 for r in bad if r["accept"] is None),
            "late": len(acc_bad),
            "wait_p50_s": med([r["accept"] - r["arrival"] for r in acc]),
            "serve_p50_s": med([r["first_token"] - r["accept"] for r in acc if r["first_token"]]),
            "failed_wait_p50_s": med([r["accept"] - r["arrival"] for r in acc_bad]),
            "failed_serve_p50_s": med([r["first_token"] - r["accept"] for r in acc_bad if r["first_token"]]),
        }
    return out


def prefill_times(urls: list[str], since: float, long_n: int, short_n: int) -> dict[str, Any]:
    """From the prefills' own records (``GET /v1/kvxfer/prefill-times``): per prompt class, how
    many prefills ended after ``since`` (wall clock) and the percentiles of their compute time
    (admission to the first token computed), to tell compute-time spread from queueing."""
    import urllib.request

    times: list[tuple[int, float]] = []
    for url in urls:
        with urllib.request.urlopen(
            f"{url.rstrip('/')}/v1/kvxfer/prefill-times?since={since}", timeout=30
        ) as r:
            times += [(int(n), float(t)) for n, t, _end in json.loads(r.read())]
    out: dict[str, Any] = {}
    for cls in ("long", "short"):
        ts = sorted(t for n, t in times if (n >= (long_n + short_n) / 2) == (cls == "long"))

        def q(p: float, ts: list[float] = ts) -> float | None:
            return round(ts[min(len(ts) - 1, int(p * len(ts)))], 4) if ts else None

        out[cls] = {"n": len(ts), "p50_s": q(0.5), "p90_s": q(0.9), "p99_s": q(0.99), "max_s": q(1.0)}
    return out


def eq1_decodes(profile: str, args: argparse.Namespace, long_n: int, short_n: int, setting: int) -> int:
    """Decode workers by Eq. 1 [paper]: at least the prefills' capacity, ``n_d >= n_p b_p T_d /
    (b_d T_p)``, rounded up, with T_p the mix's mean prefill time (one long per three short,
    the setting part reused) and T_d = TPOT(b_d) x (G - 1), from the compute profile. The
    experiment measures prefill admission, so decode must not be the bottleneck [inferred:
    the paper sizes its groups by Eq. 1 and tests forwarding on them]."""
    import math

    from kvxfer.serve.control.ratio import RatioInputs
    from kvxfer.serve.profile import load_profile

    prof = load_profile(profile)
    t_p = 0.25 * prof.prefill_s(long_n - setting) + 0.75 * prof.prefill_s(short_n - setting)
    t_d = RatioInputs.from_profile(prof, short_n, args.output_tokens, args.b_d).t_d
    n_d = max(1, math.ceil(args.prefills * args.b_p * t_d / (args.b_d * t_p)))
    log(f"Eq. 1: T_p {t_p:.3f} s (mix mean), T_d {t_d:.3f} s at b_d={args.b_d}: {n_d} decodes")
    return n_d


def scaled_profile(name_or_path: str, factor: float, folder: str) -> str:
    """Writes the profile with every time multiplied by ``factor`` into ``folder``; its path.

    The comparison is relative (two policies over the same workers), and what shapes it is
    the ratio of prefill to decode times and to the SLO, which a common factor keeps; a
    factor < 1 only makes each point's requests come faster [inferred]."""
    import json as _json
    from pathlib import Path

    from kvxfer.serve.profile import load_profile

    prof = load_profile(name_or_path)
    d = prof.to_json()
    d["prefill"] = [[n, t * factor] for n, t in prof.prefill]
    d["decode"] = [[b, t * factor] for b, t in prof.decode]
    d["meta"] = {**prof.meta, "time_scale": factor, "scaled_from": str(name_or_path)}
    path = Path(folder) / f"{prof.model}-x{factor:g}.json"
    path.write_text(_json.dumps(d, indent=1))
    return str(path)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


class _Len:
    def __init__(self, n: int) -> None:
        self.prompt_tokens = n


def slo_of(alone: dict[int, float], n: int, slack: float, t_long: float, floor: float) -> float:
    """A prompt length's TTFT alone + ``slack`` x the long prompt's + ``floor`` (noise allowance)."""
    return alone[n] + slack * t_long + floor


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["policy"], r["load"]): r["success_rate"] for r in rows}
    loads = sorted({r["load"] for r in rows})
    gap = {
        str(x): by[("reject-retry", x)] - by[("local-queue", x)]
        for x in loads
        if ("local-queue", x) in by and ("reject-retry", x) in by
    }
    return {
        "experiment": "forwarding",
        "summary": True,
        "success_gap": gap,
        "A": rows[0]["A"] if rows else None,
    }


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for pol, style in (("reject-retry", "o-"), ("local-queue", "s--")):
        pts = sorted((r["load"], r["success_rate"]) for r in rows if r["policy"] == pol)
        ax.plot([x for x, _ in pts], [y * 100 for _, y in pts], style, label=pol)
    ax.set_xlabel("closed-loop users / A")
    ax.set_ylabel("TTFT-SLO success (%)")
    r0 = rows[0]
    ax.set_title(f"forwarding ({r0['mode']}, {r0['model']}, A={r0['A']} users)", fontsize=9)
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    # SIGTERM unwinds like Ctrl-C, so the workers and gateways are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = run(args, emit=(lambda r: print(json.dumps(r), flush=True)) if args.json else None)
    if args.json:
        print(json.dumps(summary(rows)), flush=True)
    else:
        head = ("policy", "load", "users", "success", "ttft p50", "ttft p99", "retries p99")
        print("{:>13} {:>5} {:>5} {:>8} {:>9} {:>9} {:>11}".format(*head))
        for r in rows:
            print(f"{r['policy']:>13} {r['load']:>5g} {r['users']:>5} {_f(r['success_rate']):>8} "
                  f"{_f(r['ttft_p50_s']):>9} {_f(r['ttft_p99_s']):>9} "
                  f"{_f(r['retries_p99']):>11}")  # fmt: skip
    if args.plot and rows:
        plot(rows, args.plot)
        log(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
