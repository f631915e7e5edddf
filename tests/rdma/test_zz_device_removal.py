"""Removing the RDMA device under load. This module deletes rxe0, so it must run LAST and in
a pytest process of its own (no other engine of the process may hold the device):
tests/rdma/run_in_vm.sh runs it as a second pytest invocation in the same VM with
KVXFER_RDMA_DEVICE_REMOVAL=1; without that variable it skips.

What soft-RoCE does (measured, kernel 6.1): rxe has no `disassociate_ucontext`, so
`rdma link delete rxe0` does not tear the device down under its users: the kernel waits for
every process to close it, and transfers keep working meanwhile. The test therefore checks:
1. under load, with the delete pending, every transfer still ends (DONE or FAILED) within
   its deadline;
2. taking the RoCE netdev down (which does break the transport: PORT_ERR, then
   "local QP operation error" / flushes) fails the in-flight transfers within their
   deadline with a transport error, and nothing hangs;
3. once the engines are dropped the backend has released every verbs object, so the
   pending delete completes, and kvxfer then reports ibverbs unavailable ("no RDMA device")
   while other backends keep working.
(On NICs whose driver supports disassociation the kernel raises IBV_EVENT_DEVICE_FATAL
instead; the backend then fails every job at once: see README.md in the backend.)
"""

from __future__ import annotations

import gc
import os
import subprocess
import threading
import time

import numpy as np
import pytest
import rdma_helpers as h

import kvxfer

pytestmark = pytest.mark.rdma
h.require_rdma()
if os.environ.get("KVXFER_RDMA_DEVICE_REMOVAL") != "1":
    pytest.skip(
        "deletes the RDMA device: runs alone via tests/rdma/run_in_vm.sh (KVXFER_RDMA_DEVICE_REMOVAL=1)",
        allow_module_level=True,
    )


