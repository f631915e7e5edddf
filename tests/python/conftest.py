"""Shared fixtures: an in-process engine pair over every backend that can run here."""

from __future__ import annotations

import pytest
from kvxfer_testlib import IN_PROCESS, Pair, dense_layout

import kvxfer


def pytest_report_header(config):
    rows = [f"{b.name}={'yes' if b.available else 'no (' + b.reason + ')'}" for b in kvxfer.list_backends()]
    return "kvxfer backends: " + ", ".join(rows)


@pytest.fixture(params=IN_PROCESS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def pair(backend):
    p = Pair(backend, dense_layout())
    yield p
    p.close()
