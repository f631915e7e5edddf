"""Closed-loop runs of the simulator: the workloads, the TTFT SLO rule and the search for A,
exactly as ``kvxfer experiment forwarding`` does them with real processes.

* ``paper`` mix: one scenario per group, one long prompt (8192 x scale tokens) per three short
  ones (2048 x scale), a setting part of 100 x scale tokens [paper's example, as in part 1].
* ``azure``: groups alternate between the trace's two services, ``code`` and
  ``conversation``; each request draws one row of its service from the Azure LLM inference
  trace 2023 (its context and generated token counts, times ``scale`` and ``output_scale``).
* SLO of a request: its prompt's TTFT alone + ``slack`` x the TTFT alone of the group's long
  prompt (paper mix: the 8k one; trace: the service's 90th percentile) + ``floor``
  [inferred, the forwarding experiment's rule].
* A: the most users of ONE group at which local-queue meets every request's SLO; a run with
  ``groups`` groups then has ``load x A x groups`` users.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..profile import Profile
from .model import SimConfig, SimRequest, Simulation, summarize


@dataclass
class Mix:
    """Per-group request lengths; ``draw(group, rng) -> (scenario, prompt, setting, output)``."""

    name: str
    draw: Callable[[int, np.random.Generator], tuple[str, int, int, int]]
    long_tokens: dict[str, int]  # scenario -> the "long" prompt of its SLO rule
    settings: dict[str, int]


def paper_mix(scale: float = 1 / 16, output_tokens: int = 16) -> Mix:
    setting = max(1, round(100 * scale))
    long_n, short_n = round(8192 * scale), round(2048 * scale)

    def draw(_g: int, rng: np.random.Generator) -> tuple[str, int, int, int]:
        return "mixed", (long_n if rng.random() < 0.25 else short_n), setting, output_tokens

    return Mix("paper", draw, {"mixed": long_n}, {"mixed": setting})


def azure_mix(scale: float = 1 / 16, output_scale: float = 1 / 16, max_output: int = 32,
              setting_tokens: int = 4) -> Mix:  # fmt: skip
    from ..workload import load_trace

    rows = {}
    for name in ("code", "conversation"):
        tr = load_trace(name)
        p = np.array([max(2, round(r.context_tokens * scale)) for r in tr])
        o = np.array([min(max_output, max(2, round(r.generated_tokens * output_scale))) for r in tr])
        rows[name] = (p, o)
    names = ("code", "conversation")

    def draw(g: int, rng: np.random.Generator) -> tuple[str, int, int, int]:
        name = names[g % 2]
        p, o = rows[name]
        i = int(rng.integers(len(p)))
        return name, int(p[i]), min(setting_tokens, int(p[i]) // 2), int(o[i])

    long_n = {n: int(np.percentile(rows[n][0], 90)) for n in names}
    return Mix("azure", draw, long_n, dict.fromkeys(names, setting_tokens))


def slo_rule(
    profile: Profile, mix: Mix, slack: float = 0.5, floor: float = 0.05
) -> Callable[[str, int], float]:
    def alone(scenario: str, n: int) -> float:
        return profile.prefill_s(max(1, n - mix.settings[scenario]))

    def slo(scenario: str, n: int) -> float:
        return alone(scenario, n) + slack * alone(scenario, mix.long_tokens[scenario]) + floor

    return slo


def closed_loop(cfg: SimConfig, mix: Mix, users: int, duration_s: float, slack: float = 0.5,
                floor: float = 0.05, seed: int = 0, gateways: int = 1) -> dict[str, Any]:  # fmt: skip
    """``users`` closed-loop users spread over the groups (user u in group u % groups), started
    over one user's cycle alone (the ramp), measured for ``duration_s`` after it; requests that
    started in the window are followed to their end."""
    sim = Simulation(cfg, seed=seed, gateways=gateways)
    slo = slo_rule(cfg.profile, mix, slack, floor)
    rng0 = np.random.default_rng(seed + 99)
    probe = [mix.draw(0, rng0) for _ in range(200)]
    cycle = float(
        np.mean([cfg.profile.prefill_s(p - s) + o * cfg.profile.decode_s(1) for _, p, s, o in probe])
    )
    ramp = cycle
    ids = itertools.count()

    def make(u: int, now: float, rng: np.random.Generator) -> SimRequest:
        g = u % cfg.groups
        scen, p, s, o = mix.draw(g, rng)
        return SimRequest(next(ids), g, scen, p, s, o, now, now + slo(scen, p), user=u)

    end = ramp + duration_s
    sim.add_users(users, make, ramp_s=ramp, until=end)
    sim.run(end + 4 * cycle + 60.0)  # let the window's requests finish
    window = [r for r in sim.requests if ramp <= r.arrival < end]
    out = summarize(window, duration_s)
    out.update(users=users, events=sim.events, ramp_s=ramp)
    return out


def find_a(cfg: SimConfig, mix: Mix, duration_s: float, max_a: int = 256, **kw: Any) -> int:
    """A for ONE group of ``cfg`` (its ``groups`` is ignored), as the forwarding experiment
    searches it: from n_prefill x b_p users up while every request succeeds."""
    one = dataclasses.replace(cfg, groups=1, policy="local-queue")

    def ok(users: int) -> bool:
        return closed_loop(one, mix, users, duration_s, **kw)["success_rate"] == 1.0

    users = min(one.n_prefill * one.b_p, max_a)
    if ok(users):
        while users < max_a and ok(users + 1):
            users += 1
        return users
    while users > 1:
        users -= 1
        if ok(users):
            return users
    raise RuntimeError("local-queue misses the SLO even with one user (simulated)")
