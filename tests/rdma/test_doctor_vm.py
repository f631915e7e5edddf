"""`kvxfer doctor` on a host with an RDMA device (in CI: rxe0 on dummy0 in the soft-RoCE
VM, tests/rdma/run_in_vm.sh). The real command, as a user runs it: it must find rxe0, its
ACTIVE port with the 4096-byte RoCE MTU, the IPv4-mapped RoCE v2 GID, start an ibverbs
engine on the GID it predicts from sysfs, and exit 0; with CAP_IPC_LOCK dropped and a 1 MiB
memlock limit it must exit 1 naming memlock, with the fix; with dummy0's IPv4 address removed
it warns and predicts the GID the engine falls back to; with dummy0 down and a wrong
KVXFER_IB_DEVICE it fails with both fixes. Each fault is undone, and the undo checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import rdma_helpers as h

import kvxfer
from kvxfer.doctor.context import LEGACY_ENV, overlay_names

pytestmark = pytest.mark.rdma
h.require_rdma()

DOCTOR = [sys.executable, "-m", "kvxfer.cli", "doctor"]
# Children import the kvxfer this process imported, never the working directory's.
HOME = os.path.dirname(os.path.dirname(os.path.abspath(kvxfer.__file__)))
TIMEOUT = 300  # TCG: Python start-up alone takes seconds


def run(args, prefix=(), env=None):
    env = dict(os.environ, PYTHONPATH=HOME, PYTHONSAFEPATH="1", **(env or {}))
    r = subprocess.run([*prefix, *DOCTOR, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    return r.returncode, r.stdout, r.stderr


def checks_of(stdout: str) -> tuple[dict, dict]:
    doc = json.loads(stdout)
    return doc, {c["name"]: c for c in doc["checks"]}


@pytest.fixture(scope="module")
def report():
    rc, out, err = run(["--json"])
    doc, checks = checks_of(out)
    return rc, doc, checks, err


def test_exits_zero_and_needs_rdma(report):
    rc, doc, checks, err = report
    failed = {n: (c["detail"], c["fix"]) for n, c in checks.items() if c["status"] == "fail"}
    assert rc == 0, f"doctor failed here: {failed}\n{err}"
    assert doc["exit_code"] == 0
    # ibverbs is available, so a default Engine starts it: rdma is needed without --need.
    assert "rdma" in doc["need"]


def test_finds_rxe0(report):
    _, _, checks, _ = report
    c = checks["rdma.devices"]
    assert c["status"] == "ok", c
    rxe = {d["name"]: d for d in c["data"]["devices"]}
    assert "rxe0" in rxe, c["detail"]
    assert c["data"]["uverbs"], "no /dev/infiniband/uverbs* in the VM"
    assert checks["rdma.rxe"]["status"] == "ok" and "rxe0" in checks["rdma.rxe"]["detail"]
    assert checks["backends"]["data"]["ibverbs"]["available"] is True


def test_port_state_and_mtu(report):
    _, _, checks, _ = report
    c = checks["rdma.ports"]
    assert c["status"] == "ok", c
    port = {p["port"]: p for p in c["data"]["ports"]}["rxe0/1"]
    assert port["state"] == "ACTIVE"
    # dummy0 has MTU 9000 (softroce-vm), so the RoCE MTU is 4096, read from the device itself.
    assert port["active_mtu"] == 4096 and port["mtu_source"] == "ibv_query_port", port


def test_gid_choice_matches_the_engine(report):
    _, _, checks, _ = report
    g = checks["rdma.gids"]
    assert g["status"] == "ok", g
    port = {p["port"]: p for p in g["data"]["ports"]}["rxe0/1"]
    assert port["ipv4_mapped_v2"], "no IPv4-mapped RoCE v2 GID on rxe0"
    assert port["best_gid"] == "::ffff:198.18.0.1", port
    # The GID the doctor predicts from sysfs is the one the native backend chose.
    e = checks["rdma.ibverbs"]
    assert e["status"] == "ok", e
    described = e["data"]["describe"]
    assert f"GID[{port['best_gid_index']}] {port['best_gid']}" in described, described
    assert "rxe0" in described and "MTU 4096" in described, described


def test_memlock_ok_in_vm(report):
    _, _, checks, _ = report
    assert checks["memlock"]["status"] == "ok", checks["memlock"]


def test_low_memlock_without_cap_ipc_lock_fails_with_fix():
    prlimit, setpriv = shutil.which("prlimit"), shutil.which("setpriv")
    if not (prlimit and setpriv) or os.geteuid() != 0:
        pytest.skip("needs root with prlimit and setpriv (util-linux) to drop CAP_IPC_LOCK and lower memlock")
    prefix = [
        prlimit,
        "--memlock=1048576:1048576",
        setpriv,
        "--bounding-set",
        "-ipc_lock",
        "--inh-caps",
        "-ipc_lock",
        "--",
    ]
    rc, out, err = run(["--json"], prefix)
    doc, checks = checks_of(out)
    assert rc == 1 and doc["exit_code"] == 1, out + err
    m = checks["memlock"]
    assert m["status"] == "fail", m
    assert m["data"]["soft_bytes"] == 1 << 20 and m["data"]["cap_ipc_lock"] is False
    assert "memlock" in m["fix"].lower()
    # The real engine on rxe0 cannot register its own buffers under 1 MiB either.
    assert checks["rdma.ibverbs"]["status"] == "fail", checks["rdma.ibverbs"]


# ---- real faults on the VM's rxe0, each undone (and the undo checked) before the next test ----

PORT = "/sys/class/infiniband/rxe0/ports/1"
ADDRESS = "198.18.0.1/24"  # what tools/softroce/softroce-vm gives dummy0


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _mapped_gid_index() -> int | None:
    for name in sorted(os.listdir(f"{PORT}/gids"), key=int):
        if _read(f"{PORT}/gids/{name}") == "0000:0000:0000:0000:0000:ffff:c612:0001":
            return int(name)
    return None


def _wait(pred, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=60)


def _restored() -> None:
    """rxe0 as the VM made it: dummy0 up with its address, port ACTIVE, GID 1 = ::ffff:198.18.0.1."""
    _ip("link", "set", "dev", "dummy0", "up")
    if _mapped_gid_index() is None:
        r = subprocess.run(["ip", "addr", "add", ADDRESS, "dev", "dummy0"], capture_output=True, timeout=60)
        assert r.returncode == 0 or b"exists" in r.stderr, r.stderr
    _wait(
        lambda: _read(f"{PORT}/state").endswith("ACTIVE") and _mapped_gid_index() == 1,
        "rxe0 port 1 ACTIVE with GID 1 = ::ffff:198.18.0.1 again",
    )


@pytest.fixture
def fault():
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's ip to change dummy0")
    assert _mapped_gid_index() == 1, "rxe0 is not in the state the VM set up"
    yield
    _restored()


def test_missing_ipv4_gid_warns_and_prediction_matches_fallback(fault):
    _ip("addr", "del", ADDRESS, "dev", "dummy0")
    _wait(lambda: _mapped_gid_index() is None, "the IPv4-mapped GID to leave rxe0's table")
    rc, out, err = run(["--json"])
    doc, checks = checks_of(out)
    g = checks["rdma.gids"]
    assert g["status"] == "warn", g
    assert "ip addr add" in g["fix"] and "dummy0" in g["fix"], g
    port = {p["port"]: p for p in g["data"]["ports"]}["rxe0/1"]
    assert port["ipv4_mapped_v2"] == [] and port["best_gid"].startswith("fe80:"), port
    # The engine falls back to the same GID the doctor predicts; a warning alone exits 0.
    e = checks["rdma.ibverbs"]
    assert e["status"] == "ok", e
    assert f"GID[{port['best_gid_index']}] {port['best_gid']}" in e["data"]["describe"], e
    assert rc == 0 == doc["exit_code"], out + err


def test_link_down_and_wrong_device_fail_when_rdma_is_needed(fault):
    _ip("link", "set", "dev", "dummy0", "down")
    _wait(lambda: not _read(f"{PORT}/state").endswith("ACTIVE"), "rxe0 port 1 to leave ACTIVE")
    overlay = overlay_names()
    var = overlay["backend.ibverbs.device"] if overlay else LEGACY_ENV["backend.ibverbs.device"]
    rc, out, err = run(["--json", "--need", "rdma"], env={var: "mlx5_9"})
    doc, checks = checks_of(out)
    assert rc == 1 == doc["exit_code"], out + err
    d = checks["rdma.devices"]
    assert d["status"] == "fail" and "mlx5_9" in d["detail"] and "rxe0" in d["fix"], d
    p = checks["rdma.ports"]
    assert p["status"] == "fail" and "no ACTIVE port" in p["detail"], p
    assert "ip link set dummy0 up" in p["fix"], p
    assert checks["rdma.ibverbs"]["status"] == "fail" and checks["rdma.ibverbs"]["fix"]
