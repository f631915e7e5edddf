"""Discrete-event model of part 1's workers and gateway, for hundreds to thousands of instances.

What is modelled, and from what (the real code it stands for in brackets):

* **Gateway** [gateway.py]: the SAME :class:`~kvxfer.serve.policy.ForwardingPolicy` object
  ranks a group's prefills; ``reject-retry`` requests of a scenario take turns through an
  earliest-deadline gate (one probes, the others wait), a round of probes costs one
  ``rtt_s`` per prefill tried, a round in which all rejected is followed by ``policy.pause``,
  and a request that cannot make its deadline by the profile's TTFT alone is dropped early.
  ``local-queue`` pushes to the fewest-streams prefill, which queues in FIFO order. The
  first-token deadline is enforced: a request without a first token by then fails.
* **Prefill** [prefill.py]: ``b_p`` slots, one compute thread (prompts run one at a time, as
  the workers do), prefix reuse of the scenario's setting part after the first prompt of a
  scenario on that prefill, timeouts checked before execution; a slot is held until the KV
  has left. Prefill time: the profile's TTFT for the tokens computed.
* **Decode** [decode.py, batcher.py]: ``b_d`` running slots and a pending queue of
  ``pending``; a prefill hands over to the decode with the fewest requests, retrying every
  ``decode_retry_s`` while every decode is full; retrieval takes ``xi(tokens)`` = KV bytes /
  ``kv_bytes_per_s``; continuous batching, one step = the profile's TPOT at the batch size;
  requests join at the next step.
* **Users**: closed loop (the next request when the previous one ends), started evenly over
  ``ramp_s`` as the load generator does.

Not modelled [inferred simplifications]: HTTP and relay overheads beyond ``rtt_s``, CPU
contention between processes, the decode's KV-block budget (the pending cap bounds it).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..policy import ForwardingPolicy
from ..profile import Profile


@dataclass
class SimConfig:
    profile: Profile
    groups: int = 1
    n_prefill: int = 4
    n_decode: int = 2
    b_p: int = 1
    b_d: int = 16
    pending: int = 4
    policy: str = "reject-retry"
    rtt_s: float = 0.002  # one gateway -> prefill attempt (a 429 round trip: 1.9 ms median here)
    decode_retry_s: float = 0.005
    kv_bytes_per_token: int = 0  # 0 = from the profile's model configuration (float32)
    kv_bytes_per_s: float = 6e9  # retrieval bandwidth (block-free over shm: 5-7 GB/s here)
    prefix_reuse: bool = True
    early_drop: bool = True

    def xi(self, tokens: int) -> float:
        per_tok = self.kv_bytes_per_token
        if not per_tok:
            c = self.profile.config
            kv_heads = c.get("num_key_value_heads", c.get("num_attention_heads", 1))
            head_dim = c.get("head_dim", c.get("hidden_size", 64) // max(1, c.get("num_attention_heads", 1)))
            per_tok = c.get("num_hidden_layers", 1) * 2 * kv_heads * head_dim * 4
        return tokens * per_tok / self.kv_bytes_per_s


@dataclass
class SimRequest:
    rid: int
    group: int
    scenario: str
    prompt_tokens: int
    setting_tokens: int
    output_tokens: int
    arrival: float
    deadline: float
    user: int = -1
    prefill: int = -1
    decode: int = -1
    retries: int = 0
    rounds: int = 0
    accept: float | None = None
    first_token: float | None = None
    done: float | None = None
    error: str | None = None
    tokens_left: int = 0
    prefill_start: float | None = None
    prefill_end: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def success(self) -> bool:
        return self.error is None and self.first_token is not None and self.first_token <= self.deadline


@dataclass
class _Prefill:
    idx: int
    group: int
    url: str
    free: int
    queue: deque = field(default_factory=deque)  # local-queue: waiting for a slot
    compute: deque = field(default_factory=deque)  # admitted, waiting for the compute thread
    busy: bool = False
    seen: set = field(default_factory=set)  # scenarios with a cached setting part
    computed_tokens: int = 0
    busy_s: float = 0.0


@dataclass
class _Decode:
    idx: int
    group: int
    pending: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    joining: list = field(default_factory=list)
    retrieving: int = 0
    stepping: bool = False
    steps: int = 0


class Simulation:
    """``Simulation(cfg)``; ``add_users(...)`` or ``submit(...)``; ``run(until)``; results in
    ``requests``. One :class:`ForwardingPolicy` per gateway (``gateways``, each request uses
    gateway ``rid % gateways``), as several real gateways do not coordinate."""

    def __init__(self, cfg: SimConfig, seed: int = 0, gateways: int = 1) -> None:
        self.cfg = cfg
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._seq = itertools.count()
        self.rng = np.random.default_rng(seed)
        self.policies = [ForwardingPolicy(cfg.policy, seed=seed + i) for i in range(gateways)]
        self.prefills = [_Prefill(g * cfg.n_prefill + i, g, f"sim://g{g}/p{i}", cfg.b_p)
                         for g in range(cfg.groups) for i in range(cfg.n_prefill)]  # fmt: skip
        self.decodes = [
            _Decode(g * cfg.n_decode + j, g) for g in range(cfg.groups) for j in range(cfg.n_decode)
        ]
        self._by_url = {p.url: p for p in self.prefills}
        # the live members of each group (the control plane changes them: see convert())
        self.group_prefills: list[list[str]] = [
            [p.url for p in self.prefills if p.group == g] for g in range(cfg.groups)
        ]
        self.group_decodes: list[list[_Decode]] = [
            [d for d in self.decodes if d.group == g] for g in range(cfg.groups)
        ]
        self.conversions: list[dict[str, Any]] = []
        self.requests: list[SimRequest] = []
        self._gate_wait: dict[tuple[int, str], list] = {}
        self._gate_busy: dict[tuple[int, str], bool] = {}
        self.on_done: Callable[[SimRequest], None] | None = None
        self.events = 0

    # -- event core ------------------------------------------------------------------------
    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, args))

    def run(self, until: float) -> None:
        while self._heap and self._heap[0][0] <= until:
            t, _, fn, args = heapq.heappop(self._heap)
            self.now = t
            self.events += 1
            fn(*args)
        self.now = until

    # -- arrivals --------------------------------------------------------------------------
    def submit(self, req: SimRequest) -> None:
        """``req`` arrives at ``req.arrival``."""
        self.at(req.arrival, self._arrive, req)

    def add_users(
        self,
        users: int,
        make: Callable[[int, float, np.random.Generator], SimRequest],
        ramp_s: float = 0.0,
        until: float = float("inf"),
    ) -> None:
        """Closed-loop users: ``make(user, now, rng)`` builds a user's next request."""

        def issue(u: int) -> None:
            if self.now < until:
                self.submit(make(u, self.now, self.rng))

        def done(r: SimRequest) -> None:
            if r.user >= 0:
                issue(r.user)

        self.on_done = done
        for u in range(users):
            self.at(u * ramp_s / users, issue, u)

    def _arrive(self, req: SimRequest) -> None:
        self.requests.append(req)
        if self.cfg.policy == "reject-retry":
            key = (req.group, req.scenario)
            heapq.heappush(self._gate_wait.setdefault(key, []), (req.deadline, req.rid, req))
            self._gate_next(key)
        else:
            pol = self._policy(req)
            url = pol.rank(self._pool(req.group), req.scenario, self.now)[0]
            pol.opened(url)
            req.prefill = self._by_url[url].idx
            req.accept = self.now + self.cfg.rtt_s
            self.at(req.accept, self._queue_at_prefill, req)
            self.at(req.deadline, self._first_token_deadline, req)

    def _policy(self, req: SimRequest) -> ForwardingPolicy:
        return self.policies[req.rid % len(self.policies)]

    def _pool(self, group: int) -> list[str]:
        return self.group_prefills[group]

    def _finish(self, req: SimRequest, error: str | None = None) -> None:
        if req.done is not None:
            return
        req.done = self.now
        req.error = req.error or error
        if req.prefill >= 0 and req.accept is not None:
            self._policy(req).closed(self.prefills[req.prefill].url)
        if self.on_done is not None:
            self.on_done(req)

    # -- gateway: reject-retry through the earliest-deadline gate --------------------------
    def _gate_next(self, key: tuple[int, str]) -> None:
        if self._gate_busy.get(key) or not self._gate_wait.get(key):
            return
        _, _, req = heapq.heappop(self._gate_wait[key])
        self._gate_busy[key] = True
        self._probe(req, key)

    def _gate_release(self, key: tuple[int, str]) -> None:
        self._gate_busy[key] = False
        self._gate_next(key)

    def _probe(self, req: SimRequest, key: tuple[int, str]) -> None:
        cfg = self.cfg
        if self.now >= req.deadline or (
            cfg.early_drop
            and self.now + cfg.profile.prefill_s(req.prompt_tokens - req.setting_tokens) > req.deadline
        ):
            self._finish(req, "deadline")
            self._gate_release(key)
            return
        pol = self._policy(req)
        ranked = pol.rank(self._pool(req.group), req.scenario, self.now)
        for k, url in enumerate(ranked):
            p = self._by_url[url]
            if p.free > 0:
                p.free -= 1
                req.retries += k
                pol.opened(url)
                pol.accepted(req.scenario, url)
                req.prefill = p.idx
                req.accept = self.now + (k + 1) * cfg.rtt_s
                self.at(req.accept, self._admit, req)
                self.at(req.deadline, self._first_token_deadline, req)
                self.at(req.accept, self._gate_release, key)
                return
            pol.rejected(req.scenario, url)
        req.retries += len(ranked)
        req.rounds += 1
        t = self.now + len(ranked) * cfg.rtt_s + pol.pause(req.rounds)
        self.at(t, self._retry, req, key)

    def _retry(self, req: SimRequest, key: tuple[int, str]) -> None:
        wait = self._gate_wait.get(key)
        if wait and wait[0][0] < req.deadline:  # step aside for an earlier deadline
            heapq.heappush(wait, (req.deadline, req.rid, req))
            _, _, req = heapq.heappop(wait)
        self._probe(req, key)

    def _first_token_deadline(self, req: SimRequest) -> None:
        if req.first_token is None and req.done is None:
            self._finish(req, "deadline")

    # -- prefill ----------------------------------------------------------------------------
    def _queue_at_prefill(self, req: SimRequest) -> None:
        p = self.prefills[req.prefill]
        if p.free > 0:
            p.free -= 1
            self._admit(req)
        else:
            p.queue.append(req)

    def _admit(self, req: SimRequest) -> None:
        p = self.prefills[req.prefill]
        p.compute.append(req)
        self._run_prefill(p)

    def _run_prefill(self, p: _Prefill) -> None:
        while not p.busy and p.compute:
            req = p.compute.popleft()
            if req.done is not None or self.now > req.deadline:  # checked before execution
                self._finish(req, "deadline")
                self._free_slot(p)
                continue
            hit = self.cfg.prefix_reuse and req.scenario in p.seen and req.setting_tokens >= 16
            n = req.prompt_tokens - (req.setting_tokens if hit else 0)
            p.seen.add(req.scenario)
            dur = self.cfg.profile.prefill_s(n)
            p.busy = True
            p.computed_tokens += n
            p.busy_s += dur
            req.prefill_start = self.now
            self.at(self.now + dur, self._prefill_done, p, req)

    def _prefill_done(self, p: _Prefill, req: SimRequest) -> None:
        p.busy = False
        req.prefill_end = self.now
        if req.done is None:
            req.first_token = self.now
            req.tokens_left = req.output_tokens - 1
            if req.tokens_left <= 0:
                self._finish(req)
                self._free_slot(p)
            else:
                self._hand_over(req)
        else:  # the gateway gave up on it meanwhile: the KV is dropped
            self._free_slot(p)
        self._run_prefill(p)

    def _free_slot(self, p: _Prefill) -> None:
        while p.queue:
            req = p.queue.popleft()
            if req.done is None:
                self._admit(req)
                return
        p.free += 1

    # -- decode -----------------------------------------------------------------------------
    def _hand_over(self, req: SimRequest) -> None:
        g = req.group
        open_ = [d for d in self.group_decodes[g] if len(d.pending) < self.cfg.pending]
        if not open_:
            self.at(self.now + self.cfg.decode_retry_s, self._hand_over, req)
            return
        d = min(open_, key=lambda d: len(d.running) + len(d.joining) + d.retrieving + len(d.pending))
        req.decode = d.idx
        d.pending.append(req)
        self._kick(d)

    def _kick(self, d: _Decode) -> None:
        while d.pending and len(d.running) + len(d.joining) + d.retrieving < self.cfg.b_d:
            req = d.pending.popleft()
            d.retrieving += 1
            self.at(self.now + self.cfg.xi(req.prompt_tokens), self._retrieved, d, req)

    def _retrieved(self, d: _Decode, req: SimRequest) -> None:
        d.retrieving -= 1
        self._free_slot(self.prefills[req.prefill])  # the KV has left: the prefill's slot frees
        d.joining.append(req)
        if not d.stepping:
            self._step(d)

    def _step(self, d: _Decode) -> None:
        d.running.extend(d.joining)
        d.joining.clear()
        if not d.running:
            d.stepping = False
            return
        d.stepping = True
        self.at(self.now + self.cfg.profile.decode_s(len(d.running)), self._step_done, d)

    def _step_done(self, d: _Decode) -> None:
        d.steps += 1
        still = []
        for req in d.running:
            req.tokens_left -= 1
            if req.tokens_left <= 0:
                self._finish(req)
            else:
                still.append(req)
        d.running = still
        self._kick(d)
        self._step(d)


