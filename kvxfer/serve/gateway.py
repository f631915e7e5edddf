"""The P/D-Serve gateway: OpenAI-compatible HTTP in front of prefill workers.

What it does (P/D-Serve section 3.3, "on-demand forwarding upon rejection") [paper]:

* Requests wait at the gateway, not in prefill queues. For each request the gateway ranks
  the prefills of the request's scenario by the number of streams the gateway itself holds
  open to them (fewest first) and forwards ``POST /v1/prefill`` (:mod:`kvxfer.serve.protocol`).
* A prefill with no free slot answers 429 at once; the gateway then tries the next candidate,
  one after another, round after round, until one accepts or the request's deadline (its TTFT
  SLO) passes. At the deadline the request ends with an error event (early intervention).
* Batch forwarding: the prefill that accepted last in a scenario goes first for the next
  request of that scenario, until it rejects; so an idle prefill's batch fills up.
* Several gateways can front the same prefills without talking to each other: each one ranks
  by its own open streams and learns of full prefills only through their 429s.

Policy ``"local-queue"`` is the paper's baseline (its first commercial version): push to the
prefill with the fewest open streams and let it queue locally. The gateway marks those requests
with the header ``X-Kvxfer-Policy: local-queue`` (the prefill side of that policy is the
worker's). Both policies use the same code path; only the ranking and the header differ.

Choices the paper leaves open [inferred]: ties in the ranking rotate round-robin; a round in
which every candidate rejected is followed by a pause that starts at ``retry_interval_s`` and
doubles each round up to ``retry_max_interval_s`` (with jitter), so many waiting requests do not
flood the prefills with attempts that cannot succeed; a prefill that
refuses the connection is skipped for ``down_for_s``; the first-token deadline is also enforced
by the gateway (the upstream stream is closed when it passes), so a client never waits past it.

Responses: ``stream=true`` gives server-sent events in OpenAI's chunk format, one chunk per
token, ``data: [DONE]`` at the end; an error mid-stream is ``data: {"error": {...}}`` (the
``openai`` client raises ``APIError`` with that body). Every chunk carries an extra field
``kvxfer`` with ``request_id``, ``retries`` and ``prefill`` (a token's chunk also its
``token_id``); the response headers carry ``X-Kvxfer-Request-Id``, ``X-Kvxfer-Retries`` and
``X-Kvxfer-Prefill``. The scenario comes from the body field ``scenario`` or the header
``X-Scenario`` (default ``"default"``); the TTFT SLO from the body field ``ttft_slo_s`` or
the header ``X-TTFT-SLO`` (default: the gateway's).

``GET /v1/kvxfer/requests`` returns the per-request records (:class:`RequestRecord`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
from aiohttp import web

from kvxfer.serve import protocol
from kvxfer.serve.errors import GatewayError
from kvxfer.serve.policy import ForwardingPolicy
from kvxfer.serve.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer

POLICIES = ("reject-retry", "local-queue")
log = logging.getLogger("kvxfer.serve.gateway")


# --------------------------------------------------------------------------------------------
# Configuration and records


@dataclass
class GatewayConfig:
    """``routes`` maps a scenario to its prefill base URLs; ``"*"`` serves scenarios without a
    route of their own. ``ttft_slo_s`` is the default deadline from arrival to first token."""

    routes: dict[str, list[str]]
    policy: str = "reject-retry"
    ttft_slo_s: float = 5.0
    model: str = "kvxfer"
    default_max_tokens: int = 64
    batch_forwarding: bool = True
    retry_interval_s: float = 0.002
    retry_max_interval_s: float = 0.01
    down_for_s: float = 1.0
    stream_idle_timeout_s: float = 60.0  # longest gap allowed between two tokens once accepted
    enforce_first_token_deadline: bool = True
    early_drop: bool = True  # reject-retry: end a request that can no longer make its deadline
    records_kept: int = 100_000

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise GatewayError(f"unknown policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if not self.routes or not any(self.routes.values()):
            raise GatewayError("gateway needs at least one prefill URL in routes")
        if self.ttft_slo_s <= 0:
            raise GatewayError(f"ttft_slo_s must be > 0, got {self.ttft_slo_s}")


@dataclass
class RequestRecord:
    """What the gateway saw of one request; times are ``time.time()`` seconds."""

    request_id: str
    scenario: str
    policy: str
    arrival: float
    deadline: float
    prompt_tokens: int
    accept: float | None = None
    first_token: float | None = None
    finish: float | None = None
    retries: int = 0  # rejections (429) seen before acceptance
    attempts: int = 0
    prefill: str | None = None
    completion_tokens: int = 0
    outcome: str = "running"  # "stop" | "length" | an error code
    message: str = ""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


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


class _DeadlineGate:
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


class _Rejected(Exception):
    pass


class _Unavailable(Exception):
    pass


class _Terminal(Exception):
    """The request ends with this error code (no further candidate will help)."""

    def __init__(self, code: str, message: str, http_status: int = 502) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


# --------------------------------------------------------------------------------------------
# The gateway


class Gateway:
    """An aiohttp application; ``await start(host, port)`` serves it, ``await stop()`` ends it.

    ``open_streams[url]`` counts the prefill streams this gateway holds open (accepted and not
    yet finished); it is the ranking key.
    """

    def __init__(self, config: GatewayConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.tokenizer: Tokenizer = tokenizer or ByteTokenizer()
        self.prefills: list[str] = list(
            dict.fromkeys(u.rstrip("/") for us in config.routes.values() for u in us)
        )
        # the ranking state lives in the policy object, shared with the simulator
        self.forwarding = ForwardingPolicy(config.policy, config.batch_forwarding, config.down_for_s,
                                           config.retry_interval_s, config.retry_max_interval_s)  # fmt: skip
        self.open_streams: dict[str, int] = self.forwarding.open_streams
        self.open_streams.update({u: 0 for u in self.prefills})
        self.records: deque[RequestRecord] = deque(maxlen=config.records_kept)
        self._sticky = self.forwarding.sticky  # scenario -> the prefill that accepted last
        self._down_until = self.forwarding.down_until
        self._gates: dict[str, _DeadlineGate] = {}
        self.prefill_times = PrefillTimes()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.url: str | None = None
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/v1/completions", self._completions)
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/v1/kvxfer/requests", self._requests)
        self.app.on_startup.append(self._on_startup)
        self.app.on_cleanup.append(self._on_cleanup)

    # lifecycle ---------------------------------------------------------------------------
    async def _on_startup(self, _app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def _on_cleanup(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0 = any free port); returns the base URL."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def set_routes(self, routes: dict[str, list[str]]) -> None:
        """Replaces the forwarding table (the control plane's route watcher calls this)."""
        routes = {s: [u.rstrip("/") for u in us] for s, us in routes.items()}
        for us in routes.values():
            for u in us:
                self.open_streams.setdefault(u, 0)
                if u not in self.prefills:
                    self.prefills.append(u)
        self.config.routes = routes

    @property
    def _rr(self) -> Iterator[int]:
        return self.forwarding.rr

    @_rr.setter
    def _rr(self, it: Iterator[int]) -> None:
        self.forwarding.rr = it

    # ranking -----------------------------------------------------------------------------
    def candidates(self, scenario: str) -> list[str]:
        """Prefills for ``scenario`` in the order this gateway would try them now."""
        pool = self.config.routes.get(scenario) or self.config.routes.get("*")
        if not pool:
            raise _Terminal("no_route", f"no prefill serves scenario {scenario!r}", 404)
        return self.forwarding.rank([u.rstrip("/") for u in pool], scenario, time.monotonic())

    # forwarding --------------------------------------------------------------------------
    async def _try(
        self, url: str, req: protocol.PrefillRequest, rec: RequestRecord
    ) -> aiohttp.ClientResponse:
        """POST the request to one prefill. On success the stream counts in ``open_streams[url]``
        (from the moment it was sent: a request queued in a local-queue prefill counts too)."""
        assert self._session is not None
        remaining = req.deadline - time.time()
        if remaining <= 0:
            raise _Terminal("deadline", "TTFT deadline passed before any prefill accepted", 504)
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
                    self._session.post(url + "/v1/prefill", json=req.to_json(), headers=headers), wait
                )
            except asyncio.TimeoutError as e:
                raise _Terminal(
                    "deadline", f"TTFT deadline passed while waiting for prefill {url}", 504
                ) from e
            except (aiohttp.ClientConnectionError, OSError) as e:
                self.forwarding.unreachable(url, time.monotonic())
                raise _Unavailable(str(e)) from e
            if resp.status == 429:
                resp.release()
                raise _Rejected()
            if resp.status != 200:
                text = (await resp.text())[:300]
                resp.release()
                if resp.status == 400:
                    raise _Terminal("bad_request", f"prefill {url} refused the request: {text}", 400)
                raise _Unavailable(f"prefill {url} answered {resp.status}: {text}")
            ok = True
            return resp
        finally:
            if not ok:
                self.open_streams[url] -= 1

    async def _forward(self, req: protocol.PrefillRequest, rec: RequestRecord) -> aiohttp.ClientResponse:
        """Find a prefill that accepts, or raise :class:`_Terminal` at the deadline.

        Reject-retry: the requests of one scenario take turns, earliest deadline first (a gate),
        so one request at a time probes the prefills and the others wait at the gateway [paper:
        requests sit at the gateway]; without the gate, every waiting request would poll every
        prefill, and in arrival order a short prompt with a tight SLO would wait behind a long
        one [inferred]. Local-queue needs no gate: the prefill queues the request."""
        if self.config.policy != "reject-retry":
            return await self._forward_loop(req, rec)
        gate = self._gates.setdefault(rec.scenario, _DeadlineGate())
        need = (
            self.prefill_times.estimate(rec.scenario, rec.prompt_tokens) if self.config.early_drop else None
        )
        if not await gate.enter(req.deadline, req.deadline - time.time() - (need or 0.0)):
            raise _Terminal(
                "deadline", "TTFT deadline passed while waiting at the gateway for a prefill", 504
            )
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
        gate: _DeadlineGate | None = None,
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
                        raise _Terminal(
                            "deadline",
                            f"TTFT deadline cannot be met: {req.deadline - time.time():.3f} s left, a "
                            f"prefill of {rec.prompt_tokens} tokens takes about {need:.3f} s here",
                            504,
                        )
                tried = True
                try:
                    resp = await self._try(url, req, rec)
                except _Rejected:
                    rec.retries += 1
                    self.forwarding.rejected(rec.scenario, url)
                    continue
                except _Unavailable as e:
                    rec.message = str(e)
                    continue
                self.forwarding.accepted(rec.scenario, url)
                rec.prefill = url
                rec.accept = time.time()
                return resp
            remaining = req.deadline - time.time()
            if remaining <= 0 or not tried:
                why = "every prefill rejected" if rec.retries else "no prefill reachable"
                raise _Terminal(
                    "deadline", f"TTFT deadline passed at the gateway: {why} ({rec.attempts} attempts)", 504
                )
            rounds += 1
            await asyncio.sleep(min(self.forwarding.pause(rounds), remaining))
            if gate is not None and held is not None:
                held[0] = False  # while stepping aside, we do not hold the gate
                if not await gate.yield_to_earlier(req.deadline, req.deadline - time.time()):
                    raise _Terminal("deadline", "TTFT deadline passed while waiting at the gateway", 504)
                held[0] = True

    async def _events(self, resp: aiohttp.ClientResponse, rec: RequestRecord):
        """Yield NDJSON events of an accepted stream, enforcing the first-token deadline."""
        first_deadline = rec.deadline if self.config.enforce_first_token_deadline else None
        buf = b""
        while True:
            if rec.first_token is None and first_deadline is not None:
                timeout = max(0.0, first_deadline - time.time())
                code, msg = "deadline", "TTFT deadline passed before the first token"
            else:
                timeout = self.config.stream_idle_timeout_s
                code, msg = "stalled", f"no token for {timeout:g} s"
            try:
                line = await asyncio.wait_for(resp.content.readline(), timeout)
            except asyncio.TimeoutError as e:
                raise _Terminal(code, msg, 504) from e
            except (aiohttp.ClientError, OSError) as e:
                raise _Terminal("upstream_failed", f"prefill stream broke: {e!r}") from e
            if not line:
                raise _Terminal("upstream_failed", "prefill stream ended without a done or error event")
            buf += line
            if not buf.endswith(b"\n") and not resp.content.at_eof():
                continue
            text, buf = buf.strip(), b""
            if not text:
                continue
            try:
                event = json.loads(text)
                protocol.check_version(event)
            except (ValueError, protocol.ProtocolError) as e:
                raise _Terminal("upstream_failed", f"bad event from prefill: {e}") from e
            yield event

    # HTTP handlers -----------------------------------------------------------------------
    async def _health(self, _r: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "policy": self.config.policy, "prefills": self.open_streams}
        )

    async def _models(self, _r: web.Request) -> web.Response:
        m = {"id": self.config.model, "object": "model", "created": 0, "owned_by": "kvxfer"}
        return web.json_response({"object": "list", "data": [m]})

    async def _requests(self, _r: web.Request) -> web.Response:
        return web.json_response([asdict(r) for r in self.records])

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    def _parse(self, request: web.Request, body: Any, chat: bool) -> tuple[list[int], int, str, float]:
        if not isinstance(body, dict):
            raise GatewayError("request body must be a JSON object")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise GatewayError("'messages' must be a non-empty list")
            ids = self.tokenizer.chat(messages)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                ids = [int(t) for t in prompt]
            elif isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt)
            else:
                raise GatewayError("'prompt' must be a string, one string in a list, or a list of token ids")
        if not ids:
            raise GatewayError("the prompt is empty")
        max_tokens = (
            body.get("max_completion_tokens", body.get("max_tokens")) or self.config.default_max_tokens
        )
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise GatewayError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        scenario = body.get("scenario") or request.headers.get("X-Scenario") or "default"
        slo = body.get("ttft_slo_s") or request.headers.get("X-TTFT-SLO") or self.config.ttft_slo_s
        try:
            slo = float(slo)
        except (TypeError, ValueError) as e:
            raise GatewayError(f"ttft_slo_s must be a number, got {slo!r}") from e
        if slo <= 0:
            raise GatewayError(f"ttft_slo_s must be > 0, got {slo}")
        return ids, max_tokens, str(scenario), slo

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrival = time.time()
        try:
            body = await request.json()
            ids, max_tokens, scenario, slo = self._parse(request, body, chat)
        except (ValueError, GatewayError) as e:
            return _error_response(400, "invalid_request_error", f"bad request: {e}")
        stream = bool(body.get("stream", False))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        rec = RequestRecord(rid, scenario, self.config.policy, arrival, arrival + slo, len(ids))
        self.records.append(rec)
        preq = protocol.PrefillRequest(
            request_id=rid,
            scenario=scenario,
            prompt_token_ids=ids,
            max_tokens=max_tokens,
            deadline=rec.deadline,
            stop_token_ids=list(self.tokenizer.eos_token_ids),
        )
        fmt = _ChunkFormat(rid, self.config.model, chat, rec)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            upstream = await self._forward(preq, rec)
        except _Terminal as t:
            return await self._fail_early(request, rec, t, stream, fmt)
        except Exception as e:  # a bug here must still end the request with a typed error, logged
            log.exception("gateway: forwarding %s failed", rid)
            t = _Terminal("internal", f"gateway error: {type(e).__name__}: {e}", 500)
            return await self._fail_early(request, rec, t, stream, fmt)
        try:  # _try counted the stream in open_streams[rec.prefill]
            if stream:
                return await self._stream(request, upstream, rec, fmt, include_usage)
            return await self._collect(upstream, rec, fmt)
        finally:
            self.open_streams[rec.prefill] -= 1  # type: ignore[index]
            upstream.close()  # a no-op after a full read; aborts the upstream otherwise
            if rec.finish is None:
                rec.finish = time.time()
            if rec.outcome == "running":
                rec.outcome = "client_gone"

    async def _fail_early(
        self, request: web.Request, rec: RequestRecord, t: _Terminal, stream: bool, fmt: _ChunkFormat
    ) -> web.StreamResponse:
        rec.outcome, rec.message, rec.finish = t.code, t.message, time.time()
        if not stream:
            return _error_response(t.http_status, t.code, t.message, fmt.meta())
        resp = _sse_response(rec)
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            await resp.write(_sse(fmt.error(t.code, t.message)))
            await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        rec: RequestRecord,
        fmt: _ChunkFormat,
        include_usage: bool,
    ) -> web.StreamResponse:
        resp = _sse_response(rec)
        await resp.prepare(request)
        detok = self.tokenizer.detokenizer()
        try:
            async for ev in self._events(upstream, rec):
                kind = ev.get("type")
                if kind == "token":
                    if rec.first_token is None:
                        rec.first_token = time.time()
                        self.prefill_times.observe(rec)
                    rec.completion_tokens += 1
                    tid = int(ev["token_id"])
                    await resp.write(_sse(fmt.chunk(detok.add(tid), None, tid)))
                elif kind == "done":
                    rec.outcome = str(ev.get("finish_reason", "stop"))
                    rec.finish = time.time()
                    await resp.write(_sse(fmt.chunk(detok.flush(), rec.outcome)))
                    if include_usage:
                        await resp.write(_sse(fmt.usage()))
                    await resp.write(b"data: [DONE]\n\n")
                    return resp
                elif kind == "error":
                    raise _Terminal(str(ev.get("code", "internal")), str(ev.get("message", "")))
        except _Terminal as t:
            rec.outcome, rec.message, rec.finish = t.code, t.message, time.time()
            with contextlib.suppress(ConnectionError):
                await resp.write(_sse(fmt.error(t.code, t.message)))
                await resp.write(b"data: [DONE]\n\n")
        except ConnectionError:
            rec.outcome, rec.message = "client_gone", "the client closed the connection"
        except Exception as e:  # a malformed event or a bug: end the stream with a typed error, logged
            log.exception("gateway: streaming %s failed", rec.request_id)
            rec.outcome, rec.message, rec.finish = "internal", f"{type(e).__name__}: {e}", time.time()
            with contextlib.suppress(ConnectionError):
                await resp.write(_sse(fmt.error("internal", f"gateway error: {rec.message}")))
                await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _collect(
        self, upstream: aiohttp.ClientResponse, rec: RequestRecord, fmt: _ChunkFormat
    ) -> web.Response:
        detok = self.tokenizer.detokenizer()
        text: list[str] = []
        try:
            async for ev in self._events(upstream, rec):
                kind = ev.get("type")
                if kind == "token":
                    if rec.first_token is None:
                        rec.first_token = time.time()
                        self.prefill_times.observe(rec)
                    rec.completion_tokens += 1
                    text.append(detok.add(int(ev["token_id"])))
                elif kind == "done":
                    rec.outcome = str(ev.get("finish_reason", "stop"))
                    rec.finish = time.time()
                    text.append(detok.flush())
                    return web.json_response(
                        fmt.whole("".join(text), rec.outcome), headers=_meta_headers(rec)
                    )
                elif kind == "error":
                    raise _Terminal(str(ev.get("code", "internal")), str(ev.get("message", "")))
        except _Terminal as t:
            rec.outcome, rec.message, rec.finish = t.code, t.message, time.time()
            return _error_response(t.http_status, t.code, t.message, fmt.meta())
        except Exception as e:  # a malformed event or a bug: a typed error, logged
            log.exception("gateway: collecting %s failed", rec.request_id)
            rec.outcome, rec.message, rec.finish = "internal", f"{type(e).__name__}: {e}", time.time()
            return _error_response(500, "internal", f"gateway error: {rec.message}", fmt.meta())
        raise AssertionError("unreachable: _events ends with done, error or _Terminal")


