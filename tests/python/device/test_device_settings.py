"""Timing model, simulator and settings algorithm (pure pieces)."""

from __future__ import annotations

import pytest

from kvxfer.device import regret, trace
from kvxfer.device.errors import BadSettingsError
from kvxfer.device.profiles import load_profiles, profile
from kvxfer.device.settings import Estimates, Policy, bucket, choose, feasible, oracle, run_settings
from kvxfer.device.sim import CLOUD_ONLY, DEVICE_ONLY, NAIVE, PD, Env, simulate
from kvxfer.device.timing import Conditions, n_star, refined_len, t_catch, t_ready

Q = {1.0: 1.0, 0.8: 0.97, 0.6: 0.93, 0.5: 0.9, 0.4: 0.85, 0.3: 0.8}.get


def cond(L=2048, G=256, rate=1000.0, tau_d=0.03, a1=0.15, **kw) -> Conditions:
    return Conditions(L, G, rate, 1 / rate, tau_d, a1, 0.004, system_len=kw.get("sys", 200), query_len=30)


def test_profiles_name_their_source():
    for p in load_profiles().values():
        assert p.source and p.prefill_tok_s > 0 and p.decode_ms > 0
    with pytest.raises(BadSettingsError, match="unknown device class"):
        profile("no-such-phone")


def test_refined_len_keeps_system_and_query():
    assert refined_len(1000, 0.5, 100, 30) == 500
    assert refined_len(1000, 0.1, 100, 30) == 130
    assert refined_len(1000, 1.0, 100, 30) == 1000


def test_t_ready_reuses_the_system_prefix_and_keeps_a_finished_raw_prompt():
    c = cond()
    ready, tokens = t_ready(c, 0.5)
    # raw prefill ran 0.15 s (150 tokens, all in the system part) before the refined prompt came
    assert tokens == 1024
    assert ready == pytest.approx(0.15 + (1024 - 150) / 1000)
    short = cond(L=100)
    assert t_ready(short, 0.5) == (pytest.approx(0.1), 100)


def test_n_star_meets_theta_in_simulation_and_refinement_needs_fewer_tokens():
    c = cond()
    env = Env(c, 0.1, 0.004)
    n1, n5 = n_star(c, 1.0, 0.05), n_star(c, 0.5, 0.05)
    assert n5 < n1 < c.answer_len
    for n, rho in ((n1, 1.0), (n5, 0.5)):
        o = simulate(env, PD, n, rho)
        assert o.tpot_max <= 0.05 + 1e-9
        assert o.ttft == pytest.approx(c.a1)
        assert o.t_catch == pytest.approx(t_catch(c, rho, n))
    o = simulate(env, PD, n1 // 2, 1.0)  # half of n* cannot cover the catch-up
    assert o.tpot_max > 0.05


def test_baselines_in_simulation():
    c = cond()
    env = Env(c, 0.1, 0.004)
    dev, cloud = simulate(env, DEVICE_ONLY), simulate(env, CLOUD_ONLY)
    assert dev.ttft == pytest.approx(2.048) and dev.cloud_busy == 0
    assert cloud.ttft == pytest.approx(0.15) and cloud.cloud_tokens == 256
    naive = simulate(env, NAIVE, n_star(c, 1.0, 0.05))
    assert naive.tpot_max > 1.0  # shown on arrival, then a stall until the device catches up
    pd = simulate(env, PD, n_star(c, 0.5, 0.05), 0.5)
    assert pd.ttft <= 0.4 * dev.ttft
    assert cloud.cloud_busy / pd.cloud_busy > 5


def test_choose_no_help_for_short_prompts_cloud_only_for_slow_devices():
    pol = Policy(ttft_slo=1.0)
    assert choose(cond(L=300), 0.02, 0.004, pol, Q).method == DEVICE_ONLY
    assert choose(cond(tau_d=0.06), 0.1, 0.004, pol, Q).method == CLOUD_ONLY
    s = choose(cond(), 0.1, 0.004, pol, Q)
    assert s.method == PD and 1 <= s.n < 256 and Q(s.rho) >= pol.q_min
    # a stricter quality floor forbids refinement
    assert choose(cond(), 0.1, 0.004, Policy(q_min=0.99), Q).rho == 1.0


def test_choose_with_true_conditions_is_feasible_and_near_the_oracle():
    pol = Policy()
    for L in (1500, 3000, 6000):
        env = Env(cond(L=L, G=512), 0.05 + 2e-5 * L, 0.01)
        s = choose(env.cond, env.cloud_prefill_s, env.tau_busy, pol, Q)
        o = run_settings(env, s, pol, Q)
        so, oo = oracle(env, pol, Q)
        assert feasible(o, pol, True) and feasible(oo, pol, True)
        assert oo.cloud_busy <= o.cloud_busy + 1e-9
        assert o.cloud_busy <= 1.2 * oo.cloud_busy  # the closed form is within 20% of the search


def test_estimates_follow_measurements_per_class_and_bucket():
    est = Estimates(load_profiles(), regret.CLOUD, alpha=0.5)
    c0, _, _ = est.conditions("phone-npu-1b", 3000, 100)
    assert c0.prefill_tok_s == 1000.0
    est.observe("phone-npu-1b", 3000, prefill_tok_s=500.0)
    est.observe("phone-npu-1b", 3000, prefill_tok_s=500.0)
    c1, _, _ = est.conditions("phone-npu-1b", 3000, 100)
    assert c1.prefill_tok_s == pytest.approx(500.0)
    c2, _, _ = est.conditions("phone-npu-1b", 300, 100)  # another bucket: still the prior
    assert c2.prefill_tok_s == 1000.0 and bucket(300) != bucket(3000)
    with pytest.raises(BadSettingsError):
        est.observe("phone-npu-1b", 3000, speed=1.0)


def test_trace_driven_regret_is_small_and_beats_a_static_policy():
    rows = trace.load("conv", 120)
    r = regret.run(rows, Q)
    assert r.requests == 120 and r.oracle_infeasible == 0
    assert 0 <= r.mean_regret < 0.05
    assert r.alg_violations <= 0.05 * r.requests
    assert r.static_violations > r.alg_violations
    assert r.alg_cost < 0.5 * r.cloud_only_cost
