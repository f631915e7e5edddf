"""The three KV transfer paths (kvxfer.serve.kv_transfer) between two real processes, byte
for byte, and the transfer experiment's own verification."""

from __future__ import annotations

import numpy as np
import pytest

from kvxfer.experiments import transfer
from kvxfer.serve import kv_transfer as kt

pytestmark = [pytest.mark.multiprocess]


def test_geometry_offsets_follow_the_layer_major_layout():
    g = kt.KvGeometry(num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=4)
    assert g.token_bytes == 768 and g.bytes_per_token == 30 * 2 * 768
    assert g.layer_extent(1000, 32, 0) == (1000, 2 * 32 * 768)
    assert g.layer_extent(1000, 32, 5) == (1000 + 5 * 2 * 32 * 768, 2 * 32 * 768)
    assert kt.padded_tokens(33, 16) == 48 and kt.padded_tokens(32, 16) == 32
    lay = g.paged_layout(10, 16)
    assert (lay.num_layers, lay.num_kv, lay.num_blocks, lay.block_bytes) == (30, 2, 10, 16 * 768)


@pytest.mark.parametrize("backend", ["shm", "tcp"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_three_paths_move_exact_bytes_between_processes(backend, per_layer):
    """run() raises if any path's received bytes differ from the sender's (checked per path)."""
    args = transfer.parse(
        ["--backend", backend, "--tokens", "40", "200", "--block-tokens", "16", "32", "--repeats", "1",
         "--layers", "4", "--kv-heads", "2", "--head-dim", "16"] + (["--per-layer"] if per_layer else [])
    )  # fmt: skip
    rows = transfer.run(args, lambda row: None)
    modes = [r for r in rows if "mode" in r]
    assert len(modes) == 2 * 2 * 3 and all(r["verified"] and r["seconds"] > 0 for r in modes)
    for r in modes:
        nb = kt.padded_tokens(r["tokens"], r["block_tokens"]) // r["block_tokens"]
        want = {"block-free": 4 if per_layer else 1, "paged-coalesced": 1, "block-by-block": nb}[r["mode"]]
        assert r["transfers"] == want, r


def test_verification_detects_a_wrong_byte():
    """The experiment's checks are not vacuous: one flipped bit is found."""
    n_layers, n_blocks, tw, bt, tokens = 2, 8, 3, 4, 8  # tw: uint32 words per token and plane
    pool = np.zeros((n_layers, 2, n_blocks, bt * tw), np.uint32)
    ids = np.array([5, 2])
    plane = tokens * tw
    for layer in range(n_layers):
        for kv in range(2):
            base = (layer * 2 + kv) * plane
            words = np.arange(base, base + plane, dtype=np.uint32) ^ transfer.SALT_CONTIG
            pool[layer, kv, ids] = words.reshape(2, bt * tw)
    assert transfer._check_block_free(pool, ids, tokens, tw)
    pool[1, 1, 2, 3] ^= 1
    assert not transfer._check_block_free(pool, ids, tokens, tw)


def test_contiguous_placement_moves_exact_bytes_in_every_mode():
    args = transfer.parse(
        ["--tokens", "256", "--block-tokens", "16", "--repeats", "1", "--placement", "contiguous",
         "--layers", "4", "--kv-heads", "2", "--head-dim", "16"]
    )  # fmt: skip
    rows = {r["mode"]: r for r in transfer.run(args, lambda row: None) if "mode" in r}
    assert all(r["verified"] and r["placement"] == "contiguous" for r in rows.values())
    assert rows["block-free"]["transfers"] == 1 and rows["block-by-block"]["transfers"] == 16
