"""The registry interface: the ZooKeeper stand-in of P/D-Serve's control plane.

A registry is a small consistent key-value store with the five operations the control plane
needs; every backend implements the same contract (tested by one suite over all of them):

* ``put(key, value, lease=0) -> revision``; ``get(key) -> Entry | None``;
  ``get_prefix(prefix) -> list[Entry]`` (sorted by key); ``delete(key) -> bool``.
* ``cas(key, expected, value, lease=0) -> bool``: compare-and-swap on the key's modification
  revision; ``expected=0`` means "the key must not exist" (create-if-absent).
* leases: ``grant(ttl_s) -> lease id``; ``keepalive(lease) -> bool`` (False once expired);
  ``revoke(lease)``. Keys put with a lease are deleted, with a ``delete`` event, when it expires.
* watch: ``events(prefix, after, timeout_s) -> (events, revision)`` returns the changes under
  ``prefix`` with revision > ``after``, waiting up to ``timeout_s`` for the first one; the
  returned revision is the one to pass next. :class:`Watch` runs that loop in a thread.

Keys and values are ``str`` (the control plane stores JSON). Revisions are one global counter
per store, increasing with every change, as in etcd. Every call that waits has a deadline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ServeError


class RegistryError(ServeError):
    """A registry operation failed (store unreachable, bad address, unknown lease...)."""

    code = "SERVE_REGISTRY"


@dataclass(frozen=True)
class Entry:
    key: str
    value: str
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Event:
    type: str  # "put" | "delete"
    key: str
    value: str  # "" for a delete
    revision: int


class Registry:
    """Abstract base: see the module docstring for the contract."""

    url = ""

    def put(self, key: str, value: str, lease: int = 0) -> int:
        raise NotImplementedError

    def get(self, key: str) -> Entry | None:
        raise NotImplementedError

    def get_prefix(self, prefix: str) -> list[Entry]:
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        raise NotImplementedError

    def cas(self, key: str, expected: int, value: str, lease: int = 0) -> bool:
        raise NotImplementedError

    def grant(self, ttl_s: float) -> int:
        raise NotImplementedError

    def keepalive(self, lease: int) -> bool:
        raise NotImplementedError

    def revoke(self, lease: int) -> None:
        raise NotImplementedError

    def revision(self) -> int:
        raise NotImplementedError

    def events(self, prefix: str, after: int, timeout_s: float) -> tuple[list[Event], int]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Watch:
    """Calls ``on_events(events)`` from a thread for every change under ``prefix`` after
    revision ``after`` (default: now), until :meth:`stop`. A failing registry call is retried
    after ``poll_s``; the exception is kept in ``last_error``."""

    def __init__(
        self,
        registry: Registry,
        prefix: str,
        on_events: Callable[[list[Event]], None],
        after: int | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self.registry = registry
        self.prefix = prefix
        self.on_events = on_events
        self.after = registry.revision() if after is None else after
        self.poll_s = poll_s
        self.last_error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch {prefix}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                evs, self.after = self.registry.events(self.prefix, self.after, self.poll_s)
            except Exception as e:  # noqa: BLE001 - a watch survives a transient store error
                self.last_error = e
                self._stop.wait(self.poll_s)
                continue
            if evs and not self._stop.is_set():
                self.on_events(evs)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
