"""The Eq. 1 ratio planner and the online monitor (units), and the ratio experiment in the
simulator."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from kvxfer.serve.control.ratio import RatioInputs, RatioMonitor, brute_force, plan
from kvxfer.serve.errors import ConfigError
from kvxfer.serve.profile import Profile

PROF = Profile("toy", "none", "float32", {}, [(1, 0.001), (1000, 1.0)], [(1, 0.011), (100, 0.110)])


def test_inputs_from_a_profile():
    ri = RatioInputs.from_profile(
        PROF, prompt_tokens=500, output_tokens=11, b_d=10, setting_tokens=100, xi=0.5
    )
    assert ri.t_p == pytest.approx(0.4) and ri.r_pre == pytest.approx(0.8)
    assert ri.t_d == pytest.approx(0.5 + 10 * 0.020)  # xi + (G - 1) steps at batch 10
    assert ri.throughput(2, 1) == pytest.approx(min(2 / 0.4, 10 / 0.7))


def test_plan_is_within_one_instance_of_the_brute_force_best():
    rng = random.Random(1)
    for _ in range(500):
        ri = RatioInputs(rng.uniform(0.05, 5), rng.randint(1, 8), rng.uniform(0.05, 50), rng.randint(1, 64))
        budget = rng.randint(2, 40)
        n_p, n_d = plan(ri, budget, min_per_role=1)
        best = brute_force(ri, budget)[0]
        assert n_p + n_d == budget and n_p >= 1 and n_d >= 1
        assert abs(n_p - best[0]) <= 1 or ri.throughput(n_p, n_d) == pytest.approx(best[2])


def test_plan_keeps_two_of_each_role_when_it_can_and_refuses_impossible_budgets():
    ri = RatioInputs(t_p=10.0, b_p=1, t_d=0.1, b_d=1)  # prefill-bound: Eq. 1 wants nearly all prefills
    assert plan(ri, 10) == (8, 2)
    assert plan(ri, 3) == (2, 1)
    with pytest.raises(ConfigError):
        plan(ri, 1)


def test_monitor_adds_prefill_or_decode_by_the_t_p_share_in_gradual_steps():
    m = RatioMonitor(rise=0.1, cooldown=1)

    def period(e2e, tp, n=20):
        for _ in range(n):
            m.observe(e2e, tp)
        return m.decide()

    assert period(10, 2) is None and period(10.2, 2.1) is None  # settled
    assert period(14, 6) == "prefill"  # E2E up, T_p share up
    assert period(16, 8) is None  # cool-down: one step at a time
    assert period(16, 8) is None  # new base
    assert period(20, 4) == "decode"  # E2E up, T_p share down
    assert m.decide() is None  # nothing observed


def test_ratio_experiment_in_the_simulator_plans_the_best_split():
    cmd = [sys.executable, "-m", "kvxfer.cli", "experiment", "ratio", "--modes", "sim", "--json"]
    out = subprocess.run([*cmd, "--sim-duration", "200"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    splits = [r for r in rows if not r.get("summary")]
    assert sorted((r["n_p"], r["n_d"]) for r in splits) == [(n, 6 - n) for n in range(1, 6)]
    assert sum(r["planned"] for r in splits) == 1 and all(r["mode"] == "sim" for r in splits)
    (s,) = [r for r in rows if r.get("summary")]
    assert s["within_one_of_best"] and s["planned_vs_worst"] >= 1.6


def test_adapt_experiment_converges_to_the_new_best_split_without_drops():
    cmd = [sys.executable, "-m", "kvxfer.cli", "experiment", "adapt", "--json", "--end", "800"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = [json.loads(x) for x in out.stdout.splitlines()]
    assert row["experiment"] == "adapt" and row["mode"] == "sim"
    assert row["from"] != row["best_static"] and row["to"] == row["best_static"]  # the shift moved the best
    assert row["converge_s"] is not None and row["throughput_vs_static"] >= 0.9 and row["dropped"] == 0
