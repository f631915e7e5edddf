"""Continuous batching over a paged KV pool: the decode loop shared by the decode worker and
the aggregated worker.

A request joins between two steps (the step after its KV arrived) and leaves as soon as it
stops; each step runs ``compute.decode_step(pool, seqs)`` for every running sequence on the
one compute thread. Events go to each request's ``events`` queue as protocol dicts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from . import protocol


@dataclass
class Running:
    """One request in (or about to join) the batch."""

    request_id: str
    seq: Any  # kvxfer.models.Sequence
    total_tokens: int  # max_tokens: tokens the request may produce in all, the first included
    produced: int  # tokens produced so far (1 after prefill)
    stop_ids: set[int]
    events: asyncio.Queue
    timings: dict[str, float] = field(default_factory=dict)
    cancelled: bool = False
    started: float = field(default_factory=time.monotonic)

    def blocks_needed(self, pool: Any) -> int:
        """Blocks this request will still take from the pool before it ends."""
        final = self.seq.length + (self.total_tokens - self.produced)
        return max(0, pool.blocks_for(final) - len(self.seq.block_table))


class DecodeBatcher:
    def __init__(
        self,
        compute: Any,
        pool: Any,
        executor: Executor,
        on_finish: Callable[[Running], None] | None = None,
    ) -> None:
        self.compute = compute
        self.pool = pool
        self.executor = executor
        self.on_finish = on_finish
        self.running: list[Running] = []
        self._joining: list[Running] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.steps = 0
        self.failed: str | None = None

    @property
    def active(self) -> int:
        return len(self.running) + len(self._joining)

    def future_blocks(self) -> int:
        return sum(r.blocks_needed(self.pool) for r in self.running + self._joining)

    def add(self, r: Running) -> None:
        self._joining.append(r)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def _finish(self, r: Running, event: dict) -> None:
        r.events.put_nowait(event)
        r.events.put_nowait(None)
        self.pool.free(r.seq.block_table)
        r.seq.block_table = []
        if self.on_finish is not None:
            self.on_finish(r)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._joining and not self.running:
                self._wake.clear()
                await self._wake.wait()
            self.running.extend(self._joining)
            self._joining.clear()
            for r in [r for r in self.running if r.cancelled]:
                self.running.remove(r)
                self._finish(r, protocol.error_event("canceled", "the caller went away"))
            if not self.running:
                continue
            batch = list(self.running)
            try:
                tokens = await loop.run_in_executor(
                    self.executor, self.compute.decode_step, self.pool, [r.seq for r in batch]
                )
            except Exception as e:  # a failed step ends its batch, not the worker
                for r in batch:
                    self.running.remove(r)
                    self._finish(r, protocol.error_event("internal", f"decode step failed: {e!r}"))
                continue
            self.steps += 1
            for r, tok in zip(batch, tokens, strict=True):
                r.events.put_nowait(protocol.token_event(r.produced, tok))
                r.produced += 1
                reason = "stop" if tok in r.stop_ids else "length" if r.produced >= r.total_tokens else None
                if reason is not None:
                    self.running.remove(r)
                    r.timings["decode_s"] = time.monotonic() - r.started
                    r.timings["decode_tokens"] = r.produced
                    self._finish(r, protocol.done_event(reason, r.timings))
