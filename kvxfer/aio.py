"""asyncio integration: ``await transfer``, ``await engine.notification(key)`` and
``async for note in engine.notifications_async()``.

One bridge per (engine, event loop): the engine's completion file descriptor (an eventfd
the core signals when a watched transfer ends or a notification arrives) is registered
with ``loop.add_reader``; its callback resolves the futures of finished transfers and
notification waiters. No thread per waiter, no polling thread. A one-second fallback check
runs while anything is pending, in case a wake-up was lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from typing import TYPE_CHECKING, Any

from . import _native
from .notify import Notification

if TYPE_CHECKING:
    from .engine import Engine
    from .transfer import Transfer

_FALLBACK_S = 1.0


class LoopBridge:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._native = engine._native
        self._loop = loop
        self._transfers: dict[int, tuple[Transfer, asyncio.Future]] = {}
        self._note_waiters: list[tuple[Hashable | None, asyncio.Future]] = []
        self._fd = self._native.completion_fd
        self._closed = False
        self._fallback: asyncio.TimerHandle | None = None
        loop.add_reader(self._fd, self._on_ready)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.remove_reader(self._fd)
        except (RuntimeError, ValueError, OSError):
            pass  # the loop is already closed

    def _arm_fallback(self) -> None:
        if self._fallback is None and (self._transfers or self._note_waiters):
            self._fallback = self._loop.call_later(_FALLBACK_S, self._on_fallback)

    def _on_fallback(self) -> None:
        self._fallback = None
        for tid, (t, fut) in list(self._transfers.items()):
            if t.done():
                self._settle(tid, t, fut)
        self._on_ready()

    def _settle(self, tid: int, t: Transfer, fut: asyncio.Future) -> None:
        self._transfers.pop(tid, None)
        if fut.done():
            return
        err = t.error
        if err is None:
            fut.set_result(t.state)
        else:
            fut.set_exception(err)

    def _on_ready(self) -> None:
        for tid in self._native.drain_completions():
            entry = self._transfers.get(tid)
            if entry is not None and entry[0].done():
                self._settle(tid, *entry)
        if self._note_waiters:
            self._engine._mailbox.drain()
            still = []
            for key, fut in self._note_waiters:
                if fut.done():
                    continue
                got = self._engine._mailbox.take(1, key)
                if got:
                    fut.set_result(got[0])
                else:
                    still.append((key, fut))
            self._note_waiters = still
        self._arm_fallback()

    async def wait_transfer(self, t: Transfer) -> Any:
        fut = self._loop.create_future()
        self._transfers[t.id] = (t, fut)
        _native.watch(self._native, t._t)
        if t.done():
            self._settle(t.id, t, fut)
        self._arm_fallback()
        try:
            return await fut
        finally:
            self._transfers.pop(t.id, None)

    async def wait_notification(self, key: Hashable | None) -> Notification:
        got = self._engine._mailbox.take(1, key)
        if got:
            return got[0]
        fut = self._loop.create_future()
        self._note_waiters.append((key, fut))
        self._arm_fallback()
        self._on_ready()  # something may have arrived between take() and now
        return await fut

    async def iterate(self, key: Hashable | None) -> AsyncIterator[Notification]:
        while True:
            yield await self.wait_notification(key)
