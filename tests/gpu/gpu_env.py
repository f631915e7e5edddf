"""GPU detection shared by the GPU tests (not in conftest.py: a module named conftest
would be shadowed by tests/python's when both folders run in one pytest session)."""

from __future__ import annotations

import kvxfer
import kvxfer.gpu


def _gpu_count() -> tuple[int, str]:
    status = kvxfer.gpu.cuda_status()
    if status:
        return 0, status
    try:
        import torch
    except ImportError:
        return 0, "torch is not installed (the GPU tests allocate CUDA memory with torch)"
    if not torch.cuda.is_available():
        return 0, "torch sees no CUDA device"
    return torch.cuda.device_count(), ""


GPUS, WHY = _gpu_count()


def check_paged_write_read(a, b, src, dst, lay, tag: bytes):
    """Between engines ``a`` and ``b`` (``src`` and ``dst``: CUDA tensors of layout ``lay``):
    WRITE 64 random blocks of ``src`` into 64 random blocks of ``dst`` with notification
    ``tag``; check them byte for byte and every other ``dst`` block still zero; READ them back
    into 64 other blocks of ``src`` and check those. Returns the notification."""
    import numpy as np
    import torch

    ra = a.register(src, lay)
    rb = b.register(dst, lay)
    peer = a.add_peer(b.descriptor())
    rng = np.random.default_rng(1)
    ids_a = rng.choice(lay.num_blocks, 64, replace=False)
    ids_b = rng.choice(lay.num_blocks, 64, replace=False)
    a.post(kvxfer.Op.WRITE, peer, ra, rb.id, local_blocks=ids_a, remote_blocks=ids_b, notify=tag).wait(30)
    note = b.wait_notification(tag, timeout=30)
    sv = src.view(lay.num_layers, lay.num_kv, lay.num_blocks, -1)
    dv = dst.view(lay.num_layers, lay.num_kv, lay.num_blocks, -1)
    ia, ib = torch.as_tensor(ids_a), torch.as_tensor(ids_b)
    assert torch.equal(sv[:, :, ia.to(src.device)].cpu(), dv[:, :, ib.to(dst.device)].cpu())
    untouched = torch.ones(lay.num_blocks, dtype=torch.bool)
    untouched[ib] = False
    assert int(dv[:, :, untouched.to(dst.device)].count_nonzero()) == 0
    # READ back into other blocks of the source.
    ids_c = np.setdiff1d(np.arange(lay.num_blocks), ids_a)[:64]
    a.post(kvxfer.Op.READ, peer, ra, rb.id, local_blocks=ids_c, remote_blocks=ids_b).wait(30)
    ic = torch.as_tensor(ids_c).to(src.device)
    assert torch.equal(sv[:, :, ic].cpu(), sv[:, :, ia.to(src.device)].cpu())
    return note
