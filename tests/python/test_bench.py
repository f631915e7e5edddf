"""kvxfer-bench, run for real on small sizes: JSON against bench/schema.json, the table,
--plot, detection of corrupted data, and the two-host mode (over 127.0.0.1, and between
two network namespaces joined by a veth pair)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
SCHEMA = json.loads((BENCH / "schema.json").read_text())

# A kvxfer on PYTHONPATH (e.g. an ibverbs build) wins; else the source tree's.
try:
    import kvxfer
except ImportError:
    sys.path.insert(0, str(ROOT))
    import kvxfer
try:
    from kvxfer_bench import models, units, verify, workloads
except ImportError:
    sys.path.insert(0, str(BENCH))
    from kvxfer_bench import models, units, verify, workloads

AVAILABLE = {b.name for b in kvxfer.list_backends() if b.available}
# A small paged shape (llama3-8b geometry, 64-block pool) plus two contiguous sizes.
SMALL = [
    "--model",
    "llama3-8b",
    "--pool-blocks",
    "64",
    "--blocks",
    "16",
    "--sizes",
    "64K,4M",
    "--repeat",
    "2",
    "--iters",
    "3",
]


def _env() -> dict:
    """The child runs exactly the kvxfer and kvxfer_bench this process imported (the
    installed ones in CI, the source tree's in a development checkout), never whatever the
    working directory would put first on sys.path."""
    import kvxfer_bench

    env = dict(os.environ)
    homes = {str(Path(m.__file__).resolve().parents[1]) for m in (kvxfer, kvxfer_bench)}
    env["PYTHONPATH"] = os.pathsep.join(
        sorted(homes) + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["PYTHONSAFEPATH"] = "1"
    env.pop("KVXFER_BENCH_TRACE", None)
    return env


def run_bench(
    *args: str, timeout: float = 240, prefix: list[str] | None = None
) -> subprocess.CompletedProcess:
    cmd = (prefix or []) + [sys.executable, "-m", "kvxfer_bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=str(ROOT))


def json_lines(stdout: str) -> list[dict]:
    import jsonschema

    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert lines, "no JSON output"
    recs = []
    for ln in lines:
        rec = json.loads(ln)
        jsonschema.validate(rec, SCHEMA)
        recs.append(rec)
    return recs


def assert_table(text: str) -> None:
    assert re.search(r"^workload\s+op\s+coal\s+bytes\s+pieces\s+runs\s+GB/s", text, re.M), text
    assert "kvxfer-bench" in text and "machine:" in text


# --- unit tests of the pieces the CLI is made of ----------------------------------------


def test_models_block_bytes():
    # 8 KV heads x 128 head dim x 2 bytes x 16 tokens
    assert models.get("llama3-8b").block_bytes() == 32768
    assert models.get("llama3-70b").layers == 80
    assert models.get("qwen2.5-7b").block_bytes() == 4 * 128 * 2 * 16
    with pytest.raises(ValueError):
        models.get("no-such-model")


def test_units():
    assert units.parse_size("4K") == 4096 and units.parse_size("1GiB") == 1 << 30
    assert units.parse_sizes("4K..1G") == [4096 * 4**i for i in range(10)]
    assert units.parse_sizes("4K..64K*2") == [4096, 8192, 16384, 32768, 65536]
    assert units.parse_counts("16..128") == [16, 32, 64, 128]
    assert units.parse_counts("1_000_000") == [1_000_000]
    with pytest.raises(ValueError):
        units.parse_size("4Q")
    # Sweeps that would never end or are empty are refused, for sizes and counts alike.
    for bad in ("16..1024*1", "0..8", "64..16", "-4"):
        with pytest.raises(ValueError):
            units.parse_counts(bad)
    with pytest.raises(ValueError):
        units.parse_sizes("4K..1M*1")


def test_patterns():
    rng = np.random.default_rng(0)
    ids = workloads.pick_blocks(rng, "runs:8", 1024, 64)
    assert len(set(ids.tolist())) == 64
    assert all(ids[i + 1] == ids[i] + 1 for i in range(0, 64, 8) for _ in [0] if i % 8 != 7)
    assert ((ids.reshape(-1, 8) - ids.reshape(-1, 8)[:, :1]) == np.arange(8)).all()
    r = workloads.pick_blocks(rng, "random", 1024, 512)
    assert len(set(r.tolist())) == 512 and r.max() < 1024
    with pytest.raises(ValueError):
        workloads.pick_blocks(rng, "random", 10, 11)


def _layout(layers=4, kv=2, blocks=64, bb=4096):
    return {
        "num_layers": layers,
        "num_kv": kv,
        "num_blocks": blocks,
        "block_bytes": bb,
        "block_stride": bb,
        "kv_stride": blocks * bb,
        "layer_stride": kv * blocks * bb,
        "offset": 0,
    }


@pytest.mark.parametrize("bb", [256, 4096, 32768, 100000])
def test_verify_detects_corruption_and_misplacement(bb):
    lay = _layout(bb=bb)
    nbytes = 4 * 2 * 64 * bb
    rng = np.random.default_rng(1)
    src_ids, dst_ids = rng.choice(64, 20, replace=False), rng.choice(64, 20, replace=False)
    sp, dp = verify.block_pieces(lay, src_ids), verify.block_pieces(lay, dst_ids)
    src, dst = np.empty(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    verify.fill_pieces(src, sp, seed=7, stamp_stride=verify.stamp_stride_for(bb))
    expect = verify.checksums(src, sp)

    def copy(order):
        for i, j in enumerate(order):
            s, d, n = int(sp.offsets[j]), int(dp.offsets[i]), int(sp.lengths[j])
            dst[d : d + n] = src[s : s + n]

    copy(range(sp.count))
    verify.compare(expect, verify.checksums(dst, dp), dp, "exact copy")  # no error
    # one flipped byte
    verify.corrupt(dst, dp)
    with pytest.raises(verify.VerifyError, match="differ"):
        verify.compare(expect, verify.checksums(dst, dp), dp, "flipped byte")
    # two pieces swapped (right bytes, wrong place)
    order = list(range(sp.count))
    order[3], order[4] = order[4], order[3]
    copy(order)
    with pytest.raises(verify.VerifyError):
        verify.compare(expect, verify.checksums(dst, dp), dp, "swapped pieces")
    # nothing moved (poisoned destination)
    verify.poison(dst, dp, 0xA5)
    with pytest.raises(verify.VerifyError):
        verify.compare(expect, verify.checksums(dst, dp), dp, "poisoned")


def test_fill_paths_agree():
    lay = _layout(bb=4096)
    ids = np.random.default_rng(2).choice(64, 30, replace=False)
    p = verify.block_pieces(lay, ids)
    a, b = np.zeros(4 * 2 * 64 * 4096, np.uint8), np.zeros(4 * 2 * 64 * 4096, np.uint8)
    verify.fill_pieces(a, p, 3)
    verify.fill_pieces(b, verify.Pieces(p.offsets, p.lengths, 0), 3)  # the generic path
    assert np.array_equal(a, b)
    assert np.array_equal(
        verify.checksums(a, p), verify.checksums(b, verify.Pieces(p.offsets, p.lengths, 4096))
    )


def test_merge_runs_matches_engine_plan():
    """The baseline's coalescing gives the same run count as the engine's planner."""
    lay = _layout(layers=2, kv=2, blocks=256, bb=4096)
    rng = np.random.default_rng(3)
    lid = workloads.pick_blocks(rng, "runs:8", 256, 64)
    rid = workloads.pick_blocks(rng, "runs:8", 256, 64)
    so, do, ln = verify.merge_runs(verify.block_pieces(lay, lid), verify.block_pieces(lay, rid))
    a = kvxfer.Engine("tb-a", backends=["loopback"])
    b = kvxfer.Engine("tb-b", backends=["loopback"])
    try:
        kl = kvxfer.KvLayout(num_layers=2, num_kv=2, num_blocks=256, block_bytes=4096)
        ra = a.register(np.zeros(2 * 2 * 256 * 4096, np.uint8), layout=kl)
        rb = b.register(np.zeros(2 * 2 * 256 * 4096, np.uint8), layout=kl)
        peer = a.add_peer(b.descriptor())
        plan = a.plan(kvxfer.Op.WRITE, peer, ra, rb.id, local_blocks=lid, remote_blocks=rid)
        assert plan["bytes"] == int(ln.sum())
        assert plan["runs"] == len(ln)
    finally:
        a.close()
        b.close()


def test_default_workload_is_the_issue_s():
    """No arguments: llama3-8b paged (32 layers, K and V, 32 KiB blocks), 512 random of
    2048 blocks = 1 GiB, coalesced and block-by-block, plus 1 GiB contiguous."""
    from kvxfer_bench import cli

    a = cli.build_parser().parse_args([])
    cases = cli._cases_from_args(a)
    assert [(c.kind, c.coalesce, c.op) for c in cases] == [
        ("paged", True, "write"),
        ("paged", False, "write"),
        ("contiguous", True, "write"),
    ]
    paged = cases[0]
    lay = paged.selection.geometry.layout
    assert lay == {"num_layers": 32, "num_kv": 2, "num_blocks": 2048, "block_bytes": 32768}
    assert len(paged.selection.local_ids) == 512 and len(set(paged.selection.remote_ids.tolist())) == 512
    assert paged.selection.pieces("local").nbytes == 1 << 30
    assert cases[2].selection.pieces("local").nbytes == 1 << 30
    assert a.backend == "shm" and a.repeat == 3


# --- the CLI for real --------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.skipif("shm" not in AVAILABLE, reason="shm backend unavailable")
def test_cli_shm_json_and_table():
    r = run_bench(*SMALL, "--op", "both", "--json")
    assert r.returncode == 0, r.stderr
    recs = json_lines(r.stdout)
    assert_table(r.stderr)  # with --json the table goes to stderr
    # paged: 2 ops x coalesce on/off; contiguous: 2 sizes x 2 ops
    assert len(recs) == 8
    assert {(x["op"], x["coalesce"]) for x in recs if x["kind"] == "paged"} == {
        ("write", True),
        ("write", False),
        ("read", True),
        ("read", False),
    }
    for x in recs:
        assert x["backend"] == "shm" and x["mode"] == "spawned"
        assert x["verified"] and x["baseline"].startswith("memcpy") and x["ratio"] > 0
        assert ("paged" in x["workload"]) or ("contiguous" in x["workload"])
    paged = next(x for x in recs if x["kind"] == "paged")
    assert paged["bytes"] == 16 * 32 * 2 * 32768 and paged["pieces"] == 16 * 32 * 2


@pytest.mark.multiprocess
def test_cli_loopback_table_per_layer_and_plot(tmp_path):
    png = tmp_path / "bw.png"
    r = run_bench(
        "--backend",
        "loopback",
        "--model",
        "qwen2.5-7b",
        "--pool-blocks",
        "64",
        "--blocks",
        "8,32",
        "--pattern",
        "random,runs:4",
        "--per-layer",
        "--sizes",
        "4K..1M",
        "--repeat",
        "1",
        "--iters",
        "2",
        "--plot",
        str(png),
    )
    assert r.returncode == 0, r.stderr
    assert_table(r.stdout)
    assert "paged:qwen2.5-7b:runs:4:per-layer" in r.stdout
    assert "contiguous" in r.stdout
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.multiprocess
@pytest.mark.parametrize("op", ["write", "read"])
def test_cli_detects_corruption(op):
    backend = "shm" if "shm" in AVAILABLE else "loopback"
    r = run_bench(
        "--backend",
        backend,
        "--model",
        "none",
        "--block-bytes",
        "4K",
        "--pool-blocks",
        "256",
        "--blocks",
        "64",
        "--repeat",
        "1",
        "--iters",
        "2",
        "--op",
        op,
        "--corrupt-for-test",
        "--json",
    )
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "VERIFICATION FAILED" in r.stderr
    assert r.stdout.strip() == ""  # no result line for a failed case


@pytest.mark.multiprocess
def test_cli_shared_baseline_buffer_and_replot(tmp_path):
    r = run_bench(
        "--backend",
        "loopback",
        "--model",
        "none",
        "--block-bytes",
        "4K",
        "--pool-blocks",
        "256",
        "--blocks",
        "64",
        "--pattern",
        "runs:8",
        "--sizes",
        "256K",
        "--baseline-buffer",
        "shared",
        "--repeat",
        "2",
        "--iters",
        "3",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    recs = json_lines(r.stdout)
    assert len(recs) == 3 and all(x["verified"] and x["ratio"] for x in recs)
    runs = tmp_path / "runs.jsonl"
    runs.write_text(r.stdout + r.stdout)  # two "invocations"
    png = tmp_path / "replot.png"
    r = run_bench("--replot", str(runs), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 10_000


@pytest.mark.multiprocess
def test_cli_no_verify_and_usage_errors():
    r = run_bench(
        "--backend", "loopback", "--sizes", "64K", "--repeat", "1", "--iters", "2", "--no-verify", "--json"
    )
    assert r.returncode == 0, r.stderr
    (rec,) = json_lines(r.stdout)
    assert rec["verified"] is False and rec["verify_mode"] == "off"
    r = run_bench("--model", "no-such-model")
    assert r.returncode == 2 and "unknown model" in r.stderr
    r = run_bench("--backend", "no-such-backend", "--sizes", "4K")
    assert r.returncode == 1 and "no-such-backend" in r.stderr


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", sorted(AVAILABLE - {"ibverbs"}))
def test_cli_every_backend(backend):
    """Every backend this build can start, moving a small paged shape both ways."""
    r = run_bench(
        "--backend",
        backend,
        "--model",
        "none",
        "--block-bytes",
        "4K",
        "--pool-blocks",
        "512",
        "--blocks",
        "128",
        "--sizes",
        "1M",
        "--op",
        "both",
        "--repeat",
        "1",
        "--iters",
        "3",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    recs = json_lines(r.stdout)
    assert len(recs) == 6 and all(x["backend"] == backend and x["verified"] for x in recs)


@pytest.mark.rdma
@pytest.mark.skipif("ibverbs" not in AVAILABLE, reason="ibverbs backend unavailable in this build or machine")
def test_cli_ibverbs():
    r = run_bench(
        "--backend",
        "ibverbs",
        "--model",
        "none",
        "--block-bytes",
        "4K",
        "--pool-blocks",
        "512",
        "--blocks",
        "128",
        "--sizes",
        "1M",
        "--repeat",
        "1",
        "--iters",
        "3",
        "--json",
        *(["--device", dev] if (dev := os.environ.get("KVXFER_IBVERBS_DEVICE")) else []),
    )
    assert r.returncode == 0, r.stderr
    for x in json_lines(r.stdout):
        assert x["backend"] == "ibverbs" and x["verified"]


# --- two-host mode ---------------------------------------------------------------------


def _start_listener(prefix: list[str], bind: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        prefix + [sys.executable, "-m", "kvxfer_bench", "--listen", bind, "--once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=str(ROOT),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        m = re.search(r"listening on \S*:(\d+)", line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"listener did not start: {out}{err}")


def _finish(proc: subprocess.Popen) -> str:
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


@pytest.mark.multiprocess
@pytest.mark.skipif("shm" not in AVAILABLE, reason="shm backend unavailable")
def test_two_host_mode_over_localhost():
    """--listen / HOST:PORT on one host (shm needs one host; the protocol is the same)."""
    listener, port = _start_listener([], "127.0.0.1:0")
    try:
        r = run_bench(f"127.0.0.1:{port}", *SMALL, "--op", "both", "--json")
    finally:
        err = _finish(listener)
    assert r.returncode == 0, r.stderr + err
    recs = json_lines(r.stdout)
    assert len(recs) == 8 and all(x["mode"] == "remote" and x["verified"] for x in recs)
    assert all("target_machine" in x for x in recs)
    assert listener.returncode == 0, err


def _can_netns() -> str:
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("ip"):
        return "no `ip` command"
    probe = f"kvxb-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


@pytest.fixture
def netns_pair():
    """Two network namespaces joined by a veth pair: 10.231.7.1/30 <-> 10.231.7.2/30."""
    why = _can_netns()
    if why:
        print(f"skipping the network-namespace test: {why}")
        pytest.skip(why)
    tag = f"{os.getpid() % 100000}"
    a, b = f"kvxb-a{tag}", f"kvxb-b{tag}"
    va, vb = f"kvxa{tag}", f"kvxb{tag}"
    cmds = [
        ["ip", "netns", "add", a],
        ["ip", "netns", "add", b],
        ["ip", "link", "add", va, "type", "veth", "peer", "name", vb],
        ["ip", "link", "set", va, "netns", a],
        ["ip", "link", "set", vb, "netns", b],
        ["ip", "-n", a, "addr", "add", "10.231.7.1/30", "dev", va],
        ["ip", "-n", b, "addr", "add", "10.231.7.2/30", "dev", vb],
        ["ip", "-n", a, "link", "set", va, "up"],
        ["ip", "-n", b, "link", "set", vb, "up"],
        ["ip", "-n", a, "link", "set", "lo", "up"],
        ["ip", "-n", b, "link", "set", "lo", "up"],
    ]
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True, text=True)
        yield a, b, "10.231.7.1"
    finally:
        for ns in (a, b):  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", va], capture_output=True)


@pytest.mark.multiprocess
@pytest.mark.skipif("tcp" not in AVAILABLE, reason="tcp backend not in this build")
def test_two_host_mode_between_network_namespaces_tcp(netns_pair):
    ns_a, ns_b, addr = netns_pair
    listener, port = _start_listener(["ip", "netns", "exec", ns_a], f"{addr}:0")
    try:
        r = run_bench(
            f"{addr}:{port}",
            "--backend",
            "tcp",
            *SMALL,
            "--op",
            "both",
            "--json",
            prefix=["ip", "netns", "exec", ns_b],
        )
    finally:
        err = _finish(listener)
    assert r.returncode == 0, r.stderr + err
    recs = json_lines(r.stdout)
    assert len(recs) == 8 and all(
        x["mode"] == "remote" and x["backend"] == "tcp" and x["verified"] for x in recs
    )


@pytest.mark.multiprocess
@pytest.mark.skipif("shm" not in AVAILABLE, reason="shm backend unavailable")
def test_two_host_mode_between_network_namespaces_shm_is_refused_clearly(netns_pair):
    """Namespaces share the pid namespace and boot id, so shm's cross-memory attach could
    work, but its notification socket is an abstract Unix socket, which belongs to one
    network namespace: the peer is unreachable, and the tool says why."""
    ns_a, ns_b, addr = netns_pair
    listener, port = _start_listener(["ip", "netns", "exec", ns_a], f"{addr}:0")
    try:
        r = run_bench(
            f"{addr}:{port}",
            "--backend",
            "shm",
            "--sizes",
            "64K",
            "--repeat",
            "1",
            "--iters",
            "2",
            prefix=["ip", "netns", "exec", ns_b],
            timeout=120,
        )
    finally:
        _finish(listener)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "network namespace" in r.stdout + r.stderr
