"""Shared pieces of the P/D-Serve worker tests: the reference model and a small runner."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    """The seeded tiny model every ``model="tiny"`` worker loads (aggregated reference)."""
    import torch

    from kvxfer.models import Model
    from kvxfer.serve.runtime import tiny_model_config

    torch.set_num_threads(1)
    return Model(tiny_model_config(0))


def run(coro, timeout: float = 120.0):
    """Runs ``coro`` with a deadline: a hang fails the test instead of stalling the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
