"""A minimal client of the worker protocol (what the gateway does, without the OpenAI front):
used by the equivalence experiment and the tests."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from . import protocol


@dataclass
class Result:
    status: int
    tokens: list[int] = field(default_factory=list)
    done: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    seconds: float = 0.0
    ttft_s: float | None = None


async def prefill(
    session: aiohttp.ClientSession,
    url: str,
    prompt: list[int],
    max_tokens: int,
    *,
    scenario: str = "default",
    deadline_s: float = 60.0,
    stop: list[int] | None = None,
    policy: str | None = None,
    request_id: str | None = None,
) -> Result:
    """POSTs one PrefillRequest to ``url`` and collects its stream (or its refusal)."""
    req = protocol.PrefillRequest(
        request_id=request_id or uuid.uuid4().hex,
        scenario=scenario,
        prompt_token_ids=list(prompt),
        max_tokens=max_tokens,
        deadline=time.time() + deadline_s,
        stop_token_ids=list(stop or []),
    )
    headers = {"X-Kvxfer-Policy": policy} if policy else {}
    t0 = time.monotonic()
    async with session.post(url.rstrip("/") + "/v1/prefill", json=req.to_json(), headers=headers) as r:
        res = Result(r.status)
        if r.status != 200:
            res.error = await r.json(content_type=None)
            res.seconds = time.monotonic() - t0
            return res
        async for line in r.content:
            if not line.strip():
                continue
            ev = json.loads(line)
            if ev["type"] == "token":
                if res.ttft_s is None:
                    res.ttft_s = time.monotonic() - t0
                res.tokens.append(ev["token_id"])
            elif ev["type"] == "done":
                res.done = ev
            else:
                res.error = ev
    res.seconds = time.monotonic() - t0
    return res
