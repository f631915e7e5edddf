"""In-memory registry: one process, for unit tests of the control plane."""

from __future__ import annotations

import itertools
import threading
import time

from .base import Entry, Event, Registry, RegistryError


class MemoryRegistry(Registry):
    url = "memory:"

    def __init__(self, history: int = 100_000) -> None:
        self._kv: dict[str, Entry] = {}
        self._log: list[Event] = []
        self._history = history
        self._rev = 0
        self._leases: dict[int, tuple[float, float]] = {}  # id -> (ttl, expires at, monotonic)
        self._ids = itertools.count(1)
        self._cv = threading.Condition()

    # all of these run with self._cv held
    def _change(self, type_: str, key: str, value: str, lease: int = 0) -> int:
        self._rev += 1
        if type_ == "put":
            self._kv[key] = Entry(key, value, self._rev, lease)
        else:
            self._kv.pop(key, None)
        self._log.append(Event(type_, key, value, self._rev))
        if len(self._log) > self._history:
            del self._log[: len(self._log) - self._history]
        self._cv.notify_all()
        return self._rev

    def _expire(self) -> None:
        now = time.monotonic()
        for lid, (_, until) in list(self._leases.items()):
            if until <= now:
                self._drop_lease(lid)

    def _drop_lease(self, lid: int) -> None:
        self._leases.pop(lid, None)
        for k in [k for k, e in self._kv.items() if e.lease == lid]:
            self._change("delete", k, "")

    def _check_lease(self, lease: int) -> None:
        if lease and lease not in self._leases:
            raise RegistryError(f"lease {lease} does not exist (expired or revoked)")

    def put(self, key: str, value: str, lease: int = 0) -> int:
        with self._cv:
            self._expire()
            self._check_lease(lease)
            return self._change("put", key, value, lease)

    def get(self, key: str) -> Entry | None:
        with self._cv:
            self._expire()
            return self._kv.get(key)

    def get_prefix(self, prefix: str) -> list[Entry]:
        with self._cv:
            self._expire()
            return [self._kv[k] for k in sorted(self._kv) if k.startswith(prefix)]

    def delete(self, key: str) -> bool:
        with self._cv:
            self._expire()
            if key not in self._kv:
                return False
            self._change("delete", key, "")
            return True

    def cas(self, key: str, expected: int, value: str, lease: int = 0) -> bool:
        with self._cv:
            self._expire()
            self._check_lease(lease)
            cur = self._kv.get(key)
            if (cur.mod_revision if cur else 0) != expected:
                return False
            self._change("put", key, value, lease)
            return True

    def grant(self, ttl_s: float) -> int:
        if ttl_s <= 0:
            raise RegistryError(f"lease ttl must be > 0, got {ttl_s}")
        with self._cv:
            lid = next(self._ids)
            self._leases[lid] = (ttl_s, time.monotonic() + ttl_s)
            return lid

    def keepalive(self, lease: int) -> bool:
        with self._cv:
            self._expire()
            if lease not in self._leases:
                return False
            ttl, _ = self._leases[lease]
            self._leases[lease] = (ttl, time.monotonic() + ttl)
            return True

    def revoke(self, lease: int) -> None:
        with self._cv:
            self._drop_lease(lease)

    def revision(self) -> int:
        with self._cv:
            return self._rev

    def events(self, prefix: str, after: int, timeout_s: float) -> tuple[list[Event], int]:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                self._expire()
                if self._log and after < self._log[0].revision - 1:
                    raise RegistryError(f"revision {after} was compacted (history {self._history})")
                evs = [e for e in self._log if e.revision > after and e.key.startswith(prefix)]
                left = deadline - time.monotonic()
                if evs or left <= 0:
                    return evs, max(after, self._rev)
                # wake at the next lease expiry too, so expiry events arrive on time
                nxt = min((u for _, u in self._leases.values()), default=deadline)
                self._cv.wait(max(0.001, min(left, nxt - time.monotonic())))
