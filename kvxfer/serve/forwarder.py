"""Forwarding one request to a prefill [paper, P/D-Serve 3.3: on-demand forwarding upon
rejection], the part of the gateway (:mod:`kvxfer.serve.gateway`) between parsing a request
and relaying its stream.

Contract of :meth:`Forwarder.forward` ``(req, rec) -> aiohttp.ClientResponse``:

* It returns the HTTP 200 response of the prefill that accepted (its NDJSON body not yet
  read). Then ``rec.prefill`` and ``rec.accept`` are set, ``rec.retries`` counts the 429s and
  ``rec.attempts`` every POST, and the stream counts in ``open_streams[rec.prefill]``: the
  caller decrements it when the stream ends, whatever the outcome.
* Otherwise it raises :class:`Terminal` (``code``, ``message``, ``http_status``): ``deadline``
  (no prefill accepted in time, or early intervention decided none could), ``no_route``,
  ``bad_request``. Nothing stays counted then, and no gate is held after it returns or raises.
* The deadline is ``req.deadline`` (wall clock); every wait inside is bounded by it.

How [paper, with the choices it leaves open marked inferred]: candidates in the
:class:`~kvxfer.serve.policy.ForwardingPolicy` order (the same object the simulator drives);
a 429 moves to the next candidate; a round in which all rejected is followed by the policy's
pause; ``reject-retry`` requests of one scenario take turns through a :class:`DeadlineGate`,
earliest deadline first [inferred]; early intervention by :class:`PrefillTimes` [paper; the
rule inferred]. ``local-queue`` (the baseline) sends the header ``X-Kvxfer-Policy:
local-queue``, and its prefill answers once the request leaves its FIFO queue.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import TYPE_CHECKING

import aiohttp

from kvxfer.serve import protocol
from kvxfer.serve.policy import ForwardingPolicy

if TYPE_CHECKING:
    from kvxfer.serve.gateway import GatewayConfig, RequestRecord


class PrefillTimes:
    """What this gateway has seen a prefill take (accept to first token), per scenario and
    prompt-length bucket (powers of two): an exponentially weighted mean, trusted after
    ``min_samples`` observations. Early intervention [paper] uses it to end a request whose
    remaining time is shorter than its prefill would take, instead of spending a prefill slot
    on a certain timeout [inferred: the paper does not say how it decides]."""

    def __init__(self, alpha: float = 0.2, min_samples: int = 3) -> None:
        self.alpha, self.min_samples = alpha, min_samples
        self._mean: dict[tuple[str, int], float] = {}
        self._n: dict[tuple[str, int], int] = {}

    @staticmethod
    def _key(scenario: str, tokens: int) -> tuple[str, int]:
        return scenario, max(1, int(tokens)).bit_length()

    def observe(self, rec: RequestRecord) -> None:
        if rec.accept is None or rec.first_token is None:
            return
        k = self._key(rec.scenario, rec.prompt_tokens)
        x = rec.first_token - rec.accept
        self._n[k] = self._n.get(k, 0) + 1
        self._mean[k] = x if k not in self._mean else (1 - self.alpha) * self._mean[k] + self.alpha * x

    def estimate(self, scenario: str, tokens: int) -> float | None:
        k = self._key(scenario, tokens)
        return self._mean[k] if self._n.get(k, 0) >= self.min_samples else None


class DeadlineGate:
    """One holder at a time; the waiters get their turn earliest deadline first (arrival order
    among equal deadlines); ``enter`` gives up after ``timeout``."""

    def __init__(self) -> None:
        self.held = False
        self.waiters: list[tuple[float, int, asyncio.Future]] = []  # a heap
        self._seq = itertools.count()

    async def enter(self, deadline: float, timeout: float) -> bool:
        if not self.held and not self.waiters:
            self.held = True
            return True
        return await self._wait(deadline, timeout)

    async def yield_to_earlier(self, deadline: float, timeout: float) -> bool:
        """The holder steps aside if a waiter has an earlier deadline, and waits its turn again."""
        while self.waiters and self.waiters[0][2].done():
            heapq.heappop(self.waiters)
        if not self.waiters or self.waiters[0][0] >= deadline:
            return True
        self.leave()
        return await self._wait(deadline, timeout)

    async def _wait(self, deadline: float, timeout: float) -> bool:
        if timeout <= 0:
            if not self.held:  # nobody to hand over to us: take it back
                self.held = True
                return True
            return False
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiters, (deadline, next(self._seq), fut))
        if not self.held:  # the gate is free (we just stepped aside and nobody took it)
            self.held = True
            self.leave()
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except BaseException as e:
            if fut.done():  # handed to us as we gave up: pass it on
                self.leave()
            else:
                fut.cancel()  # stays in the heap; leave() skips it
            if isinstance(e, asyncio.TimeoutError):
                return False
            raise

    def leave(self) -> None:
        while self.waiters:
            _, _, fut = heapq.heappop(self.waiters)
            if not fut.done():
                fut.set_result(None)  # stays held: handed over
                return
        self.held = False


class Rejected(Exception):
    """The prefill answered 429: no free slot."""


class Unavailable(Exception):
    """The prefill could not be reached or answered an unexpected status; try the next."""


class Terminal(Exception):
    """The request ends with this error code (no further candidate will help)."""

    def __init__(self, code: str, message: str, http_status: int = 502) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


class Forwarder:
    """Forwards requests for one gateway. ``config`` is the gateway's (its ``routes`` may be
    replaced while running); ``session`` is the gateway's HTTP client session, set at its
    startup; ``policy`` holds the ranking state (``open_streams``, sticky prefills, ...)."""

    def __init__(self, config: GatewayConfig, policy: ForwardingPolicy) -> None:
        self.config = config
        self.policy = policy
        self.open_streams: dict[str, int] = policy.open_streams
        self.gates: dict[str, DeadlineGate] = {}  # reject-retry: one per scenario
        self.prefill_times = PrefillTimes()
        self.session: aiohttp.ClientSession | None = None

    def candidates(self, scenario: str) -> list[str]:
        """Prefills for ``scenario`` in the order this gateway would try them now; raises
        :class:`Terminal` (``no_route``, 404) when no prefill serves it."""
        pool = self.config.routes.get(scenario) or self.config.routes.get("*")
        if not pool:
            raise Terminal("no_route", f"no prefill serves scenario {scenario!r}", 404)
        return self.policy.rank([u.rstrip("/") for u in pool], scenario, time.monotonic())

    async def _try(
        self, url: str, req: protocol.PrefillRequest, rec: RequestRecord
    ) -> aiohttp.ClientResponse:
        """POST the request to one prefill. On success the stream counts in ``open_streams[url]``
        (from the moment it was sent: a request queued in a local-queue prefill counts too)."""
        assert self.session is not None, "Forwarder.session is set by the gateway at startup"
        remaining = req.deadline - time.time()
        if remaining <= 0:
            raise Terminal("deadline", "TTFT deadline passed before any prefill accepted", 504)
        # A local-queue prefill answers only once a slot is free: wait for its headers no longer
        # than the deadline (plus the idle allowance when the gateway does not enforce it).
        wait = (
            remaining
            if self.config.enforce_first_token_deadline
            else remaining + self.config.stream_idle_timeout_s
        )
        headers = {"X-Kvxfer-Policy": self.config.policy}
        rec.attempts += 1
        self.open_streams[url] += 1
        ok = False
        try:
            try:
                resp = await asyncio.wait_for(
                    self.session.post(url + "/v1/prefill", json=req.to_json(), headers=headers), wait
                )
            except asyncio.TimeoutError as e:
                raise Terminal(
                    "deadline", f"TTFT deadline passed while waiting for prefill {url}", 504
                ) from e
            except (aiohttp.ClientConnectionError, OSError) as e:
                self.policy.unreachable(url, time.monotonic())
                raise Unavailable(str(e)) from e
            if resp.status == 429:
                resp.release()
                raise Rejected()
            if resp.status != 200:
                text = (await resp.text())[:300]
                resp.release()
                if resp.status == 400:
                    raise Terminal("bad_request", f"prefill {url} refused the request: {text}", 400)
                raise Unavailable(f"prefill {url} answered {resp.status}: {text}")
            ok = True
            return resp
        finally:
            if not ok:
                self.open_streams[url] -= 1

    async def forward(self, req: protocol.PrefillRequest, rec: RequestRecord) -> aiohttp.ClientResponse:
        """Find a prefill that accepts, or raise :class:`Terminal` at the deadline.

        Reject-retry: the requests of one scenario take turns, earliest deadline first (a gate),
        so one request at a time probes the prefills and the others wait at the gateway [paper:
        requests sit at the gateway]; without the gate, every waiting request would poll every
        prefill, and in arrival order a short prompt with a tight SLO would wait behind a long
        one [inferred]. Local-queue needs no gate: the prefill queues the request."""
        if self.config.policy != "reject-retry":
            return await self._forward_loop(req, rec)
        gate = self.gates.setdefault(rec.scenario, DeadlineGate())
        need = (
            self.prefill_times.estimate(rec.scenario, rec.prompt_tokens) if self.config.early_drop else None
        )
        if not await gate.enter(req.deadline, req.deadline - time.time() - (need or 0.0)):
            raise Terminal("deadline", "TTFT deadline passed while waiting at the gateway for a prefill", 504)
        held = [True]
        try:
            return await self._forward_loop(req, rec, gate, held)
        finally:
            if held[0]:
                gate.leave()

    async def _forward_loop(
        self,
        req: protocol.PrefillRequest,
        rec: RequestRecord,
        gate: DeadlineGate | None = None,
        held: list[bool] | None = None,
    ) -> aiohttp.ClientResponse:
        rounds = 0
        drop = self.config.early_drop and self.config.policy == "reject-retry"
        while True:
            tried = False
            for url in self.candidates(rec.scenario):
                if time.time() >= req.deadline:
                    break
                if drop:
                    need = self.prefill_times.estimate(rec.scenario, rec.prompt_tokens)
                    if need is not None and time.time() + need > req.deadline:
                        raise Terminal(
                            "deadline",
                            f"TTFT deadline cannot be met: {req.deadline - time.time():.3f} s left, a "
                            f"prefill of {rec.prompt_tokens} tokens takes about {need:.3f} s here",
                            504,
                        )
                tried = True
                try:
                    resp = await self._try(url, req, rec)
                except Rejected:
                    rec.retries += 1
                    self.policy.rejected(rec.scenario, url)
                    continue
                except Unavailable as e:
                    rec.message = str(e)
                    continue
                self.policy.accepted(rec.scenario, url)
                rec.prefill = url
                rec.accept = time.time()
                return resp
            remaining = req.deadline - time.time()
            if remaining <= 0 or not tried:
                why = "every prefill rejected" if rec.retries else "no prefill reachable"
                raise Terminal(
                    "deadline", f"TTFT deadline passed at the gateway: {why} ({rec.attempts} attempts)", 504
                )
            rounds += 1
            await asyncio.sleep(min(self.policy.pause(rounds), remaining))
            if gate is not None and held is not None:
                held[0] = False  # while stepping aside, we do not hold the gate
                if not await gate.yield_to_earlier(req.deadline, req.deadline - time.time()):
                    raise Terminal("deadline", "TTFT deadline passed while waiting at the gateway", 504)
                held[0] = True
