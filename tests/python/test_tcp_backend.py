"""The TCP backend: byte-exact WRITE/READ over real sockets, notifications strictly after
data, pipelining, failure handling (closed, killed and stopped peers), the target's own
bounds checks, its wire-format robustness, and bind-address selection.

In-process tests run two engines of this process over loopback TCP; the tests marked
``multiprocess`` put the target in a spawned process and exchange descriptors through a
multiprocessing Pipe. Every test checks the moved bytes against numpy.
"""

from __future__ import annotations

import gc
import hashlib
import hmac
import multiprocessing as mp
import os
import signal
import socket
import struct
import threading
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import Op, TransferState, errors

pytestmark = pytest.mark.skipif(
    not any(b.name == "tcp" and b.available for b in kvxfer.list_backends()),
    reason="this build has no tcp backend",
)

LAYERS, KV, BLOCKS, BB = 3, 2, 128, 768  # 768-byte blocks: no power-of-two luck


def layout(layers=LAYERS, kv=KV, blocks=BLOCKS, bb=BB) -> kvxfer.KvLayout:
    return kvxfer.KvLayout(num_layers=layers, num_kv=kv, num_blocks=blocks, block_bytes=bb)


def pool_size(lay: kvxfer.KvLayout) -> int:
    return lay.num_layers * lay.num_kv * lay.num_blocks * lay.block_bytes


def blocks_view(pool: np.ndarray, lay: kvxfer.KvLayout) -> np.ndarray:
    """A dense pool as [layer, kv, block, byte]."""
    return pool.reshape(lay.num_layers, lay.num_kv, lay.num_blocks, lay.block_bytes)


def expected_after(dst: np.ndarray, src: np.ndarray, lay, dst_ids, src_ids) -> np.ndarray:
    """`dst` after copying blocks src_ids -> dst_ids on every layer and K/V: the reference."""
    out = dst.copy()
    blocks_view(out, lay)[:, :, np.asarray(dst_ids)] = blocks_view(src, lay)[:, :, np.asarray(src_ids)]
    return out


class TcpPair:
    """Engines `a` (initiator) and `b` (target) over TCP, each with one random KV pool."""

    def __init__(self, lay=None, seed=0, **engine_kw):
        self.lay = lay or layout()
        rng = np.random.default_rng(seed)
        self.a = kvxfer.Engine("a", backends=["tcp"], timeout=30.0, **engine_kw)
        self.b = kvxfer.Engine("b", backends=["tcp"], timeout=30.0, **engine_kw)
        self.src = rng.integers(0, 256, pool_size(self.lay), dtype=np.uint8)
        self.dst = rng.integers(0, 256, pool_size(self.lay), dtype=np.uint8)
        self.ra = self.a.register(self.src, self.lay)
        self.rb = self.b.register(self.dst, self.lay)
        self.peer = self.a.add_peer(self.b.descriptor())
        self.back = self.b.add_peer(self.a.descriptor())

    def close(self):
        self.a.close()
        self.b.close()


@pytest.fixture
def pair():
    p = TcpPair()
    yield p
    p.close()


def tcp_endpoint(engine) -> tuple[int, list[str]]:
    """(port, addresses) that `engine` publishes for the tcp backend."""
    info = dict(kvxfer._native.decode_descriptor(engine.descriptor())["backends"])["tcp"]
    version, count, port = struct.unpack_from("<BBH", info)
    assert version == 1 and len(info) == 4 + 4 * count
    return port, [socket.inet_ntoa(info[4 + 4 * i : 8 + 4 * i]) for i in range(count)]


# --------------------------------------------------------------------------------------
# Byte-exact transfers in one process


def test_engine_publishes_a_reachable_endpoint(pair):
    port, addrs = tcp_endpoint(pair.b)
    assert 0 < port < 65536
    assert "127.0.0.1" in addrs and addrs[-1].startswith("127."), addrs  # loopback comes last
    assert pair.peer.backend == "tcp"
    assert f":{port})" in pair.b.describe_backends() and "tcp (listening on" in pair.b.describe_backends()
    # And it carries bytes.
    pair.a.write(pair.peer, pair.ra, pair.rb.id, [5], remote_blocks=[9]).wait(30)
    assert np.array_equal(blocks_view(pair.dst, pair.lay)[:, :, 9], blocks_view(pair.src, pair.lay)[:, :, 5])


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("coalesce", [True, False])
def test_write_random_block_map_byte_exact(pair, seed, coalesce):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, BLOCKS))
    lids, rids = rng.permutation(BLOCKS)[:n], rng.permutation(BLOCKS)[:n]
    want = expected_after(pair.dst, pair.src, pair.lay, rids, lids)
    t = pair.a.write(pair.peer, pair.ra, pair.rb.id, lids, remote_blocks=rids, coalesce=coalesce)
    assert t.wait(30) == TransferState.DONE
    # Whole-pool equality: the destination blocks changed, nothing else did.
    assert np.array_equal(pair.dst, want)
    assert t.quiesced


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_read_random_block_map_byte_exact(pair, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, BLOCKS))
    lids, rids = rng.permutation(BLOCKS)[:n], rng.permutation(BLOCKS)[:n]
    want = expected_after(pair.src, pair.dst, pair.lay, lids, rids)  # remote rids -> local lids
    pair.a.read(pair.peer, pair.ra, pair.rb.id, lids, remote_blocks=rids).wait(30)
    assert np.array_equal(pair.src, want)


def test_layer_range_write(pair):
    rng = np.random.default_rng(8)
    lids, rids = rng.permutation(BLOCKS)[:40], rng.permutation(BLOCKS)[:40]
    want = pair.dst.copy()
    blocks_view(want, pair.lay)[1:3, :, rids] = blocks_view(pair.src, pair.lay)[1:3, :, lids]
    pair.a.write(pair.peer, pair.ra, pair.rb.id, lids, remote_blocks=rids, layers=(1, 3)).wait(30)
    assert np.array_equal(pair.dst, want)


