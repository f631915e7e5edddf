"""Helpers for the registry tests: one fixture factory over the three backends."""

from __future__ import annotations

import shutil

import pytest

from kvxfer.serve.registry import open_registry
from kvxfer.serve.registry.server import EtcdServer

KINDS = ["memory", "sqlite", "etcd"]


def need_etcd() -> None:
    if shutil.which("etcd") is None:
        pytest.skip("etcd not installed (Debian: apt-get install etcd-server; scripts/setup.sh does it)")


def make_registry(kind: str, tmp_path, etcd_server: EtcdServer | None):
    if kind == "memory":
        return open_registry("memory:")
    if kind == "sqlite":
        return open_registry(f"sqlite:{tmp_path / 'registry.db'}")
    assert etcd_server is not None
    return open_registry(etcd_server.url)
