"""The group controller's setup workflow, over the in-memory registry with scripted members
(a unit test of the controller alone; real worker processes are in test_control_e2e.py)."""

from __future__ import annotations

import threading
import time

import pytest

from kvxfer.serve.control import keys
from kvxfer.serve.control.controller import GroupController, GroupSetupError
from kvxfer.serve.control.routes import RouteWatcher, read_routes
from kvxfer.serve.registry import open_registry


class ScriptedMember:
    """Plays one member's part of the protocol: report, then at each order naming it, report
    healthy for that epoch (or "failed", if told to)."""

    def __init__(self, reg, name, role, fail=False, ttl=1.0):
        self.reg, self.name, self.role, self.fail = reg, name, role, fail
        self.key = keys.member("s", "g", name)
        self.lease = reg.grant(ttl)
        self.stop = threading.Event()
        self.put("reported", 0)
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def put(self, state, epoch):
        self.reg.put(self.key, keys.dumps({"role": self.role, "url": f"http://{self.name}", "descriptor": "",
                                           "state": state, "epoch": epoch, "message": "scripted"}),
                     lease=self.lease)  # fmt: skip

    def run(self):
        done = 0
        while not self.stop.is_set():
            self.reg.keepalive(self.lease)
            e = self.reg.get(keys.order("s", "g"))
            o = keys.loads(e.value) if e else None
            if o and o["epoch"] > done and self.name in o["members"]:
                done = o["epoch"]
                self.put("failed" if self.fail else "healthy", done)
            time.sleep(0.02)

    def die(self):
        self.stop.set()
        self.t.join(5)


def test_group_is_routed_only_after_every_member_reported_and_is_healthy():
    reg = open_registry("memory:")
    seen = []
    watcher = RouteWatcher(reg, lambda r: seen.append(r))
    ctl = GroupController(reg, "s", "g", n_prefill=2, n_decode=1, setup_deadline_s=20)
    members = [ScriptedMember(reg, "p0", "prefill")]
    t = threading.Thread(target=ctl.setup)
    t.start()
    time.sleep(0.5)
    assert t.is_alive() and read_routes(reg) == {} and reg.get(keys.order("s", "g")) is None  # collecting
    members += [ScriptedMember(reg, "p1", "prefill"), ScriptedMember(reg, "d0", "decode")]
    t.join(20)
    assert ctl.members == {"p0": "prefill", "p1": "prefill", "d0": "decode"} and ctl.epoch == 1
    assert read_routes(reg) == {"s": ["http://p0", "http://p1"]}
    deadline = time.monotonic() + 5
    while seen[-1] != {"s": ["http://p0", "http://p1"]} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen[0] == {} and seen[-1] == {"s": ["http://p0", "http://p1"]}  # the gateway's view
    watcher.stop()
    for m in members:
        m.die()


def test_a_failed_member_is_replaced_within_the_deadline_and_a_dead_one_removed_then_replaced():
    reg = open_registry("memory:")
    spawned = []

    def spawn(role):
        name = f"new-{len(spawned)}"
        spawned.append(ScriptedMember(reg, name, role))
        return name

    ctl = GroupController(reg, "s", "g", 1, 1, spawn=spawn, setup_deadline_s=20, ttl_s=1.0)
    members = [ScriptedMember(reg, "p0", "prefill"), ScriptedMember(reg, "d0", "decode", fail=True)]
    ctl.setup()
    assert ctl.members == {"p0": "prefill", "new-0": "decode"} and len(spawned) == 1  # one retry
    ctl.watch()
    members[0].die()  # p0 stops renewing its lease
    t0 = time.monotonic()
    while not (ctl.removals and ctl.removals[0].replaced) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    rm = ctl.removals[0]
    assert (rm.name, rm.role, rm.replacement) == ("p0", "prefill", "new-1") and rm.replaced
    assert len(spawned) == 2  # exactly one replacement
    assert read_routes(reg) == {"s": ["http://new-1"]}
    ctl.stop_watch()
    for m in members + spawned:
        m.die()


def test_setup_without_enough_members_ends_with_a_typed_error_at_its_deadline():
    reg = open_registry("memory:")
    ctl = GroupController(reg, "s", "g", 1, 1, setup_deadline_s=1.0)
    m = ScriptedMember(reg, "p0", "prefill")
    t0 = time.monotonic()
    with pytest.raises(GroupSetupError, match="collected"):
        ctl.setup()
    assert time.monotonic() - t0 < 3 and read_routes(reg) == {}
    m.die()
    with pytest.raises(GroupSetupError):
        GroupController(reg, "s", "g", 0, 1)
