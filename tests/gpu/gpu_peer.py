"""A cuda_ipc target engine in its own process, with its KV pool(s) on one GPU, driven
over a multiprocessing Pipe (spawn). Replies are ("ok", value) or ("error", repr)."""

from __future__ import annotations

import hashlib
import os


def pool_digest(pools, layout, ids, layers=None) -> str:
    """sha256 of the blocks ``ids`` of every pool, in stream order (pool, layer, K/V, id)."""
    import torch

    idx = torch.as_tensor(list(ids), dtype=torch.int64)
    h = hashlib.sha256()
    lo, hi = layers or (0, layout.num_layers)
    for pool in pools:
        view = pool.view(layout.num_layers, layout.num_kv, layout.num_blocks, layout.block_bytes)
        h.update(view[lo:hi, :, idx.to(pool.device)].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def serve(conn, name: str, device: int, layout_kwargs: dict, num_pools: int, seed: int, env: dict) -> None:
    os.environ.update(env)
    import torch

    import kvxfer

    try:
        layout = kvxfer.KvLayout(**layout_kwargs)
        nbytes = layout.num_layers * layout.num_kv * layout.num_blocks * layout.block_bytes
        torch.cuda.set_device(device)
        g = torch.Generator(device=f"cuda:{device}").manual_seed(seed)
        pools = [
            torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=f"cuda:{device}", generator=g)
            for _ in range(num_pools)
        ]
        engine = kvxfer.Engine(name, backends=["cuda_ipc"], timeout=60.0)
        regions = [engine.register(p, layout) for p in pools]
        conn.send(("ok", (engine.descriptor(), [r.id for r in regions])))
    except Exception as e:  # reported to the test
        conn.send(("error", repr(e)))
        return
    while True:
        try:
            cmd, *args = conn.recv()
        except EOFError:
            return
        try:
            if cmd == "digest":
                torch.cuda.synchronize(device)
                reply = pool_digest(pools, layout, args[0])
            elif cmd == "digest_at_notification":
                (note,) = engine.wait_for_notifications(1, timeout=args[1])
                reply = (note.payload, pool_digest(pools, layout, args[0]))
            elif cmd == "exit":
                conn.send(("ok", None))
                engine.close()
                return
            else:
                raise ValueError(f"unknown command {cmd}")
            conn.send(("ok", reply))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", repr(e)))


def serve_staged(conn, device: int, layout_kwargs: dict, ids: list, chunk_layers: int) -> None:
    """A tcp engine with a GPU pool and a pinned staging buffer: receives staged chunks."""
    import torch

    import kvxfer
    import kvxfer.gpu_staging as st

    try:
        layout = kvxfer.KvLayout(**layout_kwargs)
        nbytes = layout.num_layers * layout.num_kv * layout.num_blocks * layout.block_bytes
        torch.cuda.set_device(device)
        pool = torch.zeros(nbytes, dtype=torch.uint8, device=f"cuda:{device}")
        engine = kvxfer.Engine("staged-target", backends=["tcp"], timeout=60.0)
        staging = st.StagingBuffer(engine, st.staging_bytes(layout, len(ids)))
        conn.send(("ok", (engine.descriptor(), staging.id)))
        while True:
            cmd, *args = conn.recv()
            if cmd == "recv":
                st.recv_staged(engine, pool, layout, ids, staging, tag=args[0], chunk_layers=chunk_layers)
                conn.send(("ok", pool_digest([pool], layout, ids)))
            elif cmd == "exit":
                conn.send(("ok", None))
                engine.close()
                return
    except Exception as e:  # reported to the test
        conn.send(("error", repr(e)))


def staged_initiator(result, target_device: int) -> None:
    """Sends two staged rounds GPU0 -> the target's GPU over tcp; reports per round whether
    the target's blocks equal ours (sha256)."""
    import multiprocessing as mp

    import numpy as np
    import torch

    import kvxfer
    import kvxfer.gpu_staging as st

    kw = {"num_layers": 6, "num_kv": 2, "num_blocks": 128, "block_bytes": 8192}
    lay = kvxfer.KvLayout(**kw)
    rng = np.random.default_rng(9)
    ids_l = rng.choice(lay.num_blocks, 40, replace=False)
    ids_r = rng.choice(lay.num_blocks, 40, replace=False)
    ctx = mp.get_context("spawn")
    conn, theirs = ctx.Pipe()
    proc = ctx.Process(target=serve_staged, args=(theirs, target_device, kw, ids_r.tolist(), 4))
    proc.start()
    theirs.close()  # only the child holds its end: if it dies, recv() raises EOFError at once
    try:
        if not conn.poll(120):
            raise TimeoutError("the staged target did not start")
        status, value = conn.recv()
        if status != "ok":
            raise RuntimeError(f"target: {value}")
        descriptor, staging_id = value
        e = kvxfer.Engine("staged-init", backends=["tcp"], timeout=60.0)
        nbytes = 6 * 2 * 128 * 8192
        pool = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda:0")
        staging = st.StagingBuffer(e, st.staging_bytes(lay, len(ids_l)))
        peer = e.add_peer(descriptor)
        oks = []
        for round_no in range(2):  # the buffers are reused
            pool.random_(0, 256)
            tag = f"t{round_no}".encode()
            conn.send(("recv", tag))
            st.send_staged(e, peer, pool, lay, ids_l, staging, staging_id, tag=tag, chunk_layers=4)
            if not conn.poll(60):
                raise TimeoutError("the staged target did not answer")
            status, remote_digest = conn.recv()
            if status != "ok":
                raise RuntimeError(f"target: {remote_digest}")
            torch.cuda.synchronize()
            oks.append(remote_digest == pool_digest([pool], lay, ids_l))
        conn.send(("exit",))
        conn.recv()
        e.close()
        result.send(("ok", oks))
    except Exception as ex:  # noqa: BLE001 - reported to the test
        result.send(("error", repr(ex)))
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
