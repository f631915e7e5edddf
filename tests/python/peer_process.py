"""A target engine in its own process, driven over a multiprocessing Pipe.

Commands are tuples; every reply is ("ok", value) or ("error", repr). Used by the
two-process tests; runs with the "spawn" start method so nothing is inherited.
"""

from __future__ import annotations

import hashlib

import numpy as np

import kvxfer


def digest(pool: np.ndarray, layout: kvxfer.KvLayout, ids) -> str:
    bb = layout.block_bytes
    h = hashlib.sha256()
    for layer in range(layout.num_layers):
        for kv in range(layout.num_kv):
            for i in ids:
                off = layout.piece_offset(layer, kv, int(i))
                h.update(pool[off : off + bb].data)
    return h.hexdigest()


def serve(conn, name: str, backend: str, layout_kwargs: dict, seed: int, shareable: bool = False) -> None:
    layout = kvxfer.KvLayout(**layout_kwargs)
    nbytes = (
        layout.piece_offset(layout.num_layers - 1, layout.num_kv - 1, layout.num_blocks - 1)
        + layout.block_bytes
    )
    engine = kvxfer.Engine(name, backends=[backend], timeout=60.0)
    pool = kvxfer.empty(nbytes) if shareable else np.empty(nbytes, np.uint8)
    pool[:] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    region = engine.register(pool, layout)
    conn.send(("ok", engine.descriptor()))
    peers = {}
    while True:
        try:
            cmd, *args = conn.recv()
        except EOFError:
            return
        try:
            if cmd == "add_peer":
                peer = engine.add_peer(args[0])
                peers[peer.name] = peer
                reply = peer.name
            elif cmd == "digest":
                reply = digest(pool, layout, args[0])
            elif cmd == "digest_at_notification":
                # Hash the blocks the moment the notification is seen: proves ordering.
                (note,) = engine.wait_for_notifications(1, timeout=args[1])
                reply = (note.payload, digest(pool, layout, args[0]))
            elif cmd == "write_to":
                peer_name, ids, notify = args
                t = engine.write(peers[peer_name], region, 0, ids, notify=notify)
                t.wait(60)
                reply = True
            elif cmd == "exit":
                conn.send(("ok", None))
                engine.close()
                return
            else:
                raise ValueError(f"unknown command {cmd}")
            conn.send(("ok", reply))
        except Exception as e:  # reported to the test, which fails on it
            conn.send(("error", repr(e)))
