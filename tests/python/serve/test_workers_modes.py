"""The baselines' transfer modes and profiled compute through real worker processes."""

from __future__ import annotations

import asyncio
import random

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


@pytest.mark.parametrize(
    "options",
    [
        {"transfer_mode": "paged-coalesced"},
        {"transfer_mode": "block-by-block"},
        {"transfer_mode": "block-free", "per_layer": True},
    ],
    ids=["paged-coalesced", "block-by-block", "block-free-per-layer"],
)
def test_transfer_modes_give_aggregated_tokens(options, tiny_model):
    rng = random.Random(11)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (5, 16, 17, 100, 250)]
    with start_local(1, 1, backend="shm", model="tiny", gateway=False, b_p=8, b_d=8, **options) as dep:
        before = dep.status("decode-0")["kvxfer"]["transfers_done"]

        async def go():
            async with aiohttp.ClientSession() as s:
                return await asyncio.gather(*(client.prefill(s, dep.prefill_urls[0], p, 6) for p in prompts))

        results = run(go())
        transfers = dep.status("decode-0")["kvxfer"]["transfers_done"] - before
    for ids, r in zip(prompts, results, strict=True):
        assert r.error is None, r.error
        assert r.tokens == tiny_model.generate(ids, 6)
    blocks = sum(-(-len(p) // 16) for p in prompts)
    want = {"paged-coalesced": len(prompts), "block-by-block": blocks}.get(options["transfer_mode"])
    if options.get("per_layer"):
        want = len(prompts) * tiny_model.config.num_layers
    assert transfers == want


def test_profiled_mode_moves_real_kv_bytes_and_follows_its_profile():
    with start_local(1, 1, backend="shm", model="tiny", mode="profiled", gateway=False, b_p=4, b_d=4) as dep:

        async def go():
            async with aiohttp.ClientSession() as s:
                return await asyncio.gather(
                    *(client.prefill(s, dep.prefill_urls[0], list(range(1, n)), 8) for n in (20, 200, 400))
                )

        results = run(go())
        pst, dst = dep.status("prefill-0"), dep.status("decode-0")
    assert pst["mode"] == dst["mode"] == "profiled" and pst["machine"]
    for r in results:
        assert r.error is None, r.error  # the decode checked the KV value the prefill wrote
        assert len(r.tokens) == 8 and r.done["timings"]["transfer_s"] > 0
    assert dst["transfer_failures"] == 0 and dst["kvxfer"]["bytes_done"] > 0


def test_aggregated_worker_serves_the_same_endpoint_and_rejects_when_full(tiny_model):
    """Baseline (a): one process does prefill and decode behind /v1/prefill."""
    rng = random.Random(5)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (7, 90)]
    with start_local(0, 0, n_aggregated=1, model="tiny", gateway=False, b_d=2, max_new_tokens=600) as dep:
        url = dep.aggregated_urls[0]

        async def go():
            async with aiohttp.ClientSession() as s:
                jobs = [asyncio.create_task(client.prefill(s, url, p, 400)) for p in prompts]
                for _ in range(3000):  # both slots taken
                    if dep.status("aggregated-0")["busy"] == 2:
                        break
                    await asyncio.sleep(0.01)
                refused = await client.prefill(s, url, [1, 2, 3], 4)
                return refused, await asyncio.gather(*jobs)

        refused, results = run(go(), timeout=240)
        st = dep.status("aggregated-0")
    assert refused.status == 429
    for ids, r in zip(prompts, results, strict=True):
        assert r.error is None, r.error
        assert r.tokens == tiny_model.generate(ids, 400)
    assert st["role"] == "aggregated" and st["busy"] == 0 and st["rejected"] >= 1


def test_medium_model_workers_give_its_greedy_tokens():
    """Real mode with the "medium" model (the load experiments' one): prefill and decode
    processes each build it from the seed, the KV crosses over shm, and the tokens are the
    model's own greedy continuation."""
    import torch

    from kvxfer.models import Model
    from kvxfer.serve.runtime import medium_model_config

    torch.set_num_threads(1)
    model = Model(medium_model_config(0))
    rng = random.Random(13)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (9, 40)]
    with start_local(1, 1, backend="shm", model="medium", gateway=False, b_p=2, b_d=2) as dep:

        async def go():
            async with aiohttp.ClientSession() as s:
                return await asyncio.gather(*(client.prefill(s, dep.prefill_urls[0], p, 5) for p in prompts))

        results = run(go())
        st = dep.status("decode-0")
    for ids, r in zip(prompts, results, strict=True):
        assert r.error is None, r.error
        assert r.tokens == model.generate(ids, 5)
    assert st["kvxfer"]["transfers_done"] >= len(prompts)


def test_pinned_workers_and_prefill_compute_times():
    """start_local(pin_cpus=True): each worker on a physical core of its own (its status says
    which CPUs), the rest left in ``free_cpus``; more workers than cores is refused. The
    prefill records each prompt's compute time (``GET /v1/kvxfer/prefill-times``)."""
    import json
    import urllib.error
    import urllib.request

    from kvxfer.serve.deployment import physical_cores
    from kvxfer.serve.errors import ConfigError

    cores = physical_cores()
    if len(cores) < 2:
        pytest.skip("pinning two workers needs two physical cores")
    with pytest.raises(ConfigError, match="physical cores"):
        start_local(len(cores), 1, model="tiny", mode="profiled", gateway=False, pin_cpus=True)
    with start_local(1, 1, model="tiny", mode="profiled", gateway=False, b_p=2, pin_cpus=True) as dep:
        assert dep.status("prefill-0")["cpus"] == cores[0] and dep.status("decode-0")["cpus"] == cores[1]
        assert dep.free_cpus == sorted(c for core in cores[2:] for c in core)
        url = dep.prefill_urls[0]

        async def go(n):  # no common prefix between the two prompts: every token is computed
            async with aiohttp.ClientSession() as s:
                ids = list(range(1, n + 1)) if n < 100 else list(range(n, 0, -1))
                return await client.prefill(s, url, ids, 2)

        import time

        t0 = time.time()
        assert run(go(40)).error is None
        t1 = time.time()
        assert run(go(300)).error is None
        with urllib.request.urlopen(url + "/v1/kvxfer/prefill-times") as r:
            everything = json.loads(r.read())
        with urllib.request.urlopen(f"{url}/v1/kvxfer/prefill-times?since={t1}") as r:
            late = json.loads(r.read())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/v1/kvxfer/prefill-times?since=x")
        assert e.value.code == 400
        e.value.close()
    assert [n for n, _, _ in everything] == [40, 300] and [n for n, _, _ in late] == [300]
    assert all(s > 0 and end >= t0 for _, s, end in everything)
