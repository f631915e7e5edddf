"""ibverbs backend, two engines in one process: WRITE / READ of random block maps checked
byte for byte, notifications after data, several QPs with a tiny send queue, a 1000-block
request, device selection."""

from __future__ import annotations

import numpy as np
import pytest
import rdma_helpers as h

import kvxfer

pytestmark = pytest.mark.rdma
h.require_rdma()


def test_backend_is_available_and_describes_itself():
    info = {b.name: b for b in kvxfer.list_backends()}
    assert "ibverbs" in info, "this build has no ibverbs backend"
    assert info["ibverbs"].available, info["ibverbs"].reason
    with h.make_engine("describe") as e:
        text = e.describe_backends()
        assert text.startswith("ibverbs (")
        assert "MTU" in text and "GID[" in text
        assert "::ffff:" in text, f"expected the IPv4-mapped RoCE v2 GID to be chosen: {text}"


class Pair:
    def __init__(self, lay, **engine_kw):
        self.lay = lay
        n = h.layout_bytes(lay)
        self.a = h.make_engine("init-a", **engine_kw)
        self.b = h.make_engine("target-b", **engine_kw)
        self.ma = h.random_bytes(n, 1)
        self.mb = h.random_bytes(n, 2)
        self.ra = self.a.register(self.ma, layout=lay)
        self.rb = self.b.register(self.mb, layout=lay)
        self.peer = self.a.add_peer(self.b.descriptor())
        assert self.peer.backend == "ibverbs"

    def close(self):
        self.a.close()
        self.b.close()


@pytest.fixture
def pair():
    p = Pair(h.layout(4, 2, 128, 2048))
    yield p
    p.close()


def test_write_random_block_map_byte_exact(pair):
    rng = np.random.default_rng(10)
    src = rng.permutation(128)[:77]
    dst = rng.permutation(128)[:77]
    before = pair.mb.copy()
    t = pair.a.write(pair.peer, pair.ra, pair.rb.id, src, remote_blocks=dst)
    assert t.wait(h.TIMEOUT) == kvxfer.TransferState.DONE
    h.assert_blocks_equal(pair.lay, pair.ma, src, pair.mb, dst)
    keep = h.untouched_mask(pair.lay, pair.mb.size, dst)
    assert np.array_equal(pair.mb[keep], before[keep]), "bytes outside the destination blocks changed"
    assert pair.a.stats()["transfers_done"] == 1


def test_read_random_block_map_byte_exact(pair):
    rng = np.random.default_rng(11)
    local = rng.permutation(128)[:90]
    remote = rng.permutation(128)[:90]
    before = pair.ma.copy()
    t = pair.a.read(pair.peer, pair.ra, pair.rb.id, local, remote_blocks=remote)
    t.wait(h.TIMEOUT)
    h.assert_blocks_equal(pair.lay, pair.mb, remote, pair.ma, local)
    keep = h.untouched_mask(pair.lay, pair.ma.size, local)
    assert np.array_equal(pair.ma[keep], before[keep])


def test_layer_range_and_extents(pair):
    ids = np.array([5, 6, 7, 100, 3])
    t = pair.a.write(pair.peer, pair.ra, pair.rb.id, ids, layers=(1, 3))
    t.wait(h.TIMEOUT)
    for layer in (1, 2):
        for kv in range(2):
            for b in ids:
                o = pair.lay.piece_offset(layer, kv, int(b))
                assert np.array_equal(pair.ma[o : o + 2048], pair.mb[o : o + 2048])
    ext = np.array([[0, 10000], [50000, 333]], dtype=np.uint64)
    rext = np.array([[70001, 10333]], dtype=np.uint64)
    pair.a.post(kvxfer.Op.WRITE, pair.peer, pair.ra, pair.rb.id, local_extents=ext, remote_extents=rext).wait(
        h.TIMEOUT
    )
    assert np.array_equal(pair.mb[70001:80001], pair.ma[0:10000])
    assert np.array_equal(pair.mb[80001:80334], pair.ma[50000:50333])