# --------------------------------------------------------------------------------------------
# OpenAI wire format


class _ChunkFormat:
    def __init__(self, rid: str, model: str, chat: bool, rec: RequestRecord) -> None:
        self.rid, self.model, self.chat, self.rec = rid, model, chat, rec
        self.created = int(time.time())
        self._role_sent = False

    def meta(self) -> dict[str, Any]:
        return {"request_id": self.rid, "retries": self.rec.retries, "prefill": self.rec.prefill}

    def _base(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "kvxfer": self.meta(),
        }

    def chunk(self, text: str, finish: str | None, token_id: int | None = None) -> dict[str, Any]:
        base = self._base("chat.completion.chunk" if self.chat else "text_completion")
        if token_id is not None:
            base["kvxfer"]["token_id"] = token_id
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text or finish is None else {}
            if not self._role_sent:
                delta["role"] = "assistant"
                self._role_sent = True
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice]}

    def usage(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": self._usage()}

    def _usage(self) -> dict[str, int]:
        p, c = self.rec.prompt_tokens, self.rec.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def whole(self, text: str, finish: str) -> dict[str, Any]:
        if self.chat:
            msg = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}
            return {**self._base("chat.completion"), "choices": [choice], "usage": self._usage()}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice], "usage": self._usage()}

    def error(self, code: str, message: str) -> dict[str, Any]:
        return {
            "error": {"message": message, "type": code, "code": code, "param": None, "kvxfer": self.meta()}
        }


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _meta_headers(rec: RequestRecord) -> dict[str, str]:
    return {
        "X-Kvxfer-Request-Id": rec.request_id,
        "X-Kvxfer-Retries": str(rec.retries),
        "X-Kvxfer-Prefill": rec.prefill or "",
    }


