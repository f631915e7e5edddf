"""Host staging: GPU KV over a backend that reaches host memory only (tcp, shm).

Where the NIC (or the other process) cannot reach GPU memory, the blocks go through pinned
host buffers: the sender packs its blocks on the GPU (kvxfer.gpu.PackPlan), copies them to
its pinned staging buffer (D2H), and WRITEs them into the receiver's pinned staging buffer
over the engine's backend; the receiver copies them to its GPU (H2D) and unpacks them into
its pool. The transfer is cut into chunks of whole layers and the stages overlap: while
chunk c is on the wire, the sender packs and copies chunk c + 1, and the receiver copies
and unpacks chunk c - 1. Each chunk's WRITE carries a notification ``<tag>:<c>``; the
receiver waits for them in order. Both sides compute the same chunking from the layout,
the number of blocks and ``chunk_layers``.

This is an explicit API (both sides call it), not a path ``Engine.post`` takes by itself;
the staging buffers are sized to the whole transfer (``staging_bytes``).
"""

from __future__ import annotations

from typing import Any

from . import gpu

__all__ = ["StagingBuffer", "recv_staged", "send_staged", "staging_bytes"]


def staging_bytes(layout: Any, num_blocks: int) -> int:
    """Bytes of a staging buffer for ``num_blocks`` blocks of every layer and K/V."""
    return int(layout.num_layers * layout.num_kv * num_blocks * layout.block_bytes)


class StagingBuffer:
    """Pinned host memory (torch) registered with ``engine`` as host memory."""

    def __init__(self, engine: Any, nbytes: int):
        import torch

        self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.region = engine.register(self.tensor)

    @property
    def id(self) -> int:
        return self.region.id


def _chunks(layout: Any, num_blocks: int, chunk_layers: int) -> list[tuple[int, int, int, int]]:
    """(first layer, end layer, byte offset, bytes) of each chunk of the packed stream."""
    per_layer = layout.num_kv * num_blocks * layout.block_bytes
    out = []
    for lo in range(0, layout.num_layers, chunk_layers):
        hi = min(layout.num_layers, lo + chunk_layers)
        out.append((lo, hi, lo * per_layer, (hi - lo) * per_layer))
    return out


def send_staged(
    engine: Any,
    peer: Any,
    pool: Any,
    layout: Any,
    block_ids: Any,
    staging: StagingBuffer,
    remote_staging: int,
    *,
    tag: bytes,
    chunk_layers: int = 4,
    timeout: float = 60.0,
) -> None:
    """Sends ``block_ids`` of the GPU ``pool`` into the receiver's staging buffer
    (region id ``remote_staging``), chunk by chunk; returns when every chunk is DONE."""
    import torch

    from .transfer import Op

    ids = list(block_ids)
    device = pool.device.index if pool.device.index is not None else 0
    chunks = _chunks(layout, len(ids), chunk_layers)
    plans = [gpu.PackPlan(layout, ids, device, layers=(lo, hi)) for lo, hi, _, _ in chunks]
    total = sum(n for _, _, _, n in chunks)
    dev = torch.empty(total, dtype=torch.uint8, device=pool.device)
    stream = torch.cuda.Stream(device=device)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))
    events = []
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        for plan, (_, _, off, n) in zip(plans, chunks, strict=True):
            plan.pack(pool, dev[off : off + n], stream=stream)
            staging.tensor[off : off + n].copy_(dev[off : off + n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
            events.append(ev)
    transfers = []
    for c, (ev, (_, _, off, n)) in enumerate(zip(events, chunks, strict=True)):
        ev.synchronize()  # chunk c is in pinned memory; later chunks keep packing meanwhile
        ext = [[off, n]]
        transfers.append(
            engine.post(
                Op.WRITE,
                peer,
                staging.region,
                remote_staging,
                local_extents=ext,
                remote_extents=ext,
                notify=tag + b":" + str(c).encode(),
                timeout=timeout,
            )
        )
    for t in transfers:
        t.wait(timeout)


def recv_staged(
    engine: Any,
    pool: Any,
    layout: Any,
    block_ids: Any,
    staging: StagingBuffer,
    *,
    tag: bytes,
    chunk_layers: int = 4,
    timeout: float = 60.0,
) -> None:
    """Receives the chunks ``send_staged`` sends into ``staging`` and unpacks them into
    ``block_ids`` of the GPU ``pool``; returns when every byte is in the pool."""
    import torch

    ids = list(block_ids)
    device = pool.device.index if pool.device.index is not None else 0
    chunks = _chunks(layout, len(ids), chunk_layers)
    plans = [gpu.PackPlan(layout, ids, device, layers=(lo, hi)) for lo, hi, _, _ in chunks]
    total = sum(n for _, _, _, n in chunks)
    dev = torch.empty(total, dtype=torch.uint8, device=pool.device)
    stream = torch.cuda.Stream(device=device)
    with torch.cuda.stream(stream):
        for c, (plan, (_, _, off, n)) in enumerate(zip(plans, chunks, strict=True)):
            engine.wait_notification(tag + b":" + str(c).encode(), timeout=timeout)
            dev[off : off + n].copy_(staging.tensor[off : off + n], non_blocking=True)
            plan.unpack(dev[off : off + n], pool, stream=stream)
    stream.synchronize()