def convert(sim: Simulation, group: int, to_role: str, construct_s: float) -> bool:
    """Turns one instance of the other role in ``group`` into ``to_role`` at a fixed budget,
    as the control plane does it [paper: dynamic construction]: the instance leaves the route
    or the group first (no new work), drains (a prefill: no slot held; a decode: nothing
    pending, retrieving or running), then after ``construct_s`` (a fresh worker's start,
    connect, verify, healthy) joins in its new role. False if that would leave the other role
    without an instance."""
    rec: dict[str, Any] = {"group": group, "to": to_role, "start": sim.now}
    if to_role == "decode":
        if len(sim.group_prefills[group]) <= 1:
            return False
        # the prefill with the fewest held slots leaves the route first
        url = max(sim.group_prefills[group], key=lambda u: sim._by_url[u].free)
        sim.group_prefills[group].remove(url)
        p = sim._by_url[url]

        def drained_p() -> None:
            if p.free < sim.cfg.b_p or p.busy or p.queue or p.compute:
                sim.at(sim.now + 0.05, drained_p)
                return
            rec["drained"] = sim.now
            sim.at(sim.now + construct_s, join_d)

        def join_d() -> None:
            d = _Decode(len(sim.decodes), group)
            sim.decodes.append(d)
            sim.group_decodes[group].append(d)
            rec["joined"] = sim.now

        drained_p()
    else:
        if len(sim.group_decodes[group]) <= 1:
            return False
        d = min(sim.group_decodes[group], key=lambda d: len(d.running) + len(d.pending) + d.retrieving)
        sim.group_decodes[group].remove(d)  # no new hand-over picks it

        def drained_d() -> None:
            if d.pending or d.running or d.joining or d.retrieving:
                sim.at(sim.now + 0.05, drained_d)
                return
            rec["drained"] = sim.now
            sim.at(sim.now + construct_s, join_p)

        def join_p() -> None:
            idx = len(sim.prefills)
            p = _Prefill(idx, group, f"sim://g{group}/p{idx}", sim.cfg.b_p)
            sim.prefills.append(p)
            sim._by_url[p.url] = p
            sim.group_prefills[group].append(p.url)
            rec["joined"] = sim.now

        drained_d()
    sim.conversions.append(rec)
    return True


def summarize(reqs: Sequence[SimRequest], wall_s: float) -> dict[str, Any]:
    """The load generator's summary fields for simulated requests."""
    n = len(reqs)
    ttfts = sorted(r.ttft_s for r in reqs if r.ttft_s is not None)
    retries = sorted(r.retries for r in reqs)

    def pct(xs: list, q: float) -> float | None:
        return float(np.percentile(xs, q)) if xs else None

    done = [r for r in reqs if r.error is None and r.done is not None]
    errors: dict[str, int] = {}
    for r in reqs:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "requests": n,
        "success_rate": sum(r.success for r in reqs) / n if n else None,
        "ttft_p50_s": pct(ttfts, 50),
        "ttft_p99_s": pct(ttfts, 99),
        "retries_p99": pct(retries, 99),
        "throughput_rps": len(done) / wall_s if wall_s else None,
        "errors": errors,
    }
