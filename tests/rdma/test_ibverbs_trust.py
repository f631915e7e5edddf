"""Trust on ibverbs (docs/security.md): the connection manager admits only a peer that proves
the descriptor's secret, a forged DISCONNECT cuts nothing, a stale descriptor reaches
nothing once its region is deregistered (even with the memory registered again), and a
receiver whose notification queue is full holds senders back without losing a notification.

The hostile client is the plain-verbs peer (pyverbs_peer.py) speaking the wire format of
native/src/backends/ibverbs/README.md."""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pytest
import rdma_helpers as h

import kvxfer._native as native
from kvxfer import Op, TransferState, errors

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "adversarial"))
from notify_checks import NOTE, assert_full_queue_holds_posts_back_without_loss  # noqa: E402
from target_process import stop_process  # noqa: E402

pytestmark = pytest.mark.rdma
h.require_rdma()


@pytest.fixture(scope="module")
def pv(tmp_path_factory):
    import pyverbs_peer as pp

    try:
        pp.import_pyverbs(str(tmp_path_factory.mktemp("pv")))
    except ImportError as exc:
        pytest.fail(f"pyverbs is needed for the hostile-client tests: {exc}")
    dev = h.rdma_devices()[0]
    peer = pp.PvPeer("hostile-peer", device=dev, gid_index=1 if dev == "rxe0" else 0)
    peer.start()
    yield peer
    peer.stop()


def test_connection_request_without_the_secret_is_refused(pv):
    import pyverbs_peer as pp

    eng = h.make_engine("guarded")
    mem = np.full(1 << 16, 0x33, np.uint8)
    region = eng.register(mem)  # held: a dropped Region is deregistered
    desc = eng.descriptor()
    connected = len(pv.rc)
    # A proof under a wrong secret, a proof of zeros, and a nonce the engine never issued.
    with pytest.raises(ConnectionRefusedError, match="did not prove"):
        pv.connect(desc, timeout=20, secret=bytes(32))
    with pytest.raises(ConnectionRefusedError, match="did not prove"):
        pv.connect(desc, timeout=20, forge="no-proof")
    with pytest.raises(TimeoutError):
        pv.connect(desc, timeout=3, forge="own-nonce")
    # None of them got a queue pair connected: there is nothing to post an RDMA WRITE on.
    assert len(pv.rc) == connected
    assert (mem == 0x33).all()
    # A stale descriptor (another instance of the engine) is refused without the real id.
    d = native.decode_descriptor(desc)
    real = d["instance_id"]
    d["instance_id"] = real ^ 0xFFFF
    with pytest.raises(ConnectionRefusedError, match="stale") as refused:
        pv.connect(native.encode_descriptor(d), timeout=20)
    assert f"{real:x}" not in str(refused.value)
    # With the secret, the same client connects and writes.
    pv.write_local(0, b"\x44" * 4096)
    pv.connect(desc, timeout=30)
    assert pp.CM_VERSION == 2
    reg = next(r for r in d["regions"] if r["id"] == region.id)
    rkey, addr = int.from_bytes(reg["remote_keys"][0][:4], "little"), mem.ctypes.data
    pv.rdma("IBV_WR_RDMA_WRITE", 0, addr, rkey, 4096, qp_index=len(pv.rc) - 1)
    assert (mem[:4096] == 0x44).all() and (mem[4096:] == 0x33).all()
    eng.close()


def test_kvxfer_initiator_refuses_a_target_that_cannot_prove_the_secret(pv):
    """A descriptor naming the pyverbs peer's address with another secret (what a process
    that took over a peer's address would face): the peer accepts any proof and answers
    CONNECT_REP under its own secret, which does not match, so add_peer fails."""
    eng = h.make_engine("careful", connect_timeout=5.0)
    d = native.decode_descriptor(pv.descriptor())
    d["secret"] = bytes(32)
    replies = len(pv.conns)
    pv.check_proofs = False
    try:
        with pytest.raises((errors.PeerUnreachableError, errors.TimeoutError)):
            eng.add_peer(native.encode_descriptor(d))
    finally:
        pv.check_proofs = True
    assert len(pv.conns) > replies  # the peer did answer: kvxfer refused its reply
    eng.close()