def random_extents(rng, total_space: int, count: int, max_len: int) -> np.ndarray:
    """`count` disjoint [offset, length] extents inside [0, total_space), shuffled."""
    cuts = np.sort(rng.choice(total_space // max_len, size=count, replace=False)) * max_len
    lens = rng.integers(1, max_len, size=count)
    ext = np.stack([cuts, lens], axis=1).astype(np.uint64)
    return ext[rng.permutation(count)]


def gather(pool: np.ndarray, ext: np.ndarray) -> np.ndarray:
    return np.concatenate([pool[int(o) : int(o) + int(n)] for o, n in ext])


def scatter(pool: np.ndarray, ext: np.ndarray, data: np.ndarray) -> None:
    pos = 0
    for o, n in ext:
        pool[int(o) : int(o) + int(n)] = data[pos : pos + int(n)]
        pos += int(n)


@pytest.mark.parametrize("op", [Op.WRITE, Op.READ])
def test_extents_gather_scatter_byte_exact(pair, op):
    rng = np.random.default_rng(11 if op == Op.WRITE else 12)
    local_ext = random_extents(rng, pool_size(pair.lay), 50, 3000)
    total = int(local_ext[:, 1].sum())
    # The remote side: a different cut of the same number of bytes.
    remote_ext = random_extents(rng, pool_size(pair.lay), 30, 6000)
    while int(remote_ext[:, 1].sum()) < total:
        remote_ext[rng.integers(len(remote_ext)), 1] += 1
    while int(remote_ext[:, 1].sum()) > total:
        i = rng.integers(len(remote_ext))
        if remote_ext[i, 1] > 1:
            remote_ext[i, 1] -= 1
    src_side, dst_side = (pair.src, pair.dst) if op == Op.WRITE else (pair.dst, pair.src)
    src_ext, dst_ext = (local_ext, remote_ext) if op == Op.WRITE else (remote_ext, local_ext)
    want = dst_side.copy()
    scatter(want, dst_ext, gather(src_side, src_ext))
    t = pair.a.post(op, pair.peer, pair.ra, pair.rb.id, local_extents=local_ext, remote_extents=remote_ext)
    t.wait(30)
    assert np.array_equal(dst_side, want)


def test_large_extent_split_into_many_frames():
    """40 MiB in one extent: split into 8 MiB runs, several frames; READ back too."""
    n = 40 << 20
    a = kvxfer.Engine("a", backends=["tcp"])
    b = kvxfer.Engine("b", backends=["tcp"])
    try:
        src = np.random.default_rng(3).integers(0, 256, n + 4096, dtype=np.uint8)
        dst = np.zeros(n + 8192, np.uint8)
        ra, rb = a.register(src), b.register(dst)
        peer = a.add_peer(b.descriptor())
        t = a.post(Op.WRITE, peer, ra, rb.id, local_extents=[[4096, n]], remote_extents=[[100, n]])
        t.wait(60)
        assert t.plan["runs"] >= 5
        assert np.array_equal(dst[100 : 100 + n], src[4096 : 4096 + n])
        assert not dst[:100].any() and not dst[100 + n :].any()
        src[:] = 0
        a.post(Op.READ, peer, ra, rb.id, local_extents=[[0, n]], remote_extents=[[100, n]]).wait(60)
        assert np.array_equal(src[:n], dst[100 : 100 + n]) and not src[n:].any()
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------------------
# Notifications


def test_write_notification_arrives_after_all_bytes():
    """24 MiB over ~thousands of frames: when the notification is visible, every byte is."""
    lay = layout(layers=4, kv=2, blocks=768, bb=4096)
    p = TcpPair(lay, seed=21)
    try:
        ids = np.random.default_rng(1).permutation(lay.num_blocks)
        rids = np.random.default_rng(2).permutation(lay.num_blocks)
        want = expected_after(p.dst, p.src, lay, rids, ids)
        t = p.a.write(p.peer, p.ra, p.rb.id, ids, remote_blocks=rids, notify=b"req-17", coalesce=False)
        (note,) = p.b.wait_for_notifications(1, timeout=30)
        assert np.array_equal(p.dst, want)  # checked the moment the notification is seen
        assert note.payload == b"req-17" and note.peer == "a" and note.peer_instance == p.a.instance_id
        assert t.wait(30) == TransferState.DONE
    finally:
        p.close()


@pytest.mark.parametrize("nbytes", [4096, 384 * 1024], ids=["inline-4k", "sender-384k"])
def test_target_closing_right_after_the_notification_still_acknowledges(nbytes):
    """The target's application closes its engine the moment the notification arrives: the
    initiator must still see DONE (the ACK leaves before the connection closes), never a lost
    connection for a transfer whose bytes and notification arrived. 4 KiB takes the inline
    path and the target's quick path; 384 KiB the sender thread and a target worker."""
    for i in range(20):
        a = kvxfer.Engine("a", backends=["tcp"], timeout=30.0)
        b = kvxfer.Engine("b", backends=["tcp"], timeout=30.0)
        try:
            src = np.random.default_rng(i).integers(0, 256, nbytes, dtype=np.uint8)
            dst = np.zeros(nbytes, dtype=np.uint8)
            ra, rb = a.register(src), b.register(dst)
            peer = a.add_peer(b.descriptor())
            t = a.post_extent(Op.WRITE, peer, ra, rb.id, 0, 0, nbytes, notify=b"n%d" % i)
            (note,) = b.wait_for_notifications(1, timeout=30)
            assert np.array_equal(dst, src) and note.payload == b"n%d" % i
            b.close()
            del rb, b  # the last references: the target's backends stop now
            gc.collect()
            assert t.wait(30) == TransferState.DONE  # raises PeerUnreachableError if the ACK was lost
        finally:
            a.close()


@pytest.mark.parametrize("how", ["wait", "wait-other-thread", "poll", "await", "nobody"])
def test_small_write_completes_however_it_is_waited_for(pair, how):
    """A 4 KiB write takes the inline path, whose waiting caller reads its own ACK. It must
    complete however the application waits: wait() (on this or another thread), polling
    ``state``, ``await`` (the completion fd), or nobody at all (the receiver thread reads the
    ACK after a short grace). Bytes are checked exactly each time."""
    for i in range(30):
        start = (i % BLOCKS) * BB
        p = pair
        p.src[start : start + BB] = np.random.default_rng(i).integers(0, 256, BB, dtype=np.uint8)
        t = p.a.post_extent(Op.WRITE, p.peer, p.ra, p.rb.id, start, start, BB)
        if how == "wait":
            assert t.wait(30) == TransferState.DONE
        elif how == "wait-other-thread":
            out = []
            th = threading.Thread(target=lambda t=t, out=out: out.append(t.wait(30)))
            th.start()
            th.join(60)
            assert out == [TransferState.DONE]
        elif how == "poll":
            deadline = time.monotonic() + 30
            while t.state == TransferState.PENDING and time.monotonic() < deadline:
                pass
            assert t.state == TransferState.DONE
        elif how == "await":
            import asyncio

            assert asyncio.run(asyncio.wait_for(_awaited(t), 30)) == TransferState.DONE
        else:
            # Nobody waits or polls: telemetry does not drive the transfer, the receiver does.
            deadline = time.monotonic() + 30
            while t.telemetry["total_s"] < 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert 0 <= t.telemetry["total_s"] < 5
            assert t.state == TransferState.DONE
        assert np.array_equal(p.dst[start : start + BB], p.src[start : start + BB])


async def _awaited(t):
    return await t


def test_read_notification_reaches_target_after_data_landed():
    lay = layout(layers=4, kv=2, blocks=512, bb=4096)
    p = TcpPair(lay, seed=22)
    try:
        ids = np.random.default_rng(3).permutation(lay.num_blocks)
        want = expected_after(p.src, p.dst, lay, ids, ids)
        t = p.a.read(p.peer, p.ra, p.rb.id, ids, notify=b"read-done")
        (note,) = p.b.wait_for_notifications(1, timeout=30)
        assert note.payload == b"read-done" and note.peer == "a"
        assert np.array_equal(p.src, want)  # the initiator had every byte before the target heard
        t.wait(30)
    finally:
        p.close()


def test_standalone_notify_is_ordered_after_queued_transfers(pair):
    rng = np.random.default_rng(5)
    ids = rng.permutation(BLOCKS)
    groups = np.array_split(ids, 4)
    want = expected_after(pair.dst, pair.src, pair.lay, ids, ids)
    ts = [pair.a.write(pair.peer, pair.ra, pair.rb.id, g, coalesce=False) for g in groups]
    pair.a.notify(pair.peer, b"after-all", timeout=30)  # queued behind the writes
    (note,) = pair.b.wait_for_notifications(1, timeout=30)
    assert note.payload == b"after-all"
    assert np.array_equal(pair.dst, want)
    pair.a.wait_all(ts, 30)


def test_notify_payload_limits(pair):
    big = bytes(range(256)) * 256  # 64 KiB: the largest allowed
    pair.a.notify(pair.peer, big, timeout=30)
    (note,) = pair.b.wait_for_notifications(1, timeout=30)
    assert note.payload == big
    with pytest.raises(errors.InvalidArgumentError):
        pair.a.notify(pair.peer, big + b"x", timeout=30)
    # The connection is still fine afterwards.
    pair.a.write(pair.peer, pair.ra, pair.rb.id, [0, 1], remote_blocks=[2, 3]).wait(30)
    assert np.array_equal(
        blocks_view(pair.dst, pair.lay)[:, :, [2, 3]], blocks_view(pair.src, pair.lay)[:, :, [0, 1]]
    )


# --------------------------------------------------------------------------------------
# Pipelining


def test_eight_transfers_in_flight_at_once(pair):
    """4 writes and 4 reads posted back to back on one connection, each with a
    notification; all DONE, every byte right, 8 notifications at the target."""
    rng = np.random.default_rng(31)
    ids = rng.permutation(BLOCKS)
    w_local, w_remote = np.array_split(ids[:64], 4), np.array_split(rng.permutation(64), 4)
    r_local, r_remote = np.array_split(ids[64:], 4), np.array_split(64 + rng.permutation(64), 4)
    want_dst = pair.dst.copy()
    want_src = pair.src.copy()
    for lo, re in zip(w_local, w_remote, strict=True):
        want_dst = expected_after(want_dst, pair.src, pair.lay, re, lo)
    for lo, re in zip(r_local, r_remote, strict=True):
        want_src = expected_after(
            want_src, pair.dst, pair.lay, lo, re
        )  # reads from blocks 64.. (not written)
    ts = []
    for i in range(4):
        ts.append(
            pair.a.write(
                pair.peer, pair.ra, pair.rb.id, w_local[i], remote_blocks=w_remote[i], notify=b"w%d" % i
            )
        )
        ts.append(
            pair.a.read(
                pair.peer, pair.ra, pair.rb.id, r_local[i], remote_blocks=r_remote[i], notify=b"r%d" % i
            )
        )
    pair.a.wait_all(ts, 30)
    assert all(t.state == TransferState.DONE for t in ts)
    assert np.array_equal(pair.dst, want_dst)
    assert np.array_equal(pair.src, want_src)
    notes = pair.b.wait_for_notifications(8, timeout=30)
    assert sorted(n.payload for n in notes) == sorted(
        [b"w%d" % i for i in range(4)] + [b"r%d" % i for i in range(4)]
    )
    stats = pair.a.stats()
    assert stats["transfers_done"] == 8 and stats["transfers_failed"] == 0


def test_many_threads_posting_concurrently(pair):
    """submit() from 8 threads at once; 8 x 8 transfers, disjoint destinations."""
    rng = np.random.default_rng(41)
    dest = rng.permutation(BLOCKS)[:64].reshape(8, 8)
    srcs = rng.integers(0, BLOCKS, size=(8, 8))
    want = pair.dst.copy()
    for d, s in zip(dest.ravel(), srcs.ravel(), strict=True):
        want = expected_after(want, pair.src, pair.lay, [d], [s])
    errs = []

    def worker(k):
        try:
            ts = [
                pair.a.write(pair.peer, pair.ra, pair.rb.id, [srcs[k, j]], remote_blocks=[dest[k, j]])
                for j in range(8)
            ]
            pair.a.wait_all(ts, 30)
        except Exception as e:  # collected and asserted on below
            errs.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errs, errs
    assert np.array_equal(pair.dst, want)


# --------------------------------------------------------------------------------------
# Cancellation, deadlines and dead peers


def test_cancel_mid_stream_keeps_the_connection_usable():
    """A cancelled 64 MiB uncoalesced write stops at a frame boundary: it ends, lets go of
    its memory, and the next transfer on the same connection is byte-exact."""
    lay = layout(layers=1, kv=1, blocks=16384, bb=4096)
    p = TcpPair(lay, seed=51)
    try:
        ids = np.random.default_rng(1).permutation(lay.num_blocks)
        t = p.a.write(p.peer, p.ra, p.rb.id, ids, coalesce=False)
        time.sleep(0.01)
        t.cancel()
        try:
            t.wait(30)  # DONE if it finished before the cancel landed: also a valid outcome
        except errors.CanceledError:
            pass
        assert t.state in (TransferState.DONE, TransferState.FAILED)
        deadline = time.monotonic() + 10
        while not t.quiesced and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.quiesced
        p.src[:] = np.random.default_rng(2).integers(0, 256, p.src.size, dtype=np.uint8)
        ids2 = np.random.default_rng(3).permutation(lay.num_blocks)[:1000]
        want = expected_after(p.dst, p.src, lay, ids2, ids2)
        p.a.write(p.peer, p.ra, p.rb.id, ids2).wait(30)
        assert np.array_equal(p.dst, want)
    finally:
        p.close()


def test_closed_peer_engine_fails_transfers_promptly():
    """The target engine is closed and released: transfers to it end FAILED (typed) well
    within their timeout, and another peer keeps working."""
    p = TcpPair(seed=61)
    c = kvxfer.Engine("c", backends=["tcp"], timeout=30.0)
    c_pool = np.zeros_like(p.dst)
    rc = c.register(c_pool, p.lay)
    try:
        peer_c = p.a.add_peer(c.descriptor())
        ids = np.arange(10)
        p.a.write(p.peer, p.ra, p.rb.id, ids).wait(30)  # the connection works first
        assert np.array_equal(blocks_view(p.dst, p.lay)[:, :, ids], blocks_view(p.src, p.lay)[:, :, ids])
        p.b.close()
        del p.b, p.rb, p.back
        gc.collect()  # the last references go: the engine and its listener are destroyed
        for _ in range(2):  # the dropped connection, then a refused reconnect
            start = time.monotonic()
            t = p.a.write(p.peer, p.ra, 0, ids, timeout=10)
            with pytest.raises((errors.PeerUnreachableError, errors.CanceledError)):
                t.wait()
            assert time.monotonic() - start < 5, "took too long to notice the closed peer"
            assert t.state == TransferState.FAILED
        with pytest.raises((errors.PeerUnreachableError, errors.TimeoutError)):
            p.a.notify(p.peer, b"anyone?", timeout=5)
        p.a.write(peer_c, p.ra, rc.id, ids).wait(30)
        assert np.array_equal(blocks_view(c_pool, p.lay)[:, :, ids], blocks_view(p.src, p.lay)[:, :, ids])
    finally:
        p.a.close()
        c.close()


def test_deadline_of_a_transfer_is_honoured(pair):
    """A 1 ms deadline on a sizeable write ends FAILED with TimeoutError (or completes),
    never hangs; the connection stays usable."""
    ids = np.arange(BLOCKS)
    t = pair.a.write(pair.peer, pair.ra, pair.rb.id, ids, coalesce=False, timeout=0.001)
    try:
        t.wait()
    except errors.TimeoutError:
        pass
    deadline = time.monotonic() + 10
    while not t.quiesced and time.monotonic() < deadline:
        time.sleep(0.01)
    assert t.quiesced
    want = expected_after(pair.dst, pair.src, pair.lay, ids[::-1], ids)
    pair.a.write(pair.peer, pair.ra, pair.rb.id, ids, remote_blocks=ids[::-1]).wait(30)
    assert np.array_equal(pair.dst, want)


# --------------------------------------------------------------------------------------
# The target checks ranges against its own registrations


def test_target_refuses_ranges_outside_its_registered_memory():
    """A peer whose descriptor lies about a region (forged here) cannot make the target
    write or read outside its registered memory: the job fails with RemoteError, not one
    byte changes, and the connection keeps working."""
    p = TcpPair(seed=71)
    try:
        desc = kvxfer._native.decode_descriptor(p.b.descriptor())
        real = desc["regions"][0]
        n = real["length"]
        fake = [
            # Entirely past the end of the real pool, and straddling its end.
            dict(
                id=77,
                base_address=real["base_address"] + n + (1 << 20),
                length=1 << 16,
                layout=None,
                remote_keys=real["remote_keys"],
            ),
            dict(
                id=78,
                base_address=real["base_address"] + n - 4096,
                length=8192,
                layout=None,
                remote_keys=real["remote_keys"],
            ),
        ]
        desc["regions"] = desc["regions"] + fake
        peer = p.a.add_peer(kvxfer._native.encode_descriptor(desc))
        assert peer is p.peer  # same instance: refreshed in place
        before = p.dst.copy()
        src_before = p.src.copy()
        for region_id, ext in ((77, [[0, 4096]]), (78, [[0, 8192]]), (78, [[4000, 200]])):
            with pytest.raises(errors.RemoteError, match="refused"):
                p.a.post(
                    Op.WRITE,
                    p.peer,
                    p.ra,
                    region_id,
                    local_extents=[[0, ext[0][1]]],
                    remote_extents=ext,
                    notify=b"must-not-arrive",
                ).wait(30)
            with pytest.raises(errors.RemoteError, match="refused"):
                p.a.post(
                    Op.READ, p.peer, p.ra, region_id, local_extents=[[0, ext[0][1]]], remote_extents=ext
                ).wait(30)
        assert np.array_equal(p.dst, before)
        assert np.array_equal(p.src, src_before)
        assert p.b.notifications() == []
        # A write that is half inside the real region and half outside writes nothing either.
        with pytest.raises(errors.RemoteError):
            p.a.post(
                Op.WRITE,
                p.peer,
                p.ra,
                78,
                local_extents=[[0, 4096], [8192, 4096]],
                remote_extents=[[0, 4096], [4096, 4096]],
            ).wait(30)
        assert np.array_equal(p.dst, before)
        # The last 4096 bytes of the real region, through the forged region: allowed.
        p.a.post(Op.WRITE, p.peer, p.ra, 78, local_extents=[[0, 4096]], remote_extents=[[0, 4096]]).wait(30)
        assert np.array_equal(p.dst[-4096:], p.src[:4096]) and np.array_equal(p.dst[:-4096], before[:-4096])
    finally:
        p.close()


def test_region_released_on_target_is_no_longer_writable():
    p = TcpPair(seed=72)
    extra = np.zeros(1 << 16, np.uint8)
    try:
        rx = p.b.register(extra)
        p.a.add_peer(p.b.descriptor())
        p.a.post(Op.WRITE, p.peer, p.ra, rx.id, local_extents=[[0, 1000]], remote_extents=[[10, 1000]]).wait(
            30
        )
        assert np.array_equal(extra[10:1010], p.src[:1000])
        p.b.deregister(rx)
        del rx
        gc.collect()  # the Region goes: the backend forgets the range
        snapshot = extra.copy()
        with pytest.raises(errors.RemoteError):
            p.a.post(
                Op.WRITE, p.peer, p.ra, 1, local_extents=[[5000, 1000]], remote_extents=[[10, 1000]]
            ).wait(30)
        assert np.array_equal(extra, snapshot)
    finally:
        p.close()


# --------------------------------------------------------------------------------------
# Wire-format robustness: a raw socket speaking (and breaking) the protocol

HDR = struct.Struct("<HBBIQQQ")
MAGIC, VERSION = 0x544B, 2
HELLO, HELLO_ACK, WRITE, END, READ_REQ, NOTIFY, ACK, READ_DATA, NOTIFY_ACK, CHALLENGE, PROOF = range(1, 12)
PEER_UNREACHABLE, REMOTE = 6, 7


def frame(kind, aux=0, job=0, a=0, b=0, body=b"") -> bytes:
    return HDR.pack(MAGIC, VERSION, kind, aux, job, a, b) + body


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def recv_frame(s):
    _, _, kind, aux, job, a, b = HDR.unpack(recv_exact(s, HDR.size))
    return kind, aux, job, a, b


def closed_by_peer(s: socket.socket, timeout=10.0) -> bool:
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(4096):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def raw_connect(engine, hello_instance=None, name=b"raw"):
    """A socket through the authenticated handshake (tcp_wire.h) with the secret from the
    engine's descriptor; the HELLO_ACK is left for the caller to read. A HELLO naming
    another instance gets the refusal (HELLO_ACK) at once."""
    port, _ = tcp_endpoint(engine)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    inst = engine.instance_id if hello_instance is None else hello_instance
    nonce, link = os.urandom(32), 1
    s.sendall(frame(HELLO, aux=len(name), job=4242, a=inst, b=link, body=name + nonce))
    if inst != engine.instance_id:
        return s
    kind, _, _, _, blen = recv_frame(s)
    assert kind == CHALLENGE and blen == 64
    theirs = recv_exact(s, 64)[:32]
    secret = kvxfer._native.decode_descriptor(engine.descriptor())["secret"]
    proof = hmac.new(
        secret,
        b"kvxfer-tcp-initiator\0" + theirs + nonce + struct.pack("<QQ", 4242, link) + name,
        hashlib.sha256,
    ).digest()
    s.sendall(frame(PROOF, b=32, body=proof))
    return s


def tag_of(engine, region_id: int) -> int:
    d = kvxfer._native.decode_descriptor(engine.descriptor())
    index = [b[0] for b in d["backends"]].index("tcp")
    key = next(r["remote_keys"][index] for r in d["regions"] if r["id"] == region_id)
    return struct.unpack("<Q", key)[0]


def test_wire_protocol_and_malformed_frames():
    p = TcpPair(seed=81)
    base = p.rb.address
    size = p.rb.nbytes
    try:
        # Garbage instead of a HELLO: closed.
        port, _ = tcp_endpoint(p.b)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(os.urandom(64))
            assert closed_by_peer(s)
        # A HELLO for another instance: refused without naming this one, then closed.
        with raw_connect(p.b, hello_instance=p.b.instance_id ^ 1) as s:
            kind, aux, job, _, blen = recv_frame(s)
            assert (kind, aux, job) == (HELLO_ACK, PEER_UNREACHABLE, 0)
            assert b"no engine instance" in recv_exact(s, blen)
            assert closed_by_peer(s)
        tag = tag_of(p.b, p.rb.id)
        with raw_connect(p.b) as s:
            assert recv_frame(s)[:3] == (HELLO_ACK, 0, p.b.instance_id)
            # A well-formed WRITE of two runs inside the region, then END with a notification.
            payload = os.urandom(300)
            table = struct.pack("<QQQQ", base + 100, 200, base + size - 100, 100)
            s.sendall(frame(WRITE, aux=2, job=1, a=tag, b=300, body=table + payload))
            s.sendall(frame(END, aux=1, job=1, b=5, body=b"hello"))
            assert recv_frame(s)[:3] == (ACK, 0, 1)
            assert p.dst[100:300].tobytes() == payload[:200] and p.dst[-100:].tobytes() == payload[200:]
            (note,) = p.b.wait_for_notifications(1, timeout=10)
            assert note == kvxfer.Notification("raw", 4242, b"hello")
            before = p.dst.copy()
            # A run past the end: drained, not written, ACKed as REMOTE, no notification.
            s.sendall(
                frame(
                    WRITE,
                    aux=1,
                    job=2,
                    a=tag,
                    b=64,
                    body=struct.pack("<QQ", base + size - 32, 64) + bytes(64),
                )
            )
            s.sendall(frame(END, aux=1, job=2, b=4, body=b"nope"))
            kind, aux, job, _, blen = recv_frame(s)
            assert (kind, aux, job) == (ACK, REMOTE, 2)
            assert b"refused" in recv_exact(s, blen)
            assert np.array_equal(p.dst, before) and p.b.notifications() == []
            # READ_REQ inside: the exact bytes come back; outside: REMOTE.
            s.sendall(
                frame(
                    READ_REQ,
                    aux=2,
                    job=3,
                    a=tag,
                    b=150,
                    body=struct.pack("<QQQQ", base + 7, 50, base + 5000, 100),
                )
            )
            kind, aux, job, _, blen = recv_frame(s)
            assert (kind, aux, job, blen) == (READ_DATA, 0, 3, 150)
            assert recv_exact(s, 150) == p.dst[7:57].tobytes() + p.dst[5000:5100].tobytes()
            s.sendall(frame(READ_REQ, aux=1, job=4, a=tag, b=16, body=struct.pack("<QQ", base - 8, 16)))
            kind, aux, job, _, blen = recv_frame(s)
            assert (kind, aux, job) == (READ_DATA, REMOTE, 4)
            recv_exact(s, blen)
            # A standalone NOTIFY is acknowledged by sequence number.
            s.sendall(frame(NOTIFY, job=99, b=3, body=b"n99"))
            assert recv_frame(s)[:3] == (NOTIFY_ACK, 0, 99)
            assert p.b.wait_for_notifications(1, timeout=10)[0].payload == b"n99"
        # Malformed frames close the connection without touching memory.
        bad = [
            frame(WRITE, aux=0, job=5, b=0),  # no runs
            frame(WRITE, aux=1, job=5, b=10, body=struct.pack("<QQ", base, 11)),  # lengths disagree
            frame(
                WRITE, aux=1, job=5, b=(8 << 20) + 1, body=struct.pack("<QQ", base, (8 << 20) + 1)
            ),  # too big
            frame(WRITE, aux=100000, job=5, b=1),  # too many runs
            frame(END, job=5, b=1 << 20),  # notification too large
            frame(77, job=5),  # unknown type
            HDR.pack(0x1234, VERSION, WRITE, 0, 0, 0, 0),  # bad magic
        ]
        before = p.dst.copy()
        for f in bad:
            with raw_connect(p.b) as s:
                assert recv_frame(s)[0] == HELLO_ACK
                s.sendall(f)
                assert closed_by_peer(s), f[:8]
        assert np.array_equal(p.dst, before)
        # The engine still serves its real peer.
        ids = np.arange(0, BLOCKS, 3)
        want = expected_after(p.dst, p.src, p.lay, ids, ids)
        p.a.write(p.peer, p.ra, p.rb.id, ids).wait(30)
        assert np.array_equal(p.dst, want)
    finally:
        p.close()


# --------------------------------------------------------------------------------------
# Bind address selection


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_listen_address_from_config_and_environment(monkeypatch):
    monkeypatch.delenv("KVXFER_TCP_LISTEN", raising=False)
    c = kvxfer.Engine("c", backends=["tcp"])  # nothing configured: loopback only
    assert "listening on 127.0.0.1:" in c.describe_backends() and tcp_endpoint(c)[0] > 0
    c.close()
    port = free_port()
    cfg = kvxfer.EngineConfig()
    cfg.backend.tcp.listen = f"127.0.0.1:{port}"
    b = kvxfer.Engine("b", backends=["tcp"], config=cfg)
    assert tcp_endpoint(b) == (port, ["127.0.0.1"])
    assert f"listening on 127.0.0.1:{port}" in b.describe_backends()
    env_port = free_port()
    monkeypatch.setenv("KVXFER_TCP_LISTEN", f":{env_port}")
    a = kvxfer.Engine("a", backends=["tcp"])  # the environment overlay decides
    assert tcp_endpoint(a)[0] == env_port and f"0.0.0.0:{env_port}" in a.describe_backends()
    monkeypatch.setenv("KVXFER_TCP_LISTEN", "127.0.0.1:0")
    cfg_any = kvxfer.EngineConfig()
    cfg_any.backend.tcp.listen = ":0"
    d = kvxfer.Engine("d", backends=["tcp"], config=cfg_any)  # the environment wins over the config
    assert "listening on 127.0.0.1:" in d.describe_backends()
    d.close()
    for bad in ("not-an-address:12", "127.0.0.1:99999"):
        monkeypatch.setenv("KVXFER_TCP_LISTEN", bad)
        with pytest.raises(errors.InvalidArgumentError, match="tcp listen address"):
            kvxfer.Engine("e", backends=["tcp"])
    monkeypatch.delenv("KVXFER_TCP_LISTEN")
    try:
        src = np.arange(4096, dtype=np.uint8) * 7
        dst = np.zeros(4096, np.uint8)
        ra, rb = a.register(src), b.register(dst)
        peer = a.add_peer(b.descriptor())
        a.post(Op.WRITE, peer, ra, rb.id, local_extents=[[0, 4096]], remote_extents=[[0, 4096]]).wait(30)
        assert np.array_equal(dst, src)
    finally:
        a.close()
        b.close()


def test_connect_to_nothing_fails_within_connect_timeout():
    b = kvxfer.Engine("b", backends=["tcp"])
    desc = b.descriptor()
    b.close()
    del b
    gc.collect()  # the listener is gone: connection refused on every address
    a = kvxfer.Engine("a", backends=["tcp"], connect_timeout=5.0)
    try:
        start = time.monotonic()
        with pytest.raises(errors.PeerUnreachableError):
            a.add_peer(desc)
        assert time.monotonic() - start < 5.5
        # And a live peer still connects and moves bytes.
        c = kvxfer.Engine("c", backends=["tcp"])
        dst = np.zeros(64, np.uint8)
        rc = c.register(dst)
        src = np.arange(64, dtype=np.uint8)
        ra = a.register(src)
        a.post(
            Op.WRITE, a.add_peer(c.descriptor()), ra, rc.id, local_extents=[[0, 64]], remote_extents=[[0, 64]]
        ).wait(30)
        assert np.array_equal(dst, src)
        c.close()
    finally:
        a.close()


# --------------------------------------------------------------------------------------
# Two processes

XLAYOUT = dict(num_layers=2, num_kv=2, num_blocks=512, block_bytes=4096)  # 8 MiB


def target_process(conn, name: str, seed: int, layout_kwargs: dict) -> None:
    """A target engine in its own process. Replies to commands sent over `conn`."""
    lay = kvxfer.KvLayout(**layout_kwargs)
    eng = kvxfer.Engine(name, backends=["tcp"], timeout=30.0)
    pool = np.random.default_rng(seed).integers(0, 256, pool_size(lay), dtype=np.uint8)
    region = eng.register(pool, lay)
    conn.send((eng.descriptor(), region.id, os.getpid()))
    while True:
        try:
            cmd, arg = conn.recv()
        except EOFError:
            return
        if cmd == "snapshot_at_notification":
            notes = eng.wait_for_notifications(1, timeout=arg)
            snap = pool.copy()  # taken the moment the notification is seen
            conn.send(([n.payload for n in notes], snap))
        elif cmd == "pool":
            conn.send(pool.copy())
        elif cmd == "exit":
            eng.close()
            conn.send("bye")
            return


class Target:
    def __init__(self, name: str, seed: int, layout_kwargs=XLAYOUT):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target_process, args=(child, name, seed, layout_kwargs), daemon=True)
        self.proc.start()
        assert self.conn.poll(60), "target process did not start"
        self.descriptor, self.region_id, self.pid = self.conn.recv()
        self.lay = kvxfer.KvLayout(**layout_kwargs)
        self.initial = np.random.default_rng(seed).integers(0, 256, pool_size(self.lay), dtype=np.uint8)

    def ask(self, cmd, arg=None, timeout=60):
        self.conn.send((cmd, arg))
        assert self.conn.poll(timeout), f"target did not answer {cmd}"
        return self.conn.recv()

    def close(self):
        if self.proc.is_alive():
            try:
                self.ask("exit", timeout=10)
            except Exception:
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)


