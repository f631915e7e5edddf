"""Small requests (issue 9): ``post_extent``, short lists of ids and extents read without
numpy, the inline path of every in-process backend, ``poll_many``, and a peer with large
``kvxfer.empty`` memory reached through a lazily mapped region. Bytes are checked
exactly; nothing here is timed (figures live in docs/benchmarks.md)."""

from __future__ import annotations

import numpy as np
import pytest
from kvxfer_testlib import IN_PROCESS, stream

import kvxfer
from kvxfer import Op, TransferState, errors

SLOT = 4096
SLOTS = 32


class SmallPair:
    """Engines a -> b with one 128 KiB region each, shareable (kvxfer.empty) or not."""

    def __init__(self, backend: str, shareable: bool):
        alloc = kvxfer.empty if shareable else (lambda n: np.zeros(n, np.uint8))
        self.a = kvxfer.Engine("a", backends=[backend], timeout=60.0)
        self.b = kvxfer.Engine("b", backends=[backend], timeout=60.0)
        self.src, self.dst = alloc(SLOT * SLOTS), alloc(SLOT * SLOTS)
        rng = np.random.default_rng(5)
        self.src[:] = rng.integers(0, 256, self.src.size, dtype=np.uint8)
        self.dst[:] = rng.integers(0, 256, self.dst.size, dtype=np.uint8)
        layout = kvxfer.KvLayout(num_blocks=SLOTS, block_bytes=SLOT)
        self.ra = self.a.register(self.src, layout)
        self.rb = self.b.register(self.dst, layout)
        self.peer = self.a.add_peer(self.b.descriptor())

    def close(self):
        self.a.close()
        self.b.close()


@pytest.fixture(params=[(b, s) for b in IN_PROCESS for s in (True, False)], ids=lambda p: f"{p[0]}-{p[1]}")
def small(request):
    backend, shareable = request.param
    p = SmallPair(backend, shareable)
    yield p
    p.close()


def test_post_extent_write_and_read_byte_exact_with_notification(small):
    p = small
    rng = np.random.default_rng(1)
    for i, nbytes in enumerate([1, 100, 4096, 65536, 65537, 100000]):
        for op in (Op.WRITE, Op.READ):
            lo = int(rng.integers(0, p.src.size - nbytes + 1))
            ro = int(rng.integers(0, p.dst.size - nbytes + 1))
            source = p.src if op == Op.WRITE else p.dst
            source[(lo if op == Op.WRITE else ro) :][:nbytes] = rng.integers(0, 256, nbytes, dtype=np.uint8)
            key = f"small-{i}-{op.name}".encode()
            t = p.a.post_extent(op, p.peer, p.ra, p.rb.id, lo, ro, nbytes, notify=key)
            note = p.b.wait_notification(key, timeout=60)
            # The notification is visible: the bytes are in place already.
            assert np.array_equal(p.src[lo : lo + nbytes], p.dst[ro : ro + nbytes]), (nbytes, op)
            assert note.payload == key
            assert t.wait() == TransferState.DONE
            assert t.bytes == nbytes


def test_short_lists_move_the_same_bytes_as_arrays(small):
    p = small
    ids, remote = [3, 4, 9], [30, 31, 2]
    p.a.post(Op.WRITE, p.peer, p.ra, p.rb.id, local_blocks=ids, remote_blocks=remote).wait()
    layout = p.ra.layout
    assert stream(p.src, layout, ids) == stream(p.dst, layout, remote)
    # The same ids as tuples, numpy arrays and numpy scalars plan identically.
    for local_ids in (tuple(ids), np.array(ids), [np.int64(v) for v in ids]):
        plan = p.a.plan(Op.WRITE, p.peer, p.ra, p.rb.id, local_blocks=local_ids, remote_blocks=remote)
        assert plan["runs"] == 2 and plan["bytes"] == 3 * SLOT  # 3,4 -> 30,31 merge
    # Extents as a flat pair, a list of pairs and an array.
    for i, (local, rem) in enumerate(
        [((0, 10), (SLOT * 5, 10)), ([[100, 20], [300, 5]], [(SLOT * 6, 25)]), (np.array([[7, 9]]), [[1, 9]])]
    ):
        p.a.post(Op.WRITE, p.peer, p.ra, p.rb.id, local_extents=local, remote_extents=rem).wait()
        src_ext = np.asarray(local, dtype=np.int64).reshape(-1, 2)
        dst_ext = np.asarray(rem, dtype=np.int64).reshape(-1, 2)
        got = b"".join(p.dst[o : o + n].tobytes() for o, n in dst_ext)
        want = b"".join(p.src[o : o + n].tobytes() for o, n in src_ext)
        assert got == want, i


