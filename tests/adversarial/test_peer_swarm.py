"""Threads must not grow with peers: 150 real tcp engines in 3 processes connect to one
target engine, each moves one verified block with a notification and stays connected; the
target's thread count stays near its idle count (it was one thread per connected peer),
and a fresh peer still gets through. measure_peers.py is the same run at 1000 peers."""

from __future__ import annotations

import os

import pytest
from measure_peers import swarm

import kvxfer

pytestmark = [pytest.mark.multiprocess]

PEERS = 150
# Idle engine threads, plus the worker pool, which grows only with connections busy at the
# same time (all 150 peers may write at once here), never with connected ones.
GROWTH_BOUND = 2 * (os.cpu_count() or 2) + 12


@pytest.mark.skipif(
    not any(b.name == "tcp" and b.available for b in kvxfer.list_backends()),
    reason="this build has no tcp backend",
)
def test_150_engine_peers_do_not_grow_the_targets_threads():
    figures = swarm(PEERS, processes=3)
    grown = figures["target_threads_with_peers"] - figures["target_threads_idle"]
    assert grown <= GROWTH_BOUND, figures
    assert figures["target_threads_peak"] - figures["target_threads_idle"] <= GROWTH_BOUND, figures
    # The target's memory per connected peer stays small (kernel socket buffers are not in RSS).
    assert figures["target_rss_per_peer_kib"] < 256, figures