def test_notification_arrives_after_the_data(pair):
    rng = np.random.default_rng(12)
    ids = rng.permutation(128)
    t = pair.a.write(pair.peer, pair.ra, pair.rb.id, ids, notify=b"req-17 done")
    notes = pair.b.wait_for_notifications(1, h.TIMEOUT)
    # The notification is delivered only once every byte is visible at the target.
    h.assert_blocks_equal(pair.lay, pair.ma, ids, pair.mb, ids)
    assert notes[0].payload == b"req-17 done"
    assert notes[0].peer == "init-a"
    assert notes[0].peer_instance == pair.a.instance_id
    t.wait(h.TIMEOUT)


def test_read_notification_and_many_in_flight(pair):
    transfers = []
    for i in range(16):
        ids = np.arange(i * 8, i * 8 + 8)
        op = pair.a.read if i % 2 else pair.a.write
        transfers.append((op, ids, op(pair.peer, pair.ra, pair.rb.id, ids, notify=f"n{i}".encode())))
    for _, _, t in transfers:
        t.wait(h.TIMEOUT)
    for _, ids, _ in transfers:
        h.assert_blocks_equal(pair.lay, pair.ma, ids, pair.mb, ids)
    notes = pair.b.wait_for_notifications(16, h.TIMEOUT)
    assert sorted(n.payload for n in notes) == sorted(f"n{i}".encode() for i in range(16))


def test_standalone_notify_and_payload_limits(pair):
    pair.a.notify(pair.peer, b"alone")
    big = bytes(h.random_bytes(64 * 1024, 5))
    pair.a.notify(pair.peer, big)
    pair.a.notify(pair.peer, b"")
    notes = pair.b.wait_for_notifications(3, h.TIMEOUT)
    assert [n.payload for n in notes] == [b"alone", big, b""]
    with pytest.raises(kvxfer.errors.InvalidArgumentError):
        pair.a.notify(pair.peer, b"x" * (64 * 1024 + 1))


def test_several_qps_tiny_send_queue_and_a_1000_block_request(monkeypatch):
    # 4 QPs per peer and a 16-deep send queue: a 1000-block request (2000 runs, since no two
    # shuffled blocks are adjacent) needs many rounds of flow control over every QP.
    monkeypatch.setenv("KVXFER_IBVERBS_QPS_PER_PEER", "4")
    monkeypatch.setenv("KVXFER_IBVERBS_SQ_DEPTH", "16")
    p = Pair(h.layout(1, 2, 1200, 512))
    try:
        assert "4 RC QPs/peer" in p.a.describe_backends()
        assert "SQ depth 16" in p.a.describe_backends()
        rng = np.random.default_rng(13)
        src = rng.permutation(1200)[:1000]
        dst = rng.permutation(1200)[:1000]
        plan = p.a.plan(kvxfer.Op.WRITE, p.peer, p.ra, p.rb.id, local_blocks=src, remote_blocks=dst)
        assert plan["pieces"] == 2000
        t = p.a.write(p.peer, p.ra, p.rb.id, src, remote_blocks=dst, notify=b"1000")
        t.wait(h.TIMEOUT)
        h.assert_blocks_equal(p.lay, p.ma, src, p.mb, dst)
        assert p.b.wait_for_notifications(1, h.TIMEOUT)[0].payload == b"1000"
        p.mb[:] = h.random_bytes(p.mb.size, 99)
        p.a.read(p.peer, p.ra, p.rb.id, src, remote_blocks=dst).wait(h.TIMEOUT)
        h.assert_blocks_equal(p.lay, p.mb, dst, p.ma, src)
    finally:
        p.close()


def test_large_contiguous_runs_are_split(pair):
    # 4 MiB contiguous: runs are split at the backend's maximum WR size (1 MiB).
    big = h.layout(1, 1, 8, 1 << 20)
    n = h.layout_bytes(big)
    sa, sb = h.random_bytes(n, 3), np.zeros(n, np.uint8)
    ra, rb = pair.a.register(sa, layout=big), pair.b.register(sb, layout=big)
    peer = pair.a.add_peer(pair.b.descriptor())  # refresh: imports the new region
    t = pair.a.write(peer, ra, rb.id, np.arange(4), remote_blocks=np.arange(4, 8))
    assert t.plan["runs"] == 4
    t.wait(h.TIMEOUT)
    assert np.array_equal(sb[4 << 20 :], sa[: 4 << 20])