def test_bad_small_requests_raise_typed_errors_and_move_nothing(small):
    p = small
    before = p.dst.copy()
    with pytest.raises(errors.InvalidArgumentError, match="integer"):
        p.a.write(p.peer, p.ra, p.rb.id, [0.5])
    with pytest.raises(errors.InvalidArgumentError, match="integer"):
        p.a.write(p.peer, p.ra, p.rb.id, [True])
    with pytest.raises(errors.OutOfRangeError, match="local block id 99"):
        p.a.write(p.peer, p.ra, p.rb.id, [0, 99])
    with pytest.raises(errors.OutOfRangeError):
        p.a.write(p.peer, p.ra, p.rb.id, [2**63])
    with pytest.raises(errors.InvalidArgumentError, match="negative"):
        p.a.post(Op.WRITE, p.peer, p.ra, p.rb.id, local_extents=[[0, -1]], remote_extents=[[0, 1]])
    with pytest.raises(errors.OutOfRangeError):
        p.a.post(Op.WRITE, p.peer, p.ra, p.rb.id, local_extents=[[2**64 - 8, 16]], remote_extents=[[0, 16]])
    with pytest.raises(errors.InvalidArgumentError, match=">= 0"):
        p.a.post_extent(Op.WRITE, p.peer, p.ra, p.rb.id, -1, 0, 16)
    with pytest.raises(errors.OutOfRangeError):
        p.a.post_extent(Op.WRITE, p.peer, p.ra, p.rb.id, 0, p.dst.size - 8, 16)
    with pytest.raises(errors.NotFoundError, match="has no region 77"):
        p.a.post_extent(Op.WRITE, p.peer, p.ra, 77, 0, 0, 16)
    with pytest.raises(errors.InvalidArgumentError, match="zero length"):
        p.a.post_extent(Op.WRITE, p.peer, p.ra, p.rb.id, 0, 0, 0)
    with pytest.raises(errors.InvalidArgumentError, match="64 KiB"):
        p.a.post_extent(Op.WRITE, p.peer, p.ra, p.rb.id, 0, 0, 16, notify=b"x" * (64 * 1024 + 1))
    with pytest.raises(errors.InvalidArgumentError, match="bytes"):
        p.a.post_extent(Op.WRITE, p.peer, p.ra, p.rb.id, 0, 0, 16, notify="text")  # type: ignore[arg-type]
    assert np.array_equal(p.dst, before)


def test_poll_many_and_wait_on_finished_transfers(small):
    p = small
    ts = [p.a.post_extent(Op.WRITE, p.peer, p.ra, p.rb.id, i * SLOT, i * SLOT, SLOT) for i in range(SLOTS)]
    for t in ts:
        assert t.wait(timeout=60) == TransferState.DONE
        assert t.wait() == TransferState.DONE  # again: answers from the finished state
    assert p.a.poll_many(ts) == [TransferState.DONE] * SLOTS
    assert np.array_equal(p.src, p.dst)
    assert p.a.poll_many([]) == []


