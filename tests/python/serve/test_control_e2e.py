"""The control plane with real worker processes: a group assembled through the registry
(SQLite file, or a real etcd started by the test), served through the gateway, and repaired
after a kill: the dead member leaves within the lease bound and exactly one replacement joins."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from registry_backends import need_etcd

from kvxfer.serve.deployment import start_local

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
TTL = 2.0


def complete(url: str, prompt: str = "hello there") -> dict:
    body = {"model": "x", "prompt": prompt, "max_tokens": 6, "stream": False}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def wait_replaced(ctl, count: int, timeout: float = 60.0):
    t0 = time.monotonic()
    while not (len(ctl.removals) >= count and ctl.removals[count - 1].replaced):
        assert time.monotonic() - t0 < timeout, f"no replacement within {timeout} s: {ctl.removals}"
        time.sleep(0.1)
    return ctl.removals[count - 1]


@pytest.mark.parametrize("kind", ["sqlite", "etcd"])
def test_group_assembled_by_the_registry_serves_and_recovers_from_a_kill(kind, tmp_path):
    if kind == "etcd":
        need_etcd()
    with start_local(2, 2, registry=kind, b_p=2, b_d=4, log_dir=tmp_path / "logs", lease_ttl_s=TTL) as dep:
        ctl = dep.controllers["g0"]
        assert sorted(ctl.members.values()) == ["decode", "decode", "prefill", "prefill"] and ctl.epoch == 1
        decodes = sorted(n for n, r in ctl.members.items() if r == "decode")
        prefills = sorted(n for n, r in ctl.members.items() if r == "prefill")
        for p in prefills:  # descriptors came through the registry: each prefill knows both decodes
            assert dep.status(p)["decodes"] == decodes
        assert ctl.route() == [dep.procs[p].url for p in prefills]
        assert complete(dep.gateway_url)["choices"][0]["finish_reason"] in ("length", "stop")

        for n, role in ((decodes[0], "decode"), (prefills[0], "prefill")):
            before = set(dep.procs)
            t_kill = time.time()
            dep.kill(n)
            rm = wait_replaced(ctl, len(ctl.removals) + 1)
            assert (rm.name, rm.role) == (n, role)
            assert rm.detected - t_kill <= TTL + 1.5, f"removal took {rm.detected - t_kill:.2f} s"
            spawned = set(dep.procs) - before
            assert spawned == {rm.replacement}, spawned  # exactly one replacement
            assert n not in ctl.members and ctl.members[rm.replacement] == role
            assert dep.procs[n].url not in ctl.route()
            live_p = sorted(m for m, r in ctl.members.items() if r == "prefill")
            live_d = sorted(m for m, r in ctl.members.items() if r == "decode")
            for p in live_p:
                assert dep.status(p)["decodes"] == live_d
            for _ in range(3):
                assert complete(dep.gateway_url)["choices"][0]["text"]
