"""What every worker process shares: its kvxfer engine and notification router, the
``POST /v1/peer`` descriptor exchange, ``GET /v1/status``, and NDJSON streaming.

``POST /v1/peer`` body ``{"v":1,"descriptor":"<base64>"}`` plus, as an extension of protocol
v1 that older peers ignore, ``"role"``, ``"name"`` and ``"url"`` of the sender: a prefill
learns its decodes' URLs this way. The answer is ``{"v":1,"descriptor":..,"name":..}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

import kvxfer

from . import protocol
from .config import WorkerConfig
from .kv_transfer import NotificationRouter, make_engine
from .machine import machine


def json_error(status: int, code: str, message: str = "") -> web.Response:
    return web.json_response({"v": protocol.VERSION, "error": code, "message": message}, status=status)


async def read_message(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise web.HTTPBadRequest(text=json.dumps({"v": 1, "error": "json", "message": str(e)})) from e
    if not isinstance(body, dict) or body.get("v") != protocol.VERSION:
        raise web.HTTPBadRequest(
            text=json.dumps({"v": protocol.VERSION, "error": "version"}), content_type="application/json"
        )
    return body


async def open_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={"Content-Type": protocol.NDJSON})
    await resp.prepare(request)
    return resp


async def send_event(resp: web.StreamResponse, event: dict[str, Any]) -> None:
    await resp.write(json.dumps(event).encode() + b"\n")


class WorkerBase:
    role = "worker"

    def __init__(self, cfg: WorkerConfig, compute: Any) -> None:
        self.cfg = cfg
        self.compute = compute
        self.name = cfg.name
        self.engine = make_engine(cfg.name, cfg.backend, host=cfg.host)
        self.router = NotificationRouter(self.engine)
        self.compute_pool = ThreadPoolExecutor(1, thread_name_prefix="compute")
        self.open_streams = 0
        self.started = time.time()
        self.peers: dict[str, dict[str, Any]] = {}  # name -> {"role", "url"}
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/v1/peer", self._peer)
        self.app.router.add_get("/v1/status", self._status)
        self.app.on_cleanup.append(self._cleanup)

    def descriptor_b64(self) -> str:
        return base64.b64encode(self.engine.descriptor()).decode()

    async def _peer(self, request: web.Request) -> web.Response:
        body = await read_message(request)
        try:
            blob = base64.b64decode(body["descriptor"], validate=True)
            peer = await asyncio.to_thread(self.engine.add_peer, blob)
        except (KeyError, ValueError, kvxfer.KvxferError) as e:
            return json_error(400, "descriptor", f"{type(e).__name__}: {e}")
        self.peers[peer.name] = {"role": body.get("role", ""), "url": body.get("url", "")}
        self.on_peer(peer.name, self.peers[peer.name])
        return web.json_response(
            {"v": protocol.VERSION, "descriptor": self.descriptor_b64(), "name": self.name}
        )

    def on_peer(self, name: str, info: dict[str, Any]) -> None:
        """A peer was added (prefill: remember decodes)."""

    def on_peer_gone(self, name: str) -> None:
        """The control plane removed a peer from the group (prefill: forget that decode)."""

    def status(self) -> dict[str, Any]:
        raise NotImplementedError

    async def _status(self, _request: web.Request) -> web.Response:
        st = self.status()
        st.update(
            mode=self.compute.mode,
            machine=machine(),
            backend=self.cfg.backend,
            model=self.cfg.model,
            transfer_mode=self.cfg.transfer_mode,
            kvxfer=self.engine.stats(),
            cpus=sorted(os.sched_getaffinity(0)),
        )
        return web.json_response(st)

    async def _cleanup(self, _app: web.Application) -> None:
        self.router.close()
        self.compute_pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close()
