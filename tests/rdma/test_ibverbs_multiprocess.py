"""ibverbs backend across processes (multiprocessing, spawn): the target engine lives in a
child process and only the initiator reads the target's descriptor (one-way exchange).
Also: a target killed (SIGKILL) mid-transfer, and a target that restarts and re-registers."""

from __future__ import annotations

import time

import numpy as np
import pytest
import rdma_helpers as h

import kvxfer

pytestmark = [pytest.mark.rdma, pytest.mark.multiprocess]
h.require_rdma()

LAY = (2, 2, 256, 4096)  # 2 layers x K/V x 256 blocks x 4 KiB = 8 MiB


@pytest.fixture(scope="module")
def initiator():
    lay = h.layout(*LAY)
    eng = h.make_engine("mp-init")
    mem = h.random_bytes(h.layout_bytes(lay), 100)
    region = eng.register(mem, layout=lay)
    yield eng, region, mem, lay
    eng.close()


def test_two_process_write_read_and_notification_after_data(initiator):
    eng, region, mem, lay = initiator
    target = h.Target("mp-target", LAY, fill_seed=7)
    try:
        peer = eng.add_peer(target.descriptor)
        rng = np.random.default_rng(20)
        src = rng.permutation(256)[:150]
        dst = rng.permutation(256)[:150]
        t = eng.write(peer, region, target.region_id, src, remote_blocks=dst, notify=b"kv-ready:42")
        status, notes, snap = target.call("notes", 1, h.TIMEOUT, True)
        t.wait(h.TIMEOUT)
        assert notes == [("mp-init", eng.instance_id, b"kv-ready:42")]
        # `snap` was taken by the target right when the notification was delivered.
        remote = np.frombuffer(snap, dtype=np.uint8)
        h.assert_blocks_equal(lay, mem, src, remote, dst)
        untouched = h.untouched_mask(lay, remote.size, dst)
        assert np.array_equal(remote[untouched], h.random_bytes(remote.size, 7)[untouched])

        # READ a different random map back into a scratch region and compare with the target.
        scratch = np.zeros_like(mem)
        sregion = eng.register(scratch, layout=lay)
        local = rng.permutation(256)[:200]
        remote_ids = rng.permutation(256)[:200]
        eng.read(peer, sregion, target.region_id, local, remote_blocks=remote_ids).wait(h.TIMEOUT)
        h.assert_blocks_equal(lay, target.dump(), remote_ids, scratch, local)

        eng.notify(peer, b"standalone")
        assert target.call("notes", 1, h.TIMEOUT, False)[1][0][2] == b"standalone"
    finally:
        target.quit()


def test_target_killed_mid_transfer_fails_within_deadline(initiator):
    eng, region, mem, lay = initiator
    target = h.Target("mp-victim", LAY)
    other = h.Target("mp-bystander", LAY)
    try:
        peer = eng.add_peer(target.descriptor)
        ids = np.arange(256)
        # Warm up: one transfer completes, the connection is known good.
        eng.write(peer, region, target.region_id, ids).wait(h.TIMEOUT)
        deadline = 20.0
        # ~200 MiB queued: on soft-RoCE still moving when the kill lands.
        transfers = [
            eng.write(peer, region, target.region_id, ids, timeout=deadline, notify=b"x") for _ in range(24)
        ]
        time.sleep(0.05)
        target.kill()  # returns once the process is gone
        t0 = time.monotonic()
        # Work posted after the kill cannot succeed whatever the speed of the fabric.
        after, refused = [], []
        for _ in range(4):
            try:
                after.append(eng.write(peer, region, target.region_id, ids, timeout=deadline, notify=b"y"))
            except kvxfer.KvxferError as exc:  # the connection is already known dead
                refused.append(exc)
        took = h.wait_terminal(transfers + after, deadline + 5)
        assert took <= deadline + 1, f"transfers took {took:.1f} s to end after the kill"
        assert all(t.state != kvxfer.TransferState.PENDING for t in transfers + after)
        assert all(t.state == kvxfer.TransferState.FAILED for t in after)
        failed = [t for t in transfers + after if t.state == kvxfer.TransferState.FAILED]
        assert failed or refused, "nothing failed although the target was killed"
        expected = (kvxfer.errors.PeerUnreachableError, kvxfer.errors.TimeoutError)
        for t in failed:
            assert isinstance(t.error, expected), t.error
        for exc in refused:
            assert isinstance(exc, kvxfer.errors.PeerUnreachableError), exc
        assert refused or any(isinstance(t.error, kvxfer.errors.PeerUnreachableError) for t in failed), [
            str(t.error) for t in failed
        ]
        # The backend lets go of every job (its memory) soon after.
        until = time.monotonic() + 30
        while not all(t.quiesced for t in transfers + after) and time.monotonic() < until:
            time.sleep(0.05)
        assert all(t.quiesced for t in transfers + after)
        first = failed[0].error if failed else refused[0]
        took = time.monotonic() - t0
        print(f"kill -> all {len(transfers + after)} transfers ended in {took:.2f} s: {first}")

        # The engine still serves another peer.
        bystander = eng.add_peer(other.descriptor)
        eng.write(bystander, region, other.region_id, ids, notify=b"fine").wait(h.TIMEOUT)
        status, notes, snap = other.call("notes", 1, h.TIMEOUT, True)
        assert np.array_equal(np.frombuffer(snap, dtype=np.uint8), mem)
    finally:
        target.kill()
        other.quit()


def test_restarted_target_is_reachable_with_its_new_descriptor(initiator):
    eng, region, mem, lay = initiator
    first = h.Target("mp-phoenix", LAY)
    ids = np.arange(0, 256, 3)
    try:
        peer1 = eng.add_peer(first.descriptor)
        eng.write(peer1, region, first.region_id, ids).wait(h.TIMEOUT)
    finally:
        first.quit()
    # Same name, new process: new instance id, new QPs, new rkeys.
    second = h.Target("mp-phoenix", LAY)
    try:
        # The old connection is gone: writing with the stale peer fails in bounded time.
        stale = eng.write(peer1, region, first.region_id, ids, timeout=10.0)
        with pytest.raises(kvxfer.KvxferError):
            stale.wait(30)
        peer2 = eng.add_peer(second.descriptor)
        assert peer2.instance_id != peer1.instance_id
        assert peer1.removed
        eng.write(peer2, region, second.region_id, ids, notify=b"again").wait(h.TIMEOUT)
        _, notes, snap = second.call("notes", 1, h.TIMEOUT, True)
        assert notes[0][2] == b"again"
        h.assert_blocks_equal(lay, mem, ids, np.frombuffer(snap, dtype=np.uint8), ids)
    finally:
        second.quit()
