"""kvxfer-bench ``--memory cuda:0 --target-memory cuda:1 --backend tcp``: GPU KV over tcp
through host staging (kvxfer.gpu_staging), two processes on one host, against the same
paged transfer between host memory over tcp, measured in the same invocation.

Both cases move the paged shape (layers x K/V x ``--blocks`` random of ``--pool-blocks``
blocks) as a WRITE from this process to the target. Host case: one tcp transfer of the
paged blocks between numpy pools. GPU case: pack on GPU0 -> D2H -> tcp WRITE of
contiguous chunks into the target's pinned buffer -> H2D -> unpack on GPU1, chunks of
``chunk_layers`` layers overlapped. A round ends when the target has unpacked every byte
(it answers over the control pipe). Figures are medians of ``--repeat`` runs; both cases
are verified byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time

import numpy as np

from .gpu_common import TargetProcess, choose_blocks, gpu_digest, paged_shape


def _host_digest(pool: np.ndarray, lay: dict, ids) -> str:
    v = pool.reshape(lay["num_layers"], lay["num_kv"], lay["num_blocks"], lay["block_bytes"])
    return hashlib.sha256(np.ascontiguousarray(v[:, :, np.asarray(ids)]).tobytes()).hexdigest()


def _target(conn, device: int, lay: dict, ids: list, chunk_layers: int) -> None:
    import torch

    import kvxfer
    import kvxfer.gpu_staging as st

    try:
        torch.cuda.set_device(device)
        layout = kvxfer.KvLayout(**lay)
        nbytes = lay["num_layers"] * lay["num_kv"] * lay["num_blocks"] * lay["block_bytes"]
        engine = kvxfer.Engine(f"kvxfer-bench-staged-target-{os.getpid()}", backends=["tcp"], timeout=120.0)
        host = np.zeros(nbytes, np.uint8)
        rh = engine.register(host, layout)
        gpool = torch.zeros(nbytes, dtype=torch.uint8, device=f"cuda:{device}")
        staging = st.StagingBuffer(engine, st.staging_bytes(layout, len(ids)))
        conn.send(("ok", (engine.descriptor(), rh.id, staging.id)))
    except Exception as e:  # noqa: BLE001
        conn.send(("error", repr(e)))
        return
    while True:
        try:
            cmd, args = conn.recv()
        except EOFError:
            return
        try:
            if cmd == "recv":
                st.recv_staged(
                    engine, gpool, layout, ids, staging, tag=args["tag"], chunk_layers=chunk_layers
                )
                reply = None
            elif cmd == "digest_host":
                reply = _host_digest(host, lay, ids)
            elif cmd == "digest_gpu":
                torch.cuda.synchronize(device)
                reply = gpu_digest([gpool], lay, ids)
            elif cmd == "exit":
                conn.send(("ok", None))
                engine.close()
                return
            else:
                raise ValueError(cmd)
            conn.send(("ok", reply))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", repr(e)))


def run(opts: dict, emit) -> int:
    import torch

    import kvxfer
    import kvxfer.gpu_staging as st

    d0, d1 = opts["device"], opts["target_device"]
    layers, kv, pool_blocks, nblocks, bb = paged_shape(opts)
    chunk_layers = opts.get("chunk_layers", 4)
    _, ids_l, ids_r = choose_blocks(opts["seed"], pool_blocks, nblocks)
    lay = {"num_layers": layers, "num_kv": kv, "num_blocks": pool_blocks, "block_bytes": bb}
    layout = kvxfer.KvLayout(**lay)
    moved = layers * kv * nblocks * bb
    nbytes = layers * kv * pool_blocks * bb
    target = TargetProcess(_target, d1, lay, ids_r.tolist(), chunk_layers)
    descriptor, host_id, staging_id = target.greeting(300, "the staged target did not start")
    engine = kvxfer.Engine(f"kvxfer-bench-staged-{os.getpid()}", backends=["tcp"], timeout=120.0)
    rc = 0
    try:
        torch.cuda.set_device(d0)
        host = np.random.default_rng(5).integers(0, 256, nbytes, dtype=np.uint8)
        rh = engine.register(host, layout)
        gpool = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{d0}").random_(0, 256)
        staging = st.StagingBuffer(engine, st.staging_bytes(layout, nblocks))
        peer = engine.add_peer(descriptor)
        repeat = opts["repeat"]

        def host_round():
            engine.post(
                kvxfer.Op.WRITE, peer, rh, host_id, local_blocks=ids_l, remote_blocks=ids_r, timeout=120
            ).wait(120)

        round_no = [0]

        def gpu_round():
            round_no[0] += 1
            tag = f"r{round_no[0]}".encode()
            target.send("recv", tag=tag)
            st.send_staged(
                engine, peer, gpool, layout, ids_l, staging, staging_id, tag=tag, chunk_layers=chunk_layers
            )
            target.reply("recv")

        results = {}
        for name, fn in (("host", host_round), ("gpu-staged", gpu_round)):
            fn()  # warm-up
            t0 = time.perf_counter()
            fn()
            one = time.perf_counter() - t0
            iters = max(1, int(1.0 / max(one, 1e-3)))
            runs = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                runs.append((time.perf_counter() - t0) / iters)
            results[name] = (moved / statistics.median(runs) / 1e9, runs, iters)
        ok_host = _host_digest(host, lay, ids_l) == target.call("digest_host")
        torch.cuda.synchronize(d0)
        ok_gpu = gpu_digest([gpool], lay, ids_l) == target.call("digest_gpu")
        base = results["host"][0]
        emit(
            {
                "type": "baseline",
                "what": "tcp-host",
                "direction": "host->host",
                "bytes": moved,
                "gbps": base,
                "runs_s": results["host"][1],
                "verified": ok_host,
            }
        )
        g, runs, iters = results["gpu-staged"]
        emit(
            {
                "type": "result",
                "workload": "paged-random:tcp-staged",
                "backend": "tcp",
                "op": "write",
                "from": f"cuda:{d0}",
                "to": f"cuda:{d1}",
                "regions": 1,
                "bytes": moved,
                "chunk_layers": chunk_layers,
                "iters": iters,
                "gbps": g,
                "runs_s": runs,
                "tcp_host_gbps": base,
                "ratio_vs_tcp_host": g / base,
                "verified": ok_gpu,
            }
        )
        if not (ok_host and ok_gpu):
            rc = 3
    finally:
        engine.close()
        target.close(timeout=600)
    return rc