@pytest.mark.parametrize("selector", ["rxe0:1", "rxe0:0"])
def test_device_selector(selector):
    if "rxe0" not in h.rdma_devices():
        pytest.skip("the selector test names soft-RoCE's rxe0")
    lay = h.layout(1, 1, 16, 4096)
    a = h.make_engine("sel-a", device=selector)
    b = h.make_engine("sel-b", device=selector)
    gid_index = selector.split(":")[1]
    assert f"GID[{gid_index}]" in a.describe_backends()
    ma, mb = h.random_bytes(h.layout_bytes(lay), 4), np.zeros(h.layout_bytes(lay), np.uint8)
    ra, rb = a.register(ma, layout=lay), b.register(mb, layout=lay)
    peer = a.add_peer(b.descriptor())
    a.write(peer, ra, rb.id, np.arange(16)).wait(h.TIMEOUT)
    assert np.array_equal(ma, mb)
    a.close()
    b.close()


def test_bad_selectors_are_reported():
    with pytest.raises(kvxfer.errors.UnsupportedError, match="not found"):
        h.make_engine("nodev", device="nosuchdev0")
    with pytest.raises(kvxfer.errors.InvalidArgumentError):
        h.make_engine("badsel", device="rxe0:x")
    if "rxe0" in h.rdma_devices():
        with pytest.raises(kvxfer.errors.UnsupportedError, match="GID index 200"):
            h.make_engine("badgid", device="rxe0:200")


def test_unreachable_peer_fails_connect_within_timeout():
    import time

    import kvxfer._native as native

    b = h.make_engine("ghost")
    d = native.decode_descriptor(b.descriptor())
    b.close()
    del b
    # A descriptor whose UD QPN belongs to nobody: add_peer must give up at connect_timeout.
    name, info = d["backends"][0]
    info = bytearray(info)
    info[28:32] = (0xABCDE).to_bytes(4, "little")
    d["backends"] = [(name, bytes(info))]
    a = kvxfer.Engine("lonely", backends=["ibverbs"], connect_timeout=3.0)
    t0 = time.monotonic()
    with pytest.raises(kvxfer.errors.PeerUnreachableError, match="did not answer"):
        a.add_peer(native.encode_descriptor(d))
    assert time.monotonic() - t0 < 20
    a.close()


def _uverbs_fds() -> int:
    import os

    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/infiniband/")
        except OSError:
            pass
    return n


def _busy_pair_then_drop() -> None:
    p = Pair(h.layout(1, 2, 64, 4096))
    t = p.a.write(p.peer, p.ra, p.rb.id, np.arange(64), notify=b"bye")
    p.b.wait_for_notifications(1, h.TIMEOUT)
    t.wait(h.TIMEOUT)
    p.a.notify(p.peer, b"last")
    p.close()


def test_dropping_engines_releases_the_device():
    import gc
    import time

    gc.collect()
    before = _uverbs_fds()
    _busy_pair_then_drop()
    until = time.monotonic() + 20
    while _uverbs_fds() > before and time.monotonic() < until:
        gc.collect()
        time.sleep(0.05)
    assert _uverbs_fds() == before, "engines are gone but their verbs device is still open"


def test_deadline_miss_reads_as_timeout_and_the_connection_survives(pair):
    import time

    ids = np.arange(128)
    for _ in range(3):
        # 1024 separate runs with a 1 ms deadline. The transfer is not looked at until the
        # backend has let go of it, so its status is the one the backend reported.
        t = pair.a.write(pair.peer, pair.ra, pair.rb.id, ids, coalesce=False, timeout=0.001)
        until = time.monotonic() + 30
        while not t.quiesced and time.monotonic() < until:
            time.sleep(0.01)
        assert t.quiesced
        try:
            t.wait()
        except kvxfer.errors.TimeoutError:
            pass  # DONE is fine too (a fast machine), CANCELED is not
    pair.mb[:] = 0
    pair.a.write(pair.peer, pair.ra, pair.rb.id, ids, notify=b"after").wait(h.TIMEOUT)
    assert np.array_equal(pair.ma, pair.mb)
    assert pair.b.wait_for_notifications(1, h.TIMEOUT)[-1].payload == b"after"