def rdma_netdev(dev: str) -> str | None:
    try:
        out = subprocess.run(
            ["rdma", "link", "show", f"{dev}/1"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = out.split()
    return words[words.index("netdev") + 1] if "netdev" in words else None


class Load:
    """Posts WRITEs (with a notification) back to back from a thread, keeping 8 in flight."""

    def __init__(self, a, peer, ra, rb_id, deadline: float):
        self.a, self.peer, self.ra, self.rb_id, self.deadline = a, peer, ra, rb_id, deadline
        self.posted: list[tuple[float, object]] = []
        self.post_errors: list[Exception] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        ids = np.arange(64)
        while not self.stop.is_set():
            live = [t for _, t in self.posted[-8:] if t.state == kvxfer.TransferState.PENDING]
            if len(live) >= 8:
                time.sleep(0.005)
                continue
            try:
                t = self.a.write(self.peer, self.ra, self.rb_id, ids, timeout=self.deadline, notify=b"n")
                self.posted.append((time.monotonic(), t))
            except kvxfer.KvxferError as exc:  # a dead connection refuses new work at once
                self.post_errors.append(exc)
                time.sleep(0.05)

    def halt(self):
        self.stop.set()
        self.thread.join(30)


def uverbs_fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/infiniband/"):
            out.append(target)
    return out


def load_then_break_the_transport(dev: str, netdev: str, deadline: float) -> subprocess.Popen:
    """Steps 1 and 2. Every kvxfer object lives in this function's frame only, so they are all
    gone when it returns."""
    lay = h.layout(1, 1, 64, 16384)
    a = h.make_engine("rm-a")
    b = h.make_engine("rm-b")
    ma, mb = h.random_bytes(h.layout_bytes(lay), 50), np.zeros(h.layout_bytes(lay), np.uint8)
    ra, rb = a.register(ma, layout=lay), b.register(mb, layout=lay)
    peer = a.add_peer(b.descriptor())
    a.write(peer, ra, rb.id, np.arange(64)).wait(h.TIMEOUT)
    load = Load(a, peer, ra, rb.id, deadline)
    time.sleep(1.0)

    # 1. Delete the device while transfers run.
    delete = subprocess.Popen(
        ["rdma", "link", "delete", dev], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    time.sleep(2.0)
    mark = time.monotonic()
    print(
        f"rdma link delete {dev}: "
        f"{'still waiting for the device users' if delete.poll() is None else 'returned'}"
    )

    # 2. Break the transport under the same load.
    subprocess.run(["ip", "link", "set", netdev, "down"], check=True, timeout=60)
    down_at = time.monotonic()
    time.sleep(deadline + 3)
    load.halt()

    posted = list(load.posted)
    assert posted, "the load generator posted nothing"
    now = time.monotonic()
    done = failed = 0
    for t0, t in posted:
        assert t.state != kvxfer.TransferState.PENDING or now - t0 < deadline, f"transfer {t.id} hangs"
        try:
            t.wait(deadline + 5)
            done += 1
        except kvxfer.KvxferError:
            failed += 1
    during_delete = [t for t0, t in posted if mark - 2 <= t0 < down_at]
    print(
        f"posted {len(posted)}: {done} done, {failed} failed; {len(during_delete)} posted while the delete "
        f"was pending ({sum(t.state == kvxfer.TransferState.DONE for t in during_delete)} of them done); "
        f"{len(load.post_errors)} refused at post after the connection died"
    )
    assert during_delete and any(t.state == kvxfer.TransferState.DONE for t in during_delete), (
        "transfers stopped while the (rxe) delete was pending"
    )
    failures = [t for _, t in posted if t.state == kvxfer.TransferState.FAILED]
    assert failures or load.post_errors, "taking the RoCE netdev down failed no transfer"
    kinds = (
        kvxfer.errors.PeerUnreachableError,
        kvxfer.errors.TransportError,
        kvxfer.errors.TimeoutError,
        kvxfer.errors.CanceledError,
    )
    assert all(isinstance(t.error, kinds) for t in failures), [repr(t.error) for t in failures]
    transport = [t for t in failures if not isinstance(t.error, kvxfer.errors.TimeoutError)]
    print("first transport error:", transport[0].error if transport else None)
    assert transport or load.post_errors, (
        "only deadline failures: the backend never noticed the port going down"
    )
    for t in failures:
        print(f"  transfer {t.id}: {type(t.error).__name__}: {t.error}")
        break

    # The backend lets go of every job once nothing of it is outstanding.
    until = time.monotonic() + 30
    while not all(t.quiesced for _, t in posted) and time.monotonic() < until:
        time.sleep(0.05)
    assert all(t.quiesced for _, t in posted), "a transfer was never released by the backend"
    load.post_errors.clear()  # exceptions keep frames (and so engines) alive
    a.close()
    b.close()
    return delete


def test_device_removal_under_load():
    dev = h.rdma_devices()[0]
    netdev = rdma_netdev(dev)
    assert netdev, f"cannot find the netdev of {dev} (rdma link show)"
    delete = load_then_break_the_transport(dev, netdev, deadline=10.0)
    # 3. Everything kvxfer created is unreferenced now: the device must be closed...
    gc.collect()
    until = time.monotonic() + 30
    while uverbs_fds() and time.monotonic() < until:
        time.sleep(0.1)
        gc.collect()
    assert not uverbs_fds(), f"the process still holds {uverbs_fds()}: verbs resources leaked"
    # ... so the kernel can finish the delete.
    try:
        out, _ = delete.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        delete.kill()
        pytest.fail("rdma link delete did not complete although this process closed the device")
    assert delete.returncode == 0, out
    assert dev not in h.rdma_devices()
    info = {x.name: x for x in kvxfer.list_backends()}
    assert not info["ibverbs"].available
    assert "no RDMA device" in info["ibverbs"].reason, info["ibverbs"].reason
    print("after the delete, list_backends says:", info["ibverbs"].reason)
    with pytest.raises(kvxfer.errors.UnsupportedError, match="no RDMA device"):
        kvxfer.Engine("after", backends=["ibverbs"])
    with kvxfer.Engine("fallback") as e:  # a default engine starts without ibverbs
        assert "ibverbs" not in e.backends
