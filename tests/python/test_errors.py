"""Every error path: a typed exception naming what was wrong, raised before any byte
moves, and nothing changed in either pool."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
from kvxfer_testlib import dense_layout

import kvxfer
from kvxfer import Op, TransferState, errors


@pytest.fixture
def guarded(pair):
    """The pair, plus a check that neither pool changed during the test."""
    src, dst = pair.src.copy(), pair.dst.copy()
    yield pair
    assert np.array_equal(pair.src, src) and np.array_equal(pair.dst, dst)


def test_hierarchy_has_one_base_and_builtin_mixins():
    for cls in (
        errors.InvalidArgumentError,
        errors.OutOfRangeError,
        errors.NotFoundError,
        errors.UnsupportedError,
        errors.TransportError,
        errors.PeerUnreachableError,
        errors.RemoteError,
        errors.TimeoutError,
        errors.CanceledError,
        errors.BadDescriptorError,
        errors.InternalError,
    ):
        assert issubclass(cls, kvxfer.KvxferError)
    assert issubclass(errors.OutOfRangeError, ValueError) and issubclass(errors.OutOfRangeError, IndexError)
    assert issubclass(errors.TimeoutError, builtins.TimeoutError)
    assert issubclass(errors.PeerUnreachableError, ConnectionError)
    assert errors.from_status("NO_SUCH_CODE", "x").__class__ is errors.InternalError


def test_out_of_range_block_ids(guarded):
    p = guarded
    with pytest.raises(errors.OutOfRangeError, match="local block id 64 at position 2"):
        p.a.write(p.peer, p.ra, 0, [0, 1, 64])
    with pytest.raises(errors.OutOfRangeError, match="remote block id -1"):
        p.a.post(Op.WRITE, p.peer, p.ra, 0, local_blocks=[0], remote_blocks=[-1])
    with pytest.raises(errors.OutOfRangeError, match="layer range"):
        p.a.write(p.peer, p.ra, 0, [0], layers=(2, 9))


def test_extent_outside_remote_region(guarded):
    p = guarded
    n = p.dst.nbytes
    with pytest.raises(errors.OutOfRangeError, match="remote extent 0"):
        p.a.post(Op.WRITE, p.peer, p.ra, 0, local_extents=[[0, 16]], remote_extents=[[n - 8, 16]])
    with pytest.raises(errors.OutOfRangeError):  # offset + length wraps around 2**64
        p.a.post(Op.WRITE, p.peer, p.ra, 0, local_extents=[[0, 16]], remote_extents=[[2**64 - 8, 16]])


def test_mismatched_sizes_and_bad_arrays(guarded):
    p = guarded
    with pytest.raises(errors.InvalidArgumentError, match="bytes but remote side"):
        p.a.post(Op.WRITE, p.peer, p.ra, 0, local_blocks=[0, 1], remote_blocks=[0])
    with pytest.raises(errors.InvalidArgumentError, match="integer"):
        p.a.write(p.peer, p.ra, 0, np.array([0.5, 1.0]))
    with pytest.raises(errors.InvalidArgumentError, match="1-D"):
        p.a.write(p.peer, p.ra, 0, np.zeros((2, 2), np.int64))
    with pytest.raises(errors.InvalidArgumentError, match=r"\(N, 2\)"):
        p.a.post(Op.WRITE, p.peer, p.ra, 0, local_extents=np.zeros((2, 3)), remote_extents=[[0, 1]])
    with pytest.raises(errors.InvalidArgumentError, match="blocks or extents, not both"):
        p.a.post(Op.WRITE, p.peer, p.ra, 0, local_blocks=[0], local_extents=[[0, 1]], remote_blocks=[0])
    with pytest.raises(errors.InvalidArgumentError, match="no bytes"):
        p.a.write(p.peer, p.ra, 0, np.array([], np.int64))
    with pytest.raises(errors.InvalidArgumentError, match="timeout"):
        p.a.write(p.peer, p.ra, 0, [0], timeout=-1)
    with pytest.raises(errors.InvalidArgumentError, match="64 KiB"):
        p.a.write(p.peer, p.ra, 0, [0], notify=b"x" * (64 * 1024 + 1))


def test_unknown_remote_region_and_missing_layouts(guarded):
    p = guarded
    with pytest.raises(errors.NotFoundError, match="has no region 7"):
        p.a.write(p.peer, p.ra, 7, [0])
    plain = np.zeros(4096, np.uint8)
    rp = p.a.register(plain)  # no layout
    with pytest.raises(errors.InvalidArgumentError, match="without a KV layout"):
        p.a.write(p.peer, rp, 0, [0])


def test_unregistered_memory_is_rejected(guarded):
    p = guarded
    # The target's region belongs to engine b, not a: a cannot post from it.
    with pytest.raises(errors.NotFoundError, match="not registered with this engine"):
        p.a.write(p.peer, p.rb, 0, [0])


def test_unknown_and_removed_peer(guarded):
    p = guarded
    with pytest.raises(errors.NotFoundError, match="unknown peer 'zzz'"):
        p.a.peer("zzz")
    with pytest.raises(errors.NotFoundError):
        p.a.remove_peer("zzz")
    p.a.remove_peer("b")
    assert p.peer.removed
    with pytest.raises(errors.NotFoundError, match="was removed"):
        p.a.write(p.peer, p.ra, 0, [0])
    with pytest.raises(errors.NotFoundError, match="was removed"):
        p.a.notify(p.peer, b"x")


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[:10],
        lambda d: d + b"\0",
        lambda d: b"XXXX" + d[4:],
        lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:],
        lambda d: d[:4] + b"\x09\x00" + d[6:],
        lambda d: b"",
    ],
    ids=["truncated", "trailing", "magic", "bitflip", "version", "empty"],
)
def test_malformed_peer_metadata(pair, damage):
    with pytest.raises(errors.BadDescriptorError):
        pair.a.add_peer(damage(pair.b.descriptor()))


def test_own_descriptor_and_non_bytes(pair):
    with pytest.raises(errors.InvalidArgumentError, match="own"):
        pair.a.add_peer(pair.a.descriptor())
    with pytest.raises(errors.InvalidArgumentError, match="descriptor must be bytes"):
        pair.a.add_peer("not bytes")


def test_registration_errors():
    eng = kvxfer.Engine("reg", backends=["loopback"])
    with pytest.raises(errors.OutOfRangeError, match="layout spans"):
        eng.register(np.zeros(1000, np.uint8), dense_layout(1, 1, 4, 256))
    with pytest.raises(errors.InvalidArgumentError, match="num_kv"):
        eng.register(np.zeros(1 << 16, np.uint8), kvxfer.KvLayout(num_kv=3, num_blocks=4, block_bytes=16))
    with pytest.raises(errors.InvalidArgumentError, match="C-contiguous"):
        eng.register(np.zeros((64, 64), np.uint8)[:, ::2])
    with pytest.raises(errors.InvalidArgumentError, match="read-only"):
        eng.register(b"read-only bytes")
    with pytest.raises(errors.InvalidArgumentError, match="empty"):
        eng.register(np.zeros(0, np.uint8))
    eng.close()


def test_backend_selection_errors():
    with pytest.raises(errors.NotFoundError, match="unknown backend 'carrier-pigeon'"):
        kvxfer.Engine("x", backends=["carrier-pigeon"])
    unavailable = [b for b in kvxfer.list_backends() if not b.available]
    for b in unavailable:
        with pytest.raises((errors.UnsupportedError, errors.NotFoundError)):
            kvxfer.Engine("x", backends=[b.name])
    with pytest.raises(errors.InvalidArgumentError, match="name"):
        kvxfer.Engine("")


def test_closed_engine_rejects_work(pair):
    pair.a.close()
    assert pair.a.closed
    with pytest.raises(errors.CanceledError, match="closed"):
        pair.a.write(pair.peer, pair.ra, 0, [0])
    with pytest.raises(errors.CanceledError):
        pair.a.register(np.zeros(16, np.uint8))


def test_cancel_is_terminal_and_fenced(backend):
    from kvxfer_testlib import Pair

    p = Pair(backend, dense_layout(1, 1, 4096, 4096))
    try:
        t = p.a.write(p.peer, p.ra, 0, np.arange(4096), coalesce=False)
        t.cancel()
        assert t.state in (TransferState.DONE, TransferState.FAILED)
        if t.state == TransferState.FAILED:
            assert isinstance(t.error, errors.CanceledError)
            with pytest.raises(errors.CanceledError):
                t.wait(10)
        assert t.cancel() is False  # idempotent
    finally:
        p.close()


def test_wait_timeout_does_not_fail_the_transfer(backend):
    from kvxfer_testlib import Pair

    p = Pair(backend, dense_layout(1, 1, 4096, 16384), seed=1)
    try:
        # A loaded machine may deschedule this thread long enough for the copy to end before
        # the 1 us wait starts; then that attempt proves nothing and is repeated.
        timed_out = False
        for _ in range(5):
            t = p.a.write(p.peer, p.ra, 0, np.arange(4096), coalesce=False)  # 64 MiB, 4096 runs
            try:
                t.wait(0.000001)
            except errors.TimeoutError as e:
                assert "still pending" in str(e)
                timed_out = True
            assert t.wait(60) == TransferState.DONE  # the short wait did not fail the transfer
            if timed_out:
                break
        assert timed_out, "every 64 MiB transfer ended within 1 us of its post"
    finally:
        p.close()