def _sse_response(rec: RequestRecord) -> web.StreamResponse:
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **_meta_headers(rec)}
    return web.StreamResponse(status=200, headers=headers)


def _error_response(status: int, code: str, message: str, meta: dict[str, Any] | None = None) -> web.Response:
    err: dict[str, Any] = {"message": message, "type": code, "code": code, "param": None}
    if meta:
        err["kvxfer"] = meta
    return web.json_response({"error": err}, status=status)


def single_route(prefill_urls: Iterable[str]) -> dict[str, list[str]]:
    """Routes where every scenario may use every prefill (the mixed pool)."""
    return {"*": list(prefill_urls)}


# --------------------------------------------------------------------------------------------
# Running one gateway as a process


async def serve_forever(
    config: GatewayConfig,
    tokenizer: Tokenizer,
    host: str,
    port: int,
    ready=None,
    until_stdin_eof: bool = False,
) -> None:
    """Serve until cancelled (or, with ``until_stdin_eof``, until standard input closes: the
    parent that holds its other end has exited). ``ready(url)`` is called once it listens."""
    import os
    import sys
    import threading

    gw = Gateway(config, tokenizer)
    url = await gw.start(host, port)
    if ready is not None:
        ready(url)
    done = asyncio.Event()
    if until_stdin_eof:
        loop = asyncio.get_running_loop()

        def watch() -> None:  # unbuffered reads: no lock left held at interpreter shutdown
            with contextlib.suppress(OSError):
                while os.read(sys.stdin.fileno(), 4096):
                    pass
            loop.call_soon_threadsafe(done.set)

        threading.Thread(target=watch, daemon=True).start()
    try:
        await done.wait()
    finally:
        await gw.stop()


