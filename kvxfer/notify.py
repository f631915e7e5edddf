"""Notifications, keyed: every notification has a key (by default its whole payload,
for example a request id), and callers wait for the key they care about, from threads or
from asyncio, without taking each other's notifications.

The native engine keeps one queue; :class:`Mailbox` drains it into per-key queues under
one lock. Notifications nobody waits for by key stay available to ``take()``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

from .errors import WaitTimeoutError


class Notification(NamedTuple):
    """A message a peer attached to a transfer (or sent alone), delivered after its data."""

    peer: str
    peer_instance: int
    payload: bytes


KeyFn = Callable[[Notification], Hashable]


def payload_key(note: Notification) -> Hashable:
    return note.payload


class Mailbox:
    def __init__(self, native: Any, key_fn: KeyFn = payload_key) -> None:
        self._native = native
        self._key_fn = key_fn
        self._lock = threading.Lock()
        self._order: deque[Notification] = deque()  # arrival order, every undelivered note
        self._listeners: list[Callable[[], None]] = []

    # The mailbox holds at most this many undelivered notifications; beyond it, they stay
    # in the native engine's queue, whose own bound makes senders see BackPressureError.
    MAX_HELD = 65536

    def drain(self) -> int:
        """Moves what the native engine received into the mailbox; returns how many."""
        room = self.MAX_HELD - len(self._order)
        if room <= 0:
            return 0
        rows = self._native.notifications(room)
        if not rows:
            return 0
        with self._lock:
            for row in rows:
                self._order.append(Notification(*row))
            listeners = list(self._listeners)
        for fn in listeners:
            fn()
        return len(rows)

    def take(self, max: int = 0, key: Hashable | None = None) -> list[Notification]:  # noqa: A002
        """Removes and returns queued notifications (those with ``key`` if given)."""
        self.drain()
        with self._lock:
            if key is None:
                n = len(self._order) if max <= 0 else min(max, len(self._order))
                return [self._order.popleft() for _ in range(n)]
            out: list[Notification] = []
            keep: deque[Notification] = deque()
            for note in self._order:
                if self._key_fn(note) == key and (max <= 0 or len(out) < max):
                    out.append(note)
                else:
                    keep.append(note)
            self._order = keep
            return out

    def wait(self, key: Hashable | None, timeout: float) -> Notification:
        """The next notification with ``key`` (any, if None); raises WaitTimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.take(1, key)
            if got:
                return got[0]
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeoutError(f"no notification with key {key!r} within {timeout} s")
            # The native wait returns as soon as anything arrives; another waiter may drain
            # it first, so sleep in short slices.
            self._native.wait_notification(min(left, 0.005) if key is not None else left)

    def add_listener(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)
