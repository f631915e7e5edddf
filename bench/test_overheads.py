"""Per-call overheads of the kvxfer Python surface, with pytest-benchmark.

    pytest bench/test_overheads.py --benchmark-only

Not part of the main test run (pyproject's testpaths is tests/python) and without timing
assertions: the figures are for reading and comparing (``--benchmark-compare``), not for
gating. Everything goes through the loopback backend (two engines in this process), so
what is measured is the core and the bindings, not a transport: post() validates,
plans (coalesces) and hands the job to the copy pool; wait()/poll() read the job state.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

try:
    import kvxfer
except ImportError:  # a source checkout: kvxfer/ sits next to bench/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import kvxfer

BLOCK = 256
POOL = 1 << 18  # 262144 blocks of 256 B = 64 MiB per side


@pytest.fixture(scope="module")
def pair():
    a = kvxfer.Engine("ovh-a", backends=["loopback"], threads=1)
    b = kvxfer.Engine("ovh-b", backends=["loopback"], threads=1)
    layout = kvxfer.KvLayout(num_layers=1, num_kv=1, num_blocks=POOL, block_bytes=BLOCK)
    src = np.zeros(POOL * BLOCK, np.uint8)
    dst = np.zeros(POOL * BLOCK, np.uint8)
    ra = a.register(src, layout=layout)
    rb = b.register(dst, layout=layout)
    peer = a.add_peer(b.descriptor())
    yield a, peer, ra, rb.id
    a.close()
    b.close()


def _ids(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.ascontiguousarray(rng.choice(POOL, size=n, replace=False), dtype=np.int64)


@pytest.mark.parametrize("n", [1, 1000, 100_000], ids=["1", "1k", "100k"])
def test_post(benchmark, pair, n):
    """post() of n random block ids (random on both sides: nothing coalesces). The copy
    runs after post() returns; setup() waits for it outside the timing."""
    eng, peer, region, rid = pair
    local, remote = _ids(n, 1), _ids(n, 2)
    pending = []

    def setup():
        while pending:
            pending.pop().wait(30)

    def post():
        pending.append(eng.post(kvxfer.Op.WRITE, peer, region, rid, local_blocks=local, remote_blocks=remote))

    benchmark.pedantic(post, setup=setup, rounds=200 if n < 100_000 else 50, iterations=1, warmup_rounds=2)
    setup()
    benchmark.extra_info["block_ids"] = n


@pytest.mark.parametrize("n", [1, 1000, 100_000], ids=["1", "1k", "100k"])
def test_post_and_wait(benchmark, pair, n):
    """A whole transfer of n 256-B blocks at queue depth 1: post, copy, completion."""
    eng, peer, region, rid = pair
    local, remote = _ids(n, 3), _ids(n, 4)

    def run():
        eng.post(kvxfer.Op.WRITE, peer, region, rid, local_blocks=local, remote_blocks=remote).wait(30)

    benchmark(run)
    benchmark.extra_info["block_ids"] = n


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesce", "no-coalesce"])
def test_plan_100k(benchmark, pair, coalesce):
    """plan() of 100k block ids: validation and planning (with or without the coalescing
    pass) without moving anything."""
    eng, peer, region, rid = pair
    local, remote = _ids(100_000, 5), _ids(100_000, 6)
    benchmark(
        lambda: eng.plan(
            kvxfer.Op.WRITE, peer, region, rid, local_blocks=local, remote_blocks=remote, coalesce=coalesce
        )
    )


def test_poll(benchmark, pair):
    """poll() of a finished transfer (the cost of checking a handle)."""
    eng, peer, region, rid = pair
    t = eng.post(kvxfer.Op.WRITE, peer, region, rid, local_blocks=_ids(1))
    t.wait(30)
    benchmark(t.poll)


def test_wait_done(benchmark, pair):
    """wait() of a finished transfer (returns at once; GIL release and re-acquire)."""
    eng, peer, region, rid = pair
    t = eng.post(kvxfer.Op.WRITE, peer, region, rid, local_blocks=_ids(1))
    t.wait(30)
    benchmark(t.wait)


@pytest.mark.parametrize("backend", ["loopback", "shm"])
def test_register_1gib(benchmark, backend):
    """register() of a 1 GiB numpy array with a KV layout (pages already faulted in)."""
    if not {b.name: b.available for b in kvxfer.list_backends()}.get(backend):
        pytest.skip(f"backend {backend} unavailable")
    eng = kvxfer.Engine(f"ovh-reg-{backend}", backends=[backend])
    buf = np.ones(1 << 30, np.uint8)
    layout = kvxfer.KvLayout(num_layers=32, num_kv=2, num_blocks=512, block_bytes=32768)
    regions = []

    def setup():
        while regions:
            eng.deregister(regions.pop())

    def register():
        regions.append(eng.register(buf, layout=layout))

    benchmark.pedantic(register, setup=setup, rounds=50, iterations=1, warmup_rounds=1)
    setup()
    eng.close()