def test_forged_disconnect_cuts_nothing(pv):
    import pyverbs_peer as pp

    eng = h.make_engine("kept")
    mem = np.zeros(1 << 16, np.uint8)
    region = eng.register(mem)  # held: a dropped Region is deregistered
    desc = eng.descriptor()
    d = pv.connect(desc, timeout=30)
    qp = len(pv.rc) - 1
    c = pv.last_connection
    forged = pp.encode_cm(
        pp.DISC,
        c["conn_id"],
        pv.instance,
        d["instance_id"],
        initiator_nonce=c["initiator_nonce"],
        target_nonce=c["target_nonce"],
        mac=bytes(32),
    )
    pv.send_cm(forged, c["endpoint"])
    time.sleep(1.0)  # the engine's progress thread has handled it
    reg = next(r for r in d["regions"] if r["id"] == region.id)
    rkey = int.from_bytes(reg["remote_keys"][0][:4], "little")
    pv.write_local(0, b"\x55" * 4096)
    pv.rdma("IBV_WR_RDMA_WRITE", 0, mem.ctypes.data, rkey, 4096, qp_index=qp)
    assert (mem[:4096] == 0x55).all()
    pv.send_notification(b"still here", qp_index=qp)
    assert eng.wait_for_notifications(1, h.TIMEOUT)[0].payload == b"still here"
    eng.close()


def test_stale_descriptor_after_deregister_never_lands():
    """The Region object stays alive (so the backend region is not destroyed): deregister()
    alone must end remote access. Then the same memory is registered again, several times:
    the old descriptor's remote key still reaches nothing."""
    a = h.make_engine("stale-init")
    b = h.make_engine("stale-target")
    src = h.random_bytes(8192, 61)
    ra = a.register(src)
    mem = np.zeros(8192, np.uint8)
    old = b.register(mem)
    peer = a.add_peer(b.descriptor())
    ext = [[0, 4096]]

    def write(rid: int):
        return a.post(Op.WRITE, peer, ra, rid, local_extents=ext, remote_extents=ext)

    write(old.id).wait(h.TIMEOUT)
    assert np.array_equal(mem[:4096], src[:4096])
    mem[:] = 0
    b.deregister(old)
    with pytest.raises(errors.RemoteError):
        write(old.id).wait(h.TIMEOUT)
    assert not mem.any(), "a write through a deregistered region's descriptor landed"
    again = []
    for _ in range(8):
        again.append(b.register(mem))  # same memory, new registration
        with pytest.raises(errors.RemoteError):
            write(old.id).wait(h.TIMEOUT)
        assert not mem.any(), "a stale descriptor reached memory registered again"
        b.deregister(again[-1])
    # The connection is repaired and the current registration is reachable.
    fresh = b.register(mem)
    peer = a.add_peer(b.descriptor())
    a.post(Op.WRITE, peer, ra, fresh.id, local_extents=ext, remote_extents=ext).wait(h.TIMEOUT)
    assert np.array_equal(mem[:4096], src[:4096])
    a.close()
    b.close()


def test_full_notification_queue_holds_senders_back_without_loss():
    a = h.make_engine("sender")
    b = h.make_engine("slow-reader")
    try:
        assert_full_queue_holds_posts_back_without_loss(a, b, timeout=20.0, settle=120, drain=60, poll=0.05)
    finally:
        a.close()
        b.close()


