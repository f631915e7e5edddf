"""The decode worker: a paged KV pool registered with kvxfer as ONE region, a small pending
queue, asynchronous retrieval into freed slots, continuous batching.

``POST /v1/decode`` (:class:`protocol.DecodeRequest`, the KV metadata of one range in ONE
message) answers 429 at once when ``b_d`` requests run or are being retrieved and the pending
queue (``pending`` entries) is full; otherwise it streams NDJSON token events (index 1 on:
index 0 came from the prefill) and one done or error event.

Retrieval [paper, section 3.5 "asynchronous retrieval"]: when a slot is free (a running
request finished), the oldest pending request's KV is pulled with kvxfer from the prefill
(:mod:`kvxfer.serve.kv_transfer`, mode chosen by the request's ``kv.mode``), several
retrievals may run at once, and the request joins the batch at the next step. Once its
bytes are here the decode tells the prefill (kvxfer notification ``kvx-released:<id>``) so
the prefill frees its slot. A request still pending at its ``deadline`` ends with an error
event "deadline" [inferred: the decode's deadline bounds the wait for retrieval only].
Pool blocks are reserved for the request's whole length before retrieval starts, so a step
never runs out of blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web

import kvxfer

from . import kv_transfer as kt
from . import protocol
from .batcher import DecodeBatcher, Running
from .config import WorkerConfig
from .runtime import shared_tensor
from .worker_base import WorkerBase, json_error, open_stream, read_message, send_event


@dataclass
class _Pending:
    req: protocol.DecodeRequest
    events: asyncio.Queue
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    running: Running | None = None


def make_pool(compute: Any, num_blocks: int, block_tokens: int, device: str = "cpu"):
    """A PagedKVPool whose tensor is :func:`shared_tensor` memory (memfd on the host, the shm
    fast path; device memory on a GPU)."""
    from kvxfer.models import PagedKVPool

    cfg, dtype = compute.config, compute.dtype
    buf = shared_tensor(PagedKVPool.nbytes_for(cfg, num_blocks, block_tokens, dtype), device)
    pool = PagedKVPool(cfg, num_blocks, block_tokens, device=device, dtype=dtype, buffer=buf)
    return pool


class DecodeWorker(WorkerBase):
    role = "decode"

    def __init__(self, cfg: WorkerConfig, compute: Any) -> None:
        super().__init__(cfg, compute)
        bt = cfg.block_tokens
        per_req = -(-(cfg.max_prompt_tokens + cfg.max_new_tokens) // bt)
        nblocks = cfg.num_blocks or cfg.b_d * per_req + 1
        self.pool = make_pool(compute, nblocks, bt, cfg.device)
        self.region = self.engine.register(self.pool.tensor, self.pool.layout())
        self.pending: deque[_Pending] = deque()
        self.retrieving = 0
        self.reserved = 0  # blocks promised to requests being retrieved
        self.xfer_pool = ThreadPoolExecutor(cfg.b_d, thread_name_prefix="retrieve")
        self.batcher: DecodeBatcher | None = None
        self.accepted = self.rejected = self.transfer_failures = 0
        self.transfer_s: deque[float] = deque(maxlen=1000)  # recent retrieval times (s)
        self.app.router.add_post("/v1/decode", self._decode)
        self.app.on_startup.append(self._startup)

    async def _startup(self, _app: web.Application) -> None:
        self.batcher = DecodeBatcher(
            self.compute, self.pool, self.compute_pool, on_finish=lambda r: self._kick()
        )
        self.batcher.start()

    async def _cleanup(self, app: web.Application) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self.xfer_pool.shutdown(wait=False, cancel_futures=True)
        await super()._cleanup(app)

    # -- admission -----------------------------------------------------------------------------
    def _load(self) -> int:
        assert self.batcher is not None
        return self.batcher.active + self.retrieving

    async def _decode(self, request: web.Request) -> web.StreamResponse:
        if self._load() >= self.cfg.b_d and len(self.pending) >= self.cfg.pending:
            self.rejected += 1
            return json_error(429, "busy")
        body = await read_message(request)
        try:
            req = protocol.DecodeRequest.from_json(body)
            self._validate(req)
        except (protocol.ProtocolError, kvxfer.KvxferError, ValueError) as e:
            return json_error(400, "bad_request", str(e))
        if self._load() >= self.cfg.b_d and len(self.pending) >= self.cfg.pending:
            self.rejected += 1
            return json_error(429, "busy")
        self.accepted += 1
        p = _Pending(req, asyncio.Queue())
        self.pending.append(p)
        self._kick()
        resp = await open_stream(request)
        self.open_streams += 1
        try:
            while True:
                ev = await p.events.get()
                if ev is None:
                    break
                await send_event(resp, ev)
        except (ConnectionResetError, asyncio.CancelledError):
            p.cancelled = True
            if p.running is not None:
                p.running.cancelled = True
            raise
        finally:
            self.open_streams -= 1
        return resp

    def _validate(self, req: protocol.DecodeRequest) -> None:
        if req.kv.mode not in kt.MODES:
            raise ValueError(f"unknown kv mode {req.kv.mode!r}")
        if req.kv.tokens != req.prompt_len or req.prompt_len < 1:
            raise ValueError(f"kv.tokens {req.kv.tokens} != prompt_len {req.prompt_len}")
        if req.prompt_len > self.cfg.max_prompt_tokens or req.max_tokens > self.cfg.max_new_tokens + 1:
            raise ValueError(
                f"prompt {req.prompt_len} / max_tokens {req.max_tokens} over this decode's "
                f"{self.cfg.max_prompt_tokens} / {self.cfg.max_new_tokens + 1}"
            )
        self.engine.peer(req.kv.prefill)  # NotFoundError if the prefill never introduced itself

    # -- retrieval -----------------------------------------------------------------------------
    def _kick(self) -> None:
        """Start retrievals while a batch slot is free and the pool can hold the request."""
        assert self.batcher is not None
        while self.pending and self._load() < self.cfg.b_d:
            p = self.pending[0]
            if p.cancelled:
                self.pending.popleft()
                self._release_remote(p.req)
                continue
            if time.time() > p.req.deadline:
                self.pending.popleft()
                self._fail(p, "deadline", "still pending at its deadline")
                continue
            need = self.pool.blocks_for(p.req.prompt_len + p.req.max_tokens)
            if self.pool.free_blocks - self.batcher.future_blocks() - self.reserved < need:
                break  # wait for a running request to end
            self.pending.popleft()
            ids = self.pool.allocate(p.req.prompt_len)
            self.reserved += need - len(ids)
            self.retrieving += 1
            asyncio.get_running_loop().create_task(self._retrieve(p, ids, need - len(ids)))
        if self.pending:
            self._arm_deadline_check()

    def _arm_deadline_check(self) -> None:
        loop = asyncio.get_running_loop()
        if not getattr(self, "_deadline_armed", False):
            self._deadline_armed = True

            def fire() -> None:
                self._deadline_armed = False
                self._kick()

            loop.call_later(0.05, fire)

    def _pull(self, req: protocol.DecodeRequest, ids: list[int]) -> float:
        """Runs in a retrieval thread: move the KV, then release the prefill's slot."""
        t0 = time.monotonic()
        kv = req.kv
        peer = self.engine.peer(kv.prefill)
        local_ids = np.asarray(ids, dtype=np.int64)
        timeout = max(1.0, req.deadline - time.time() + 30.0)
        try:
            if kv.mode == "block-free":
                tp = kt.padded_tokens(kv.tokens, self.pool.block_tokens)
                if kv.length != self.compute.geometry.contiguous_bytes(tp):
                    raise kt.KvTransferError(f"kv.length {kv.length} != {tp} padded tokens of this model")
                kt.pull_block_free(
                    self.engine, peer, self.region, kv.region, kv.offset, tp, local_ids,
                    self.compute.geometry, per_layer=self.cfg.per_layer, timeout=timeout,
                )  # fmt: skip
            elif kv.mode == "paged-coalesced":
                kt.pull_paged_coalesced(
                    self.engine,
                    peer,
                    self.region,
                    kv.region,
                    local_ids,
                    np.asarray(kv.blocks),
                    timeout=timeout,
                )
            else:
                kt.pull_block_by_block(
                    self.engine, peer, self.router, self.region, kv.region, local_ids,
                    np.asarray(kv.blocks), req.request_id, timeout=timeout,
                )  # fmt: skip
        finally:
            self._release_remote(req)
        return time.monotonic() - t0

    def _release_remote(self, req: protocol.DecodeRequest) -> None:
        try:
            self.engine.notify(self.engine.peer(req.kv.prefill), kt.RELEASED + b":" + req.request_id.encode())
        except kvxfer.KvxferError:
            pass  # the prefill also frees the slot when our stream to it ends

    async def _retrieve(self, p: _Pending, ids: list[int], reserved: int) -> None:
        from kvxfer.models import Sequence

        loop = asyncio.get_running_loop()
        req = p.req
        try:
            seconds = await loop.run_in_executor(self.xfer_pool, self._pull, req, ids)
            ok = self.compute.check_kv(req.request_id, self.pool, ids, req.prompt_len)
            if not ok:
                raise kt.KvTransferError("received KV bytes differ from what the prefill wrote")
        except Exception as e:
            self.transfer_failures += 1
            self.pool.free(ids)
            self._fail(p, "transfer_failed", f"{type(e).__name__}: {e}")
            return
        finally:
            self.retrieving -= 1
            self.reserved -= reserved
        self.transfer_s.append(seconds)
        seq = Sequence(req.request_id, list(ids), req.prompt_len, req.first_token)
        r = Running(
            request_id=req.request_id,
            seq=seq,
            total_tokens=req.max_tokens,
            produced=1,
            stop_ids=set(req.stop_token_ids),
            events=p.events,
            timings={"pending_s": time.monotonic() - p.arrived - seconds, "transfer_s": seconds},
            cancelled=p.cancelled,
        )
        p.running = r
        assert self.batcher is not None
        self.batcher.add(r)
        self._kick()

    def _fail(self, p: _Pending, code: str, message: str) -> None:
        self._release_remote(p.req)
        p.events.put_nowait(protocol.error_event(code, message))
        p.events.put_nowait(None)

    def status(self) -> dict[str, Any]:
        assert self.batcher is not None
        st = protocol.worker_status(
            "decode", self.name, self.cfg.b_d, self._load(), len(self.pending), self.open_streams
        )
        ts = sorted(self.transfer_s)
        st.update(
            running=len(self.batcher.running),
            retrieving=self.retrieving,
            pool_blocks=self.pool.num_blocks,
            free_blocks=self.pool.free_blocks,
            accepted=self.accepted,
            rejected=self.rejected,
            transfer_failures=self.transfer_failures,
            steps=self.batcher.steps,
            transfer_p50_s=ts[len(ts) // 2] if ts else None,
        )
        return st
