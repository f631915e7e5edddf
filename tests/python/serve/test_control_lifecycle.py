"""Group lifecycle under load with real processes: a member added to and one removed from a
running group (the ratio's steps), scale out by a group, scale in by a group (route removed
first, drained, stopped) and a rolling upgrade, with no request failing."""

from __future__ import annotations

import threading
import time

import pytest
from test_control_e2e import complete

from kvxfer.serve.control.routes import read_routes
from kvxfer.serve.deployment import start_local

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


class Load:
    """Three client threads sending completions back to back; every outcome recorded."""

    def __init__(self, url: str) -> None:
        self.url, self.ok, self.errors = url, 0, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(3)]
        for t in self.threads:
            t.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                complete(self.url)
                self.ok += 1
            except Exception as e:  # noqa: BLE001 - any failure is what the test counts
                self.errors.append(repr(e))

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_ratio_steps_scale_out_scale_in_and_rolling_upgrade_drop_no_request(tmp_path):
    with start_local(1, 1, registry="sqlite", b_p=2, b_d=4, log_dir=tmp_path / "logs") as dep:
        load = Load(dep.gateway_url)
        try:
            time.sleep(1.0)
            ctl0 = dep.controllers["g0"]
            newp = ctl0.add_member("prefill")  # a ratio step: one more prefill joins the running group
            assert len(ctl0.route()) == 2
            (oldp,) = [n for n, r in ctl0.members.items() if r == "prefill" and n != newp]
            ctl0.remove_member(oldp, drain=lambda name: dep.drain([name]))  # and one leaves, drained
            assert ctl0.route() == [dep.procs[newp].url] and not dep.procs[oldp].alive
            g1 = dep.add_group("*", 1, 1)  # scale out
            assert len(read_routes(dep.registry)["*"]) == 2
            old = [n for n in dep.controllers["g0"].members]
            dep.retire_group("g0")  # scale in: route first, drain, stop
            assert read_routes(dep.registry)["*"] == dep.controllers[g1].route()
            assert all(not dep.procs[n].alive for n in old)
            before = load.ok
            new = dep.rolling_upgrade(prefix_cache=False)  # new worker settings, one group at a time
            assert list(dep.controllers) == new and g1 in dep.retired
            time.sleep(1.0)
        finally:
            load.end()
        assert load.errors == [] and load.ok > before > 0
        (g,) = new
        for n in dep.controllers[g].members:
            assert dep.status(n)["name"] == n
        assert read_routes(dep.registry)["*"] == dep.controllers[g].route()
