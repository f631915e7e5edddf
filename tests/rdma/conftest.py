"""RDMA tests: they need a real RDMA device (in CI: soft-RoCE rxe0 inside the QEMU guest that
tests/rdma/run_in_vm.sh starts). Without one every module skips, saying why; with one, an
ibverbs backend that cannot start is a failure, not a skip."""

from __future__ import annotations

import gc

import pytest
import rdma_helpers


def pytest_report_header(config):  # noqa: ARG001
    devs = rdma_helpers.rdma_devices()
    return [f"rdma devices: {', '.join(devs) if devs else 'none'}"]


@pytest.fixture(autouse=True)
def _collect_engines():
    """Engines, regions and peers hold verbs resources: drop them between tests."""
    yield
    gc.collect()
