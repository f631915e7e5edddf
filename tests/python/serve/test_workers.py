"""Prefill and decode worker processes (tiny model, real compute) over shm and tcp: requests
flow prefill -> kvxfer -> decode with the aggregated model's tokens; prefix reuse; a full
prefill rejects at once; the local-queue policy queues instead."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import pytest

from kvxfer.serve import client
from kvxfer.serve.deployment import start_local

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def run(coro, timeout: float = 120.0):
    """Runs ``coro`` with a deadline: a hang fails the test instead of stalling the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def tiny_model():
    """The seeded tiny model every ``model="tiny"`` worker loads (the aggregated reference)."""
    import torch

    from kvxfer.models import Model
    from kvxfer.serve.runtime import tiny_model_config

    torch.set_num_threads(1)
    return Model(tiny_model_config(0))


@pytest.fixture(scope="module", params=["shm", "tcp"])
def dep(request):
    with start_local(
        1,
        1,
        backend=request.param,
        model="tiny",
        gateway=False,
        b_p=2,
        b_d=2,
        pending=0,
        max_prompt_tokens=256,
        max_new_tokens=3000,
    ) as d:
        yield d


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(rng.randint(3, 200))] for _ in range(n)]


async def _until_accepted(s, url, ids, max_tokens, **kw) -> client.Result:
    for _ in range(2000):
        r = await client.prefill(s, url, ids, max_tokens, **kw)
        if r.status != 429:
            return r
        await asyncio.sleep(0.01)
    raise AssertionError("never accepted")


def test_requests_flow_prefill_to_decode_with_aggregated_tokens(dep, tiny_model):
    prompts = _prompts(6, seed=1)
    before = dep.status("decode-0")["kvxfer"]["transfers_done"]

    async def go():
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(_until_accepted(s, dep.prefill_urls[0], p, 10) for p in prompts))

    results = run(go())
    for ids, r in zip(prompts, results, strict=True):
        assert r.error is None, r.error
        assert r.tokens == tiny_model.generate(ids, 10)
        assert r.done["finish_reason"] == "length"
        assert r.done["timings"]["transfer_s"] > 0 and r.done["timings"]["decode"] == "decode-0"
    st = dep.status("decode-0")
    assert st["kvxfer"]["transfers_done"] - before == len(prompts)  # ONE kvxfer READ per request
    assert st["running"] == 0 and st["free_blocks"] == st["pool_blocks"]  # every block came back
    assert dep.status("prefill-0")["busy"] == 0  # every slot released


def test_prefix_reuse_inside_a_scenario_keeps_tokens(dep, tiny_model):
    rng = random.Random(7)
    setting = [rng.randrange(512) for _ in range(40)]
    a = setting + [rng.randrange(512) for _ in range(20)]
    b = setting + [rng.randrange(512) for _ in range(30)]
    scen = f"scen-{dep.decode_urls[0]}"
    hits0 = dep.status("prefill-0")["prefix_hits"]

    async def go():
        async with aiohttp.ClientSession() as s:
            ra = await client.prefill(s, dep.prefill_urls[0], a, 8, scenario=scen)
            rb = await client.prefill(s, dep.prefill_urls[0], b, 8, scenario=scen)
            return ra, rb

    ra, rb = run(go())
    assert ra.done["timings"]["prefix_len"] == 0
    assert rb.done["timings"]["prefix_len"] == 40  # the setting part, not recomputed
    assert ra.tokens == tiny_model.generate(a, 8) and rb.tokens == tiny_model.generate(b, 8)
    st = dep.status("prefill-0")
    assert st["prefix_hits"] == hits0 + 1 and 0 < st["prefix_hit_rate"] <= 1


def test_full_prefill_rejects_at_once_and_local_queue_waits(dep, tiny_model):
    """Decode full (b_d=2, no pending queue) -> the prefill's 2 slots stay held by prompts
    waiting for a decode -> the next requests are refused in well under a millisecond (median of 20)."""
    url = dep.prefill_urls[0]
    longs, waits = _prompts(2, seed=3), _prompts(2, seed=4)

    async def poll(name, key, value):
        for _ in range(3000):
            if dep.status(name)[key] == value:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{name}.{key} never reached {value}")

    async def go():
        async with aiohttp.ClientSession() as s:
            # Long enough that the decode stays full while 20 refusals are timed on a loaded host.
            long_jobs = [asyncio.create_task(client.prefill(s, url, p, 3000)) for p in longs]
            await poll("decode-0", "running", 2)
            wait_jobs = [asyncio.create_task(client.prefill(s, url, p, 5)) for p in waits]
            await poll("prefill-0", "busy", 2)
            rtts = []
            for _ in range(20):  # the median of 20: one slow wake-up on a loaded host is not the policy's
                t0 = time.perf_counter()
                refused = await client.prefill(s, url, [1, 2, 3], 5)
                rtts.append(time.perf_counter() - t0)
                assert refused.status == 429, refused
            rtt = sorted(rtts)[len(rtts) // 2]
            queued = asyncio.create_task(client.prefill(s, url, [4, 5, 6], 5, policy="local-queue"))
            await poll("prefill-0", "queued", 1)
            return (
                refused,
                rtt,
                await asyncio.gather(*long_jobs),
                await asyncio.gather(*wait_jobs),
                await queued,
            )

    refused, rtt, long_res, wait_res, queued = run(go(), timeout=240)
    assert refused.status == 429 and refused.error["error"] == "busy"
    decision = dep.status("prefill-0")["reject_decision_p50_s"]
    assert decision < 1e-3, f"reject decided in {decision * 1e3:.3f} ms (median)"
    assert rtt < 0.05, f"429 round trip {rtt * 1e3:.1f} ms (median)"
    for ids, r, n in [
        *zip(longs, long_res, [3000, 3000], strict=True),
        *zip(waits, wait_res, [5, 5], strict=True),
        ([4, 5, 6], queued, 5),
    ]:
        assert r.status == 200 and r.error is None, r.error
        assert r.tokens == tiny_model.generate(ids, n)
