"""The P/D ratio: Eq. 1 planner and the online monitor [paper: P/D-Serve sections 2.1 and 3.4].

Eq. 1 matches prefill and decode capacity: ``n_p b_p / T_p ~= n_d b_d / T_d``, hence
``n_p / n_d ~= (b_d T_p) / (b_p T_d)``, with ``T_p = TTFT x r_pre`` (prefill time per batch,
prefix reuse included) and ``T_d = xi + TPOT(b_d) x G`` (the time a request holds a decode
slot: its KV transfer plus G decode steps at the full batch). Throughput of a split is
``min(I_t, n_p b_p / T_p, n_d b_d / T_d)`` [paper]; normalized by ``n_p + n_d`` it is Φ.

For part 1's workers, a prefill runs one prompt at a time on its compute thread (its b_p
slots only hold KV until it has left), so the effective prefill batch is 1 [inferred: what our
workers do; the paper's NPUs batch prompts].

:class:`RatioMonitor` is the online trigger [paper]: per period it compares the mean E2E
latency and the share ``T_p / E2E`` with the previous period's; E2E up and share up means
prefill is the bottleneck (add a prefill), E2E up and share down means decode is (add a
decode); one instance per decision, then a cool-down of ``cooldown`` periods (gradual steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..profile import Profile


@dataclass(frozen=True)
class RatioInputs:
    t_p: float  # s per prefill batch (TTFT x r_pre)
    b_p: int
    t_d: float  # s a request holds a decode slot (xi + TPOT(b_d) x G)
    b_d: int
    r_pre: float = 1.0
    xi: float = 0.0

    @classmethod
    def from_profile(
        cls, profile: Profile, prompt_tokens: int, output_tokens: int, b_d: int, setting_tokens: int = 0,
        xi: float = 0.0, b_p: int = 1,
    ) -> RatioInputs:  # fmt: skip
        """From a measured profile and a scenario's lengths; ``setting_tokens`` is the part a
        prefix hit saves (r_pre = TTFT(prompt - setting) / TTFT(prompt))."""
        full = profile.prefill_s(prompt_tokens)
        t_p = profile.prefill_s(max(1, prompt_tokens - setting_tokens))
        # the first token comes from the prefill: G - 1 decode steps at the full batch
        t_d = xi + profile.decode_s(b_d) * max(1, output_tokens - 1)
        return cls(t_p, b_p, t_d, b_d, r_pre=t_p / full if full else 1.0, xi=xi)

    def prefill_rps(self, n_p: int) -> float:
        return n_p * self.b_p / self.t_p

    def decode_rps(self, n_d: int) -> float:
        return n_d * self.b_d / self.t_d

    def throughput(self, n_p: int, n_d: int, traffic_rps: float = float("inf")) -> float:
        return min(traffic_rps, self.prefill_rps(n_p), self.decode_rps(n_d))


def plan(inputs: RatioInputs, budget: int, min_per_role: int | None = None) -> tuple[int, int]:
    """The Eq. 1 split of ``budget`` instances: ``n_p = budget x r / (1 + r)`` with
    ``r = (b_d T_p) / (b_p T_d)``, rounded, and at least ``min_per_role`` of each role
    (default: 2 when the budget allows, so no role has a single point of failure [paper])."""
    if min_per_role is None:
        min_per_role = 2 if budget >= 4 else 1
    if budget < 2 * min_per_role:
        from ..errors import ConfigError

        raise ConfigError(f"a budget of {budget} cannot hold {min_per_role} instance(s) of each role")
    r = (inputs.b_d * inputs.t_p) / (inputs.b_p * inputs.t_d)
    n_p = round(budget * r / (1 + r))
    n_p = max(min_per_role, min(budget - min_per_role, n_p))
    return n_p, budget - n_p


def brute_force(inputs: RatioInputs, budget: int) -> list[tuple[int, int, float]]:
    """Every split with at least one of each role, with its Eq. 1 throughput, best first."""
    rows = [(n_p, budget - n_p, inputs.throughput(n_p, budget - n_p)) for n_p in range(1, budget)]
    return sorted(rows, key=lambda x: -x[2])


@dataclass
class RatioMonitor:
    """Feed ``observe(e2e_s, t_p_s)`` per finished request and call ``decide()`` once per
    period: returns "prefill", "decode" or None. ``rise`` is the relative E2E increase that
    counts as "rising" (default 10%)."""

    rise: float = 0.10
    cooldown: int = 1
    _e2e: list[float] = field(default_factory=list)
    _tp: list[float] = field(default_factory=list)
    _prev: tuple[float, float] | None = None
    _base: tuple[float, float] | None = None
    _wait: int = 0
    history: list[dict] = field(default_factory=list)

    def observe(self, e2e_s: float, t_p_s: float) -> None:
        self._e2e.append(e2e_s)
        self._tp.append(t_p_s)

    def decide(self) -> str | None:
        if not self._e2e:
            return None
        e2e = sum(self._e2e) / len(self._e2e)
        share = sum(self._tp) / max(1e-12, sum(self._e2e))
        self._e2e.clear()
        self._tp.clear()
        prev, self._prev = self._prev, (e2e, share)
        if self._base is None:
            self._base = (e2e, share)
        action = None
        if prev is not None and self._wait == 0:
            base_e2e, base_share = self._base
            if e2e > base_e2e * (1 + self.rise):  # E2E rising against the settled level
                action = "prefill" if share > base_share else "decode"
        if action is not None:
            self._wait = self.cooldown
            self._base = None  # settle again after the step
        elif self._wait:
            self._wait -= 1
        self.history.append({"e2e_s": e2e, "tp_share": share, "action": action})
        return action