@pytest.fixture
def initiator():
    lay = kvxfer.KvLayout(**XLAYOUT)
    eng = kvxfer.Engine("initiator", backends=["tcp"], timeout=30.0)
    pool = np.random.default_rng(99).integers(0, 256, pool_size(lay), dtype=np.uint8)
    region = eng.register(pool, lay)
    yield eng, pool, region, lay
    eng.close()


@pytest.mark.multiprocess
def test_two_processes_write_read_and_notifications(initiator):
    eng, pool, region, lay = initiator
    target = Target("target", seed=5)
    try:
        peer = eng.add_peer(target.descriptor)
        rng = np.random.default_rng(6)
        lids, rids = rng.permutation(lay.num_blocks), rng.permutation(lay.num_blocks)
        # WRITE with a notification: the target snapshots its pool when it sees it.
        t = eng.write(
            peer, region, target.region_id, lids, remote_blocks=rids, notify=b"kv-ready", coalesce=False
        )
        payloads, snap = target.ask("snapshot_at_notification", 30)
        assert payloads == [b"kv-ready"]
        assert np.array_equal(snap, expected_after(target.initial, pool, lay, rids, lids))
        t.wait(30)
        # READ a random block map back from the (now known) remote pool.
        remote_now = snap
        lids2, rids2 = rng.permutation(lay.num_blocks)[:300], rng.permutation(lay.num_blocks)[:300]
        want = expected_after(pool, remote_now, lay, lids2, rids2)
        eng.read(peer, region, target.region_id, lids2, remote_blocks=rids2, notify=b"read-done").wait(30)
        assert np.array_equal(pool, want)
        payloads, snap2 = target.ask("snapshot_at_notification", 30)
        assert payloads == [b"read-done"] and np.array_equal(
            snap2, remote_now
        )  # a READ changes nothing there
        # Standalone notify across processes.
        eng.notify(peer, b"bye-now", timeout=30)
        payloads, _ = target.ask("snapshot_at_notification", 30)
        assert payloads == [b"bye-now"]
    finally:
        target.close()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_sigkill_mid_transfer_fails_within_deadline():
    """The victim is stopped (SIGSTOP) so that a 64 MiB write is certainly in flight, then
    SIGKILLed: the write FAILS well within its deadline, new work to it fails at once,
    and a second peer engine keeps working byte-exact."""
    big = dict(num_layers=1, num_kv=1, num_blocks=16384, block_bytes=4096)  # 64 MiB
    lay = kvxfer.KvLayout(**big)
    eng = kvxfer.Engine("initiator", backends=["tcp"], timeout=30.0)
    pool = np.random.default_rng(1).integers(0, 256, pool_size(lay), dtype=np.uint8)
    region = eng.register(pool, lay)
    victim = Target("victim", seed=2, layout_kwargs=big)
    bystander = Target("bystander", seed=3, layout_kwargs=big)
    try:
        p_victim = eng.add_peer(victim.descriptor)
        p_other = eng.add_peer(bystander.descriptor)
        ids = np.arange(lay.num_blocks)
        os.kill(victim.pid, signal.SIGSTOP)
        t = eng.write(p_victim, region, victim.region_id, ids, timeout=20)
        time.sleep(0.5)
        assert t.state == TransferState.PENDING, "the write was not held up by the stopped peer"
        start = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises((errors.PeerUnreachableError, errors.CanceledError)):
            t.wait()
        assert time.monotonic() - start < 5, "the dead peer was not noticed promptly"
        assert t.state == TransferState.FAILED
        deadline = time.monotonic() + 5
        while not t.quiesced and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.quiesced
        victim.proc.join(10)
        # New work to the dead peer fails at once with a typed error.
        start = time.monotonic()
        with pytest.raises(errors.PeerUnreachableError):
            eng.write(p_victim, region, victim.region_id, [0], timeout=10).wait()
        assert time.monotonic() - start < 5
        # The other peer still works, byte for byte.
        rids = np.random.default_rng(4).permutation(lay.num_blocks)
        eng.write(p_other, region, bystander.region_id, ids, remote_blocks=rids, notify=b"still-here")
        payloads, snap = bystander.ask("snapshot_at_notification", 30)
        assert payloads == [b"still-here"]
        assert np.array_equal(snap, expected_after(bystander.initial, pool, lay, rids, ids))
    finally:
        for proc in (victim, bystander):
            if proc.proc.is_alive():
                os.kill(proc.pid, signal.SIGCONT)
            proc.close()
        eng.close()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_stopped_peer_times_out_then_recovers():
    """A peer that stops reading (SIGSTOP) mid-write: the write ends FAILED with a
    TimeoutError at its deadline and lets go of its memory shortly after (the connection
    is dropped); when the peer resumes, the next transfer reconnects and is byte-exact."""
    big = dict(num_layers=1, num_kv=1, num_blocks=8192, block_bytes=4096)  # 32 MiB
    lay = kvxfer.KvLayout(**big)
    eng = kvxfer.Engine("initiator", backends=["tcp"], timeout=30.0)
    pool = np.random.default_rng(7).integers(0, 256, pool_size(lay), dtype=np.uint8)
    region = eng.register(pool, lay)
    target = Target("sleepy", seed=8, layout_kwargs=big)
    try:
        peer = eng.add_peer(target.descriptor)
        os.kill(target.pid, signal.SIGSTOP)
        ids = np.arange(lay.num_blocks)
        start = time.monotonic()
        t = eng.write(peer, region, target.region_id, ids, timeout=2)
        with pytest.raises(errors.TimeoutError):
            t.wait()
        assert time.monotonic() - start < 3
        while not t.quiesced and time.monotonic() - start < 8:
            time.sleep(0.02)
        assert t.quiesced, "the backend kept the memory of a timed-out write"
        os.kill(target.pid, signal.SIGCONT)
        rids = np.random.default_rng(9).permutation(lay.num_blocks)
        eng.write(peer, region, target.region_id, ids, remote_blocks=rids, notify=b"again")
        payloads, snap = target.ask("snapshot_at_notification", 30)
        assert payloads == [b"again"]
        want = expected_after(target.initial, pool, lay, rids, ids)
        assert np.array_equal(snap, want)
    finally:
        if target.proc.is_alive():
            os.kill(target.pid, signal.SIGCONT)
        target.close()
        eng.close()


