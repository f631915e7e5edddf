"""Baseline (a): aggregated serving. One worker does prefill and decode with the same model
and one paged pool, behind the same ``POST /v1/prefill`` endpoint as a prefill worker, so the
gateway can front it unchanged.

``b_d`` slots: a request holds one from admission to its last token (the batch). Policies as
the prefill worker's: ``reject-retry`` answers 429 at once when all slots are taken,
``local-queue`` waits in FIFO order. A new prompt's prefill runs on the same compute thread
as the decode steps, between two of them (so prefills stall the running batch, which is the
interference disaggregation removes [paper, section 1]). The prompt's KV goes from the
prefill buffer into the pool by ``PagedKVPool.scatter_from_contiguous`` (a local copy).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import torch
from aiohttp import web

import kvxfer

from . import kv_transfer as kt
from . import protocol
from .batcher import DecodeBatcher, Running
from .config import POLICIES, WorkerConfig
from .decode import make_pool
from .runtime import PrefixCache
from .worker_base import WorkerBase, json_error, open_stream, read_message, send_event


class AggregatedWorker(WorkerBase):
    role = "aggregated"

    def __init__(self, cfg: WorkerConfig, compute: Any) -> None:
        super().__init__(cfg, compute)
        bt = cfg.block_tokens
        per_req = -(-(cfg.max_prompt_tokens + cfg.max_new_tokens) // bt)
        self.pool = make_pool(compute, cfg.num_blocks or cfg.b_d * per_req + 1, bt)
        t_max = kt.padded_tokens(cfg.max_prompt_tokens, bt)
        self.buf_bytes = compute.geometry.contiguous_bytes(t_max)
        self.scratch = torch.empty(self.buf_bytes, dtype=torch.uint8)  # one prefill at a time
        self.free = cfg.b_d
        self.waiters: deque[asyncio.Future] = deque()
        self.prefix = PrefixCache(cfg.prefix_min_tokens, enabled=cfg.prefix_cache)
        self.accepted = self.rejected = self.deadline_misses = 0
        self.batcher: DecodeBatcher | None = None
        self.app.router.add_post("/v1/prefill", self._prefill)
        self.app.on_startup.append(self._startup)

    async def _startup(self, _app: web.Application) -> None:
        self.batcher = DecodeBatcher(self.compute, self.pool, self.compute_pool)
        self.batcher.start()

    async def _cleanup(self, app: web.Application) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        await super()._cleanup(app)

    def _release(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1

    async def _acquire_queued(self) -> None:
        if self.free and not self.waiters:
            self.free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()
            raise

    async def _prefill(self, request: web.Request) -> web.StreamResponse:
        arrived = time.time()
        policy = request.headers.get("X-Kvxfer-Policy", self.cfg.policy)
        if policy not in POLICIES:
            return json_error(400, "policy", f"unknown policy {policy!r}")
        if policy == "reject-retry" and not self.free:
            self.rejected += 1
            return json_error(429, "busy")
        body = await read_message(request)
        try:
            req = protocol.PrefillRequest.from_json(body)
        except protocol.ProtocolError as e:
            return json_error(400, "bad_request", str(e))
        n = len(req.prompt_token_ids)
        if not 1 <= n <= self.cfg.max_prompt_tokens or not 1 <= req.max_tokens <= self.cfg.max_new_tokens + 1:
            return json_error(
                400, "bad_request", f"prompt of {n} tokens or max_tokens {req.max_tokens} out of range"
            )
        if policy == "reject-retry":
            if not self.free:
                self.rejected += 1
                return json_error(429, "busy")
            self.free -= 1
        else:
            await self._acquire_queued()
        self.accepted += 1
        try:
            resp = await open_stream(request)
            self.open_streams += 1
            try:
                await self._run(req, resp, arrived)
            finally:
                self.open_streams -= 1
        finally:
            self._release()
        return resp

    async def _run(self, req: protocol.PrefillRequest, resp: web.StreamResponse, arrived: float) -> None:
        from kvxfer.models import Sequence

        t_admit = time.time()
        if t_admit > req.deadline:
            self.deadline_misses += 1
            await send_event(resp, protocol.error_event("deadline", "deadline passed before prefill"))
            return
        ids = req.prompt_token_ids
        loop = asyncio.get_running_loop()
        need = self.pool.blocks_for(len(ids) + req.max_tokens)
        while self.pool.free_blocks - self.batcher.future_blocks() < need:
            await asyncio.sleep(0.005)  # the pool is sized for b_d requests, so this wait is short

        def prefill_and_scatter():
            prefix_kv, plen = self.prefix.lookup(req.scenario, ids)
            out = self.compute.prefill(
                req.request_id, ids, self.scratch, self.cfg.block_tokens, prefix_kv, plen
            )
            self.prefix.update(req.scenario, ids, out.kv if self.compute.mode == "real" else None)
            blocks = self.pool.allocate(len(ids))
            self.pool.scatter_from_contiguous(out.kv, blocks, len(ids))
            return out, blocks

        try:
            out, blocks = await loop.run_in_executor(self.compute_pool, prefill_and_scatter)
        except kvxfer.KvxferError as e:
            await send_event(resp, protocol.error_event("prefill_failed", f"{type(e).__name__}: {e}"))
            return
        t_done = time.time()
        timings = {
            "prefill_wait_s": t_admit - arrived,
            "prefill_s": t_done - t_admit,
            "prefix_len": out.prefix_len,
        }
        if t_done > req.deadline:
            self.deadline_misses += 1
            self.pool.free(blocks)
            await send_event(resp, protocol.error_event("deadline", "deadline passed during prefill"))
            return
        await send_event(resp, protocol.token_event(0, out.first_token))
        if req.max_tokens == 1 or out.first_token in req.stop_token_ids:
            self.pool.free(blocks)
            reason = "stop" if out.first_token in req.stop_token_ids else "length"
            await send_event(resp, protocol.done_event(reason, timings))
            return
        r = Running(
            request_id=req.request_id,
            seq=Sequence(req.request_id, blocks, len(ids), out.first_token),
            total_tokens=req.max_tokens,
            produced=1,
            stop_ids=set(req.stop_token_ids),
            events=asyncio.Queue(),
            timings=timings,
        )
        self.batcher.add(r)
        try:
            while True:
                ev = await r.events.get()
                if ev is None:
                    break
                await send_event(resp, ev)
        except (ConnectionResetError, asyncio.CancelledError):
            r.cancelled = True
            raise

    def status(self) -> dict[str, Any]:
        st = protocol.worker_status(
            "aggregated",
            self.name,
            self.cfg.b_d,
            self.cfg.b_d - self.free,
            len(self.waiters),
            self.open_streams,
        )
        st.update(self.prefix.stats())
        st.update(
            accepted=self.accepted,
            rejected=self.rejected,
            deadline_misses=self.deadline_misses,
            steps=self.batcher.steps if self.batcher else 0,
        )
        return st
