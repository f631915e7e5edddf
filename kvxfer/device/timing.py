"""Timing model of one P/D-Device request [inferred: research notes 2.4, our reconstruction].

Notation: L prompt tokens, rho keep ratio, n cloud tokens (first one included), A1 arrival of the
first cloud token at the device, tau_c cloud token interval, P_d(x) = x / prefill rate, c_d the
device's cost per absorbed cloud token, tau_d the device decode step, theta the TPOT cap.

    T_ready = t_rho + P_d(rho L - reused)        device has the prompt in its KV
    T_catch = max(T_ready, A_n) + c_d n          (batch variant; the runtime absorbs progressively)
    n*(rho) = min { n : (T_catch(n, rho) - A1) / n <= theta }

Refinement [inferred]: the refined prompt keeps ``refined_len(L, rho, sys, query)`` tokens; it
arrives with the first token (t_rho = A1). The device starts prefilling the raw prompt at time 0;
at t_rho it keeps the KV of the longest common prefix of what it prefilled and the refined
prompt, which is at least the system part (the refiner always keeps it whole, at the front).
If the raw prompt was fully prefilled before the refined prompt arrived, the device keeps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def refined_len(prompt_len: int, rho: float, system_len: int = 0, query_len: int = 0) -> int:
    """Tokens the refined prompt keeps: round(rho L), never fewer than the system part plus the
    query (which are always kept), never more than L."""
    if rho >= 1.0:
        return prompt_len
    return min(prompt_len, max(int(round(rho * prompt_len)), system_len + query_len))


@dataclass(frozen=True)
class Conditions:
    """What one request will meet (true or estimated)."""

    prompt_len: int
    answer_len: int
    prefill_tok_s: float  # device prompt prefill rate
    c_d: float  # device seconds per absorbed cloud token
    tau_d: float  # device decode step (s)
    a1: float  # first cloud token at the device (s after the request starts)
    tau_c: float  # cloud token interval as seen at the device (s)
    system_len: int = 0
    query_len: int = 0


def t_ready(c: Conditions, rho: float) -> tuple[float, int]:
    """(time the device has its prompt in KV, prompt tokens it prefilled in all)."""
    full = c.prompt_len / c.prefill_tok_s
    if rho >= 1.0:
        return full, c.prompt_len
    if full <= c.a1:  # raw prompt done before the refined one arrives: keep the raw one
        return full, c.prompt_len
    done_raw = c.prefill_tok_s * c.a1
    reused = min(done_raw, c.system_len)
    r = refined_len(c.prompt_len, rho, c.system_len, c.query_len)
    return c.a1 + max(0.0, r - reused) / c.prefill_tok_s, r


def t_catch(c: Conditions, rho: float, n: int) -> float:
    """Catch-up time with progressive absorption of cloud tokens arriving at A1 + k tau_c."""
    t, _ = t_ready(c, rho)
    absorbed = 0
    while absorbed < n:
        arrived = min(n, int(math.floor((t - c.a1) / c.tau_c)) + 1) if t >= c.a1 else 0
        if arrived > absorbed:
            t += c.c_d * (arrived - absorbed)
            absorbed = arrived
        else:
            t = c.a1 + absorbed * c.tau_c  # wait for the next one
    return t


def n_star(c: Conditions, rho: float, theta: float, safety: float = 0.9) -> int:
    """Fewest cloud tokens whose paced display (at most ``safety * theta`` apart) covers the
    time until the device emits token n+1. ``safety`` leaves room for jitter [inferred]."""
    th = theta * safety
    if th <= c.c_d:
        return c.answer_len
    ready, _ = t_ready(c, rho)
    n = max(1, math.ceil((ready - c.a1) / (th - c.c_d)))
    # the closed form assumes every token has arrived by T_ready; step up when they have not
    while n < c.answer_len and (t_catch(c, rho, n) - c.a1) / n > th:
        n += 1
    return min(n, c.answer_len)


def cloud_cost(prefill_s: float, n: int, tau_busy: float) -> float:
    """Cloud busy seconds for a request that generates ``n`` tokens (first one included)."""
    return prefill_s + max(0, n - 1) * tau_busy
