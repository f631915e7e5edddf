"""Registries for P/D-Serve's control plane (see :mod:`.base` for the contract).

``open_registry(spec)``: ``"memory:"`` (this process only), ``"sqlite:PATH"`` (the default
kind: one file shared by the processes of a host) or ``"etcd://HOST:PORT"``.
"""

from __future__ import annotations

from .base import Entry, Event, Registry, RegistryError, Watch


def open_registry(spec: str) -> Registry:
    if spec == "memory:":
        from .memory import MemoryRegistry

        return MemoryRegistry()
    if spec.startswith("sqlite:"):
        from .sqlite import SqliteRegistry

        if not spec[len("sqlite:") :]:
            raise RegistryError("sqlite: needs a file path, e.g. sqlite:/tmp/kvxfer.db")
        return SqliteRegistry(spec[len("sqlite:") :])
    if spec.startswith("etcd://"):
        from .etcd import EtcdRegistry

        return EtcdRegistry(spec)
    raise RegistryError(f"unknown registry {spec!r}; expected memory:, sqlite:PATH or etcd://HOST:PORT")


__all__ = ["Entry", "Event", "Registry", "RegistryError", "Watch", "open_registry"]
