"""Settings algorithm: per request, choose the method and (n, rho).

[abstract] an algorithm decides the best settings; [3rd-party] the knobs are the number of cloud
tokens and the refinement ratio, decided from observed trajectories.
[inferred] (research notes 2.4 / D5): minimize the cloud cost ``P_c(L) + (n - 1) tau_busy``
subject to TTFT <= SLO, max displayed TPOT <= theta and quality(rho) >= q_min, over a grid of rho
with n = n*(rho) in closed form; the inputs are EWMA estimates per (device class, prompt-length
bucket) of the device prefill rate, per-token absorb cost, decode step, first-token arrival and
cloud token interval, updated after every request from what it measured. No cloud help when the
device alone meets the TTFT SLO (short prompts); cloud-only when the device decodes slower than
theta, or when no (n, rho) beats streaming the whole answer.

:func:`oracle` is the comparison point: it knows the request's true conditions and searches
(method, n, rho) on the simulator for the cheapest setting that meets every constraint.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from kvxfer.device.errors import BadSettingsError
from kvxfer.device.profiles import DeviceProfile
from kvxfer.device.sim import CLOUD_ONLY, DEVICE_ONLY, PD, Env, Outcome, simulate
from kvxfer.device.timing import Conditions, cloud_cost, n_star

BUCKETS = (256, 512, 1024, 2048, 4096, 8192)  # upper edges; one more bucket past the last
RHO_GRID = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3)


def bucket(prompt_len: int) -> int:
    """Index of the prompt-length bucket."""
    return bisect.bisect_left(BUCKETS, prompt_len)


@dataclass(frozen=True)
class Policy:
    ttft_slo: float = 1.0  # s
    theta: float = 0.05  # max displayed TPOT, s
    q_min: float = 0.9
    delta_min: float = 0.01
    safety: float = 0.9  # plan the pacing at safety * theta [inferred]


@dataclass(frozen=True)
class Settings:
    method: str  # PD | DEVICE_ONLY | CLOUD_ONLY
    n: int = 0
    rho: float = 1.0
    predicted_cost: float = 0.0
    reason: str = ""


class Ewma:
    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.value: float | None = None
        self.count = 0

    def update(self, x: float) -> None:
        if not math.isfinite(x):
            return
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x
        self.count += 1


FIELDS = ("prefill_tok_s", "c_d", "tau_d", "a1", "tau_c", "cloud_prefill_s", "tau_busy")


class Estimates:
    """EWMA per (device class, prompt-length bucket) of every timing input, with priors from
    the device profile and the cloud figures given at construction."""

    def __init__(self, priors: dict[str, DeviceProfile], cloud_prior: dict[str, float], alpha: float = 0.3):
        self.priors = priors
        self.cloud_prior = dict(cloud_prior)  # a1_base, a1_per_token, tau_c, prefill_per_token, tau_busy
        self.alpha = alpha
        self._e: dict[tuple[str, int, str], Ewma] = {}

    def _get(self, cls: str, b: int, f: str) -> float | None:
        e = self._e.get((cls, b, f))
        return None if e is None else e.value

    def observe(self, cls: str, prompt_len: int, **measured: float) -> None:
        b = bucket(prompt_len)
        for f, x in measured.items():
            if f not in FIELDS:
                raise BadSettingsError(f"unknown measurement {f!r}; known: {FIELDS}")
            if x is None:
                continue
            self._e.setdefault((cls, b, f), Ewma(self.alpha)).update(float(x))

    def conditions(self, cls: str, prompt_len: int, answer_len: int, system_len=0, query_len=0) -> tuple:
        """(Conditions, cloud_prefill_s, tau_busy) as currently estimated."""
        if cls not in self.priors:
            raise BadSettingsError(f"unknown device class {cls!r}")
        p, cp, b = self.priors[cls], self.cloud_prior, bucket(prompt_len)

        def g(f: str, prior: float) -> float:
            v = self._get(cls, b, f)
            return prior if v is None else v

        prefill_prior = cp["prefill_base"] + cp["prefill_per_token"] * prompt_len
        cond = Conditions(
            prompt_len=prompt_len,
            answer_len=answer_len,
            prefill_tok_s=g("prefill_tok_s", p.prefill_tok_s),
            c_d=g("c_d", p.c_d),
            tau_d=g("tau_d", p.tau_d),
            a1=g("a1", cp["rtt"] + prefill_prior),
            tau_c=g("tau_c", cp["tau_c"]),
            system_len=system_len,
            query_len=query_len,
        )
        return cond, g("cloud_prefill_s", prefill_prior), g("tau_busy", cp["tau_busy"])


def choose(
    cond: Conditions,
    cloud_prefill_s: float,
    tau_busy: float,
    policy: Policy,
    quality: Callable[[float], float],
) -> Settings:
    """The decision rule on (estimated) conditions."""
    g = cond.answer_len
    cloud_only_cost = cloud_cost(cloud_prefill_s, g, tau_busy)
    device_ttft = cond.prompt_len / cond.prefill_tok_s
    if cond.tau_d > policy.theta:
        return Settings(CLOUD_ONLY, g, 1.0, cloud_only_cost, "device decodes slower than theta")
    if device_ttft <= policy.ttft_slo:
        return Settings(DEVICE_ONLY, 0, 1.0, 0.0, "device alone meets the TTFT SLO")
    best: Settings | None = None
    for rho in RHO_GRID:
        if quality(rho) < policy.q_min:
            continue
        n = n_star(cond, rho, policy.theta, policy.safety)
        if n >= g:
            continue
        cost = cloud_cost(cloud_prefill_s, n, tau_busy)
        if best is None or cost < best.predicted_cost - 1e-12:
            best = Settings(PD, n, rho, cost, "cheapest feasible (n, rho)")
    if best is None or best.predicted_cost >= cloud_only_cost:
        return Settings(CLOUD_ONLY, g, 1.0, cloud_only_cost, "no (n, rho) cheaper than the whole answer")
    return best


def feasible(o: Outcome, policy: Policy, quality_ok: bool) -> bool:
    return o.ttft <= policy.ttft_slo + 1e-9 and o.tpot_max <= policy.theta + 1e-9 and quality_ok


def oracle(env: Env, policy: Policy, quality: Callable[[float], float]) -> tuple[Settings, Outcome]:
    """Cheapest setting meeting every constraint on the true conditions (simulated); when none
    does, the one with the smallest constraint violation, cloud-only first."""
    g = env.cond.answer_len
    dev = simulate(env, DEVICE_ONLY)
    if feasible(dev, policy, True):
        return Settings(DEVICE_ONLY, 0, 1.0, 0.0, "oracle"), dev
    cands: list[tuple[float, Settings, Outcome]] = []
    for rho in RHO_GRID:
        if quality(rho) < policy.q_min:
            continue
        lo, hi = 1, g
        run = lambda n, r=rho: simulate(env, PD, n, r, policy.theta, policy.delta_min, quality(r))  # noqa: E731
        if not feasible(run(hi), policy, True):
            continue
        while lo < hi:  # feasibility is monotone in n (more cloud tokens never widen a gap)
            mid = (lo + hi) // 2
            if feasible(run(mid), policy, True):
                hi = mid
            else:
                lo = mid + 1
        o = run(lo)
        cands.append((o.cloud_busy, Settings(PD, lo, rho, o.cloud_busy, "oracle"), o))
    cloud = simulate(env, CLOUD_ONLY)
    if feasible(cloud, policy, True):
        cands.append((cloud.cloud_busy, Settings(CLOUD_ONLY, g, 1.0, cloud.cloud_busy, "oracle"), cloud))
    if not cands:
        return Settings(CLOUD_ONLY, g, 1.0, cloud.cloud_busy, "oracle: nothing feasible"), cloud
    cands.sort(key=lambda x: x[0])
    return cands[0][1], cands[0][2]


def run_settings(env: Env, s: Settings, policy: Policy, quality: Callable[[float], float]) -> Outcome:
    if s.method == PD:
        return simulate(env, PD, s.n, s.rho, policy.theta, policy.delta_min, quality(s.rho))
    return simulate(env, s.method)


def with_answer(cond: Conditions, answer_len: int) -> Conditions:
    return replace(cond, answer_len=answer_len)
