"""Smoke test of an installed kvxfer wheel (run by scripts/wheel.sh in a fresh virtualenv
with no compiler on PATH, from a directory outside the source tree).

Checks, each with a deadline: kvxfer imports from the virtualenv (not a source tree); no
compiler is reachable; list_backends(); a loopback WRITE + READ between two engines of
this process; a shm WRITE + READ between this process and a second one (a kvxfer.empty
region, reached through its memfd, and a plain numpy region, reached by cross-memory
attach), byte for byte, notifications after data; `kvxfer doctor --json` through the
installed console script; the extras the package declares.

Usage: python smoke.py            (the initiator; starts the target itself)
       python smoke.py --target   (internal)
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import selectors
import shutil
import subprocess
import sys
import time

import numpy as np

import kvxfer

DEADLINE_S = 60.0
LAYOUT = {"num_layers": 4, "num_kv": 2, "num_blocks": 64, "block_bytes": 4096}
EXTRAS = {"serve", "plot", "gpu", "vllm"}


def layout() -> kvxfer.KvLayout:
    return kvxfer.KvLayout(**LAYOUT)


def pool_bytes(lay: kvxfer.KvLayout) -> int:
    return lay.piece_offset(lay.num_layers - 1, lay.num_kv - 1, lay.num_blocks - 1) + lay.block_bytes


def stream(pool: np.ndarray, lay: kvxfer.KvLayout, ids) -> bytes:
    """The bytes of blocks `ids` in transfer order (layer, K/V, list position)."""
    bb = lay.block_bytes
    return b"".join(
        pool[lay.piece_offset(layer, kv, int(i)) : lay.piece_offset(layer, kv, int(i)) + bb].tobytes()
        for layer in range(lay.num_layers)
        for kv in range(lay.num_kv)
        for i in ids
    )


def say(msg: str) -> None:
    print(f"smoke: {msg}", file=sys.stderr, flush=True)


# ---- target process -------------------------------------------------------------------


def target() -> int:
    lay = layout()
    n = pool_bytes(lay)
    with kvxfer.Engine("smoke-target", backends=["shm"], timeout=DEADLINE_S) as eng:
        shared = kvxfer.empty(n)  # memfd: the initiator maps it (pidfd_getfd)
        plain = np.zeros(n, np.uint8)  # plain memory: reached by process_vm_writev
        r_shared, r_plain = eng.register(shared, lay), eng.register(plain, lay)
        hello = {"descriptor": eng.descriptor().hex(), "regions": [r_shared.id, r_plain.id]}
        print(json.dumps(hello), flush=True)
        ids = json.loads(sys.stdin.readline())["ids"]
        notes = eng.wait_for_notifications(2, timeout=DEADLINE_S)
        digests = [hashlib.sha256(stream(p, lay, ids)).hexdigest() for p in (shared, plain)]
        notes = sorted(x.payload.decode() for x in notes)
        print(json.dumps({"notes": notes, "digests": digests}), flush=True)
        sys.stdin.readline()  # stay alive (and registered) until the initiator is done
    return 0


# ---- initiator ------------------------------------------------------------------------


def read_line(proc: subprocess.Popen, deadline: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the target process did not answer in time")
    finally:
        sel.close()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the target process exited (status {proc.wait(5)})")
    return line


def check_installed() -> None:
    where = os.path.realpath(kvxfer.__file__)
    assert where.startswith(os.path.realpath(sys.prefix)), f"kvxfer imported from {where}, not {sys.prefix}"
    native = os.path.realpath(kvxfer._native.__file__)
    assert native.startswith(os.path.realpath(sys.prefix)), native
    for cc in ("gcc", "cc", "g++", "c++", "clang", "clang++"):
        assert shutil.which(cc) is None, f"a compiler is on PATH: {shutil.which(cc)}"
    say(f"kvxfer {kvxfer.__version__} from {where}; no compiler on PATH (CC={os.environ.get('CC')})")


def check_backends() -> None:
    info = {b.name: b for b in kvxfer.list_backends()}
    assert {"loopback", "shm", "tcp", "ibverbs"} <= set(info), info
    assert info["loopback"].available and info["shm"].available, info
    if not info["ibverbs"].available:
        assert info["ibverbs"].reason, "an unavailable backend must say why"
    # libibverbs is not in the wheel: the module dlopens the host's. Where the host has it,
    # the backend must have loaded it (any reason but "cannot be loaded").
    try:
        ctypes.CDLL("libibverbs.so.1")
        host_has_verbs = True
    except OSError:
        host_has_verbs = False
    if host_has_verbs:
        assert "cannot be loaded" not in info["ibverbs"].reason, info["ibverbs"].reason
    say("backends: " + ", ".join(f"{n}={'yes' if b.available else 'no'}" for n, b in info.items()))
    say(f"ibverbs: {info['ibverbs'].reason or 'available'} (host libibverbs.so.1: {host_has_verbs})")


def check_loopback() -> None:
    lay = layout()
    n = pool_bytes(lay)
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, n, dtype=np.uint8)
    dst = np.zeros(n, np.uint8)
    back = np.zeros(n, np.uint8)
    with (
        kvxfer.Engine("smoke-a", backends=["loopback"], timeout=DEADLINE_S) as a,
        kvxfer.Engine("smoke-b", backends=["loopback"], timeout=DEADLINE_S) as b,
    ):
        ra, rb = a.register(src, lay), b.register(dst, lay)
        rback = a.register(back, lay)
        peer = a.add_peer(b.descriptor())
        lids, rids = rng.choice(64, 20, replace=False), rng.choice(64, 20, replace=False)
        a.post(kvxfer.Op.WRITE, peer, ra, rb.id, local_blocks=lids, remote_blocks=rids, notify=b"lb").wait(
            DEADLINE_S
        )
        (note,) = b.wait_for_notifications(1, timeout=DEADLINE_S)
        assert note.payload == b"lb" and note.peer == "smoke-a", note
        assert stream(dst, lay, rids) == stream(src, lay, lids), "loopback WRITE bytes differ"
        a.post(kvxfer.Op.READ, peer, rback, rb.id, local_blocks=lids, remote_blocks=rids).wait(DEADLINE_S)
        assert stream(back, lay, lids) == stream(src, lay, lids), "loopback READ bytes differ"
    say("loopback: 20 random blocks x 4 layers x K/V written and read back, byte for byte")


def check_shm() -> None:
    lay = layout()
    n = pool_bytes(lay)
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, n, dtype=np.uint8)
    back = np.zeros(n, np.uint8)
    deadline = time.monotonic() + DEADLINE_S
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--target"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        hello = json.loads(read_line(proc, deadline))
        r_shared, r_plain = hello["regions"]
        with kvxfer.Engine(
            "smoke-init", backends=["shm"], timeout=DEADLINE_S, connect_timeout=DEADLINE_S
        ) as eng:
            ra, rback = eng.register(src, lay), eng.register(back, lay)
            peer = eng.add_peer(bytes.fromhex(hello["descriptor"]))
            lids, rids = rng.choice(64, 24, replace=False), rng.choice(64, 24, replace=False)
            ts = [
                eng.post(kvxfer.Op.WRITE, peer, ra, r, local_blocks=lids, remote_blocks=rids, notify=note)
                for r, note in ((r_shared, b"memfd"), (r_plain, b"cma"))
            ]
            eng.wait_all(ts, DEADLINE_S)
            proc.stdin.write(json.dumps({"ids": [int(i) for i in rids]}) + "\n")
            proc.stdin.flush()
            got = json.loads(read_line(proc, deadline))
            want = hashlib.sha256(stream(src, lay, lids)).hexdigest()
            assert got["notes"] == ["cma", "memfd"], got
            assert got["digests"] == [want, want], f"shm WRITE bytes differ in the target: {got} vs {want}"
            for r in (r_shared, r_plain):
                back[:] = 0
                t = eng.post(kvxfer.Op.READ, peer, rback, r, local_blocks=lids, remote_blocks=rids)
                t.wait(DEADLINE_S)
                assert stream(back, lay, lids) == stream(src, lay, lids), f"shm READ from region {r} differs"
        proc.stdin.write("bye\n")
        proc.stdin.flush()
        assert proc.wait(max(1.0, deadline - time.monotonic())) == 0, "the target process failed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    say(
        "shm: 24 random blocks into a memfd region and a plain region of another process, read back; "
        "notifications after data"
    )


def check_doctor() -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "kvxfer")
    assert os.access(exe, os.X_OK), f"console script {exe} missing"
    r = subprocess.run([exe, "doctor", "--json"], capture_output=True, text=True, timeout=DEADLINE_S * 2)
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == r.returncode, (doc["exit_code"], r.returncode)
    failed = {c["name"]: c["detail"] + " | fix: " + c["fix"] for c in doc["checks"] if c["status"] == "fail"}
    assert r.returncode == 0, f"kvxfer doctor failed: {failed}"
    assert doc["native"].startswith(os.path.realpath(sys.prefix)) or doc["native"].startswith(sys.prefix)
    say(f"kvxfer doctor --json: exit 0, summary {doc['summary']}")


def check_extras() -> None:
    from importlib.metadata import metadata

    declared = set(metadata("kvxfer").get_all("Provides-Extra") or [])
    missing = EXTRAS - declared
    assert not missing, f"the wheel lacks the extras {sorted(missing)} (declares {sorted(declared)})"
    say(f"extras declared: {', '.join(sorted(declared))}")


def main() -> int:
    if sys.argv[1:] == ["--target"]:
        return target()
    t0 = time.monotonic()
    for step in (check_installed, check_backends, check_loopback, check_shm, check_doctor, check_extras):
        step()
    say(f"all checks passed in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
