"""Discrete-event simulation of one request under each method, driving the real :class:`Pacer`
with a fake clock. Used by the settings algorithm's oracle and by the trace-driven regret study.

Methods: ``pd-device`` (cloud first tokens + pacer + refinement, device takes over),
``device-only``, ``cloud-only`` (the whole answer streamed from the cloud, shown on arrival),
``naive-hybrid`` [inferred reading of the brief]: the cloud's tokens are shown as they arrive
(no pacer) and the device prefills the raw prompt (no refinement), then takes over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvxfer.device.pacer import Pacer
from kvxfer.device.timing import Conditions, cloud_cost, t_ready

PD = "pd-device"
DEVICE_ONLY = "device-only"
CLOUD_ONLY = "cloud-only"
NAIVE = "naive-hybrid"
METHODS = (PD, DEVICE_ONLY, CLOUD_ONLY, NAIVE)


@dataclass(frozen=True)
class Env:
    """The truth one request meets. ``cond`` holds the device and link timings as seen on the
    device; ``cloud_prefill_s`` and ``tau_busy`` are the cloud's own busy times."""

    cond: Conditions
    cloud_prefill_s: float
    tau_busy: float
    rtt: float = 0.02
    jitter: tuple[float, ...] = ()  # extra delay per cloud token index (s), monotone arrivals kept
    link_down_at: float | None = None  # the link breaks at this time (s), never comes back


@dataclass
class Outcome:
    method: str
    n: int
    rho: float
    ttft: float
    gaps: list[float] = field(default_factory=list)
    cloud_busy: float = 0.0
    cloud_tokens: int = 0
    handoff: int | None = None
    t_catch: float | None = None
    quality: float = 1.0
    link_gap: float | None = None

    @property
    def tpot_max(self) -> float:
        return max(self.gaps, default=0.0)

    @property
    def tpot_p99(self) -> float:
        return percentile(self.gaps, 99)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _arrivals(env: Env, count: int) -> list[float]:
    c = env.cond
    out, last = [], 0.0
    for k in range(count):
        j = env.jitter[k] if k < len(env.jitter) else 0.0
        last = max(last, c.a1 + k * c.tau_c + j)
        out.append(last)
    return out


def simulate(
    env: Env,
    method: str,
    n: int = 1,
    rho: float = 1.0,
    theta: float = 0.05,
    delta_min: float = 0.01,
    quality: float = 1.0,
) -> Outcome:
    c = env.cond
    g = c.answer_len
    if method == DEVICE_ONLY:
        ready = c.prompt_len / c.prefill_tok_s
        return Outcome(method, 0, 1.0, ready, [c.tau_d] * (g - 1), 0.0, 0, quality=1.0)
    if method == CLOUD_ONLY:
        arr = _arrivals(env, g)
        if env.link_down_at is not None:
            arr = [a for a in arr if a <= env.link_down_at]
        gaps = [arr[i] - arr[i - 1] for i in range(1, len(arr))]
        busy = cloud_cost(env.cloud_prefill_s, g, env.tau_busy)
        return Outcome(method, g, 1.0, arr[0] if arr else math.inf, gaps, busy, g)

    if method == NAIVE:
        rho = 1.0
    n = max(1, min(n, g))
    arr = _arrivals(env, n)
    sent = n
    if env.link_down_at is not None:
        arr = [a for a in arr if a <= env.link_down_at]
    ready, _ = t_ready(c, rho)
    # progressive absorption; the device takes over once it has absorbed all that arrived and
    # either the quota is in or nothing more is on the way
    t, absorbed = ready, 0
    total = len(arr)
    while True:
        got = sum(1 for a in arr if a <= t)
        if got > absorbed:
            t += c.c_d * (got - absorbed)
            absorbed = got
        elif absorbed == total or absorbed >= 1:
            break  # nothing more will come, or the device is ahead of the cloud: take over
        else:
            t = arr[0]
    h = max(absorbed, 1)
    t_catch = t
    if absorbed == 0:  # nothing arrived at all (link down before the first token)
        return simulate(env, DEVICE_ONLY)
    # the cloud stops when the catch-up signal reaches it (half an RTT later) or at its quota
    stop_at = t_catch + env.rtt / 2
    generated = min(sent, 1 + max(0, math.floor((stop_at - c.a1 + env.rtt / 2) / c.tau_c)))
    generated = max(generated, h)
    busy = cloud_cost(env.cloud_prefill_s, generated, env.tau_busy)

    if method == NAIVE:
        pacer = Pacer(theta=max(theta, 1e-9), delta_min=0.0, handoff=n, t_catch=None)
    else:
        pacer = Pacer(theta=theta, delta_min=delta_min, handoff=n, t_catch=t_catch)
    events: list[tuple[float, int, int]] = [(a, 0, k) for k, a in enumerate(arr)]
    events.append((t_catch, 1, h))
    for j in range(g - h):
        events.append((t_catch + j * c.tau_d, 2, h + j))
    events.sort()
    i = 0
    while len(pacer.shown) < g:
        due = pacer.next_due()
        nxt = events[i][0] if i < len(events) else math.inf
        if due is not None and due <= nxt:
            pacer.release(due)
            continue
        if i >= len(events):
            break
        tt, kind, k = events[i]
        i += 1
        if kind == 0:
            pacer.cloud_token(k, 0, tt)
        elif kind == 1:
            pacer.fix_handoff(k)
        else:
            pacer.device_token(k, 0, tt)
    gaps = pacer.gaps()
    link_gap = None
    if env.link_down_at is not None and len(arr) < sent:
        link_gap = max(gaps[h - 1 :], default=0.0) if h >= 1 else None
    return Outcome(
        method,
        n,
        rho,
        pacer.shown[0].shown,
        gaps,
        busy,
        generated,
        h,
        t_catch,
        quality,
        link_gap,
    )
