"""The gateway's forwarding policy as a plain object, shared by the real gateway
(:mod:`kvxfer.serve.gateway`) and the simulator (:mod:`kvxfer.serve.sim`): the same ranking,
batch forwarding, down-marking and retry back-off decide in both.

* ``rank(pool, scenario, now)``: the prefills of a scenario in the order to try them: those
  not marked down, fewest open streams first (this gateway's own count), ties rotating
  round-robin; with ``reject-retry`` and batch forwarding, the prefill that accepted last in
  the scenario first, until it rejects [paper: on-demand forwarding and batch forwarding].
* ``accepted`` / ``rejected`` / ``unreachable`` update that state; ``opened`` / ``closed``
  count streams; ``pause(rounds)`` is the wait after a round in which every candidate
  rejected: ``retry_interval_s`` doubling per round up to ``retry_max_interval_s``, times a
  jitter in [0.5, 1) [inferred].
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

POLICIES = ("reject-retry", "local-queue")


class ForwardingPolicy:
    def __init__(
        self,
        policy: str = "reject-retry",
        batch_forwarding: bool = True,
        down_for_s: float = 1.0,
        retry_interval_s: float = 0.002,
        retry_max_interval_s: float = 0.01,
        seed: int = 0,
    ) -> None:
        if policy not in POLICIES:
            from kvxfer.errors import InvalidArgumentError

            raise InvalidArgumentError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        self.policy = policy
        self.batch_forwarding = batch_forwarding
        self.down_for_s = down_for_s
        self.retry_interval_s = retry_interval_s
        self.retry_max_interval_s = retry_max_interval_s
        self.open_streams: dict[str, int] = {}
        self.sticky: dict[str, str] = {}  # scenario -> the prefill that accepted last
        self.down_until: dict[str, float] = {}
        self.rr = itertools.count()
        self.jitter = random.Random(seed)

    def rank(self, pool: Sequence[str], scenario: str, now: float) -> list[str]:
        up = [u for u in pool if self.down_until.get(u, 0.0) <= now] or list(pool)
        rot = next(self.rr) % len(up)
        up = up[rot:] + up[:rot]  # ties rotate round-robin (sorted() is stable)
        ranked = sorted(up, key=lambda u: self.open_streams.get(u, 0))
        if self.policy == "reject-retry" and self.batch_forwarding:
            sticky = self.sticky.get(scenario)
            if sticky in ranked:
                ranked.remove(sticky)
                ranked.insert(0, sticky)
        return ranked

    def opened(self, url: str) -> None:
        self.open_streams[url] = self.open_streams.get(url, 0) + 1

    def closed(self, url: str) -> None:
        self.open_streams[url] -= 1

    def accepted(self, scenario: str, url: str) -> None:
        self.sticky[scenario] = url

    def rejected(self, scenario: str, url: str) -> None:
        if self.sticky.get(scenario) == url:
            del self.sticky[scenario]

    def unreachable(self, url: str, now: float) -> None:
        self.down_until[url] = now + self.down_for_s

    def pause(self, rounds: int) -> float:
        base = min(self.retry_max_interval_s, self.retry_interval_s * 2 ** min(rounds - 1, 30))
        return base * (0.5 + 0.5 * self.jitter.random())
