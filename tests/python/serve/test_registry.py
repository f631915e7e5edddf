"""The registry contract, one suite over the three backends (memory, sqlite, a real etcd
started by the test), plus cross-process behaviour of the embedded and etcd stores."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import pytest
from registry_backends import KINDS, make_registry, need_etcd

from kvxfer.errors import KvxferError
from kvxfer.serve.registry import RegistryError, Watch, open_registry
from kvxfer.serve.registry.server import EtcdServer


@pytest.fixture(scope="module")
def etcd_server():
    need_etcd()
    with EtcdServer() as srv:
        yield srv


@pytest.fixture(params=KINDS)
def reg(request, tmp_path):
    srv = request.getfixturevalue("etcd_server") if request.param == "etcd" else None
    r = make_registry(request.param, tmp_path, srv)
    r.ns = f"/t/{uuid.uuid4().hex[:8]}/"  # the etcd server is shared by the module's tests
    yield r
    r.close()


def test_put_get_prefix_delete_and_revisions(reg):
    ns = reg.ns
    r1 = reg.put(ns + "a", "1")
    r2 = reg.put(ns + "b/x", "2")
    r3 = reg.put(ns + "a", "3")
    assert r1 < r2 < r3 <= reg.revision()
    e = reg.get(ns + "a")
    assert (e.value, e.mod_revision) == ("3", r3)
    assert reg.get(ns + "missing") is None
    assert [(x.key, x.value) for x in reg.get_prefix(ns)] == [(ns + "a", "3"), (ns + "b/x", "2")]
    assert [x.key for x in reg.get_prefix(ns + "b/")] == [ns + "b/x"]
    assert reg.delete(ns + "a") is True and reg.delete(ns + "a") is False
    assert reg.get(ns + "a") is None


def test_compare_and_swap(reg):
    k = reg.ns + "cas"
    assert reg.cas(k, 0, "first") is True  # create if absent
    assert reg.cas(k, 0, "again") is False
    rev = reg.get(k).mod_revision
    assert reg.cas(k, rev + 1, "wrong revision") is False
    assert reg.cas(k, rev, "second") is True
    assert reg.get(k).value == "second"
    assert reg.cas(k, rev, "stale") is False


def test_concurrent_cas_has_exactly_one_winner(reg, tmp_path):
    k = reg.ns + "leader"
    wins: list[int] = []

    def contend(i: int) -> None:
        r = reg if reg.url == "memory:" else open_registry(reg.url)
        if r.cas(k, 0, str(i)):
            wins.append(i)
        if r is not reg:
            r.close()

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(wins) == 1 and reg.get(k).value == str(wins[0])


def test_lease_expiry_deletes_keys_with_an_event_and_keepalive_holds(reg):
    ns = reg.ns
    short, kept = reg.grant(1.0), reg.grant(1.0)
    after = reg.revision()
    reg.put(ns + "short", "x", lease=short)
    reg.put(ns + "kept", "y", lease=kept)
    t0 = time.monotonic()
    deleted: list[str] = []
    while ns + "short" not in deleted:
        assert reg.keepalive(kept)
        evs, after = reg.events(ns, after, 0.3)
        deleted += [e.key for e in evs if e.type == "delete"]
        assert time.monotonic() - t0 < 6.0, "lease did not expire within 6 s"
    took = time.monotonic() - t0
    assert 0.8 <= took, took  # not before its ttl
    assert reg.get(ns + "short") is None and reg.keepalive(short) is False
    assert reg.get(ns + "kept") is not None  # kept alive past its ttl
    reg.revoke(kept)
    assert reg.get(ns + "kept") is None
    with pytest.raises(RegistryError, match="lease"):
        reg.put(ns + "z", "v", lease=short)


def test_watch_delivers_changes_under_its_prefix_in_order(reg):
    ns = reg.ns
    got = []
    done = threading.Event()

    def on(evs):
        got.extend(evs)
        if any(e.key == ns + "w/end" for e in evs):
            done.set()

    w = Watch(reg, ns + "w/", on, poll_s=0.2)
    try:
        reg.put(ns + "w/1", "a")
        reg.put(ns + "other", "not mine")
        reg.delete(ns + "w/1")
        reg.put(ns + "w/end", "b")
        assert done.wait(10)
    finally:
        w.stop()
    assert [(e.type, e.key, e.value) for e in got] == [
        ("put", ns + "w/1", "a"), ("delete", ns + "w/1", ""), ("put", ns + "w/end", "b")]  # fmt: skip
    assert [e.revision for e in got] == sorted(e.revision for e in got)


def test_bad_input_is_a_typed_error(tmp_path):
    for spec in ("zookeeper://x", "sqlite:"):
        with pytest.raises(RegistryError) as e:
            open_registry(spec)
        assert isinstance(e.value, KvxferError)
    with pytest.raises(RegistryError, match="ttl"):
        open_registry("memory:").grant(0)
    with pytest.raises(RegistryError, match="cannot open"):
        open_registry(f"sqlite:{tmp_path}/no/such/dir/r.db")
    t0 = time.monotonic()
    with pytest.raises(RegistryError):  # nothing listens there: a clear error, quickly
        open_registry("etcd://127.0.0.1:1")
    assert time.monotonic() - t0 < 10


_CHILD = """
import sys, time
from kvxfer.serve.registry import open_registry
r = open_registry(sys.argv[1])
lease = r.grant(1.0)
r.put(sys.argv[2], "child", lease=lease)
print("ready", flush=True)
while True:
    r.keepalive(lease)
    time.sleep(0.2)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["sqlite", "etcd"])
def test_another_process_sees_puts_and_its_lease_ends_when_it_is_killed(kind, tmp_path, request):
    srv = request.getfixturevalue("etcd_server") if kind == "etcd" else None
    reg = make_registry(kind, tmp_path, srv)
    key = f"/x/{uuid.uuid4().hex[:8]}/member"
    after = reg.revision()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, reg.url, key], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # longer than the ttl: the child's keepalives hold it
        assert reg.get(key).value == "child"
        child.kill()
        child.wait(10)
        t0 = time.monotonic()
        gone = False
        while not gone and time.monotonic() - t0 < 6:
            evs, after = reg.events(key, after, 0.5)
            gone = any(e.type == "delete" for e in evs)
        assert gone, "the killed process's key outlived its lease by more than 6 s"
    finally:
        child.kill()
        child.wait(10)
        child.stdout.close()
        reg.close()
