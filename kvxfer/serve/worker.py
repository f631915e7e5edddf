"""One worker process: ``python -m kvxfer.serve.worker '<WorkerConfig JSON>'``.

Starts the role's aiohttp server, then prints ONE line on stdout, ``{"ready": true, "role":
.., "name": .., "url": .., "descriptor": "<base64>"}`` (a gateway prints no descriptor), and
serves until SIGTERM or SIGINT, or until its stdin reaches end of file (the parent that
started it is gone: no orphans). A failure before ready prints ``{"ready": false, "error":
..}`` and exits 1.

Role ``standby`` (needs ``registry``): the process loads no model; it prints ``{"ready": true,
"role": "standby", "name": .., "url": ""}``, registers as a standby and waits for a
controller's assignment (:mod:`.control.standby`); then it loads the assigned role in the same
process, prints a second ready line with that role, URL and descriptor, and joins the group
through its member agent like any worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from typing import Any

from aiohttp import web

from .config import WorkerConfig
from .errors import ConfigError


def build(cfg: WorkerConfig):
    """The worker object (with ``.app``) of ``cfg.role``; gateway: ``(Gateway, None)``."""
    from .runtime import make_compute

    _, compute = make_compute(cfg)
    if cfg.role == "prefill":
        from .prefill import PrefillWorker

        return PrefillWorker(cfg, compute)
    if cfg.role == "decode":
        from .decode import DecodeWorker

        return DecodeWorker(cfg, compute)
    from .aggregated import AggregatedWorker

    return AggregatedWorker(cfg, compute)


def _tokenizer_spec(cfg: WorkerConfig) -> str:
    if cfg.tokenizer:
        return cfg.tokenizer
    return "smollm2" if cfg.model == "smollm2" else "bytes:512"


async def _serve(cfg: WorkerConfig, stop: asyncio.Event) -> None:
    if cfg.role == "gateway":
        from .gateway import Gateway, GatewayConfig
        from .tokenizers import load_tokenizer

        watcher = None
        routes = cfg.routes or {"*": cfg.prefill_urls}
        if cfg.registry:  # the forwarding table comes from the registry's confirmed groups
            from .control.routes import read_routes
            from .registry import open_registry

            reg = open_registry(cfg.registry)
            routes = read_routes(reg) or routes
        gw = Gateway(
            GatewayConfig(routes=routes, policy=cfg.policy, ttft_slo_s=cfg.ttft_slo_s, model=cfg.model),
            load_tokenizer(_tokenizer_spec(cfg)),
        )
        url = await gw.start(cfg.host, cfg.port)
        if cfg.registry:
            from .control.routes import RouteWatcher

            loop = asyncio.get_running_loop()
            watcher = RouteWatcher(reg, lambda r: loop.call_soon_threadsafe(gw.set_routes, r))
        print(json.dumps({"ready": True, "role": "gateway", "name": cfg.name, "url": url}), flush=True)
        try:
            await stop.wait()
        finally:
            if watcher is not None:
                watcher.stop()
            await gw.stop()
        return
    if cfg.role != "standby":
        await _serve_role(cfg, stop, None)
        return
    from .control.standby import StandbyAgent

    if not cfg.registry:
        raise ConfigError("a standby worker needs a registry")
    standby = StandbyAgent(cfg.registry, cfg.name, ttl_s=cfg.lease_ttl_s)
    standby.register()
    try:
        print(json.dumps({"ready": True, "role": "standby", "name": cfg.name, "url": ""}), flush=True)
        job = await asyncio.to_thread(standby.wait, stop.is_set)
        if job is None:
            return
        if job.get("role") not in ("prefill", "decode"):
            raise ConfigError(f"a standby can become a prefill or a decode, not {job.get('role')!r}")
        cfg = cfg.replace(role=job["role"], scenario=job["scenario"], group=job["group"])
        await _serve_role(cfg, stop, standby)
    finally:
        standby.release()


async def _serve_role(cfg: WorkerConfig, stop: asyncio.Event, standby: Any) -> None:
    worker = build(cfg)
    runner = web.AppRunner(worker.app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://{cfg.host}:{port}"
    ready = {
        "ready": True,
        "role": cfg.role,
        "name": cfg.name,
        "url": url,
        "descriptor": worker.descriptor_b64(),
    }
    agent = None
    if cfg.registry and cfg.role in ("prefill", "decode"):
        from .control.member import MemberAgent

        loop = asyncio.get_running_loop()
        agent = MemberAgent(worker, cfg.registry, cfg.scenario, cfg.group, url, loop, ttl_s=cfg.lease_ttl_s,
                            on_lost=lambda: loop.call_soon_threadsafe(stop.set))  # fmt: skip
        agent.start()  # reports to the registry; the group setup goes on in its thread
    if standby is not None:
        standby.release()  # the member report exists: the standby record can go
    print(json.dumps(ready), flush=True)
    try:
        await stop.wait()
    finally:
        if agent is not None:
            await asyncio.to_thread(agent.stop)
        await runner.cleanup()


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    with contextlib.suppress(Exception):
        while sys.stdin.buffer.read(4096):
            pass
    loop.call_soon_threadsafe(stop.set)


async def _main(cfg: WorkerConfig, watch_stdin: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if watch_stdin:
        threading.Thread(target=_watch_stdin, args=(loop, stop), daemon=True).start()
    await _serve(cfg, stop)


def pin_cpus(cpus: list[int]) -> None:
    """Runs this process (and the threads it starts later) on ``cpus`` only."""
    try:
        os.sched_setaffinity(0, cpus)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot pin the worker to CPUs {cpus}: {e}") from e


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        cfg = WorkerConfig.from_json(argv[0])
        if cfg.cpus:
            pin_cpus(cfg.cpus)
        asyncio.run(_main(cfg, watch_stdin="--no-stdin-watch" not in argv))
    except Exception as e:
        print(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}), flush=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
