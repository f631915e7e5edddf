"""Shared helpers of the RDMA tests: device detection, layouts, byte checks, and the target
engine that two-process tests run in a child process (multiprocessing, spawn).

Nothing here imports pytest: spawned children import this module.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

import numpy as np

IB = "ibverbs"
# TCG (soft-RoCE in a QEMU guest without KVM) runs code 15-30x slower than a host:
# deadlines are generous and data sizes modest.
TIMEOUT = 60.0


def rdma_devices() -> list[str]:
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except FileNotFoundError:
        return []


def require_rdma() -> None:
    """Module-level skip when this machine has no RDMA device at all (and only then)."""
    if not rdma_devices():
        import pytest

        pytest.skip(
            "no RDMA device (/sys/class/infiniband is empty or missing): run tests/rdma/run_in_vm.sh "
            "for soft-RoCE, or `rdma link add rxe0 type rxe netdev <if>` where the kernel has rdma_rxe",
            allow_module_level=True,
        )


def make_engine(name: str, device: str = "", **kw: Any):
    """An ibverbs engine; ``device`` is the IbverbsConfig device selector ("rxe0", "rxe0:1")."""
    import kvxfer

    kw.setdefault("timeout", TIMEOUT)
    kw.setdefault("connect_timeout", 30.0)
    cfg = kvxfer.EngineConfig()
    cfg.backend.ibverbs.device = device
    return kvxfer.Engine(name, backends=[IB], config=cfg, **kw)


def layout(num_layers: int, num_kv: int, num_blocks: int, block_bytes: int):
    import kvxfer

    return kvxfer.KvLayout(
        num_layers=num_layers, num_kv=num_kv, num_blocks=num_blocks, block_bytes=block_bytes
    )


def layout_bytes(lay) -> int:
    return int(lay.num_layers * lay.layer_stride)


def random_bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def piece_slices(lay, ids) -> list[slice]:
    """Byte slices of every (layer, kv, block) piece, in the planner's stream order."""
    out = []
    for layer in range(lay.num_layers):
        for kv in range(lay.num_kv):
            for b in ids:
                o = lay.piece_offset(layer, kv, int(b))
                out.append(slice(o, o + lay.block_bytes))
    return out


def assert_blocks_equal(lay, src: np.ndarray, src_ids, dst: np.ndarray, dst_ids) -> None:
    for s, d in zip(piece_slices(lay, src_ids), piece_slices(lay, dst_ids), strict=True):
        if not np.array_equal(src[s], dst[d]):
            bad = int(np.flatnonzero(src[s] != dst[d])[0])
            raise AssertionError(f"piece at src {s.start} / dst {d.start} differs from byte {bad}")


def untouched_mask(lay, nbytes: int, ids) -> np.ndarray:
    mask = np.ones(nbytes, dtype=bool)
    for s in piece_slices(lay, ids):
        mask[s] = False
    return mask


# --------------------------------------------------------------------------------------------
# A target engine in a child process. Commands arrive as tuples on a multiprocessing Pipe.


def target_main(conn, name: str, lay_args: tuple, fill_seed: int | None, env: dict | None = None) -> None:
    if env:
        os.environ.update(env)
    try:
        lay = layout(*lay_args)
        eng = make_engine(name)
        nbytes = layout_bytes(lay)
        mem = random_bytes(nbytes, fill_seed) if fill_seed is not None else np.zeros(nbytes, np.uint8)
        region = eng.register(mem, layout=lay)
        conn.send(("ready", eng.descriptor(), os.getpid(), region.id))
    except Exception:  # noqa: BLE001 - report to the parent
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        cmd = msg[0]
        try:
            if cmd == "dump":
                conn.send(mem.tobytes())
            elif cmd == "fill":
                mem[:] = random_bytes(nbytes, msg[1])
                conn.send("ok")
            elif cmd == "descriptor":
                conn.send(eng.descriptor())
            elif cmd == "notes":
                count, timeout, snapshot = msg[1], msg[2], msg[3]
                notes = eng.wait_for_notifications(count, timeout)
                # Snapshot right after delivery: the data must already be there.
                snap = mem.tobytes() if snapshot else None
                conn.send(("ok", [(n.peer, n.peer_instance, n.payload) for n in notes], snap))
            elif cmd == "quit":
                conn.send("bye")
                eng.close()
                return
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


class Target:
    """Handle of a target engine running in a spawned child process."""

    def __init__(
        self,
        name: str,
        lay_args: tuple,
        fill_seed: int | None = None,
        env: dict | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target_main, args=(child, name, lay_args, fill_seed, env), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(start_timeout):
            self.kill()
            raise RuntimeError(f"target {name} did not start within {start_timeout} s")
        msg = self.conn.recv()
        if msg[0] != "ready":
            self.kill()
            raise RuntimeError(f"target {name} failed to start:\n{msg[1]}")
        _, self.descriptor, self.pid, self.region_id = msg
        self.layout = layout(*lay_args)
        self.nbytes = layout_bytes(self.layout)

    def call(self, *msg: Any, timeout: float = 120.0) -> Any:
        self.conn.send(msg)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"target did not answer {msg[0]!r} within {timeout} s")
        out = self.conn.recv()
        if isinstance(out, tuple) and out and out[0] == "error":
            raise RuntimeError(f"target failed on {msg[0]!r}:\n{out[1]}")
        return out

    def dump(self) -> np.ndarray:
        return np.frombuffer(self.call("dump"), dtype=np.uint8)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(30)

    def quit(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("quit", timeout=60)
            except Exception:  # noqa: BLE001
                pass
            self.proc.join(60)
        self.kill()


def wait_terminal(transfers, limit: float) -> float:
    """Waits until every transfer is DONE or FAILED; returns the seconds it took."""
    import kvxfer

    t0 = time.monotonic()
    for t in transfers:
        left = limit - (time.monotonic() - t0)
        try:
            t.wait(max(left, 0.001))
        except kvxfer.errors.TimeoutError:
            if t.state == kvxfer.TransferState.PENDING:
                raise
        except kvxfer.KvxferError:
            pass
    return time.monotonic() - t0