class GatewayProcess:
    """One gateway in a child process (``python -m kvxfer.serve.gateway``), e.g. a second gateway
    with another policy over the same prefills. ``start()`` returns its URL once it listens."""

    def __init__(
        self,
        prefill_urls: Sequence[str],
        policy: str = "reject-retry",
        ttft_slo_s: float = 5.0,
        tokenizer: str = "bytes",
        model: str = "kvxfer",
        log_path: str | None = None,
    ) -> None:
        """``log_path``: append the gateway's standard error there (default: discard it)."""
        self.log_path = log_path
        if policy not in POLICIES:
            raise GatewayError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        self.args = [
            "--policy",
            policy,
            "--ttft-slo",
            str(ttft_slo_s),
            "--tokenizer",
            tokenizer,
            "--model",
            model,
        ]
        for u in prefill_urls:
            self.args += ["--prefill", u]
        self.proc: Any = None
        self.url: str | None = None
        self._drain: Any = None

    def start(self, timeout_s: float = 60.0) -> str:
        import selectors
        import subprocess
        import sys
        import threading

        from kvxfer.child_env import child_env

        env = child_env()
        cmd = [sys.executable, "-m", "kvxfer.serve.gateway", "--port", "0", "--until-stdin-eof", *self.args]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env
        )
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stderr, selectors.EVENT_READ)
        deadline, seen = time.monotonic() + timeout_s, b""
        try:
            while self.url is None:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    self.stop()
                    raise GatewayError(
                        f"gateway process did not start within {timeout_s} s: {seen[-2000:]!r}"
                    )
                if sel.select(min(left, 0.5)):
                    line = self.proc.stderr.readline()
                    seen += line
                    if line.startswith(b"gateway listening on "):
                        self.url = line.decode().split()[-1]
        finally:
            sel.close()
        stderr, log_file = self.proc.stderr, self.log_path

        def drain() -> None:  # keep the pipe drained; keep the text when asked to
            if log_file is None:
                for _ in stderr:
                    pass
                return
            with open(log_file, "ab") as f:
                for line in stderr:
                    f.write(line)
                    f.flush()

        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()
        return self.url

    def stop(self) -> None:
        import subprocess

        if self.proc is not None and self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stderr is not None:
            if self._drain is not None:
                self._drain.join(5)
            self.proc.stderr.close()

    def __enter__(self) -> GatewayProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m kvxfer.serve.gateway --prefill URL [--prefill URL ...] [--route SCEN=URL,URL]``."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="kvxfer-gateway", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prefill", action="append", default=[], help="prefill base URL (all scenarios)")
    p.add_argument("--route", action="append", default=[], help="SCENARIO=URL[,URL...]")
    p.add_argument("--policy", choices=POLICIES, default="reject-retry")
    p.add_argument("--ttft-slo", type=float, default=5.0)
    p.add_argument("--tokenizer", default="bytes", help="bytes | bytes:VOCAB | smollm2 | a tokenizer dir")
    p.add_argument("--model", default="kvxfer")
    p.add_argument("--until-stdin-eof", action="store_true", help="exit when standard input closes")
    args = p.parse_args(argv)
    routes: dict[str, list[str]] = {}
    if args.prefill:
        routes["*"] = args.prefill
    for r in args.route:
        scen, _, urls = r.partition("=")
        if not scen or not urls:
            p.error(f"--route wants SCENARIO=URL[,URL...], got {r!r}")
        routes[scen] = urls.split(",")
    try:
        cfg = GatewayConfig(routes=routes, policy=args.policy, ttft_slo_s=args.ttft_slo, model=args.model)
        tok = load_tokenizer(args.tokenizer)
    except GatewayError as e:
        print(f"kvxfer-gateway: {e}", file=sys.stderr)
        return 2

    def ready(url: str) -> None:
        print(f"gateway listening on {url}", file=sys.stderr, flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(cfg, tok, args.host, args.port, ready, args.until_stdin_eof))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
