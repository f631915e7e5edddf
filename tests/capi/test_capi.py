"""The C ABI (native/include/kvxfer.h, libkvxfer.so) used from Python through cffi:
two real processes moving bytes over shm and tcp, and the error paths (bad handles, bad
input: a status code and a message, no crash, no hang)."""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from kvxfer_capi_testlib import (
    ROOT,
    CapiError,
    Parts,
    add_peer,
    check,
    descriptor,
    engine,
    ffi,
    post,
    register,
    remote_regions,
    wait_note,
)

PEER = Path(__file__).resolve().parent / "capi_peer.py"
LAYOUT = {"num_layers": 1, "num_kv": 1, "num_blocks": 16, "block_bytes": 256}


def code_of(lib, call) -> tuple[str, str]:
    """(status name, last error) of a call expected to fail."""
    code = call
    assert code != lib.KVXFER_OK
    return ffi.string(lib.kvxfer_status_name(code)).decode(), ffi.string(lib.kvxfer_last_error()).decode()


def test_versions(lib):
    assert lib.kvxfer_abi_version() == lib.KVXFER_ABI_VERSION == 1
    version = ffi.string(lib.kvxfer_version()).decode()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^version = "{re.escape(version)}"', pyproject, re.M), version


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["shm", "tcp"])
def test_two_processes_move_bytes(lib, tmp_path, backend):
    args = [str(tmp_path), backend]
    dec = subprocess.Popen([sys.executable, str(PEER), "decode", *args], stdout=subprocess.PIPE, text=True)
    try:
        pre = subprocess.run(
            [sys.executable, str(PEER), "prefill", *args], stdout=subprocess.PIPE, text=True, timeout=60
        )
        if pre.returncode != 0:
            dec.kill()  # it would wait for a notification that is not coming
        dec_out, _ = dec.communicate(timeout=60)
    finally:
        if dec.poll() is None:
            dec.kill()
            dec.wait()
    assert pre.returncode == 0, pre.stdout
    assert dec.returncode == 0, dec_out
    p, d = json.loads(pre.stdout.splitlines()[-1]), json.loads(dec_out.splitlines()[-1])
    assert p["via"] == backend
    assert p["written"] == 6 * 7 * 2048 + 1000 + 3000 + 536
    assert p["read_bad_bytes"] == 0
    assert d["note"] == ["prefill", "req-A"] and d["bad_bytes"] == 0 and d["done"]


@pytest.mark.multiprocess
def test_peer_gone_ends_by_deadline(lib, tmp_path):
    dec = subprocess.Popen(
        [sys.executable, str(PEER), "decode", str(tmp_path), "tcp"], stdout=subprocess.DEVNULL
    )
    try:
        path = tmp_path / "decode.kvx"
        for _ in range(1500):
            if path.exists():
                break
            time.sleep(0.02)
        eng = engine(lib, "name=lonely\nbackends=tcp\ntcp.listen=127.0.0.1:0\nconnect_timeout_ms=3000")
        peer = add_peer(lib, eng, path.read_bytes())
        src = np.ones(4096, np.uint8)
        reg = register(lib, eng, src.ctypes.data, src.nbytes)
        dec.send_signal(signal.SIGKILL)
        dec.wait()
        parts = Parts()
        parts.add(reg, remote_regions(lib, peer)[-1].id, {"extents": [(0, 4096)]}, {"extents": [(0, 4096)]})
        t0 = time.monotonic()
        try:
            t = post(lib, eng, peer, lib.KVXFER_OP_WRITE, parts, timeout_ms=2000)
        except CapiError as e:  # refused at once: the connection is known dead
            assert e.name == "PEER_UNREACHABLE", e
        else:
            name, msg = code_of(lib, lib.kvxfer_transfer_wait(t, 10000))
            assert name in ("PEER_UNREACHABLE", "TIMEOUT"), (name, msg)
            assert msg
            check(lib, lib.kvxfer_transfer_release(t))
        assert time.monotonic() - t0 < 8
        check(lib, lib.kvxfer_engine_destroy(eng))
    finally:
        if dec.poll() is None:
            dec.kill()
            dec.wait()


