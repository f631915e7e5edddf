"""CUDA memory and the cuda_ipc backend, end to end, byte for byte.

Runs on a machine with GPUs (scripts/gpu_check.sh); elsewhere each test skips with its
reason, except the CPU-only checks at the top, which run everywhere."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import numpy as np
import pytest

import kvxfer
import kvxfer.gpu
from kvxfer.errors import InvalidArgumentError, KvxferError, UnsupportedError

sys.path.insert(0, os.path.dirname(__file__))
import gpu_peer  # noqa: E402
from gpu_env import GPUS, check_paged_write_read  # noqa: E402


def _layout(layers=4, kv=2, blocks=256, block_bytes=16384):
    return kvxfer.KvLayout(num_layers=layers, num_kv=kv, num_blocks=blocks, block_bytes=block_bytes)


def _nbytes(layout):
    return layout.num_layers * layout.num_kv * layout.num_blocks * layout.block_bytes


# --- everywhere ------------------------------------------------------------------------


def test_cuda_registration_without_a_driver_names_why():
    if kvxfer.gpu.available():
        pytest.skip("this machine has a CUDA driver: the no-driver error cannot occur here")
    e = kvxfer.Engine("nodriver", backends=["loopback"])
    try:
        with pytest.raises(UnsupportedError, match="libcuda"):
            e.register_ptr(1 << 20, 4096, kind=kvxfer.MemoryKind.CUDA, device=0)
        with pytest.raises(UnsupportedError, match="libcuda"):
            e.register_ptr(1 << 20, 4096, kind=kvxfer.MemoryKind.CUDA)
        with pytest.raises(UnsupportedError, match="libcuda"):
            kvxfer.gpu.PackPlan(_layout(), [1, 2], device=0)
    finally:
        e.close()
    info = {b.name: b for b in kvxfer.list_backends()}
    assert not info["cuda_ipc"].available and "libcuda" in info["cuda_ipc"].reason
    with pytest.raises(UnsupportedError, match="cuda_ipc"):
        kvxfer.Engine("nodriver2", backends=["cuda_ipc"])


def test_block_runs_merge_consecutive_blocks():
    lay = _layout(layers=2, kv=2, blocks=8, block_bytes=64)
    runs = kvxfer.gpu.block_runs(lay, [3, 4, 5, 1])
    # Per (layer, kv) plane: [3..5] merge into one run, [1] is another.
    assert runs.shape == (8, 3)
    assert runs[0].tolist() == [3 * 64, 0, 192] and runs[1].tolist() == [64, 192, 64]
    assert int(runs[:, 2].sum()) == 2 * 2 * 4 * 64
    with pytest.raises(InvalidArgumentError):
        kvxfer.gpu.block_runs(lay, [8])


# --- one GPU ---------------------------------------------------------------------------


def test_register_every_kind_of_cuda_object(one_gpu):
    import torch

    e = kvxfer.Engine("reg", backends=["cuda_ipc"])
    try:
        t = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda:0")
        r = e.register(t)
        assert r.kind == kvxfer.MemoryKind.CUDA and r.device == 0 and r.nbytes == 1 << 20

        class Cai:  # a bare __cuda_array_interface__ producer (as CuPy or Numba export)
            def __init__(self, tensor):
                self.__cuda_array_interface__ = tensor.__cuda_array_interface__
                self.keep = tensor

        r2 = e.register(Cai(torch.zeros((64, 1024), dtype=torch.float32, device="cuda:0")))
        assert r2.kind == kvxfer.MemoryKind.CUDA and r2.nbytes == 64 * 1024 * 4

        class Dl:  # only the DLPack protocol
            def __init__(self, tensor):
                self.t = tensor

            def __dlpack__(self, stream=None):
                return self.t.__dlpack__()

            def __dlpack_device__(self):
                return self.t.__dlpack_device__()

        r3 = e.register(Dl(torch.zeros(4096, dtype=torch.int32, device="cuda:0")))
        assert r3.kind == kvxfer.MemoryKind.CUDA and r3.nbytes == 4096 * 4

        raw = torch.zeros(8192, dtype=torch.uint8, device="cuda:0")
        r4 = e.register_ptr(raw.data_ptr(), raw.numel(), owner=raw, kind=kvxfer.MemoryKind.CUDA)
        assert r4.device == 0

        with pytest.raises(InvalidArgumentError, match="not CUDA device memory"):
            host = np.zeros(4096, np.uint8)
            e.register_ptr(host.ctypes.data, 4096, owner=host, kind=kvxfer.MemoryKind.CUDA, device=0)
        if GPUS >= 2:
            with pytest.raises(InvalidArgumentError, match="cuda:0, not cuda:1"):
                e.register_ptr(raw.data_ptr(), 4096, owner=raw, kind=kvxfer.MemoryKind.CUDA, device=1)
        with pytest.raises(InvalidArgumentError, match="past the end of its allocation"):
            e.register_ptr(raw.data_ptr(), 1 << 40, owner=raw, kind=kvxfer.MemoryKind.CUDA, device=0)
        # Host memory is not cuda_ipc's: a typed error, naming what is started.
        with pytest.raises(UnsupportedError, match="no started backend handles host memory"):
            e.register(np.zeros(4096, np.uint8))
    finally:
        e.close()


def _pair(devices=(0, 0)):
    a = kvxfer.Engine("gpu-a", backends=["cuda_ipc"], timeout=30.0)
    b = kvxfer.Engine("gpu-b", backends=["cuda_ipc"], timeout=30.0)
    return a, b


@pytest.mark.parametrize("devices", [(0, 0), (0, 1), (1, 0)], ids=["same-gpu", "gpu0-gpu1", "gpu1-gpu0"])
def test_in_process_write_read_byte_exact(one_gpu, devices):
    import torch

    if max(devices) >= GPUS:
        pytest.skip(f"needs {max(devices) + 1} GPUs, this machine has {GPUS}")
    lay = _layout()
    n = _nbytes(lay)
    g = torch.Generator(device="cpu").manual_seed(5)
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to(f"cuda:{devices[0]}")
    dst = torch.zeros(n, dtype=torch.uint8, device=f"cuda:{devices[1]}")
    a, b = _pair()
    try:
        note = check_paged_write_read(a, b, src, dst, lay, b"w1")
        assert note.peer == "gpu-a"
    finally:
        a.close()
        b.close()


def test_local_regions_on_two_gpus_in_one_transfer_is_a_typed_error(two_gpus):
    import torch

    lay = _layout(layers=1, kv=1, blocks=16, block_bytes=4096)
    a, b = _pair()
    try:
        mine = [torch.zeros(_nbytes(lay), dtype=torch.uint8, device=f"cuda:{d}") for d in (0, 1)]
        theirs = [torch.zeros(_nbytes(lay), dtype=torch.uint8, device="cuda:0") for _ in range(2)]
        group = a.register_group(mine, lay)
        remote = b.register_group(theirs, lay)
        peer = a.add_peer(b.descriptor())
        t = a.post(kvxfer.Op.WRITE, peer, group, remote.ids, local_blocks=[1, 2])
        with pytest.raises(UnsupportedError, match="one local GPU"):
            t.wait(30)
    finally:
        a.close()
        b.close()


def test_unaligned_extents_byte_exact(one_gpu):
    import torch

    n = 1 << 20
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda:0")
    dst = torch.zeros(n, dtype=torch.uint8, device="cuda:0")
    a, b = _pair()
    try:
        ra, rb = a.register(src), b.register(dst)
        peer = a.add_peer(b.descriptor())
        ext_l = np.array([[3, 1001], [70001, 5], [200000, 300007]], np.uint64)
        ext_r = np.array([[17, 1001], [9, 5], [500000, 300007]], np.uint64)
        a.post(kvxfer.Op.WRITE, peer, ra, rb.id, local_extents=ext_l, remote_extents=ext_r).wait(30)
        for (lo, ln), (ro, _) in zip(ext_l.tolist(), ext_r.tolist(), strict=True):
            assert torch.equal(src[lo : lo + ln].cpu(), dst[ro : ro + ln].cpu())
        assert int(dst[:9].count_nonzero()) == 0
    finally:
        a.close()
        b.close()


def test_copy_engine_runs_and_notification_only(one_gpu, monkeypatch):
    """Runs at least KVXFER_CUDA_IPC_CE_MIN_BYTES long go to the copy engines, the rest to
    the kernel, in one transfer; a transfer without parts still delivers its notification."""
    import torch

    monkeypatch.setenv("KVXFER_CUDA_IPC_CE_MIN_BYTES", "65536")
    n = 4 << 20
    dev_b = "cuda:1" if GPUS >= 2 else "cuda:0"
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda:0")
    dst = torch.zeros(n, dtype=torch.uint8, device=dev_b)
    a, b = _pair()
    try:
        ra, rb = a.register(src), b.register(dst)
        peer = a.add_peer(b.descriptor())
        ext_l = np.array([[0, 1 << 20], [2 << 20, 4096], [(3 << 20) + 16, 65536 + 32]], np.uint64)
        ext_r = np.array([[1 << 20, 1 << 20], [16, 4096], [(2 << 20) + 48, 65536 + 32]], np.uint64)
        a.post(kvxfer.Op.WRITE, peer, ra, rb.id, local_extents=ext_l, remote_extents=ext_r).wait(30)
        for (lo, ln), (ro, _) in zip(ext_l.tolist(), ext_r.tolist(), strict=True):
            assert torch.equal(src[lo : lo + ln].cpu(), dst[ro : ro + ln].cpu())
        a.post_parts(kvxfer.Op.WRITE, peer, [], notify=b"only").wait(30)
        assert b.wait_notification(b"only", timeout=30).payload == b"only"
    finally:
        a.close()
        b.close()


def test_pack_unpack_byte_exact(one_gpu):
    import torch

    lay = _layout(layers=4, kv=2, blocks=128, block_bytes=4096)
    pool = torch.randint(0, 256, (_nbytes(lay),), dtype=torch.uint8, device="cuda:0")
    others = np.setdiff1d(np.arange(lay.num_blocks), np.arange(60, 64))
    ids = np.random.default_rng(3).choice(others, 40, replace=False)
    ids[5:9] = np.arange(60, 64)  # a run of consecutive blocks (merged); ids stay distinct
    plan = kvxfer.gpu.PackPlan(lay, ids, device=0)
    assert plan.nbytes == 4 * 2 * 40 * 4096 and plan.num_runs < 4 * 2 * 40
    out = torch.zeros(plan.nbytes, dtype=torch.uint8, device="cuda:0")
    side = torch.cuda.Stream(device=0)
    ready = torch.cuda.Event()
    ready.record()
    plan.pack(pool, out, stream=side, after=ready)
    side.synchronize()
    ref = pool.view(4, 2, 128, 4096)[:, :, torch.as_tensor(ids, device="cuda:0")].reshape(-1)
    assert torch.equal(out, ref)
    # Unpack into a fresh pool: only the plan's blocks change.
    pool2 = torch.zeros_like(pool)
    plan.unpack(out, pool2, stream=side)
    side.synchronize()
    v1, v2 = pool.view(4, 2, 128, 4096), pool2.view(4, 2, 128, 4096)
    idx = torch.as_tensor(ids, device="cuda:0")
    assert torch.equal(v1[:, :, idx], v2[:, :, idx])
    assert int(pool2.count_nonzero()) == int(v2[:, :, idx].count_nonzero())
    # One layer at a time (the per-layer side-stream use).
    plan_l = kvxfer.gpu.PackPlan(lay, ids, device=0, layers=(2, 3))
    out_l = torch.zeros(plan_l.nbytes, dtype=torch.uint8, device="cuda:0")
    plan_l.pack(pool, out_l)
    torch.cuda.synchronize()
    assert torch.equal(out_l, v1[2:3, :, idx].reshape(-1))
    with pytest.raises(KvxferError, match="reads up to byte"):
        plan.pack(pool[: pool.numel() // 2], out)
    with pytest.raises(KvxferError, match="writes up to byte"):
        plan.pack(pool, out[:100])


# --- two processes ---------------------------------------------------------------------


class Target:
    def __init__(self, device: int, layout, num_pools=1, seed=11, env=None):
        ctx = mp.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        kw = {
            "num_layers": layout.num_layers,
            "num_kv": layout.num_kv,
            "num_blocks": layout.num_blocks,
            "block_bytes": layout.block_bytes,
        }
        self.proc = ctx.Process(
            target=gpu_peer.serve, args=(theirs, "gpu-target", device, kw, num_pools, seed, env or {})
        )
        self.proc.start()
        theirs.close()  # if the target dies, reply() raises EOFError at once
        self.descriptor, self.region_ids = self.reply(120)

    def reply(self, timeout=60):
        if not self.conn.poll(timeout):
            raise TimeoutError("the target process did not answer")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"target: {value}")
        return value

    def call(self, *cmd, timeout=60):
        self.conn.send(cmd)
        return self.reply(timeout)

    def close(self):
        try:
            self.call("exit")
        except Exception:  # noqa: BLE001
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


@pytest.mark.parametrize("layout_kind", ["one-region", "per-layer-regions"])
@pytest.mark.parametrize("devices", [(0, 1), (0, 0)], ids=["gpu0-to-gpu1", "same-gpu"])
def test_two_processes_paged_write_read(one_gpu, devices, layout_kind):
    import torch

    if max(devices) >= GPUS:
        pytest.skip(f"needs {max(devices) + 1} GPUs, this machine has {GPUS}")
    if layout_kind == "one-region":
        lay, pools = _layout(layers=8, kv=2, blocks=256, block_bytes=16384), 1
    else:  # vLLM's shape: one tensor per layer for K and one for V
        lay, pools = _layout(layers=1, kv=1, blocks=256, block_bytes=16384), 16
    target = Target(devices[1], lay, pools)
    e = kvxfer.Engine("gpu-init", backends=["cuda_ipc"], timeout=60.0)
    try:
        dev = f"cuda:{devices[0]}"
        g = torch.Generator(device=dev).manual_seed(7)
        local = [
            torch.randint(0, 256, (_nbytes(lay),), dtype=torch.uint8, device=dev, generator=g)
            for _ in range(pools)
        ]
        group = e.register_group(local, lay)
        peer = e.add_peer(target.descriptor)
        rng = np.random.default_rng(2)
        ids_l = rng.choice(lay.num_blocks, 96, replace=False)
        ids_r = rng.choice(lay.num_blocks, 96, replace=False)
        # WRITE: the target hashes its blocks the moment the notification arrives.
        target.conn.send(("digest_at_notification", ids_r.tolist(), 60))
        t = e.post(
            kvxfer.Op.WRITE,
            peer,
            group,
            target.region_ids,
            local_blocks=ids_l,
            remote_blocks=ids_r,
            notify=b"kv-ready",
        )
        t.wait(60)
        payload, remote_digest = target.reply(60)
        assert payload == b"kv-ready"
        assert remote_digest == gpu_peer.pool_digest(local, lay, ids_l)
        # READ: pull other blocks of the target into fresh local blocks.
        ids_src = np.setdiff1d(np.arange(lay.num_blocks), ids_r)[:80]
        rng.shuffle(ids_src)
        ids_dst = np.setdiff1d(np.arange(lay.num_blocks), ids_l)[:80]
        e.post(
            kvxfer.Op.READ, peer, group, target.region_ids, local_blocks=ids_dst, remote_blocks=ids_src
        ).wait(60)
        torch.cuda.synchronize()
        assert gpu_peer.pool_digest(local, lay, ids_dst) == target.call("digest", ids_src.tolist())
    finally:
        e.close()
        target.close()


def test_two_processes_vmm_memory_is_a_typed_error(one_gpu):
    """torch's expandable segments allocate with the VMM API, which legacy CUDA IPC cannot
    export: the transfer fails with UnsupportedError naming why, nothing hangs."""
    import torch

    lay = _layout(layers=1, kv=1, blocks=64, block_bytes=4096)
    target = Target(0, lay, 1, env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    e = kvxfer.Engine("gpu-init-vmm", backends=["cuda_ipc"], timeout=20.0)
    try:
        local = torch.zeros(_nbytes(lay), dtype=torch.uint8, device="cuda:0")
        r = e.register(local, lay)
        peer = e.add_peer(target.descriptor)
        t = e.post(kvxfer.Op.WRITE, peer, r, target.region_ids[0], local_blocks=[1, 2], remote_blocks=[3, 4])
        try:
            t.wait(20)
        except UnsupportedError as err:
            assert "legacy CUDA IPC" in str(err) or "cuIpcOpenMemHandle" in str(err)
        else:
            pytest.skip("this torch/driver exports expandable-segment memory through legacy IPC")
    finally:
        e.close()
        target.close()


def test_tcp_host_staged_gpu_to_gpu_byte_exact(one_gpu):
    """GPU KV over tcp through pinned host buffers (kvxfer.gpu_staging), two processes.
    Both sides run in child processes, so a crash of either is reported as a failure with
    its exit code instead of ending the test session."""
    ctx = mp.get_context("spawn")
    conn, theirs = ctx.Pipe()
    proc = ctx.Process(target=gpu_peer.staged_initiator, args=(theirs, 1 if GPUS >= 2 else 0))
    proc.start()
    theirs.close()  # a dead child then ends poll() at once (EOF) instead of after its timeout
    try:
        assert conn.poll(300), "the staged initiator did not finish"
        status, value = conn.recv()
        assert status == "ok", value
        assert value == [True, True], f"staged rounds byte-exact: {value}"
    except (EOFError, AssertionError):
        proc.join(30)
        if proc.exitcode not in (0, None):
            pytest.fail(f"the staged initiator process died with exit code {proc.exitcode}")
        raise
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
