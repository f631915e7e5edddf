"""The simulator: invariants of the model, determinism, that it runs the gateway's own policy
object, and the ``scale`` experiment's output."""

from __future__ import annotations

import json
import subprocess
import sys

from kvxfer.serve.policy import ForwardingPolicy
from kvxfer.serve.profile import Profile
from kvxfer.serve.sim.model import SimConfig, SimRequest, Simulation
from kvxfer.serve.sim.runs import closed_loop, find_a, paper_mix

# a made-up profile with round numbers: prefill 1 ms per token, decode step 10 ms + 1 ms per request
PROF = Profile("toy", "none", "float32", {"num_hidden_layers": 2, "num_key_value_heads": 1, "head_dim": 8},
               [(1, 0.001), (1000, 1.0)], [(1, 0.011), (100, 0.110)])  # fmt: skip


def test_one_request_has_the_profile_latencies():
    cfg = SimConfig(PROF, n_prefill=1, n_decode=1, rtt_s=0.002, kv_bytes_per_s=1e12)
    sim = Simulation(cfg)
    sim.submit(SimRequest(0, 0, "s", 100, 0, 5, arrival=0.0, deadline=10.0))
    sim.run(10)
    (r,) = sim.requests
    assert r.success and abs(r.ttft_s - (0.002 + 0.1)) < 1e-9  # one attempt + 100 tokens of prefill
    assert abs(r.done - r.first_token - 4 * 0.011) < 1e-6  # 4 more tokens at batch size 1
    assert isinstance(sim.policies[0], ForwardingPolicy)


def test_prefill_slots_and_decode_batches_are_never_exceeded_and_runs_are_deterministic():
    cfg = SimConfig(PROF, groups=3, n_prefill=2, n_decode=1, b_p=2, b_d=4, pending=2)
    seen = {"slots": 0, "batch": 0}
    sims = []
    for _ in range(2):
        sim = Simulation(cfg, seed=5)
        orig = sim._step

        def step(d, orig=orig, sim=sim):
            seen["batch"] = max(seen["batch"], len(d.running) + len(d.joining))
            seen["slots"] = max(seen["slots"], max(cfg.b_p - p.free for p in sim.prefills))
            orig(d)

        sim._step = step
        for i in range(300):
            sim.submit(
                SimRequest(i, i % 3, "s", 50 + (i * 37) % 400, 10, 8, arrival=i * 0.01, deadline=i * 0.01 + 2)
            )
        sim.run(60)
        sims.append([(r.rid, r.first_token, r.done, r.error) for r in sim.requests])
    assert seen["slots"] <= cfg.b_p and seen["batch"] <= cfg.b_d
    assert sims[0] == sims[1]
    assert all(d is not None for _, _, d, _ in sims[0])  # every request ended


def test_reject_retry_keeps_the_slo_where_local_queue_collapses():
    cfg = SimConfig(PROF, n_prefill=4, n_decode=2, b_p=1, b_d=16)
    mix = paper_mix(scale=1 / 16, output_tokens=16)
    a = find_a(cfg, mix, 120.0)
    big = {p: closed_loop(SimConfig(PROF, groups=10, n_prefill=4, n_decode=2, policy=p), mix, 40 * a, 60.0)
           for p in ("local-queue", "reject-retry")}  # fmt: skip
    assert big["reject-retry"]["success_rate"] > big["local-queue"]["success_rate"] + 0.2


def test_scale_experiment_quick_writes_the_issue_fields():
    out = subprocess.run([sys.executable, "-m", "kvxfer.cli", "experiment", "scale", "--quick", "--json",
                          "--duration", "10", "--instances", "100"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    assert {(r["policy"], r["load"]) for r in rows} == {
        (p, x) for p in ("local-queue", "reject-retry") for x in (1, 4)
    }
    for r in rows:
        assert r["experiment"] == "scale" and r["mode"] == "sim" and r["instances"] == 100
        assert 0 <= r["success_rate"] <= 1
