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

The forwarding itself (ranking, retries on 429, the earliest-deadline gate, early
intervention) is :class:`kvxfer.serve.forwarder.Forwarder`; this module parses requests,
keeps the records and relays the accepted stream.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from kvxfer.serve.forwarder import Forwarder, Terminal
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
        self.forwarder = Forwarder(config, self.forwarding)
        self.prefill_times = self.forwarder.prefill_times
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
        self.forwarder.session = self._session

    async def _on_cleanup(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
            self.forwarder.session = None

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

    # ranking and forwarding: kvxfer.serve.forwarder ----------------------------------------
    def candidates(self, scenario: str) -> list[str]:
        """Prefills for ``scenario`` in the order this gateway would try them now."""
        return self.forwarder.candidates(scenario)

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
                raise Terminal(code, msg, 504) from e
            except (aiohttp.ClientError, OSError) as e:
                raise Terminal("upstream_failed", f"prefill stream broke: {e!r}") from e
            if not line:
                raise Terminal("upstream_failed", "prefill stream ended without a done or error event")
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
                raise Terminal("upstream_failed", f"bad event from prefill: {e}") from e
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
            upstream = await self.forwarder.forward(preq, rec)
        except Terminal as t:
            return await self._fail_early(request, rec, t, stream, fmt)
        except Exception as e:  # a bug here must still end the request with a typed error, logged
            log.exception("gateway: forwarding %s failed", rid)
            t = Terminal("internal", f"gateway error: {type(e).__name__}: {e}", 500)
            return await self._fail_early(request, rec, t, stream, fmt)
        try:  # the forwarder counted the stream in open_streams[rec.prefill]
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
        self, request: web.Request, rec: RequestRecord, t: Terminal, stream: bool, fmt: _ChunkFormat
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
                    raise Terminal(str(ev.get("code", "internal")), str(ev.get("message", "")))
        except Terminal as t:
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
                    raise Terminal(str(ev.get("code", "internal")), str(ev.get("message", "")))
        except Terminal as t:
            rec.outcome, rec.message, rec.finish = t.code, t.message, time.time()
            return _error_response(t.http_status, t.code, t.message, fmt.meta())
        except Exception as e:  # a malformed event or a bug: a typed error, logged
            log.exception("gateway: collecting %s failed", rec.request_id)
            rec.outcome, rec.message, rec.finish = "internal", f"{type(e).__name__}: {e}", time.time()
            return _error_response(500, "internal", f"gateway error: {rec.message}", fmt.meta())
        raise AssertionError("unreachable: _events ends with done, error or Terminal")


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
