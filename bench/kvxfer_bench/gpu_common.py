"""What the GPU benches share (gpu.py over cuda_ipc, gpu_staged.py over tcp, gpu_overhead.py):
the spawned target process and its control pipe, the paged block choice, and the sha256 of
the moved blocks of GPU pools."""

from __future__ import annotations

import hashlib
import multiprocessing as mp

import numpy as np


def paged_shape(opts: dict) -> tuple[int, int, int, int, int]:
    """(layers, kv, pool_blocks, blocks, block_bytes) of a kvxfer-bench GPU run."""
    return opts["layers"], opts["kv"], opts["pool_blocks"], opts["blocks"], opts["block_bytes"]


def choose_blocks(seed: int, pool_blocks: int, nblocks: int):
    """The run's generator and its random local and remote block ids (distinct within each)."""
    rng = np.random.default_rng(seed)
    ids_l = rng.choice(pool_blocks, nblocks, replace=False)
    ids_r = rng.choice(pool_blocks, nblocks, replace=False)
    return rng, ids_l, ids_r


def gpu_digest(pools, lay: dict, ids) -> str:
    """sha256 of blocks `ids` of each pool (a flat uint8 tensor of layout `lay`), in stream
    order: pool, layer, K/V, block."""
    import torch

    h = hashlib.sha256()
    for pool in pools:
        idx = torch.as_tensor(np.asarray(ids), dtype=torch.int64, device=pool.device)
        view = pool.view(lay["num_layers"], lay["num_kv"], lay["num_blocks"], lay["block_bytes"])
        for layer in range(lay["num_layers"]):  # a layer at a time keeps the host copy small
            h.update(view[layer, :, idx].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class TargetProcess:
    """`fn(conn, *args)` in a spawned process, driven over a pipe: each command is
    ``(cmd, kwargs)``, each answer ``("ok", value)`` or ``("error", text)``; "exit" ends it."""

    def __init__(self, fn, *args):
        ctx = mp.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=fn, args=(theirs, *args), daemon=True)
        self.proc.start()
        theirs.close()  # if the target dies, the next recv raises EOFError at once

    def greeting(self, timeout: float, what: str):
        """The first message of a target that reports its start (RuntimeError: `what`)."""
        if not self.conn.poll(timeout):
            raise RuntimeError(what)
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"target: {value}")
        return value

    def send(self, cmd: str, **args) -> None:
        self.conn.send((cmd, args))

    def reply(self, cmd: str, timeout: float = 600):
        if not self.conn.poll(timeout):
            raise RuntimeError(f"target: no answer to {cmd}")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"target: {cmd}: {value}")
        return value

    def call(self, cmd: str, timeout: float = 600, **args):
        self.send(cmd, **args)
        return self.reply(cmd, timeout)

    def close(self, timeout: float = 30) -> None:
        try:
            self.call("exit", timeout=timeout)
        except Exception:  # noqa: BLE001
            pass
        self.proc.join(30)
