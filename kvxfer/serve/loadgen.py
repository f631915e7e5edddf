"""Load generator: closed-loop users and open-loop clients against a gateway, through the real
``openai`` Python client (``AsyncOpenAI``, streaming).

* Closed loop [paper, P/D-Serve 4.1]: ``users`` concurrent users; each sends its next request
  as soon as its previous one ends. Bounded by ``duration_s`` (no request starts after it) and
  ``max_requests``.
* Open loop: requests start at their ``arrival_s`` whatever the state of earlier ones (Poisson
  or trace replay), bounded by ``max_in_flight`` and ``duration_s``.

Per request the client measures TTFT (request sent -> first streamed chunk), end-to-end time
and tokens; it reads the gateway's rejection count from the ``kvxfer.retries`` field of the
chunks (or of the error body when the request ended early). ``success`` = finished without an
error and TTFT within the SLO. The SLO also goes to the gateway (body field ``ttft_slo_s``) as
the request's deadline, and the scenario as the body field ``scenario``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import openai

from kvxfer.serve.workload import Replay, Request, Workload

Slo = float | Callable[[Request], float]  # one TTFT SLO, or one per request (e.g. by prompt length)


def _slo(slo: Slo, req: Request) -> float:
    return float(slo(req)) if callable(slo) else float(slo)


@dataclass
class Result:
    request_id: str
    scenario: str
    user: int
    prompt_tokens: int
    start_s: float  # from the start of the run
    ttft_s: float | None
    e2e_s: float
    completion_tokens: int
    retries: int | None
    error: str | None  # None, or the error code (gateway/worker code, or "client_timeout", ...)
    finish_reason: str | None
    success: bool
    slo_s: float = 0.0
    text: str = ""


def _client(base_url: str, timeout_s: float) -> openai.AsyncOpenAI:
    # the client's default pool holds 1000 connections, more than any run here opens
    return openai.AsyncOpenAI(
        base_url=base_url.rstrip("/") + "/v1", api_key="kvxfer", max_retries=0, timeout=timeout_s
    )


async def send(
    client: openai.AsyncOpenAI,
    req: Request,
    *,
    ttft_slo_s: float,
    t0: float,
    user: int = -1,
    model: str = "kvxfer",
    api: str = "completions",
    keep_text: bool = False,
) -> Result:
    """One streamed request; never raises for a failed request (the result says why)."""
    extra = {"scenario": req.scenario, "ttft_slo_s": ttft_slo_s}
    start = time.monotonic()
    ttft = None
    tokens = 0
    retries: int | None = None
    error: str | None = None
    finish: str | None = None
    parts: list[str] = []
    try:
        if api == "chat":
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": req.prompt}],
                max_tokens=req.max_tokens,
                stream=True,
                extra_body=extra,
            )
        else:
            stream = await client.completions.create(
                model=model, prompt=req.prompt, max_tokens=req.max_tokens, stream=True, extra_body=extra
            )
        async for chunk in stream:
            if ttft is None:
                ttft = time.monotonic() - start
            meta = (chunk.model_extra or {}).get("kvxfer") or {}
            retries = meta.get("retries", retries)
            if not chunk.choices:
                continue
            c = chunk.choices[0]
            if c.finish_reason:
                finish = c.finish_reason
            else:
                tokens += 1
            if keep_text:
                parts.append((c.delta.content or "") if api == "chat" else (c.text or ""))
    except openai.APIStatusError as e:  # an HTTP error status before any chunk
        body = e.body if isinstance(e.body, dict) else {}
        error = str(body.get("code") or f"http_{e.status_code}")
        retries = (body.get("kvxfer") or {}).get("retries", retries)
    except openai.APITimeoutError:
        error = "client_timeout"
    except openai.APIConnectionError:
        error = "connection"
    except openai.APIError as e:  # an error event inside the stream
        body = e.body if isinstance(e.body, dict) else {}
        error = str(body.get("code") or "stream_error")
        retries = (body.get("kvxfer") or {}).get("retries", retries)
    if error is None and finish is None:
        error = "no_finish"
    e2e = time.monotonic() - start
    ok = error is None and ttft is not None and ttft <= ttft_slo_s
    return Result(
        req.request_id,
        req.scenario,
        user,
        req.prompt_tokens,
        start - t0,
        ttft,
        e2e,
        tokens,
        retries,
        error,
        finish,
        ok,
        ttft_slo_s,
        "".join(parts),
    )


async def closed_loop(
    base_url: str,
    workload: Workload | Replay,
    users: int,
    *,
    ttft_slo_s: Slo,
    duration_s: float,
    max_requests: int | None = None,
    model: str = "kvxfer",
    api: str = "completions",
    request_timeout_s: float = 120.0,
    think_time_s: float = 0.0,
    ramp_s: float = 0.0,
    until: Callable[[list[Result]], bool] | None = None,
    user_ids: Sequence[int] | None = None,
) -> list[Result]:
    """``users`` closed-loop users for ``duration_s`` seconds (or ``max_requests`` in total, or
    until ``until(results so far)`` is true: checked before each new request).

    ``ramp_s`` staggers the users' first requests evenly over that many seconds (user ``u``
    starts at ``u * ramp_s / users``): all of them at once is a burst that no steady state
    has, and which can tip a loaded system into timeouts it then never leaves. Results keep
    their ``start_s``; leave out those before the ramp's end to measure the steady state.
    ``user_ids``: run only these of the ``users`` users (a share, when several load generator
    processes split one population; the ramp still spaces them as in the whole)."""
    if users < 1 or duration_s <= 0:
        raise ValueError(f"users must be >= 1 and duration_s > 0, got {users}, {duration_s}")
    client = _client(base_url, request_timeout_s)
    results: list[Result] = []
    issued = 0
    t0 = time.monotonic()
    stop_at = t0 + duration_s

    async def user(u: int) -> None:
        nonlocal issued
        if ramp_s > 0:
            await asyncio.sleep(u * ramp_s / users)
        for req in workload.user_stream(u):
            if time.monotonic() >= stop_at or (max_requests is not None and issued >= max_requests):
                return
            if until is not None and until(results):
                return
            issued += 1
            results.append(
                await send(client, req, ttft_slo_s=_slo(ttft_slo_s, req), t0=t0, user=u, model=model, api=api)
            )
            if think_time_s:
                await asyncio.sleep(think_time_s)

    try:
        await asyncio.gather(*(user(u) for u in (range(users) if user_ids is None else user_ids)))
    finally:
        await client.close()
    return results


async def open_loop(
    base_url: str,
    requests: Sequence[Request],
    *,
    ttft_slo_s: Slo,
    duration_s: float | None = None,
    max_in_flight: int = 256,
    model: str = "kvxfer",
    api: str = "completions",
    request_timeout_s: float = 120.0,
) -> list[Result]:
    """Send each request at its ``arrival_s`` (seconds from now). A request whose turn comes
    while ``max_in_flight`` are open waits for a free one (its TTFT counts the wait)."""
    client = _client(base_url, request_timeout_s)
    sem = asyncio.Semaphore(max_in_flight)
    t0 = time.monotonic()
    results: list[Result] = []

    async def one(req: Request) -> None:
        async with sem:
            results.append(
                await send(client, req, ttft_slo_s=_slo(ttft_slo_s, req), t0=t0, model=model, api=api)
            )

    tasks = []
    try:
        for req in requests:
            at = req.arrival_s or 0.0
            if duration_s is not None and at >= duration_s:
                break
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req)))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await client.close()
    return results


def _pct(values: Iterable[float], q: float) -> float | None:
    v = list(values)
    return float(np.percentile(v, q)) if v else None


def _has_tpot(r: Result) -> bool:
    return r.error is None and r.ttft_s is not None and r.completion_tokens > 1


def summarize(results: Sequence[Result], wall_s: float | None = None) -> dict[str, Any]:
    """success_rate, TTFT p50/p99 (over requests that got a first token), retries p50/p99,
    errors by code, and throughput when ``wall_s`` is given."""
    n = len(results)
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    retries = [r.retries for r in results if r.retries is not None]
    out: dict[str, Any] = {
        "requests": n,
        "success_rate": (sum(r.success for r in results) / n) if n else None,
        "ttft_p50_s": _pct(ttfts, 50),
        "ttft_p99_s": _pct(ttfts, 99),
        "retries_p50": _pct(retries, 50),
        "retries_p99": _pct(retries, 99),
        "e2e_p50_s": _pct((r.e2e_s for r in results if r.error is None), 50),
        "tpot_p50_s": _pct(
            ((r.e2e_s - r.ttft_s) / (r.completion_tokens - 1) for r in results if _has_tpot(r)), 50
        ),
        "errors": dict(Counter(r.error for r in results if r.error)),
    }
    if wall_s:
        done = [r for r in results if r.error is None]
        out["throughput_rps"] = len(done) / wall_s
        out["tokens_per_s"] = sum(r.completion_tokens for r in done) / wall_s
    return out


def as_rows(results: Sequence[Result]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
