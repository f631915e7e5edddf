"""The prefill worker: ``b_p`` slots, block-free sender buffers, first token at once, the KV
handed to a decode, the decode's tokens relayed.

Admission [paper, P/D-Serve section 3.3]: policy ``reject-retry`` has NO local queue: with
every slot taken, ``POST /v1/prefill`` answers 429 before reading the body. Policy
``local-queue`` (the paper's first commercial version, the baseline) accepts always and
waits for a slot in FIFO order. The request header ``X-Kvxfer-Policy`` (set by the gateway)
chooses per request; the worker's ``policy`` is the default.

A slot is held from admission until the prompt's KV has left [paper]: the decode's
notification ``kvx-released:<id>`` (sent once its kvxfer READ ended), or the end of the
decode's stream, whichever comes first.

Sender buffers [paper, section 3.5]: ``b_p`` contiguous buffers, each sized for
``max_prompt_tokens`` (padded to whole blocks), reserved at start in ONE memfd allocation
registered ONCE with kvxfer. A prompt's K/V go layer-major into its slot's buffer
(``[L][K/V][T_pad][H][D]``); the DecodeRequest names (region, offset, length). For the
paged baselines the prefill also keeps a paged pool and scatters the prompt's KV into it.

Prefix reuse [paper]: a per-scenario cache of the setting part's K/V
(:class:`runtime.PrefixCache`), hit rate in ``/v1/status``.

Decode choice [inferred]: the decode with the fewest streams this prefill holds open to it;
on 429 the next one; after a full round, a pause of 5 ms, until ``decode_wait_s``. Timeouts
are checked before and after prefill execution [paper]; a request past its deadline ends
with an error event "deadline".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any

import aiohttp
from aiohttp import web

import kvxfer

from . import kv_transfer as kt
from . import protocol
from .config import POLICIES, WorkerConfig
from .decode import make_pool
from .runtime import PrefixCache, shared_tensor
from .worker_base import WorkerBase, json_error, open_stream, read_message, send_event


class PrefillWorker(WorkerBase):
    role = "prefill"

    def __init__(self, cfg: WorkerConfig, compute: Any) -> None:
        super().__init__(cfg, compute)
        geom = compute.geometry
        self.t_max = kt.padded_tokens(cfg.max_prompt_tokens, cfg.block_tokens)
        self.buf_bytes = geom.contiguous_bytes(self.t_max)
        self.buffers = shared_tensor(cfg.b_p * self.buf_bytes, cfg.device)
        self.buf_region = self.engine.register(self.buffers)
        self.paged = None
        if cfg.transfer_mode != "block-free":
            self.paged = make_pool(
                compute, cfg.b_p * (self.t_max // cfg.block_tokens) + 1, cfg.block_tokens, cfg.device
            )
            self.paged_region = self.engine.register(self.paged.tensor, self.paged.layout())
            kt.answer_block_acks(self.router, self.engine)
        self.router.on(kt.RELEASED, self._on_released)
        self.free: deque[int] = deque(range(cfg.b_p))
        self.waiters: deque[asyncio.Future] = deque()  # local-queue policy: FIFO of slot waiters
        self.held: dict[str, tuple[int, list[int]]] = {}  # request id -> (slot, paged blocks)
        self.decodes: dict[str, dict[str, Any]] = {}  # kvxfer name -> {"url", "open", "down_until"}
        self.prefix = PrefixCache(cfg.prefix_min_tokens, enabled=cfg.prefix_cache)
        self.accepted = self.rejected = self.deadline_misses = 0
        self.reject_s: deque[float] = deque(maxlen=10000)  # handler time of each 429 (s)
        # (tokens computed, seconds, end wall time) of each prefill, for load experiments
        self.compute_s: deque[tuple[int, float, float]] = deque(maxlen=10000)
        self.session: aiohttp.ClientSession | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.app.router.add_post("/v1/prefill", self._prefill)
        self.app.router.add_get("/v1/kvxfer/prefill-times", self._compute_times)
        self.app.on_startup.append(self._startup)

    async def _startup(self, _app: web.Application) -> None:
        self.loop = asyncio.get_running_loop()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=self.cfg.stream_idle_s),
        )

    async def _cleanup(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()
        await super()._cleanup(app)

    def on_peer(self, name: str, info: dict[str, Any]) -> None:
        if info.get("role") == "decode" and info.get("url"):
            self.decodes[name] = {"url": info["url"].rstrip("/"), "open": 0, "down_until": 0.0}

    def on_peer_gone(self, name: str) -> None:
        # streams already open to it keep their entry object; no new request picks it
        self.decodes.pop(name, None)

    # -- slots ---------------------------------------------------------------------------------
    def _on_released(self, note: kvxfer.Notification) -> None:
        rid = note.payload.split(b":", 1)[1].decode()
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._release, rid)

    def _release(self, rid: str) -> None:
        held = self.held.pop(rid, None)
        if held is None:
            return
        slot, blocks = held
        if blocks and self.paged is not None:
            self.paged.free(blocks)
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(slot)
                return
        self.free.append(slot)

    async def _acquire_queued(self) -> int:
        if self.free and not self.waiters:
            return self.free.popleft()
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._give_back(fut.result())
            raise

    def _give_back(self, slot: int) -> None:
        self.held[f"__slot{slot}"] = (slot, [])
        self._release(f"__slot{slot}")

    # -- the request ---------------------------------------------------------------------------
    async def _prefill(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        arrived = time.time()
        policy = request.headers.get("X-Kvxfer-Policy", self.cfg.policy)
        if policy not in POLICIES:
            return json_error(400, "policy", f"unknown policy {policy!r}")
        if policy == "reject-retry" and not self.free:
            self.rejected += 1
            resp = json_error(429, "busy")  # decided before the body is read
            self.reject_s.append(time.perf_counter() - t0)
            return resp
        body = await read_message(request)
        try:
            req = protocol.PrefillRequest.from_json(body)
        except protocol.ProtocolError as e:
            return json_error(400, "bad_request", str(e))
        n = len(req.prompt_token_ids)
        if not 1 <= n <= self.cfg.max_prompt_tokens or req.max_tokens < 1:
            return json_error(400, "bad_request", f"prompt of {n} tokens (1..{self.cfg.max_prompt_tokens}) "
                              f"or max_tokens {req.max_tokens} < 1")  # fmt: skip
        if policy == "reject-retry":
            if not self.free:
                self.rejected += 1
                return json_error(429, "busy")
            slot = self.free.popleft()
        else:
            slot = await self._acquire_queued()
        self.accepted += 1
        self.held[req.request_id] = (slot, [])
        try:
            resp = await open_stream(request)
        except BaseException:
            self._release(req.request_id)
            raise
        self.open_streams += 1
        try:
            await self._run(req, slot, resp, arrived)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:  # never leave the caller without a last event
            await send_event(resp, protocol.error_event("internal", f"{type(e).__name__}: {e}"))
        finally:
            self.open_streams -= 1
            self._release(req.request_id)
        return resp

    async def _run(
        self, req: protocol.PrefillRequest, slot: int, resp: web.StreamResponse, arrived: float
    ) -> None:
        t_admit = time.time()
        if t_admit > req.deadline:
            self.deadline_misses += 1
            await send_event(resp, protocol.error_event("deadline", "deadline passed before prefill"))
            return
        ids = req.prompt_token_ids
        prefix_kv, plen = self.prefix.lookup(req.scenario, ids)
        kv_out = self.buffers[slot * self.buf_bytes : (slot + 1) * self.buf_bytes]
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(
                self.compute_pool,
                self.compute.prefill,
                req.request_id,
                ids,
                kv_out,
                self.cfg.block_tokens,
                prefix_kv,
                plen,
            )
        except kvxfer.KvxferError as e:
            await send_event(resp, protocol.error_event("prefill_failed", f"{type(e).__name__}: {e}"))
            return
        self.prefix.update(req.scenario, ids, out.kv if self.compute.mode == "real" else None)
        t_done = time.time()
        self.compute_s.append((out.num_tokens - out.prefix_len, t_done - t_admit, t_done))
        timings = {
            "prefill_wait_s": t_admit - arrived,
            "prefill_s": t_done - t_admit,
            "prefix_len": out.prefix_len,
        }
        if t_done > req.deadline:  # checked after execution too [paper]
            self.deadline_misses += 1
            await send_event(resp, protocol.error_event("deadline", "deadline passed during prefill"))
            return
        await send_event(resp, protocol.token_event(0, out.first_token))
        if req.max_tokens == 1 or out.first_token in req.stop_token_ids:
            reason = "stop" if out.first_token in req.stop_token_ids else "length"
            await send_event(resp, protocol.done_event(reason, timings))
            return
        kv = self._kv_range(req, slot, out)
        dreq = protocol.DecodeRequest(
            request_id=req.request_id,
            kv=kv,
            prompt_len=len(ids),
            first_token=out.first_token,
            max_tokens=req.max_tokens,
            deadline=time.time() + self.cfg.decode_wait_s,
            stop_token_ids=req.stop_token_ids,
        )
        await self._hand_over(dreq, resp, timings)

    def _kv_range(self, req: protocol.PrefillRequest, slot: int, out: Any) -> protocol.KvRange:
        geom = self.compute.geometry
        tp = kt.padded_tokens(out.num_tokens, self.cfg.block_tokens)
        if self.paged is None:
            return protocol.KvRange(
                prefill=self.name,
                region=self.buf_region.id,
                offset=slot * self.buf_bytes,
                length=geom.contiguous_bytes(tp),
                tokens=out.num_tokens,
                mode="block-free",
            )
        blocks = self.paged.allocate(out.num_tokens)
        self.held[req.request_id] = (slot, blocks)
        self.paged.scatter_from_contiguous(out.kv, blocks, out.num_tokens)
        return protocol.KvRange(
            prefill=self.name,
            region=self.paged_region.id,
            offset=0,
            length=geom.contiguous_bytes(tp),
            tokens=out.num_tokens,
            mode=self.cfg.transfer_mode,
            blocks=blocks,
        )

    async def _hand_over(self, dreq: protocol.DecodeRequest, resp: web.StreamResponse, timings: dict) -> None:
        t0 = time.time()
        try:
            name, dresp = await self._pick_decode(dreq)
        except _NoDecode as e:
            await send_event(resp, protocol.error_event(e.code, str(e)))
            return
        timings["decode_pick_s"] = time.time() - t0
        d = self.decodes.get(name) or {"open": 0}  # removed by the control plane meanwhile
        d["open"] += 1
        finished = False
        try:
            async for line in dresp.content:
                if not line.strip():
                    continue
                ev = json.loads(line)
                if ev.get("type") == "done":
                    ev["timings"] = {**timings, **ev.get("timings", {}), "decode": name}
                    finished = True
                elif ev.get("type") == "error":
                    finished = True
                await send_event(resp, ev)
                if finished:
                    break
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
            await send_event(
                resp, protocol.error_event("decode_failed", f"decode {name}: {type(e).__name__}: {e}")
            )
            return
        finally:
            d["open"] -= 1
            dresp.close()
        if not finished:
            await send_event(
                resp, protocol.error_event("decode_failed", f"decode {name} ended its stream early")
            )

    async def _pick_decode(self, dreq: protocol.DecodeRequest) -> tuple[str, aiohttp.ClientResponse]:
        assert self.session is not None
        body = dreq.to_json()
        while True:
            now = time.monotonic()
            alive = [n for n, d in self.decodes.items() if d["down_until"] <= now]
            if not self.decodes:
                raise _NoDecode("decode_failed", "this prefill knows no decode worker")
            for name in sorted(alive, key=lambda n: self.decodes[n]["open"]):
                d = self.decodes[name]
                try:
                    r = await self.session.post(d["url"] + "/v1/decode", json=body)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    d["down_until"] = time.monotonic() + 1.0
                    continue
                if r.status == 200:
                    return name, r
                text = await r.text()
                r.release()
                if r.status != 429:
                    raise _NoDecode("decode_failed", f"decode {name} refused the request: {r.status} {text}")
            if time.time() > dreq.deadline:
                raise _NoDecode("busy", f"no decode accepted within {self.cfg.decode_wait_s} s")
            await asyncio.sleep(0.005)

    def status(self) -> dict[str, Any]:
        st = protocol.worker_status(
            "prefill",
            self.name,
            self.cfg.b_p,
            self.cfg.b_p - len(self.free),
            len(self.waiters),
            self.open_streams,
        )
        st.update(self.prefix.stats())
        st.update(
            policy=self.cfg.policy,
            accepted=self.accepted,
            rejected=self.rejected,
            deadline_misses=self.deadline_misses,
            decodes=sorted(self.decodes),
            buffer_bytes=self.buf_bytes,
            reject_decision_max_s=max(self.reject_s, default=None),
            reject_decision_p50_s=sorted(self.reject_s)[len(self.reject_s) // 2] if self.reject_s else None,
        )
        return st

    def compute_times(self, since: float = 0.0) -> list[tuple[int, float, float]]:
        """``(tokens computed, seconds, end time)`` of the prefills that ended after ``since``
        (wall clock), at most the last 10,000 (``GET /v1/kvxfer/prefill-times?since=T``)."""
        return [x for x in self.compute_s if x[2] >= since]

    async def _compute_times(self, request: web.Request) -> web.Response:
        try:
            since = float(request.query.get("since", "0"))
        except ValueError:
            return json_error(400, "bad_request", "since must be a number (wall-clock seconds)")
        return web.json_response(self.compute_times(since))


class _NoDecode(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
