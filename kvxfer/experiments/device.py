"""``kvxfer experiment device``: P/D-Device against device-only, cloud-only and naive hybrid.

Real pieces: the cloud helper (model in this process, its own thread), the device runtime in its
own process throttled to a device class, an emulated link (TCP proxy: 20 ms each way, 2 ms
jitter, 12.5 MB/s [assumed]), the tiny model (same seed on both sides). Per prompt-length bucket
and method, ``--repeats`` requests; the JSON line per (method, bucket) holds medians. ``pd-device``
runs the settings algorithm (EWMA estimates warmed by one calibration request per bucket) and
may pick device-only or cloud-only; ``naive-hybrid`` uses the same n at rho = 1, shown on arrival.
Then: one pd-device request with the link cut mid-stream; the settings algorithm's regret
against the oracle on the Azure trace (simulated).

``quality``: token agreement of the shown answer with the cloud-only greedy answer on the run's
model (1.0 means identical); ``quality_curve``: SmolLM2-135M agreement at the chosen rho from
``kvxfer/device/quality_curve.json`` (``python -m kvxfer.device.quality``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

THETA = 0.05


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _agreement(a: list[int], b: list[int]) -> float:
    if not b:
        return 0.0
    return sum(1 for x, y in zip(a, b) if x == y) / len(b)  # noqa: B905


def _prompt(rng: random.Random, vocab: int, length: int) -> tuple[list[int], int, int]:
    ids = [rng.randrange(vocab) for _ in range(length)]
    return ids, max(1, length // 10), min(32, length // 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvxfer experiment device", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two buckets, 96-token answers, one repeat (< 60 s)")
    ap.add_argument("--json", action="store_true", help="JSON lines on stdout")
    ap.add_argument("--plot", default=None, help="PNG: timeline of one request, TTFT and max TPOT vs length")
    ap.add_argument("--model", default="tiny:0")
    ap.add_argument("--profile", default="phone-npu-1b", help="device class (kvxfer/device/profiles.json)")
    ap.add_argument("--buckets", default=None, help="prompt lengths, comma separated")
    ap.add_argument("--answer", type=int, default=None, help="answer tokens per request")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--cloud-device", default="cpu", help="torch device of the cloud's model")
    ap.add_argument(
        "--cloud",
        default="local",
        choices=("local", "serve"),
        help="local: the cloud helper runs the model (refinement available); serve: tokens from a local "
        "P/D-Serve deployment (1 prefill + 1 decode worker, shm) through its gateway, rho = 1",
    )
    ap.add_argument("--regret-rows", type=int, default=None)
    ap.add_argument("--quality-metric", default="accuracy", choices=("accuracy", "agreement"))
    ap.add_argument("--q-min", type=float, default=0.95)
    ap.add_argument("--save", default=None, help="write rows and the timelines as JSON (for --replot)")
    ap.add_argument("--replot", default=None, help="plot a file written by --save instead of running")
    a = ap.parse_args(argv)
    if a.replot:
        saved = json.loads(Path(a.replot).read_text())
        _plot(
            saved["rows"], {int(k): v for k, v in saved["timelines"].items()}, a.plot or "device.png", THETA
        )
        if not a.json:
            _table(saved["rows"])
        return 0

    import torch

    torch.set_num_threads(1)
    from kvxfer.device.cloud import CloudHelper
    from kvxfer.device.device import DeviceProcess, Job
    from kvxfer.device.errors import DeviceError
    from kvxfer.device.link import Cut, LinkProxy, LinkSpec
    from kvxfer.device.lm import load_lm
    from kvxfer.device.profiles import load_profiles
    from kvxfer.device.quality import CURVE, load_curve
    from kvxfer.device.settings import Estimates, Policy, choose
    from kvxfer.device.sim import CLOUD_ONLY, DEVICE_ONLY, PD
    from kvxfer.device.timing import n_star

    buckets = (
        [int(x) for x in a.buckets.split(",")]
        if a.buckets
        else ([512, 2048] if a.quick else [256, 1024, 2048, 4096])
    )
    G = a.answer or (96 if a.quick else 256)
    repeats = a.repeats or (1 if a.quick else 3)
    regret_rows = a.regret_rows if a.regret_rows is not None else (100 if a.quick else 2000)
    prof = load_profiles()[a.profile]
    quality_curve = load_curve(metric=a.quality_metric) if CURVE.exists() else (lambda rho: float(rho >= 1))
    agreement_curve = load_curve(metric="agreement") if CURVE.exists() else (lambda rho: float(rho >= 1))
    stops: list[int] = []
    if a.cloud == "serve":
        # P/D-Serve runs its own tiny model; the gateway returns no attention mass (rho = 1 only)
        a.model = "serve-tiny:0"
        stops = [256]  # the byte tokenizer's end of sequence, on which the gateway stops
        quality_curve = agreement_curve = lambda rho: float(rho >= 1)  # noqa: E731
        if max(buckets) + G > 4096:
            ap.error("--cloud serve: the P/D-Serve tiny model has 4096 positions (prompt + answer)")
    policy = Policy(ttft_slo=a.ttft_slo, theta=THETA, q_min=a.q_min)
    machine = (
        f"{platform.node()} {platform.machine()} cpus={os.cpu_count()} python {platform.python_version()}"
    )
    t_start = time.time()
    rows: list[dict] = []
    timelines: dict = {}

    def emit(d: dict) -> None:
        rows.append(d)
        if a.json:
            print(json.dumps(d), flush=True)

    _log(
        f"device experiment: model {a.model}, class {a.profile}, buckets {buckets}, "
        f"answer {G}, repeats {repeats}"
    )
    cloud_lm = load_lm(a.model, device=a.cloud_device)
    ref_lm = load_lm(a.model)
    vocab = min(256, ref_lm.model.config.vocab_size)  # byte ids: never the serve model's EOS (256)
    rng = random.Random(0)
    link_up = LinkSpec(delay=0.02, jitter=0.002, rate=12.5e6)
    link_down = LinkSpec(delay=0.02, jitter=0.002, rate=12.5e6)
    cloud_prior = {
        "rtt": 0.04,
        "prefill_base": 0.01,
        "prefill_per_token": 1e-4,
        "tau_c": 0.005,
        "tau_busy": 0.005,
    }
    est = Estimates({a.profile: prof}, cloud_prior)

    with contextlib.ExitStack() as stack:
        gateway = None
        if a.cloud == "serve":
            from kvxfer.serve.deployment import start_local

            _log("starting a local P/D-Serve deployment (1 prefill + 1 decode worker, shm)")
            dep = stack.enter_context(
                start_local(
                    n_prefill=1, n_decode=1, backend="shm", model="tiny", max_prompt_tokens=max(buckets)
                )
            )
            gateway = dep.gateway_url
        cloud = stack.enter_context(CloudHelper(cloud_lm, gateway=gateway))
        link = stack.enter_context(LinkProxy(cloud.port, up=link_up, down=link_down))
        dev = stack.enter_context(DeviceProcess(a.model, prof))
        addr = f"127.0.0.1:{link.port}"

        def run(method, ids, s, q, n=1, rho=1.0, g=None, **kw):
            j = Job(
                f"{method}-{len(ids)}-{rng.random():.6f}",
                method,
                ids,
                g or G,
                n=n,
                rho=rho,
                system_len=s,
                query_len=q,
                theta=THETA,
                cloud=addr,
                stop_token_ids=stops,
                **kw,
            )
            try:
                r = dev.run(j)
            except DeviceError as e:
                _log(f"  {method}: request failed: {type(e).__name__}: {e}")
                return None
            if r["ttft_s"] is None:
                _log(f"  {method}: no token was shown ({r['stream_end']})")
                return None
            acc = cloud.accounts.get(j.request_id)
            r["cloud_busy_s"] = acc.busy_s if acc else 0.0
            r["cloud_tokens"] = acc.tokens if acc else 0
            r["cloud_prefill_s"] = acc.prefill_s if acc else 0.0
            r["cloud_decode_s"] = acc.decode_s if acc else 0.0
            return r

        # warm-up (not measured): the first request pays for allocator and kernel start-up
        # (CUDA context, cuBLAS) that would otherwise poison the first calibration
        for L in sorted({min(buckets), max(buckets)}):
            w_ids, w_s, w_q = _prompt(rng, vocab, L)
            run(CLOUD_ONLY, w_ids, w_s, w_q, g=16)
            run(PD, w_ids, w_s, w_q, n=4, rho=0.5, g=16)
        for L in buckets:
            ids, s, q = _prompt(rng, vocab, L)
            ref = ref_lm.model.generate(ids, G, stop_token_ids=stops)
            # calibration: one short cloud-only request measures A1, cloud prefill and token interval
            cal = run(CLOUD_ONLY, ids, s, q)
            if cal is not None:
                arr = cal["arrived_s"]
                tau_c = (
                    statistics.median([arr[i] - arr[i - 1] for i in range(1, len(arr))])
                    if len(arr) > 1
                    else 0.005
                )
                busy_tok = cal["cloud_decode_s"] / max(1, cal["cloud_tokens"] - 1)
                est.observe(
                    a.profile,
                    L,
                    a1=cal["ttft_s"],
                    tau_c=tau_c,
                    cloud_prefill_s=cal["cloud_prefill_s"],
                    tau_busy=busy_tok,
                )
            cond, pre, busy = est.conditions(a.profile, L, G, s, q)
            # the device's pacer margin now (display and sleep lateness, measured in the device
            # process); the settings plan n at theta minus it, and the job pins it for the pacer
            margin = dev.margin(THETA)
            pol = dataclasses.replace(policy, safety=1.0 - margin / THETA)
            st = choose(cond, pre, busy, pol, quality_curve)
            n_naive = n_star(cond, 1.0, THETA, pol.safety)
            _log(
                f"L={L}: settings {st.method} n={st.n} rho={st.rho} ({st.reason}); naive n={n_naive}; "
                f"pacer margin {margin * 1e3:.1f} ms"
            )
            per: dict[str, list[dict]] = {}
            failed: dict[str, int] = {}
            for _rep in range(repeats):
                for method in ("device-only", "cloud-only", "naive-hybrid", "pd-device"):
                    if method == PD:
                        m = st.method if st.method != PD else PD
                        r = run(m, ids, s, q, n=st.n or 1, rho=st.rho, margin_s=margin)
                    elif method == "naive-hybrid":
                        r = run(method, ids, s, q, n=max(1, n_naive))
                    else:
                        r = run(method, ids, s, q)
                    if r is None:
                        failed[method] = failed.get(method, 0) + 1
                        continue
                    r["quality"] = _agreement(r["tokens"], ref)
                    per.setdefault(method, []).append(r)
                    _log(
                        f"  {method:13s} ttft {r['ttft_s']:.3f} s  max tpot {r['tpot_max_s'] * 1e3:.1f} ms  "
                        f"cloud busy {r['cloud_busy_s']:.3f} s  tokens {r['cloud_tokens']}  "
                        f"overrun {r['overrun_s']:.3f} s"
                    )
                    if method == PD and st.method == PD:
                        est.observe(a.profile, L, a1=r["ttft_s"])
            med = {}
            for method, rs in per.items():
                d = {
                    "experiment": "device",
                    "method": method,
                    "prompt_tokens": L,
                    "ttft_s": statistics.median(x["ttft_s"] for x in rs),
                    "tpot_max_s": statistics.median(x["tpot_max_s"] for x in rs),
                    "tpot_p99_s": statistics.median(x["tpot_p99_s"] for x in rs),
                    "cloud_busy_s": statistics.median(x["cloud_busy_s"] for x in rs),
                    "cloud_tokens": statistics.median(x["cloud_tokens"] for x in rs),
                    "cloud_prefill_s": statistics.median(x["cloud_prefill_s"] for x in rs),
                    "cloud_decode_s": statistics.median(x["cloud_decode_s"] for x in rs),
                    "quality": statistics.median(x["quality"] for x in rs),
                    "answer_tokens": G,
                    "repeats": len(rs),
                    "device_class": a.profile,
                    "theta_s": THETA,
                    "overrun_s": max(x["overrun_s"] for x in rs),
                    "failed": failed.get(method, 0),
                }
                if method == PD:
                    d.update(
                        decision=st.method,
                        n=st.n,
                        rho=st.rho,
                        quality_curve=quality_curve(st.rho),
                        agreement_curve=agreement_curve(st.rho),
                        handoff=rs[0]["handoff"],
                        more_requests=rs[0]["more_requests"],
                        handoffs=[x["handoff"] for x in rs],
                        pacer_margin_s=statistics.median(x["pacer_margin_s"] for x in rs),
                        planned_margin_s=margin,
                        t_ready_s=statistics.median(x.get("t_ready") or 0.0 for x in rs),
                    )
                if method == "naive-hybrid":
                    d.update(n=n_naive)
                med[method] = d
                emit(d)
            if not all(m in med for m in (PD, DEVICE_ONLY, CLOUD_ONLY, "naive-hybrid")):
                _log(f"L={L}: no summary, failed requests {failed}")
                continue
            pd, do, co = med[PD], med[DEVICE_ONLY], med[CLOUD_ONLY]
            summary = {
                "experiment": "device",
                "kind": "summary",
                "prompt_tokens": L,
                "ttft_reduction_vs_device_only": 1 - pd["ttft_s"] / do["ttft_s"],
                "cloud_busy_ratio_cloud_only_over_pd": co["cloud_busy_s"] / pd["cloud_busy_s"]
                if pd["cloud_busy_s"]
                else None,
                "pd_tpot_max_s": pd["tpot_max_s"],
                "naive_tpot_max_s": med["naive-hybrid"]["tpot_max_s"],
                "decision": st.method,
            }
            if st.method == PD:
                # the best any pacing could do at this rho in this run: the display needs one
                # token per theta (less the absorb cost) from the first token to T_ready
                tau = co["cloud_decode_s"] / max(1, co["cloud_tokens"] - 1)
                n_min = max(1, math.ceil((pd["t_ready_s"] - pd["ttft_s"]) / (THETA - prof.c_d)))
                pd_pre = statistics.median(x["cloud_busy_s"] - x["cloud_decode_s"] for x in per[PD])
                summary.update(
                    n_min=n_min,
                    cloud_tau_s=tau,
                    busy_ratio_bound=co["cloud_busy_s"] / (pd_pre + (n_min - 1) * tau),
                )
            emit(summary)
            timelines[L] = per[PD][0]

        # link cut mid-stream: the device completes alone; the gap is reported
        L = buckets[0] if a.quick else buckets[-1]
        ids, s, q = _prompt(rng, vocab, L)
        ref = ref_lm.model.generate(ids, G, stop_token_ids=stops)
        cond, pre, busy = est.conditions(a.profile, L, G, s, q)
        n_cut = max(8, n_star(cond, 1.0, THETA, policy.safety))
        with LinkProxy(cloud.port, up=link_up, down=link_down, cut=Cut(after_down_bytes=400)) as cut_link:
            j = Job(
                f"cut-{L}",
                PD,
                ids,
                G,
                n=n_cut,
                system_len=s,
                query_len=q,
                theta=THETA,
                cloud=f"127.0.0.1:{cut_link.port}",
                stop_token_ids=stops,
            )
            r = dev.run(j)
        emit(
            {
                "experiment": "device",
                "kind": "link-drop",
                "prompt_tokens": L,
                "n": n_cut,
                "cloud_received": r["cloud_received"],
                "stream_end": r["stream_end"],
                "link_down_s": r["link_down_s"],
                "link_gap_s": r["link_gap_s"],
                "tpot_max_s": r["tpot_max_s"],
                "answer_tokens": len(r["tokens"]),
                "answer_equals_cloud_only": r["tokens"] == ref,
            }
        )

    if regret_rows:
        from kvxfer.device import regret, trace

        t0 = time.time()
        res = regret.run(trace.load("conv", regret_rows), quality_curve, Policy(theta=THETA, q_min=a.q_min))
        emit(
            {
                "experiment": "device",
                "kind": "settings-regret",
                "trace": "azure-llm-2023 conv",
                "requests": res.requests,
                "mean_regret": res.mean_regret,
                "alg_cloud_s": res.alg_cost,
                "oracle_cloud_s": res.oracle_cost,
                "cloud_only_s": res.cloud_only_cost,
                "alg_violations": res.alg_violations,
                "oracle_infeasible": res.oracle_infeasible,
                "static_cloud_s": res.static_cost,
                "static_violations": res.static_violations,
                "decisions": res.decisions,
                "wall_s": time.time() - t0,
            }
        )
    emit(
        {
            "experiment": "device",
            "kind": "run",
            "machine": machine,
            "wall_s": time.time() - t_start,
            "command": "kvxfer experiment device " + " ".join(sys.argv[1:] if argv is None else argv),
            "cloud": a.cloud,
        }
    )
    if not a.json:
        _table(rows)
    if a.save:
        keep = ("shown_s", "arrived_s", "sources", "handoff", "tokens")
        tl = {L: {k: v[k] for k in keep} for L, v in timelines.items()}
        Path(a.save).write_text(json.dumps({"rows": rows, "timelines": tl}))
    if a.plot and timelines:
        _plot(rows, timelines, a.plot, THETA)
        _log(f"plot written to {a.plot}")
    return 0


def _table(rows: list[dict]) -> None:
    print(
        f"{'method':13s} {'prompt':>6s} {'ttft s':>7s} {'max tpot ms':>11s} {'p99 ms':>7s} "
        f"{'cloud busy s':>12s} {'cloud tok':>9s} {'quality':>7s}"
    )
    for d in rows:
        if "method" in d:
            print(
                f"{d['method']:13s} {d['prompt_tokens']:6d} {d['ttft_s']:7.3f} {d['tpot_max_s'] * 1e3:11.1f} "
                f"{d['tpot_p99_s'] * 1e3:7.1f} {d['cloud_busy_s']:12.3f} {d['cloud_tokens']:9.0f} "
                f"{d['quality']:7.2f}"
            )
        else:
            print(json.dumps(d))


def _plot(rows: list[dict], timelines: dict, path: str, theta: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(17, 4.8))
    L = 2048 if 2048 in timelines else max(timelines)
    r = timelines[L]
    xs, src = r["shown_s"], r["sources"]
    for s_, color, label in (("c", "tab:blue", "cloud token"), ("d", "tab:orange", "device token")):
        pts = [(x, i) for i, (x, c) in enumerate(zip(xs, src)) if c == s_]  # noqa: B905
        if pts:
            ax[0].scatter([p[0] for p in pts], [p[1] for p in pts], s=6, c=color, label=label)
    if r.get("handoff"):
        ax[0].axvline(xs[r["handoff"]], color="k", ls="--", lw=1, label=f"handoff (token {r['handoff']})")
    ax[0].set(
        xlabel="time since request (s)",
        ylabel="displayed token index",
        title=f"one pd-device request, {L}-token prompt",
    )
    ax[0].legend(loc="upper left", fontsize=8)
    methods = ("device-only", "cloud-only", "naive-hybrid", "pd-device")
    for m in methods:
        pts = sorted((d["prompt_tokens"], d["ttft_s"], d["tpot_max_s"]) for d in rows if d.get("method") == m)
        if pts:
            ax[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            ax[2].plot([p[0] for p in pts], [p[2] * 1e3 for p in pts], marker="o", label=m)
    ax[1].set(xlabel="prompt tokens", ylabel="TTFT (s)", title="TTFT", yscale="log")
    ax[2].axhline(theta * 1e3, color="r", ls=":", label="theta")
    ax[2].set(xlabel="prompt tokens", ylabel="max displayed TPOT (ms)", title="max TPOT", yscale="log")
    for x in ax[1:]:
        x.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
