"""Killing a decode process mid-stream ends its requests with an error event, not a hang."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from kvxfer.serve import client, protocol
from kvxfer.serve.deployment import start_local

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def run(coro, timeout: float = 120.0):
    """Runs ``coro`` with a deadline: a hang fails the test instead of stalling the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_killed_decode_ends_streams_with_error_event():
    with start_local(
        1, 1, backend="shm", model="tiny", gateway=False, b_p=2, b_d=2, max_new_tokens=3000, decode_wait_s=2.0
    ) as dep:
        url = dep.prefill_urls[0]

        async def go():
            async with aiohttp.ClientSession() as s:
                req = protocol.PrefillRequest("victim", "s", list(range(1, 30)), 3000, time.time() + 60)
                events = []
                async with s.post(url + "/v1/prefill", json=req.to_json()) as r:
                    assert r.status == 200
                    async for line in r.content:
                        ev = json.loads(line)
                        events.append(ev)
                        if len(events) == 5:
                            dep.kill("decode-0")  # SIGKILL mid-stream
                        if ev["type"] != "token":
                            break
                # the prefill stays usable: a new request ends (no decode left) with an error event
                after = await client.prefill(s, url, [1, 2, 3], 5)
                return events, after

        t0 = time.monotonic()
        events, after = run(go(), timeout=60)
        assert time.monotonic() - t0 < 30
        assert [e["type"] for e in events[:5]] == ["token"] * 5
        assert events[-1]["type"] == "error" and events[-1]["code"] == "decode_failed", events[-1]
        assert after.status == 200 and after.error is not None and after.error["type"] == "error"
        assert after.error["code"] in ("busy", "decode_failed")
        st = dep.status("prefill-0")
        assert st["busy"] == 0 and st["open_streams"] == 0  # no slot or stream left behind
