"""Trace-driven regret of the settings algorithm against the oracle grid search.

Each row of the Azure trace (prompt and answer lengths, arrival time) becomes one request from a
device of a class drawn per request, under drifting conditions [assumed, stated here]:
device speed x (1 + 0.3 sin(2 pi t / 900 s)) x lognormal(0, 0.05) (thermal drift and noise);
link RTT 40 ms + 30 ms sin(2 pi t / 600 s), per-token jitter exponential with mean 2 ms;
cloud (GPU-class, assumed): prefill 20 ms + 20 us/token, token interval 15 ms, busy 15 ms/token;
system part 20% of the prompt, query min(64, 10%).

The online algorithm sees only its EWMA estimates, updated after each request with what the
request measured; the oracle sees the truth. Regret = (cost_alg - cost_oracle) / cost_cloud_only.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from kvxfer.device.profiles import DeviceProfile, load_profiles
from kvxfer.device.settings import Estimates, Policy, choose, feasible, oracle, run_settings
from kvxfer.device.sim import Env, simulate
from kvxfer.device.timing import Conditions, cloud_cost

CLOUD = {"rtt": 0.04, "prefill_base": 0.02, "prefill_per_token": 20e-6, "tau_c": 0.015, "tau_busy": 0.015}


@dataclass
class RegretResult:
    requests: int
    mean_regret: float  # mean (alg - oracle) / cloud_only cost
    alg_cost: float  # sum of cloud busy seconds
    oracle_cost: float
    cloud_only_cost: float
    alg_violations: int  # requests missing a constraint the oracle met
    oracle_infeasible: int
    decisions: dict
    static_cost: float  # fixed n = 32, rho = 1 for every request (a naive policy)
    static_violations: int


def make_env(t: float, prompt_len: int, answer_len: int, prof: DeviceProfile, rng: random.Random) -> Env:
    speed = (1 + 0.3 * math.sin(2 * math.pi * t / 900.0)) * rng.lognormvariate(0, 0.05)
    p = prof.scaled(speed)
    rtt = CLOUD["rtt"] + 0.03 * math.sin(2 * math.pi * t / 600.0)
    prefill = CLOUD["prefill_base"] + CLOUD["prefill_per_token"] * prompt_len
    jitter = [rng.expovariate(1 / 0.002) for _ in range(min(answer_len, 2048))]
    cond = Conditions(
        prompt_len=prompt_len,
        answer_len=answer_len,
        prefill_tok_s=p.prefill_tok_s,
        c_d=p.c_d,
        tau_d=p.tau_d,
        a1=rtt + prefill + 0.001,
        tau_c=CLOUD["tau_c"],
        system_len=int(0.2 * prompt_len),
        query_len=min(64, int(0.1 * prompt_len)),
    )
    return Env(cond, prefill, CLOUD["tau_busy"], rtt, tuple(jitter))


def run(
    rows: list[tuple[float, int, int]],
    quality: Callable[[float], float],
    policy: Policy | None = None,
    classes: tuple[str, ...] = ("phone-npu-1b", "phone-gpu-1b", "phone-npu-135m", "phone-cpu-1b"),
    seed: int = 0,
    max_prompt: int = 8192,
) -> RegretResult:
    policy = policy or Policy()
    profiles = load_profiles()
    est = Estimates({c: profiles[c] for c in classes}, CLOUD)
    rng = random.Random(seed)
    regrets, dec = [], Counter()
    alg_c = orc_c = cloud_c = static_c = 0.0
    viol = infeas = static_viol = 0
    for t, L, G in rows:
        L, G = max(1, min(L, max_prompt)), max(2, min(G, 2048))
        cls = rng.choice(classes)
        env = make_env(t, L, G, profiles[cls], rng)
        c = env.cond
        cond_hat, pre_hat, busy_hat = est.conditions(cls, L, G, c.system_len, c.query_len)
        s = choose(cond_hat, pre_hat, busy_hat, policy, quality)
        o = run_settings(env, s, policy, quality)
        so, oo = oracle(env, policy, quality)
        full = cloud_cost(env.cloud_prefill_s, G, env.tau_busy)
        ok_o = feasible(oo, policy, quality(so.rho) >= policy.q_min)
        ok_a = feasible(o, policy, quality(s.rho) >= policy.q_min)
        infeas += not ok_o
        viol += ok_o and not ok_a
        regrets.append((o.cloud_busy - oo.cloud_busy) / full)
        alg_c += o.cloud_busy
        orc_c += oo.cloud_busy
        cloud_c += full
        dec[s.method] += 1
        st = simulate(env, "pd-device", min(32, G), 1.0, policy.theta, policy.delta_min, 1.0)
        static_c += st.cloud_busy
        static_viol += ok_o and not feasible(st, policy, True)
        # what the device measured on this request feeds the estimates
        est.observe(
            cls,
            L,
            prefill_tok_s=c.prefill_tok_s,
            c_d=c.c_d,
            tau_d=c.tau_d,
            a1=c.a1 + (env.jitter[0] if env.jitter else 0.0),
            tau_c=c.tau_c,
            cloud_prefill_s=env.cloud_prefill_s,
            tau_busy=env.tau_busy,
        )
    return RegretResult(
        len(rows),
        sum(regrets) / max(1, len(regrets)),
        alg_c,
        orc_c,
        cloud_c,
        viol,
        infeas,
        dict(dec),
        static_c,
        static_viol,
    )
