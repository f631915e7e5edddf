"""A deployment over two network namespaces (two "hosts": this one and a namespace joined by
a veth pair), assembled by the registry: prefills and gateway here, decodes in the other
namespace, KV moved by kvxfer's tcp backend between them; the registry is the SQLite file
(both namespaces share the file system) or an etcd server on this side's veth address. It
serves, and recovers after a decode is killed (the replacement starts in the other namespace
too)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from registry_backends import need_etcd
from test_control_e2e import complete, wait_replaced

from kvxfer.serve.deployment import start_local

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns) to build a second network namespace")
    tag = f"kx{os.getpid() % 100000}"
    ns, here, there = f"{tag}ns", f"{tag}a", f"{tag}b"
    net = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", ns)
        _ip("addr", "add", f"{net}.1/24", "dev", here)
        _ip("link", "set", here, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{net}.2/24", "dev", there)
        _ip("netns", "exec", ns, "ip", "link", "set", there, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except subprocess.CalledProcessError as e:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot build a network namespace here: {e.stderr.decode(errors='replace')[:200]}")
    yield ns, f"{net}.1", f"{net}.2"
    subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=30)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.mark.parametrize("kind", ["sqlite", "etcd"])
def test_registry_assembles_a_group_across_two_namespaces_and_recovers_a_decode(kind, two_hosts, tmp_path):
    if kind == "etcd":
        need_etcd()  # its own server, listening on this namespace's veth address
    ns, addr_here, addr_there = two_hosts
    with start_local(2, 2, backend="tcp", registry=kind, host=addr_here, b_p=2, b_d=4, lease_ttl_s=2.0,
                     role_netns={"decode": (ns, addr_there)}, log_dir=tmp_path / "logs") as dep:  # fmt: skip
        ctl = dep.controllers["g0"]
        decodes = sorted(n for n, r in ctl.members.items() if r == "decode")
        assert all(dep.procs[d].url.startswith(f"http://{addr_there}:") for d in decodes)
        prefills = sorted(n for n, r in ctl.members.items() if r == "prefill")
        assert all(dep.procs[p].url.startswith(f"http://{addr_here}:") for p in prefills)
        for _ in range(3):
            assert complete(dep.gateway_url)["choices"][0]["text"]
        moved = sum(dep.status(d)["kvxfer"]["transfers_done"] for d in decodes)
        assert moved >= 3  # the KV crossed the veth pair through kvxfer's tcp backend
        dep.kill(decodes[0])
        t0 = time.monotonic()
        rm = wait_replaced(ctl, 1)
        assert rm.name == decodes[0] and dep.procs[rm.replacement].url.startswith(f"http://{addr_there}:")
        assert time.monotonic() - t0 < 60
        for _ in range(3):
            assert complete(dep.gateway_url)["choices"][0]["text"]
