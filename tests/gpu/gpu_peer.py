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