@pytest.fixture
def pair(lib):
    """Two engines of this process on the fault backend (memcpy, scriptable faults)."""
    made = []

    def make(script: str = ""):
        a = engine(lib, f"name=a\nbackends=fault\nfault.script={script}\ndefault_timeout_ms=5000")
        b = engine(lib, "name=b\nbackends=fault")
        made.extend([a, b])
        return a, b

    yield make
    for e in made:
        lib.kvxfer_engine_destroy(e)


def setup_blocks(lib, a, b):
    src = np.arange(16 * 256, dtype=np.uint32).astype(np.uint8)
    dst = np.zeros(16 * 256, np.uint8)
    ra = register(lib, a, src.ctypes.data, src.nbytes, LAYOUT)
    register(lib, b, dst.ctypes.data, dst.nbytes, LAYOUT)
    peer = add_peer(lib, a, descriptor(lib, b))
    return src, dst, ra, peer, remote_regions(lib, peer)[0].id


def test_in_process_blocks_and_keyed_notes(lib, pair):
    a, b = pair()
    src, dst, ra, peer, rid = setup_blocks(lib, a, b)
    parts = Parts()
    parts.add(ra, rid, {"blocks": [1, 2, 3]}, {"blocks": [9, 0, 15]})
    t1 = post(lib, a, peer, lib.KVXFER_OP_WRITE, parts, notify=b"first")
    t2 = post(lib, a, peer, lib.KVXFER_OP_WRITE, Parts(), notify=b"second")  # notification only
    for t in (t1, t2):
        check(lib, lib.kvxfer_transfer_wait(t, 5000))
    view = src.reshape(16, 256)
    assert (dst.reshape(16, 256)[[9, 0, 15]] == view[[1, 2, 3]]).all()
    assert (dst.reshape(16, 256)[4:9] == 0).all()
    # Keyed: the second is taken first; the first stays queued for its own waiter.
    assert wait_note(lib, b, b"second", 2000) == ("a", b"second")
    assert wait_note(lib, b, b"first", 2000) == ("a", b"first")
    t0 = time.monotonic()
    assert wait_note(lib, b, None, 200) is None  # PENDING, after about the timeout
    assert 0.15 < time.monotonic() - t0 < 2


def test_deadline_and_cancel(lib, pair):
    a, b = pair("hang")
    _, dst, ra, peer, rid = setup_blocks(lib, a, b)
    parts = Parts()
    parts.add(ra, rid, {"blocks": [0]}, {"blocks": [0]})
    t = post(lib, a, peer, lib.KVXFER_OP_WRITE, parts, timeout_ms=300)
    assert lib.kvxfer_transfer_wait(t, 0) == lib.KVXFER_PENDING
    t0 = time.monotonic()
    assert code_of(lib, lib.kvxfer_transfer_wait(t, -1))[0] == "TIMEOUT"  # -1: until its deadline
    assert time.monotonic() - t0 < 3
    state = ffi.new("int32_t*")
    check(lib, lib.kvxfer_transfer_state(t, state))
    assert state[0] == lib.KVXFER_STATE_FAILED
    t2 = post(lib, a, peer, lib.KVXFER_OP_WRITE, parts, timeout_ms=30000)
    canceled = ffi.new("int32_t*")
    check(lib, lib.kvxfer_transfer_cancel(t2, canceled))
    assert canceled[0] == 1
    assert code_of(lib, lib.kvxfer_transfer_wait(t2, 5000))[0] == "CANCELED"
    assert not dst.any()
    for t_ in (t, t2):
        check(lib, lib.kvxfer_transfer_release(t_))


