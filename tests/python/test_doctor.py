"""`kvxfer doctor`: the real command on this host (no RDMA device, no GPU here: those rows
must say skip/warn with a reason and the exit code must follow the rule), the JSON shape,
the exit-code rule under a real low memlock limit and a real busy port, bad arguments, no
torch/aiohttp, and the sysfs parser on a small tree (the only place with a fake: the VM
test tests/rdma/test_doctor_vm.py is the proof on a real rxe0)."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

import kvxfer
from kvxfer.doctor import checks_net, sysfs
from kvxfer.doctor.context import LEGACY_ENV, overlay_names, parse_size
from kvxfer.errors import InvalidArgumentError

DOCTOR = [sys.executable, "-m", "kvxfer.cli", "doctor"]
# Children import the kvxfer this process imported (the installed one in CI, the source
# tree with its built module here), never whatever the working directory holds.
HOME = os.path.dirname(os.path.dirname(os.path.abspath(kvxfer.__file__)))
CHILD_ENV = {"PYTHONPATH": HOME, "PYTHONSAFEPATH": "1"}
NAMES = [
    "backends",
    "config.env",
    "memlock",
    "rdma.devices",
    "rdma.ports",
    "rdma.gids",
    "rdma.ibverbs",
    "rdma.rxe",
    "cuda.driver",
    "cuda.gpu_registration",
    "shm.cross_process",
    "shm.memfd",
    "shm.socket",
    "shm.dev_shm",
    "net.listen",
]


def env_name(config_field: str) -> str:
    """The variable this build reads for a configuration field (pre-0.2 builds: the old name)."""
    overlay = overlay_names()
    return overlay[config_field] if overlay else LEGACY_ENV[config_field]


def run(args=(), env=None, prefix=()):
    full_env = dict(os.environ, **CHILD_ENV, **(env or {}))
    r = subprocess.run([*prefix, *DOCTOR, *args], capture_output=True, text=True, timeout=120, env=full_env)
    return r.returncode, r.stdout, r.stderr


def run_json(args=(), **kw):
    rc, out, err = run(["--json", *args], **kw)
    try:
        doc = json.loads(out)
    except json.JSONDecodeError:
        pytest.fail(f"not JSON (rc {rc}): {out!r} {err!r}")
    return rc, doc, {c["name"]: c for c in doc["checks"]}


def has_rdma_device() -> bool:
    return bool(sysfs.read_devices())


def has_cuda() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def here():
    return run_json()


def test_json_shape(here):
    rc, doc, _ = here
    for key in ("schema", "kvxfer", "host", "kernel", "need", "pool_bytes", "exit_code", "summary", "checks"):
        assert key in doc, key
    assert doc["schema"] == 1
    assert [c["name"] for c in doc["checks"]] == NAMES
    for c in doc["checks"]:
        assert set(c) == {"name", "status", "detail", "fix", "data"}, c
        assert c["status"] in ("ok", "warn", "fail", "skip"), c
        assert isinstance(c["detail"], str) and c["detail"], c
        assert isinstance(c["fix"], str) and isinstance(c["data"], dict), c
        if c["status"] == "fail":
            assert c["fix"], f"a failing check must say how to fix it: {c}"
    assert sum(doc["summary"].values()) == len(NAMES)
    assert doc["summary"] == {
        s: sum(c["status"] == s for c in doc["checks"]) for s in ("ok", "warn", "fail", "skip")
    }
    # The exit-code rule: 1 exactly when some check failed.
    assert doc["exit_code"] == rc == (1 if doc["summary"]["fail"] else 0)


def test_this_host(here):
    rc, doc, checks = here
    assert "shm" in doc["need"]
    failed = {n: c["detail"] for n, c in checks.items() if c["status"] == "fail"}
    assert rc == 0, f"this host has shm and tcp; nothing needed should fail: {failed}"
    assert checks["shm.cross_process"]["status"] == "ok", checks["shm.cross_process"]
    assert checks["shm.cross_process"]["data"]["cma"] is True
    assert checks["shm.socket"]["status"] == "ok"
    assert checks["backends"]["data"]["shm"]["available"] is True
    # net.listen started a real tcp engine: the port it reports was really bound.
    assert checks["net.listen"]["data"]["listened"].startswith("127.0.0.1:")  # loopback unless configured
    if not has_rdma_device():
        for name in ("rdma.devices", "rdma.ports", "rdma.gids", "rdma.ibverbs"):
            assert checks[name]["status"] == "skip", checks[name]
            assert "no RDMA device" in checks[name]["detail"] or "unavailable" in checks[name]["detail"]
        assert "rdma" not in doc["need"]
        rxe = checks["rdma.rxe"]
        assert rxe["status"] in ("ok", "skip") and rxe["detail"], rxe
        if rxe["status"] == "skip":
            assert "not in this kernel" in rxe["detail"] or "disabled" in rxe["detail"], rxe
            assert "softroce-vm" in rxe["fix"]
    if not has_cuda():
        assert checks["cuda.driver"]["status"] == "skip"
        assert "libcuda.so.1" in checks["cuda.driver"]["detail"]
        assert checks["cuda.gpu_registration"]["status"] == "skip"


def test_table_matches_json(here):
    rc_json, doc, _ = here
    rc, out, err = run()
    assert rc == rc_json, out + err
    for name in NAMES:
        assert name in out
    s = doc["summary"]
    assert f"{s['ok']} ok, {s['warn']} warn, {s['fail']} fail, {s['skip']} skip" in out
    assert f"exit {rc}" in out


def test_needing_what_is_absent_fails_with_fix():
    if has_rdma_device() or has_cuda():
        pytest.skip("this host has an RDMA device or CUDA: asking for them does not fail here")
    rc, doc, checks = run_json(["--need", "rdma", "--need", "cuda"])
    assert rc == 1 and doc["exit_code"] == 1
    assert set(doc["need"]) >= {"shm", "rdma", "cuda"}
    for name in ("backends", "rdma.devices", "rdma.ibverbs", "cuda.driver"):
        assert checks[name]["status"] == "fail", checks[name]
        assert checks[name]["fix"], checks[name]
    assert "rdma_rxe" in checks["rdma.devices"]["fix"] or "rxe" in checks["rdma.devices"]["fix"]
    assert "NVIDIA driver" in checks["cuda.driver"]["fix"]


def test_low_memlock_warns_unless_rdma_is_needed():
    prlimit, setpriv = shutil.which("prlimit"), shutil.which("setpriv")
    if not (prlimit and setpriv) or os.geteuid() != 0:
        pytest.skip("needs root with prlimit and setpriv (util-linux) to drop CAP_IPC_LOCK and lower memlock")
    if has_rdma_device():
        pytest.skip("with an RDMA device, rdma is needed by default: tests/rdma/test_doctor_vm.py covers it")
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
    rc, doc, checks = run_json(prefix=prefix)
    m = checks["memlock"]
    assert m["status"] == "warn", m  # not needed: no RDMA here
    assert m["data"]["soft_bytes"] == 1 << 20 and m["data"]["cap_ipc_lock"] is False
    assert rc == doc["exit_code"] == (1 if doc["summary"]["fail"] else 0)
    rc, doc, checks = run_json(["--need", "rdma", "--pool-bytes", "64MiB"], prefix=prefix)
    m = checks["memlock"]
    assert rc == 1 and m["status"] == "fail", m
    assert m["data"]["pool_bytes"] == 64 << 20 and m["data"]["required_bytes"] > 64 << 20
    assert "memlock" in m["fix"].lower() and "IPC_LOCK" in m["fix"]


def test_busy_tcp_port_and_malformed_bind():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        rc, _, checks = run_json(env={env_name("backend.tcp.listen"): f"127.0.0.1:{port}"})
    c = checks["net.listen"]
    assert rc == 1 and c["status"] == "fail", c
    assert str(port) in c["fix"] and "taken" in c["fix"], c
    rc, _, checks = run_json(env={env_name("backend.tcp.listen"): "bad:x"})
    assert rc == 1 and checks["net.listen"]["status"] == "fail"
    assert "malformed" in checks["net.listen"]["detail"]


def test_configuration_variables():
    if overlay_names() is None:
        pytest.skip("this kvxfer build has no configuration overlay (kvxfer < 0.2)")
    # A pre-0.2 name is ignored by kvxfer: a warning that names the new one, exit 0.
    rc, doc, checks = run_json(env={"KVXFER_IB_GID": "1"})
    c = checks["config.env"]
    assert c["status"] == "warn" and "KVXFER_IB_GID" in c["detail"], c
    assert env_name("backend.ibverbs.gid_index") in c["fix"], c
    assert rc == doc["exit_code"] == (1 if doc["summary"]["fail"] else 0)
    # An invalid value makes every engine creation fail: the doctor fails and says which.
    var = env_name("backend.ibverbs.gid_index")
    rc, _, checks = run_json(env={var: "not-a-number"})
    c = checks["config.env"]
    assert rc == 1 and c["status"] == "fail" and var in c["detail"] and c["fix"], c
    rc, _, checks = run_json(env={var: "1"})
    assert checks["config.env"]["status"] == "ok" and var in checks["config.env"]["detail"]


def test_bad_arguments_exit_2():
    rc, out, err = run(["--need", "gpu-magic"])
    assert rc == 2 and "gpu-magic" in err and out == ""
    rc, out, err = run(["--pool-bytes", "12 parsecs"])
    assert rc == 2 and "12 parsecs" in err


def test_runs_without_torch_and_aiohttp():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['aiohttp'] = None  # importing them now raises\n"
        "from kvxfer.cli import main\n"
        "rc = main(['doctor', '--json'])\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "sys.exit(rc)\n"
    )
    env = dict(os.environ, **CHILD_ENV)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode in (0, 1), r.stderr
    assert json.loads(r.stdout)["checks"], r.stdout


def test_parse_size_and_bind():
    assert parse_size("4GiB") == 4 << 30 and parse_size("512M") == 512 << 20 and parse_size("1000") == 1000
    for bad in ("", "x", "-1", "0", "5 furlongs"):
        with pytest.raises(InvalidArgumentError, match="size"):
            parse_size(bad)
    assert checks_net.parse_bind(":5600") == ("0.0.0.0", 5600)
    assert checks_net.parse_bind("localhost:") == ("127.0.0.1", 0)
    assert checks_net.parse_bind("10.1.2.3") == ("10.1.2.3", 0)
    assert checks_net.parse_bind("*:80") == ("0.0.0.0", 80)
    for bad in ("bad:x", "host.example:80", "1.2.3.4:70000", ":12a"):
        assert checks_net.parse_bind(bad) is None, bad


# ---- the sysfs parser, on a tree shaped like the kernel's (values from rxe0 in the VM) ----


def _write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def _rxe_tree(root, netdev_mtu=9000, with_ipv4=True):
    ib, net = os.path.join(root, "infiniband"), os.path.join(root, "net")
    _write(net, "dummy0/mtu", str(netdev_mtu))
    dev = "rxe0"
    _write(ib, f"{dev}/node_type", "1: CA")
    _write(ib, f"{dev}/parent", "dummy0")
    p = f"{dev}/ports/1"
    _write(ib, f"{p}/state", "4: ACTIVE")
    _write(ib, f"{p}/phys_state", "5: LinkUp")
    _write(ib, f"{p}/link_layer", "Ethernet")
    _write(ib, f"{p}/lid", "0x0")
    _write(ib, f"{p}/rate", "10 Gb/sec (1X QDR)")
    gids = ["fe80:0000:0000:0000:b8b5:10ff:fe6c:9e2b", "0000:0000:0000:0000:0000:ffff:c612:0001"]
    if not with_ipv4:
        gids[1] = "0000:0000:0000:0000:0000:0000:0000:0000"
    gids.append("0000:0000:0000:0000:0000:0000:0000:0000")
    for i, g in enumerate(gids):
        _write(ib, f"{p}/gids/{i}", g)
        if int(g.replace(":", ""), 16):
            _write(ib, f"{p}/gid_attrs/types/{i}", "RoCE v2")
            _write(ib, f"{p}/gid_attrs/ndevs/{i}", "dummy0")
    return ib, net


def test_sysfs_parser_rxe(tmp_path):
    ib, net = _rxe_tree(str(tmp_path))
    (dev,) = sysfs.read_devices(ib, net)
    assert dev.name == "rxe0" and dev.parent == "dummy0" and dev.soft
    (port,) = dev.ports
    assert (port.state, port.phys_state, port.link_layer, port.lid) == ("ACTIVE", "LinkUp", "Ethernet", 0)
    assert port.gid_table_len == 3 and [g.index for g in port.gids] == [0, 1]  # the zero GID is dropped
    assert port.netdev == "dummy0" and port.netdev_mtu == 9000 and port.active_mtu == 4096
    best = port.best_gid()
    assert best.index == 1 and best.text == "::ffff:198.18.0.1" and best.ipv4 == "198.18.0.1" and best.roce_v2


def test_sysfs_parser_fallbacks(tmp_path):
    ib, net = _rxe_tree(str(tmp_path), netdev_mtu=1500, with_ipv4=False)
    (port,) = sysfs.read_devices(ib, net)[0].ports
    assert port.active_mtu == 1024  # 1500 less the RoCE headers
    best = port.best_gid()
    assert best.index == 0 and best.address.is_link_local  # no IPv4-mapped GID: the link-local v2 one
    # An unreadable GID type (the kernel answers EINVAL for unused entries) is tolerated.
    os.remove(os.path.join(ib, "rxe0/ports/1/gid_attrs/types/0"))
    (port,) = sysfs.read_devices(ib, net)[0].ports
    assert port.gids[0].type is None and port.best_gid().index == 0


def test_sysfs_parser_infiniband_and_missing_root(tmp_path):
    ib = os.path.join(str(tmp_path), "infiniband")
    _write(ib, "mlx5_0/node_type", "1: CA")
    _write(ib, "mlx5_0/ports/1/state", "1: DOWN")
    _write(ib, "mlx5_0/ports/1/phys_state", "3: Disabled")
    _write(ib, "mlx5_0/ports/1/link_layer", "InfiniBand")
    _write(ib, "mlx5_0/ports/1/lid", "0x12")
    _write(ib, "mlx5_0/ports/1/gids/0", "fe80:0000:0000:0000:0002:c903:0049:5e71")
    (dev,) = sysfs.read_devices(ib, os.path.join(str(tmp_path), "net"))
    (port,) = dev.ports
    assert not dev.soft and port.state == "DOWN" and port.lid == 0x12 and not port.ethernet
    assert port.best_gid().index == 0 and port.active_mtu is None
    assert sysfs.read_devices(os.path.join(str(tmp_path), "absent")) == []


def test_cross_process_probe_through_symlinked_path(tmp_path):
    """PATH entries that are symlinks (as in scripts/wheel.sh's compiler-free PATH) must not
    break the probe: /proc/PID/exe names the resolved binary."""
    real = shutil.which("sleep")
    if real is None:
        pytest.skip("no sleep binary on PATH")
    (tmp_path / "sleep").symlink_to(real)
    rc, _, checks = run_json(env={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    c = checks["shm.cross_process"]
    assert c["status"] == "ok" and c["data"]["cma"] is True and c["data"]["pidfd_getfd"] is True, c
