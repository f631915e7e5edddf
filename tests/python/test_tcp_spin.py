"""tcp's bounded busy-poll (``EngineConfig.backend.tcp.spin_us``, issue 9): the option is
accepted and validated (config and environment), 0 turns it off, a spin is bounded (an
engine that served a request stops using CPU once its budget is spent), and neither a
stop nor a wait's timeout waits for a spin to end.

Whether a thread spins is read from its scheduler state (/proc/self/task/TID/stat), sampled
while the test sleeps: a thread that polls stays runnable (R) even while it yields the CPU
to others, one that sleeps in the kernel is S. Unlike CPU time this does not depend on how
busy the host is. Budgets of 1 s make a spin that ignored a stop or a timeout show as a
delay of about a second against the bounds checked here (0.5 s)."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import Op, errors
from kvxfer.config import EngineConfig

pytestmark = pytest.mark.skipif(
    not any(b.name == "tcp" and b.available for b in kvxfer.list_backends()),
    reason="this build has no tcp backend",
)

SLOT = 4096
LONG_SPIN_US = 1_000_000  # the largest budget: a spin that is not cut short lasts 1 s


def tcp_engine(name: str, spin_us: int | None) -> kvxfer.Engine:
    cfg = EngineConfig()
    if spin_us is not None:
        cfg.backend.tcp.spin_us = spin_us
    return kvxfer.Engine(name, backends=["tcp"], timeout=30.0, config=cfg)


def thread_ids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def runnable_share(tids: set[int], seconds: float) -> float:
    """Share of samples (one every 5 ms for `seconds`) in which any of `tids` was running
    or runnable (state R)."""
    busy = samples = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        states = []
        for tid in tids:
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except OSError:  # the thread ended
                pass
        samples += 1
        busy += "R" in states
        time.sleep(0.005)
    return busy / max(samples, 1)


class Pair:
    """a -> b over tcp in this process; b's listener spins `target_spin` after a request.
    `threads`: the threads the two engines started (set after the first request)."""

    def __init__(self, target_spin: int | None, initiator_spin: int | None = 0):
        self.before = thread_ids()
        self.threads: set[int] = set()
        self.a = tcp_engine("a", initiator_spin)
        self.b = tcp_engine("b", target_spin)
        self.src = np.random.default_rng(3).integers(0, 256, 4 * SLOT, dtype=np.uint8)
        self.dst = np.zeros_like(self.src)
        self.ra, self.rb = self.a.register(self.src), self.b.register(self.dst)
        self.peer = self.a.add_peer(self.b.descriptor())
        # A first request, then a pause: the worker that served the handshake may serve a
        # request that follows it at once (no listener spin after that one); 50 ms later
        # the connection is parked, so later requests reach the listener's quick path.
        self.one_request(3)
        time.sleep(0.05)

    def one_request(self, slot: int = 0) -> None:
        off = slot * SLOT
        self.a.post_extent(Op.WRITE, self.peer, self.ra, self.rb.id, off, off, SLOT).wait(30)
        assert np.array_equal(self.dst[off : off + SLOT], self.src[off : off + SLOT])
        self.threads |= thread_ids() - self.before

    def close(self) -> None:
        self.a.close()
        self.b.close()


def test_spin_option_is_validated_in_config_and_environment(monkeypatch):
    for spin in (0, 20, LONG_SPIN_US):
        tcp_engine("ok", spin).close()
    with pytest.raises(errors.InvalidArgumentError, match="spin_us"):
        tcp_engine("too-long", LONG_SPIN_US + 1)
    assert ("KVXFER_TCP_SPIN_US", "backend.tcp.spin_us") in kvxfer.environment_variables()
    monkeypatch.setenv("KVXFER_TCP_SPIN_US", "-1")
    with pytest.raises(errors.InvalidArgumentError, match="KVXFER_TCP_SPIN_US"):
        tcp_engine("bad-env", None)
    monkeypatch.setenv("KVXFER_TCP_SPIN_US", str(LONG_SPIN_US + 1))
    with pytest.raises(errors.InvalidArgumentError, match="KVXFER_TCP_SPIN_US"):
        tcp_engine("bad-env", None)


@pytest.mark.parametrize("how", ["config", "environment"])
def test_spin_runs_after_a_request_and_zero_turns_it_off(how, monkeypatch):
    """With a 1 s budget the target's listener polls after serving a request (one of the
    engines' threads stays runnable while we watch); with 0 every engine thread sleeps.
    Bytes verified both ways."""

    def make(spin: int) -> Pair:
        if how == "config":
            return Pair(target_spin=spin)
        monkeypatch.setenv("KVXFER_TCP_SPIN_US", str(spin))
        return Pair(target_spin=None, initiator_spin=None)

    share = {}
    for spin in (0, LONG_SPIN_US):
        p = make(spin)
        try:
            p.one_request()
            share[spin] = runnable_share(p.threads, 0.3)
        finally:
            p.close()
    assert share[0] < 0.3, f"spin_us=0: an engine thread was runnable in {share[0]:.0%} of 0.3 s idle"
    assert share[LONG_SPIN_US] > 0.7, f"a 1 s spin was runnable in only {share[LONG_SPIN_US]:.0%} of 0.3 s"


def test_spin_is_bounded_by_its_budget():
    """A 50 ms budget: once it is spent every engine thread sleeps again."""
    p = Pair(target_spin=50_000)
    try:
        p.one_request()
        time.sleep(0.3)  # the spin ends after 50 ms of wall time
        share = runnable_share(p.threads, 0.3)
        assert share < 0.3, f"an engine thread was runnable in {share:.0%} of 0.3 s after a 50 ms spin"
        p.one_request(1)  # and it still serves
    finally:
        p.close()


def test_stop_during_a_listener_spin_is_prompt():
    """The target's engine is closed and released (its backend stops: the listener is
    joined) while its listener spins with a 1 s budget: that takes well under the budget,
    and no spinning goes on afterwards."""
    p = Pair(target_spin=LONG_SPIN_US)
    try:
        p.one_request()
        start = time.monotonic()
        p.b.close()
        del p.b, p.rb
        gc.collect()  # the last references go: the backend stops and joins its listener
        took = time.monotonic() - start
        assert took < 0.5, f"stopping the engine took {took:.3f} s during a 1 s spin"
        share = runnable_share(p.threads, 0.3)
        assert share < 0.3, f"an engine thread was runnable in {share:.0%} of 0.3 s after the stop"
    finally:
        p.a.close()


# --------------------------------------------------------------------------------------
# The initiator's spin for its ACK: against a target process that is stopped (SIGSTOP), so
# the ACK never comes while the waiting caller spins.


def target_process(conn) -> None:
    eng = kvxfer.Engine("stopped-target", backends=["tcp"], timeout=30.0)
    pool = np.zeros(4 * SLOT, np.uint8)
    region = eng.register(pool)
    conn.send((eng.descriptor(), region.id))
    conn.recv()  # until the test is done
    eng.close()


def wait_until_stopped(pid: int) -> None:
    """SIGSTOP takes effect asynchronously: wait until every thread of `pid` is stopped."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except OSError:
                pass
        if states and all(s in "tT" for s in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


@pytest.mark.multiprocess
def test_wait_timeout_and_close_during_an_ack_spin_are_prompt():
    """Initiator spin budget 1 s, target stopped: wait(timeout=0.05) raises TimeoutError
    within 0.5 s, and a wait without a timeout returns within 0.5 s of the engine's close."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=target_process, args=(child,), daemon=True)
    proc.start()
    eng = tcp_engine("spinning-initiator", LONG_SPIN_US)
    try:
        assert conn.poll(60), "target process did not start"
        descriptor, region_id = conn.recv()
        src = np.ones(4 * SLOT, np.uint8)
        region = eng.register(src)
        peer = eng.add_peer(descriptor)
        eng.post_extent(Op.WRITE, peer, region, region_id, 0, 0, SLOT).wait(30)  # works first
        os.kill(proc.pid, signal.SIGSTOP)
        wait_until_stopped(proc.pid)
        t = eng.post_extent(Op.WRITE, peer, region, region_id, 0, 0, SLOT)
        start = time.monotonic()
        with pytest.raises(errors.TimeoutError):
            t.wait(0.05)
        took = time.monotonic() - start
        assert took < 0.5, f"wait(0.05) returned after {took:.3f} s during a 1 s spin"

        t2 = eng.post_extent(Op.WRITE, peer, region, region_id, SLOT, SLOT, SLOT)
        ended = {}

        def waiter():
            try:
                t2.wait()
            except errors.KvxferError as e:
                ended["error"] = e
            ended["at"] = time.monotonic()

        th = threading.Thread(target=waiter)
        th.start()
        time.sleep(0.05)  # the waiter is inside its spin (or asleep after it)
        closed_at = time.monotonic()
        eng.close()
        th.join(5)
        assert not th.is_alive(), "wait() did not return after close()"
        assert ended["at"] - closed_at < 0.5, f"wait() returned {ended['at'] - closed_at:.3f} s after close()"
        assert "error" in ended, "a write to a stopped target cannot have succeeded"
    finally:
        eng.close()
        os.kill(proc.pid, signal.SIGCONT)
        conn.send("done")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