def _stopped_peers_and_a_healthy_one(
    n_stopped: int, per_stopped: int, deadline_s: float, healthy_note, settle: bool
) -> tuple[float, float, list]:
    """SIGSTOPs ``n_stopped`` targets, posts ``per_stopped`` WRITEs with 60 KiB notifications
    to each (deadline ``deadline_s``), then 20 WRITEs with ``healthy_note(i)`` to a healthy
    target. With ``settle``, the healthy peer posts only once every stopped peer's 64 receive
    buffers are used (its further SENDs wait in RNR, holding the initiator's buffers). Returns
    the healthy peer's time (from the first post), the stopped transfers' lateness after their
    deadline and their end states; every one of them ended, the stopped ones TimeoutError."""
    lay = (1, 1, 16, 4096)
    stopped = [h.Target(f"ib-stopped-{i}", lay) for i in range(n_stopped)]
    healthy = h.Target("ib-healthy", lay)
    a = h.make_engine("ib-initiator")
    try:
        ra = a.register(h.random_bytes(4096, 62))
        peers = [a.add_peer(t.descriptor) for t in stopped]
        ph = a.add_peer(healthy.descriptor)
        for t in stopped:
            stop_process(t.pid, within=30)
        ext = [[0, 64]]
        t_post = time.monotonic()
        to_stopped = [
            a.post(
                Op.WRITE,
                p,
                ra,
                t.region_id,
                local_extents=ext,
                remote_extents=ext,
                notify=bytes(NOTE),
                timeout=deadline_s,
            )
            for p, t in zip(peers, stopped, strict=True)
            for _ in range(per_stopped)
        ]
        if settle:
            until = time.monotonic() + deadline_s / 2
            while (
                sum(t.poll() == TransferState.DONE for t in to_stopped) < n_stopped * 64
                and time.monotonic() < until
            ):
                time.sleep(0.05)
            time.sleep(0.5)
        to_healthy = [
            a.post(
                Op.WRITE,
                ph,
                ra,
                healthy.region_id,
                local_extents=ext,
                remote_extents=ext,
                notify=healthy_note(i),
            )
            for i in range(20)
        ]
        for t in to_healthy:
            t.wait(h.TIMEOUT)
        healthy_s = time.monotonic() - t_post  # starved, it would end at the stopped peers' deadline
        stop = time.monotonic() + 90
        while any(t.poll() == TransferState.PENDING for t in to_stopped) and time.monotonic() < stop:
            time.sleep(0.01)
        late = time.monotonic() - t_post - deadline_s
        states = [t.poll() for t in to_stopped]
        assert TransferState.PENDING not in states
        for t in to_stopped:
            if t.poll() == TransferState.FAILED:
                with pytest.raises(errors.TimeoutError):
                    t.wait()
        return healthy_s, late, states
    finally:
        for t in stopped:
            os.kill(t.pid, signal.SIGCONT)
        a.close()
        healthy.quit()
        for t in stopped:
            t.quit()


def test_stopped_peer_ends_by_its_deadline_and_holds_no_healthy_peer():
    """A SIGSTOPped target takes no notifications: once its 64 receive buffers are used, the
    SENDs to it wait (RNR) and those transfers end TimeoutError at their deadlines, while a
    healthy peer of the same initiator is served at once. (TCG: generous bounds.)"""
    deadline_s = 8.0
    healthy_s, late, states = _stopped_peers_and_a_healthy_one(1, 100, deadline_s, lambda i: b"h", False)
    assert healthy_s < deadline_s, f"a healthy peer waited {healthy_s:.1f} s behind a stopped one"
    assert TransferState.FAILED in states, "the stopped peer's receive buffers never ran out"
    assert late < 2.0, f"the stopped peer's transfers ended {late:.2f} s after their deadline"


def test_several_stopped_peers_leave_notification_buffers_for_a_healthy_one():
    """Five SIGSTOPped targets each hold their share of the initiator's buffers for large
    notifications (SENDs waiting in RNR); together they hold more than one slab. More buffers
    are registered on demand, so a healthy peer's large notifications still go out at once."""
    deadline_s = 15.0
    healthy_s, _, states = _stopped_peers_and_a_healthy_one(
        5, 80, deadline_s, lambda i: i.to_bytes(4, "little") + bytes(NOTE - 4), True
    )
    assert healthy_s < deadline_s, f"a healthy peer waited {healthy_s:.1f} s behind stopped ones"
    assert TransferState.FAILED in states, "the stopped peers' receive buffers never ran out"
