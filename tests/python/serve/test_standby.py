"""The stateless path with real processes (SQLite registry, tiny model): standby workers
start with no model and no role; under a continuous load the controller turns one into a
decode and one into a prefill (assignment, load the role in the same process, report,
connect and verify, healthy, decode metadata to the prefills through the registry, then
routed), they serve, and no request fails. A killed decode is replaced by the third standby;
when no standby is left, a new process is spawned."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from test_control_e2e import complete, wait_replaced
from test_control_lifecycle import Load

from kvxfer.serve.control import keys
from kvxfer.serve.deployment import start_local

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


class BodyLoad(Load):
    """:class:`Load` that records an HTTP error's body (the gateway's error code)."""

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                complete(self.url)
                self.ok += 1
            except urllib.error.HTTPError as e:
                self.errors.append(f"{e.code} {e.read()[:300]!r}")
            except Exception as e:  # noqa: BLE001 - any failure is what the test counts
                self.errors.append(repr(e))


def stream_tokens(url: str) -> int:
    """One streamed completion through the gateway; the number of token events before
    ``[DONE]`` (an error event or a stream without ``[DONE]`` fails the test)."""
    body = {"model": "x", "prompt": "stream me", "max_tokens": 6, "stream": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    tokens, done = 0, False
    with urllib.request.urlopen(req, timeout=60) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            ev = json.loads(line[6:])
            assert "error" not in ev, ev
            tokens += 1
    assert done, "stream ended without [DONE]"
    return tokens


def test_standbys_become_a_decode_and_a_prefill_under_load_and_no_request_fails(tmp_path):
    with start_local(1, 1, registry="sqlite", b_p=2, b_d=4, standby=3, log_dir=tmp_path / "logs") as dep:
        ctl = dep.controllers["g0"]
        standbys = sorted(n for n, p in dep.procs.items() if p.role == "standby")
        assert len(standbys) == 3
        registered = sorted(e.key[len(keys.STANDBY) :] for e in dep.registry.get_prefix(keys.STANDBY))
        assert registered == standbys
        pids = {n: dep.procs[n].popen.pid for n in standbys}
        load = BodyLoad(dep.gateway_url)
        try:
            time.sleep(1.0)
            procs_before = set(dep.procs)
            new_d = ctl.add_member("decode")  # a ratio step, served by a standby
            new_p = ctl.add_member("prefill")
            assert {new_d, new_p} < set(standbys) and ctl.claimed == [new_d, new_p]
            assert set(dep.procs) == procs_before  # no new process: the same ones took the roles
            assert ctl.members[new_d] == "decode" and ctl.members[new_p] == "prefill"
            # the decode's metadata reached every prefill (through the registry), the new
            # prefill is routed, and the standby records and assignments are gone
            decodes = sorted(n for n, r in ctl.members.items() if r == "decode")
            for p in (n for n, r in ctl.members.items() if r == "prefill"):
                assert dep.status(p)["decodes"] == decodes
            assert dep.procs[new_p].url in ctl.route() and len(ctl.route()) == 2
            left = [e.key[len(keys.STANDBY) :] for e in dep.registry.get_prefix(keys.STANDBY)]
            assert left == sorted(set(standbys) - {new_d, new_p})
            assert dep.registry.get_prefix(keys.ASSIGN) == []
            ok_at_join = load.ok
            t0 = time.monotonic()
            while time.monotonic() - t0 < 30 and not (
                dep.status(new_p)["accepted"] > 0 and dep.status(new_d)["accepted"] > 0
            ):
                time.sleep(0.2)
        finally:
            load.end()
        assert load.errors == [] and load.ok > ok_at_join > 0
        for n in (new_d, new_p):
            st = dep.status(n)
            assert st["name"] == n and st["role"] == ctl.members[n] and st["accepted"] > 0
            assert dep.procs[n].popen.pid == pids[n] and dep.procs[n].alive
        for _ in range(4):
            assert stream_tokens(dep.gateway_url) >= 1
        # recovery through the stateless path: the killed decode's replacement is the last standby
        (old_d,) = [n for n, r in ctl.members.items() if r == "decode" and n not in standbys]
        procs_before = set(dep.procs)
        dep.kill(old_d)
        rm = wait_replaced(ctl, 1)
        (last,) = set(standbys) - {new_d, new_p}
        assert (rm.name, rm.role, rm.replacement) == (old_d, "decode", last)
        assert set(dep.procs) == procs_before  # the standby, not a new process
        for p in (n for n, r in ctl.members.items() if r == "prefill"):
            assert dep.status(p)["decodes"] == sorted(n for n, r in ctl.members.items() if r == "decode")
        for _ in range(4):
            assert stream_tokens(dep.gateway_url) >= 1
        # no standby left: the next step starts a new process, as before
        extra = ctl.add_member("decode")
        assert extra not in standbys and set(dep.procs) == procs_before | {extra}
        assert complete(dep.gateway_url)["choices"][0]["text"]