def test_bad_handles(lib, pair):
    a, b = pair()
    out = ffi.new("size_t*")
    name, msg = code_of(lib, lib.kvxfer_engine_name(ffi.NULL, ffi.NULL, 0, out))
    assert name == "BAD_HANDLE" and "NULL" in msg
    bogus = ffi.cast("kvxfer_engine*", 0xDEAD0)
    name, msg = code_of(lib, lib.kvxfer_engine_close(bogus))
    assert name == "BAD_HANDLE" and "not a live kvxfer_engine" in msg
    # A handle of another type is not accepted.
    as_region = ffi.cast("kvxfer_region*", a)
    assert code_of(lib, lib.kvxfer_deregister(a, as_region))[0] == "BAD_HANDLE"
    # Released handles.
    _, _, ra, peer, rid = setup_blocks(lib, a, b)
    parts = Parts()
    parts.add(ra, rid, {"blocks": [0]}, {"blocks": [0]})
    t = post(lib, a, peer, lib.KVXFER_OP_WRITE, parts)
    check(lib, lib.kvxfer_transfer_wait(t, 5000))
    check(lib, lib.kvxfer_transfer_release(t))
    assert code_of(lib, lib.kvxfer_transfer_wait(t, 0))[0] == "BAD_HANDLE"
    assert code_of(lib, lib.kvxfer_transfer_release(t))[0] == "BAD_HANDLE"  # double release
    check(lib, lib.kvxfer_peer_release(peer))
    tp = ffi.new("kvxfer_transfer**")
    arr, n = parts.array()
    assert code_of(lib, lib.kvxfer_post(a, peer, 0, arr, n, ffi.NULL, 0, 0, 0, tp))[0] == "BAD_HANDLE"
    assert tp[0] == ffi.NULL
    # A destroyed engine, and the handles made from it.
    e = engine(lib, "name=gone\nbackends=fault")
    buf = np.zeros(4096, np.uint8)
    r = register(lib, e, buf.ctypes.data, buf.nbytes, LAYOUT)
    pe = add_peer(lib, e, descriptor(lib, b))
    t0 = time.monotonic()
    check(lib, lib.kvxfer_engine_destroy(e))
    assert time.monotonic() - t0 < 2  # the engine's threads stopped without waiting for a timeout
    assert code_of(lib, lib.kvxfer_engine_destroy(e))[0] == "BAD_HANDLE"
    rid = ffi.new("uint32_t*")
    assert code_of(lib, lib.kvxfer_region_id(r, rid))[0] == "BAD_HANDLE"
    assert code_of(lib, lib.kvxfer_peer_release(pe))[0] == "BAD_HANDLE"
    assert code_of(lib, lib.kvxfer_free_shareable(ffi.cast("void*", 0x1000)))[0] == "BAD_HANDLE"


@pytest.mark.parametrize(
    ("config", "name", "needle"),
    [
        ("name=x;nosuch=1", "NOT_FOUND", "nosuch"),
        ("name=x;shm.threads=many", "INVALID_ARGUMENT", "backend.shm.threads"),
        ("name=x;default_timeout_ms=-5", "INVALID_ARGUMENT", "default_timeout_ms"),
        ("name=x;justtext", "INVALID_ARGUMENT", "justtext"),
        ("name=x;backends=warp", "NOT_FOUND", "warp"),
    ],
)
def test_bad_config(lib, config, name, needle):
    out = ffi.new("kvxfer_engine**")
    got, msg = code_of(lib, lib.kvxfer_engine_create(config.encode(), out))
    assert (got, out[0]) == (name, ffi.NULL)
    assert needle in msg