def test_small_transfers_interleaved_with_a_bulk_one(small):
    """A bulk READ of the whole region runs while small WRITEs go the other way into a
    second region: both end DONE with exact bytes."""
    p = small
    big_src = kvxfer.empty(8 << 20)
    big_src[:] = np.random.default_rng(2).integers(0, 256, big_src.size, dtype=np.uint8)
    big_dst = np.zeros(8 << 20, np.uint8)
    rbig_dst = p.b.register(big_dst)
    rbig_src = p.a.register(big_src)
    peer = p.a.add_peer(p.b.descriptor())
    bulk = p.a.post(
        Op.WRITE,
        peer,
        rbig_src,
        rbig_dst.id,
        local_extents=[[i * 4096, 4096] for i in range(2048)],
        remote_extents=[[0, 8 << 20]],
        coalesce=False,
    )
    small_ts = [
        p.a.post_extent(Op.WRITE, peer, p.ra, p.rb.id, i * SLOT, i * SLOT, SLOT) for i in range(SLOTS)
    ]
    for t in [bulk, *small_ts]:
        assert t.wait(timeout=120) == TransferState.DONE
    assert np.array_equal(p.src, p.dst)
    assert np.array_equal(big_src, big_dst)


@pytest.mark.skipif("shm" not in IN_PROCESS, reason="shm is not available on this host")
def test_shm_peer_with_large_shareable_memory_is_mapped_lazily_and_byte_exact():
    """add_peer no longer populates the peer's mapping: the bytes must still land (first
    touch faults the pages in), at both ends of a 256 MiB region."""
    a = kvxfer.Engine("a", backends=["shm"])
    b = kvxfer.Engine("b", backends=["shm"])
    try:
        big = kvxfer.empty(256 << 20)
        src = np.arange(SLOT, dtype=np.uint8)
        rb = b.register(big)
        ra = a.register(src)
        peer = a.add_peer(b.descriptor())
        for off in (0, big.size // 2 + 3, big.size - SLOT):
            a.post_extent(Op.WRITE, peer, ra, rb.id, 0, off, SLOT).wait()
            assert np.array_equal(big[off : off + SLOT], src)
        back = np.zeros(SLOT, np.uint8)
        rback = a.register(back)
        a.post_extent(Op.READ, peer, rback, rb.id, 0, big.size - SLOT, SLOT).wait()
        assert np.array_equal(back, src)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("backend", [b for b in IN_PROCESS if b in ("loopback", "shm", "tcp")])
def test_inline_threshold_is_configurable_and_both_paths_agree(backend, monkeypatch):
    """inline_max_bytes=0 sends every transfer to the backend's threads; the environment
    overlay sets it too. Both paths move the same bytes and deliver the notification."""
    from kvxfer.config import EngineConfig

    section = backend  # the config section of each of these backends has the backend's name
    for inline in (0, 1 << 20):
        cfg = EngineConfig()
        getattr(cfg.backend, section).inline_max_bytes = inline
        a = kvxfer.Engine("a", backends=[backend], config=cfg)
        b = kvxfer.Engine("b", backends=[backend])
        try:
            assert a.backend_caps()[backend]["inline_max_bytes"] == inline
            src = np.arange(SLOT * 4, dtype=np.uint32).view(np.uint8)
            dst = np.zeros_like(src)
            ra, rb = a.register(src), b.register(dst)
            peer = a.add_peer(b.descriptor())
            key = f"inline-{inline}".encode()
            a.post_extent(Op.WRITE, peer, ra, rb.id, 0, 0, src.size, notify=key).wait()
            assert b.wait_notification(key, timeout=60).payload == key
            assert np.array_equal(src, dst)
        finally:
            a.close()
            b.close()
    monkeypatch.setenv(f"KVXFER_{section.upper()}_INLINE_MAX_BYTES", "0")
    e = kvxfer.Engine("env", backends=[backend])
    try:
        assert e.backend_caps()[backend]["inline_max_bytes"] == 0
    finally:
        e.close()
    monkeypatch.setenv(f"KVXFER_{section.upper()}_INLINE_MAX_BYTES", "-1")
    with pytest.raises(errors.InvalidArgumentError, match="INLINE_MAX_BYTES"):
        kvxfer.Engine("bad", backends=[backend])
