"""`kvxfer doctor` on a host with an RDMA device (in CI: rxe0 on dummy0 in the soft-RoCE
VM, tests/rdma/run_in_vm.sh). The real command, as a user runs it: it must find rxe0, its
ACTIVE port with the 4096-byte RoCE MTU, the IPv4-mapped RoCE v2 GID, start an ibverbs
engine on the GID it predicts from sysfs, and exit 0; with CAP_IPC_LOCK dropped and a 1 MiB
memlock limit it must exit 1 naming memlock, with the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import rdma_helpers as h

import kvxfer

pytestmark = pytest.mark.rdma
h.require_rdma()

DOCTOR = [sys.executable, "-m", "kvxfer.cli", "doctor"]
# Children import the kvxfer this process imported, never the working directory's.
HOME = os.path.dirname(os.path.dirname(os.path.abspath(kvxfer.__file__)))
TIMEOUT = 300  # TCG: Python start-up alone takes seconds


def run(args, prefix=()):
    env = dict(os.environ, PYTHONPATH=HOME, PYTHONSAFEPATH="1")
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