def drop_race_worker(iterations: int) -> None:
    """Uses and drops engine pairs as fast as possible. Right after a transfer completes,
    a backend thread may still hold the finished job, by then the last owner of the local
    Region: releasing it frees a Python buffer and waits for the GIL, while this thread,
    holding the GIL, drops the last Peer. Tearing the connection down must never wait
    for that thread (a join would deadlock)."""
    for i in range(iterations):
        a = kvxfer.Engine("a", backends=["tcp"])
        b = kvxfer.Engine("b", backends=["tcp"])
        src = np.full(1 << 16, i % 251, np.uint8)
        dst = np.zeros(1 << 16, np.uint8)
        ra, rb = a.register(src), b.register(dst)
        peer = a.add_peer(b.descriptor())
        ext = [[0, 1 << 16]]
        t = a.post(Op.WRITE, peer, ra, rb.id, local_extents=ext, remote_extents=ext, notify=b"n")
        t.wait(30)
        del t, ra, src  # the job (maybe still held by the receiver) now owns the Region
        del peer  # possibly the last Peer reference: the TcpPeer goes under the GIL
        assert (dst == i % 251).all()
        a.close()
        b.close()
        del a, b, rb, dst
    # Let the backend threads release the last job before the interpreter finalizes: a
    # native thread that releases a Python buffer during finalization is killed by CPython.
    time.sleep(0.5)


@pytest.mark.multiprocess
def test_dropping_everything_right_after_completion_never_deadlocks():
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=drop_race_worker, args=(150,), daemon=True)
    proc.start()
    proc.join(120)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        pytest.fail("engine teardown deadlocked")
    assert proc.exitcode == 0
