"""Two real processes on this host over the shared-memory backend (and TCP when built):
byte-exact transfers, notifications after data, a peer killed mid-transfer, a peer that
restarts, and an engine that keeps serving its other peers throughout."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
from peer_process import digest, serve

import kvxfer
from kvxfer import Op, TransferState, errors

pytestmark = pytest.mark.multiprocess

CROSS_PROCESS = [
    b for b in ("shm", "tcp") if any(x.name == b and x.available for x in kvxfer.list_backends())
]
LAYOUT = dict(num_layers=4, num_kv=2, num_blocks=256, block_bytes=4096)


class Remote:
    """A peer engine in a spawned process."""

    def __init__(self, name, backend, seed=1, layout=LAYOUT, shareable=False):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=serve, args=(child, name, backend, layout, seed, shareable), daemon=True
        )
        self.proc.start()
        self.descriptor = self.call_reply(timeout=60)

    def call_reply(self, timeout=60):
        if not self.conn.poll(timeout):
            raise AssertionError("peer process did not answer in time")
        status, value = self.conn.recv()
        assert status == "ok", value
        return value

    def call(self, *cmd, timeout=60):
        self.conn.send(cmd)
        return self.call_reply(timeout)

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self):
        if self.proc.is_alive():
            try:
                self.call("exit", timeout=10)
            except Exception:
                self.kill()
        self.proc.join(10)


@pytest.fixture(params=CROSS_PROCESS)
def xbackend(request):
    return request.param


@pytest.fixture
def local(xbackend):
    layout = kvxfer.KvLayout(**LAYOUT)
    eng = kvxfer.Engine("initiator", backends=[xbackend], timeout=60.0)
    pool = np.random.default_rng(7).integers(0, 256, layout.num_layers * layout.layer_stride, dtype=np.uint8)
    region = eng.register(pool, layout)
    yield eng, pool, region, layout
    eng.close()


@pytest.mark.parametrize("shareable", [False, True], ids=["numpy-memory", "kvxfer.empty-memory"])
@pytest.mark.parametrize("op", [Op.WRITE, Op.READ])
def test_random_block_maps_across_processes(xbackend, local, op, shareable):
    """Target memory from numpy (shm reaches it by cross-memory attach) or from
    kvxfer.empty (shm maps the peer's memfd and uses memcpy)."""
    eng, pool, region, layout = local
    remote = Remote("target", xbackend, shareable=shareable)
    try:
        peer = eng.add_peer(remote.descriptor)
        rng = np.random.default_rng(11)
        for _ in range(3):
            lids = rng.choice(256, 100, replace=False)
            rids = rng.choice(256, 100, replace=False)
            t = eng.post(op, peer, region, 0, local_blocks=lids, remote_blocks=rids)
            assert t.wait(60) == TransferState.DONE
            assert remote.call("digest", rids.tolist()) == digest(pool, layout, lids)
    finally:
        remote.close()


def test_notification_reaches_target_after_all_bytes(xbackend, local):
    eng, pool, region, layout = local
    remote = Remote("target", xbackend)
    try:
        peer = eng.add_peer(remote.descriptor)
        ids = np.random.default_rng(5).permutation(256)
        remote.conn.send(("digest_at_notification", ids.tolist(), 60))
        t = eng.write(peer, region, 0, ids, notify=b"kv-ready:req-9")
        payload, seen = remote.call_reply(timeout=90)
        assert payload == b"kv-ready:req-9"
        assert seen == digest(pool, layout, ids)
        t.wait(60)
    finally:
        remote.close()


def test_target_writes_back_to_initiator(xbackend, local):
    """Peers can be added in both directions; the remote side initiates here."""
    eng, pool, region, layout = local
    remote = Remote("target", xbackend, seed=3)
    try:
        eng.add_peer(remote.descriptor)
        remote.call("add_peer", eng.descriptor())
        remote.call("write_to", "initiator", [1, 2, 3], b"back")
        (note,) = eng.wait_for_notifications(1, timeout=30)
        assert note.payload == b"back" and note.peer == "target"
        assert digest(pool, layout, [1, 2, 3]) == remote.call("digest", [1, 2, 3])
    finally:
        remote.close()


@pytest.mark.parametrize("shareable", [False, True], ids=["numpy-memory", "kvxfer.empty-memory"])
def test_peer_killed_mid_transfer_fails_within_deadline(xbackend, shareable):
    """SIGKILL the target while a large write is in flight: the transfer ends FAILED
    within its deadline (no hang), and the engine keeps serving another peer."""
    layout = dict(num_layers=1, num_kv=1, num_blocks=64 * 1024, block_bytes=4096)  # 256 MiB
    kl = kvxfer.KvLayout(**layout)
    eng = kvxfer.Engine("initiator", backends=[xbackend], threads=1, timeout=60.0)
    pool = np.ones(kl.num_blocks * kl.block_bytes, np.uint8)
    region = eng.register(pool, kl)
    victim = Remote("victim", xbackend, layout=layout, shareable=shareable)
    bystander = Remote("bystander", xbackend, layout=layout)
    try:
        p_victim = eng.add_peer(victim.descriptor)
        p_other = eng.add_peer(bystander.descriptor)
        failures = 0
        for attempt in range(5):  # the kill must land while bytes are still moving
            ids = np.random.default_rng(attempt).permutation(kl.num_blocks)
            t = eng.post(Op.WRITE, p_victim, region, 0, local_blocks=ids, coalesce=False, timeout=30)
            victim.kill()
            start = time.monotonic()
            with pytest.raises(errors.KvxferError) as info:
                t.wait()
                raise errors.InternalError("transfer finished before the kill landed")
            if isinstance(info.value, errors.InternalError):
                victim.close()
                victim = Remote("victim", xbackend, layout=layout, shareable=shareable)
                p_victim = eng.add_peer(victim.descriptor)
                continue
            assert time.monotonic() - start < 30
            assert isinstance(info.value, (errors.PeerUnreachableError, errors.TimeoutError)), info.value
            assert t.state == TransferState.FAILED
            failures += 1
            break
        assert failures == 1, "could not kill the peer while a transfer was in flight"
        # The engine still serves its other peer.
        ids = np.arange(1000)
        eng.write(p_other, region, 0, ids).wait(60)
        assert bystander.call("digest", ids.tolist()) == digest(pool, kl, ids)
        # New work to the dead peer fails at once with a typed error.
        with pytest.raises((errors.PeerUnreachableError, errors.TimeoutError)):
            eng.write(p_victim, region, 0, [0], timeout=10).wait()
    finally:
        victim.close()
        bystander.close()
        eng.close()


def test_peer_restart_and_reregister(xbackend, local):
    eng, pool, region, layout = local
    first = Remote("target", xbackend, seed=1)
    first_instance = kvxfer._native.decode_descriptor(first.descriptor)["instance_id"]
    peer = eng.add_peer(first.descriptor)
    assert peer.instance_id == first_instance
    first.kill()
    with pytest.raises((errors.PeerUnreachableError, errors.TimeoutError)):
        eng.write(peer, region, 0, [0, 1], timeout=10).wait()
    second = Remote("target", xbackend, seed=2)
    try:
        new_peer = eng.add_peer(second.descriptor)  # same name, new instance: replaced
        assert new_peer.instance_id != first_instance and peer.removed
        assert eng.peer("target").instance_id == new_peer.instance_id
        eng.write(new_peer, region, 0, [0, 1, 200]).wait(60)
        assert second.call("digest", [0, 1, 200]) == digest(pool, layout, [0, 1, 200])
    finally:
        second.close()
        first.close()