def test_bad_input(lib, pair):
    a, b = pair()
    src, dst, ra, peer, rid = setup_blocks(lib, a, b)
    pp = ffi.new("kvxfer_peer**")
    assert code_of(lib, lib.kvxfer_add_peer(a, b"garbage!", 8, pp))[0] == "BAD_DESCRIPTOR"
    desc = descriptor(lib, b)
    assert code_of(lib, lib.kvxfer_add_peer(a, desc[:-3], len(desc) - 3, pp))[0] == "BAD_DESCRIPTOR"
    small = ffi.new("uint8_t[4]")
    n = ffi.new("size_t*")
    name, msg = code_of(lib, lib.kvxfer_engine_descriptor(a, small, 4, n))
    assert name == "OUT_OF_RANGE" and n[0] > 4 and str(n[0]) in msg

    def refused(parts, op=0, needle=""):
        arr, k = parts.array()
        tp = ffi.new("kvxfer_transfer**")
        got, msg = code_of(lib, lib.kvxfer_post(a, peer, op, arr, k, ffi.NULL, 0, 1000, 0, tp))
        assert tp[0] == ffi.NULL
        assert needle in msg, msg
        return got

    p = Parts()
    p.add(ra, rid, {"blocks": [0, 16]}, {"blocks": [0, 1]})
    assert refused(p, needle="16") == "OUT_OF_RANGE"
    p = Parts()
    p.add(ra, rid, {"blocks": [0]}, {"blocks": [0, 1]})
    assert refused(p) == "INVALID_ARGUMENT"  # byte totals differ
    p = Parts()
    p.add(ra, 777, {"blocks": [0]}, {"blocks": [0]})
    assert refused(p, needle="777") == "NOT_FOUND"
    p = Parts()
    p.add(ra, rid, {"blocks": [0]}, {"blocks": [0]})
    assert refused(p, op=5, needle="op 5") == "INVALID_ARGUMENT"
    p._parts[0]["local_side"]["kind"] = 7
    assert refused(p, needle="kind 7") == "INVALID_ARGUMENT"
    p = Parts()
    p.add(ra, rid, {"blocks": [0], "layers": (1, 1)}, {"blocks": [0]})
    assert refused(p, needle="empty") == "OUT_OF_RANGE"
    # Memory
    rp = ffi.new("kvxfer_region**")
    assert code_of(lib, lib.kvxfer_register(a, ffi.NULL, 16, ffi.NULL, rp))[0] == "INVALID_ARGUMENT"
    lay = ffi.new("kvxfer_kv_layout*", dict(LAYOUT, num_blocks=17))
    name, msg = code_of(lib, lib.kvxfer_register(a, ffi.cast("void*", src.ctypes.data), src.nbytes, lay, rp))
    assert name in ("INVALID_ARGUMENT", "OUT_OF_RANGE") and msg
    assert not dst.any()  # nothing moved by any refused request


def test_last_error_is_per_thread(lib):
    out = ffi.new("kvxfer_engine**")
    lib.kvxfer_engine_create(b"name=x;nosuch=1", out)
    mine = ffi.string(lib.kvxfer_last_error()).decode()
    seen = []

    def other():
        lib.kvxfer_engine_close(ffi.NULL)
        seen.append(ffi.string(lib.kvxfer_last_error()).decode())

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert "nosuch" in mine and "NULL" in seen[0]
    assert ffi.string(lib.kvxfer_last_error()).decode() == mine


def test_completion_fd_signals_a_notification(lib, pair):
    a, b = pair()
    _, _, _, peer, _ = setup_blocks(lib, a, b)
    fd = ffi.new("int*")
    check(lib, lib.kvxfer_engine_completion_fd(b, fd))
    check(lib, lib.kvxfer_engine_drain_completion_fd(b))
    assert select.select([fd[0]], [], [], 0)[0] == []
    check(lib, lib.kvxfer_notify(a, peer, b"ping", 4, 2000))
    assert select.select([fd[0]], [], [], 5)[0] == [fd[0]]
    check(lib, lib.kvxfer_engine_drain_completion_fd(b))
    assert select.select([fd[0]], [], [], 0)[0] == []
    assert wait_note(lib, b, b"ping", 1000) == ("a", b"ping")


def test_keyed_waits_from_many_threads(lib, pair):
    """Eight threads wait for eight keys on one engine; the notes arrive in reverse
    order; each thread gets its own, none is lost or taken twice."""
    a, b = pair()
    _, _, _, peer, _ = setup_blocks(lib, a, b)
    keys = [f"req-{i}".encode() for i in range(8)]
    got: dict[bytes, object] = {}

    def waiter(key: bytes) -> None:
        got[key] = wait_note(lib, b, key, 10000)

    threads = [threading.Thread(target=waiter, args=(k,)) for k in keys]
    for th in threads:
        th.start()
    time.sleep(0.05)
    for k in reversed(keys):
        check(lib, lib.kvxfer_notify(a, peer, k, len(k), 2000))
    for th in threads:
        th.join(15)
    assert got == {k: ("a", k) for k in keys}
    assert wait_note(lib, b, None, 0) is None
