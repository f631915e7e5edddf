"""The cloud helper of P/D-Device.

[abstract] the cloud prefills and helps each device with only a part of the work.
[3rd-party] it returns the first token fast, then a limited number of further tokens; it stops
once the device has taken over or its quota is reached.

One session (see :mod:`kvxfer.device.wire`) per request: after the identity check, the helper
prefills the prompt (chunked; the last chunk is the refiner's observation window), sends the
first token at once (with the refined prompt when rho < 1), then decodes at most n - 1 more,
stopping early on ``caught_up``, on a stop token or when the device hangs up; ``more`` raises
the quota and ``finish`` lets it stream the whole answer (the fallback when the device cannot
keep the pace). Its busy time per request (model compute only: prefill, refinement, decode
steps) is accounted in :attr:`CloudHelper.accounts` and sent in the ``done`` message.

Backend [inferred]: the model runs in this helper, as on a P/D-Serve prefill worker that keeps the
request for its first n tokens; the refiner needs the prefill's attention mass, which the
P/D-Serve gateway does not return. With ``gateway=URL`` the tokens come from a P/D-Serve
deployment instead (rho = 1 only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kvxfer.device import wire
from kvxfer.device.errors import BadSettingsError, DeviceTimeoutError
from kvxfer.device.lm import LM, load_lm
from kvxfer.device.refiner import cloud_prefill, refine

HELLO_TIMEOUT = 10.0
LINGER = 1.0  # s the helper waits at its quota for a "more" before it ends the stream


@dataclass
class Account:
    request_id: str
    prompt_tokens: int = 0
    n: int = 0
    rho: float = 1.0
    prefill_s: float = 0.0
    refine_s: float = 0.0
    decode_s: float = 0.0
    tokens: int = 0
    reason: str = ""
    refined_len: int = 0
    events: list = field(default_factory=list)

    @property
    def busy_s(self) -> float:
        return self.prefill_s + self.refine_s + self.decode_s


class CloudHelper:
    """``gateway``: the URL of a P/D-Serve gateway. Without it the helper runs the model itself;
    with it every token comes from P/D-Serve (``lm`` then only names the model for the identity
    check, and refinement is not available: the gateway does not return the prefill's attention
    mass, so rho < 1 is served as rho = 1 and the first token carries no refined prompt)."""

    def __init__(self, lm: LM, host: str = "127.0.0.1", port: int = 0, gateway: str | None = None) -> None:
        self.lm = lm
        self.gateway = gateway.rstrip("/") if gateway else None
        self._t_first: float | None = None  # gateway path: first token of the current stream
        self.host, self.port = host, port
        self.identity = lm.identity()
        self.accounts: dict[str, Account] = {}
        self.refused = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cloud-model")  # the model is not thread-safe
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> int:
        self._thread = threading.Thread(target=self._run, name="cloud-helper", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise DeviceTimeoutError("cloud helper did not start in time")
        return self.port

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._session, self.host, self.port))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            pending = asyncio.all_tasks(self._loop)
            for t in pending:
                t.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None
        self._pool.shutdown(wait=True)

    def __enter__(self) -> CloudHelper:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- one session -----------------------------------------------------------------------
    async def _compute(self, fn, *args):
        loop = asyncio.get_running_loop()

        def timed():
            t0 = time.perf_counter()
            out = fn(*args)
            return out, time.perf_counter() - t0

        return await loop.run_in_executor(self._pool, timed)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass  # the device or the link went away; its account says how far it got
        except (BadSettingsError, asyncio.TimeoutError) as e:
            with contextlib.suppress(Exception):
                writer.write(wire.encode({"type": "error", "code": "bad_request", "message": str(e)}))
                await writer.drain()
        except Exception as e:  # noqa: BLE001 - e.g. the P/D-Serve gateway went away: tell the device
            with contextlib.suppress(Exception):
                msg = f"{type(e).__name__}: {e}"
                writer.write(wire.encode({"type": "error", "code": "cloud_failed", "message": msg}))
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = wire.decode(await asyncio.wait_for(reader.readline(), HELLO_TIMEOUT))
        diff = wire.check_identity(self.identity, hello) if hello.get("type") == "hello" else "no hello"
        if diff:
            self.refused += 1
            writer.write(wire.encode({"type": "error", "code": "version_mismatch", "message": diff}))
            await writer.drain()
            return
        writer.write(wire.encode({"type": "hello_ok", **self.identity}))
        await writer.drain()
        req = wire.decode(await asyncio.wait_for(reader.readline(), HELLO_TIMEOUT))
        try:
            rid = str(req["request_id"])
            ids = [int(t) for t in req["prompt_token_ids"]]
            n, rho, g = int(req["n"]), float(req.get("rho", 1.0)), int(req["max_tokens"])
            sys_len, q_len = int(req.get("system_len", 0)), int(req.get("query_len", 0))
            stops = {int(t) for t in req.get("stop_token_ids", [])}
        except (KeyError, TypeError, ValueError) as e:
            raise BadSettingsError(f"bad generate request: {e!r}") from e
        if req.get("type") != "generate" or not ids or n < 1 or g < 1 or not 0 < rho <= 1:
            raise BadSettingsError(
                f"bad generate request (n={n}, rho={rho}, max_tokens={g}, {len(ids)} tokens)"
            )
        acc = Account(rid, len(ids), n, rho)
        self.accounts[rid] = acc
        ctl = {"quota": min(n, g), "stop": None}
        changed = asyncio.Event()

        async def control() -> None:
            while True:
                line = await reader.readline()
                if not line:
                    ctl["stop"] = ctl["stop"] or "closed"
                    changed.set()
                    return
                m = wire.decode(line)
                if m["type"] == "caught_up":
                    ctl["stop"] = "caught_up"
                elif m["type"] == "more":
                    ctl["quota"] = min(g, ctl["quota"] + max(0, int(m["n"])))
                elif m["type"] == "finish":
                    ctl["quota"] = g
                acc.events.append((time.time(), m["type"], m.get("n", m.get("index"))))
                changed.set()

        ctl_task = asyncio.create_task(control())
        if self.gateway:
            try:
                await self._serve_gateway(writer, acc, ids, g, stops, ctl, changed)
            finally:
                ctl_task.cancel()
                with contextlib.suppress(BaseException):
                    await ctl_task
            return
        try:
            cp, acc.prefill_s = await self._compute(cloud_prefill, self.lm, ids, rho < 1, max(32, q_len))
            first = {"type": "token", "index": 0, "token_id": cp.first_token}
            if rho < 1:
                t0 = time.perf_counter()
                kept = refine(ids, cp.mass, rho, sys_len, q_len)
                acc.refine_s = time.perf_counter() - t0
                acc.refined_len = len(kept)
                first["refined"] = kept
            sent, last = 1, cp.first_token
            acc.tokens = 1
            writer.write(wire.encode(first))
            await writer.drain()
            while True:
                if last in stops:
                    reason = "stop"
                    break
                if sent >= g:
                    reason = "length"
                    break
                if ctl["stop"]:
                    reason = ctl["stop"]
                    break
                if sent >= ctl["quota"]:
                    changed.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(changed.wait(), LINGER)
                    if sent >= ctl["quota"] and not ctl["stop"]:
                        reason = "quota"
                        break
                    continue
                last, dt = await self._compute(self.lm.decode, cp.state, g)
                acc.decode_s += dt
                sent += 1
                acc.tokens = sent  # kept current: a broken link ends the session without "done"
                writer.write(wire.encode({"type": "token", "index": sent - 1, "token_id": last}))
                await writer.drain()
            acc.tokens, acc.reason = sent, reason
            writer.write(
                wire.encode(
                    {
                        "type": "done",
                        "reason": reason,
                        "cloud_busy_s": acc.busy_s,
                        "cloud_tokens": sent,
                        "cloud_prefill_s": acc.prefill_s,
                    }
                )
            )
            await writer.drain()
        finally:
            ctl_task.cancel()
            with contextlib.suppress(BaseException):
                await ctl_task

    async def _gateway_stream(self, http, body, writer, acc: Account, out, stops, ctl) -> bool:
        """One gateway streaming completion; True when a stop token ended the answer."""
        async with http.post(f"{self.gateway}/v1/completions", json=body) as r:
            if r.status != 200:
                raise BadSettingsError(f"P/D-Serve gateway answered {r.status}: {await r.text()}")
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise BadSettingsError(f"P/D-Serve stream error: {chunk['error']}")
                tid = chunk.get("kvxfer", {}).get("token_id")
                if tid is None:
                    continue
                msg = {"type": "token", "index": len(out), "token_id": int(tid)}
                if self._t_first is None:
                    self._t_first = time.perf_counter()
                out.append(int(tid))
                acc.tokens = len(out)
                writer.write(wire.encode(msg))
                await writer.drain()
                if tid in stops:
                    return True
                if ctl["stop"]:
                    return False  # leaving the block closes the stream: the deployment stops decoding
        return False

    async def _serve_gateway(self, writer, acc: Account, ids, g, stops, ctl, changed) -> None:
        """Tokens from the P/D-Serve gateway: one streaming completion with max_tokens = quota;
        ``more``/``finish`` past it start a continuation (prompt + tokens so far); ``caught_up``
        or a hang-up closes the stream, which stops the deployment's decode. Busy time is the
        wall time of each gateway stream (an upper bound: it includes queueing and transfer)."""
        import aiohttp

        out: list[int] = []
        reason = "quota"
        async with aiohttp.ClientSession() as http:
            while True:
                want = min(ctl["quota"], g) - len(out)
                if want <= 0 or ctl["stop"]:
                    if ctl["stop"]:
                        reason = ctl["stop"]
                        break
                    changed.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(changed.wait(), LINGER)
                    if min(ctl["quota"], g) - len(out) <= 0 and not ctl["stop"]:
                        reason = "length" if len(out) >= g else "quota"
                        break
                    continue
                body = {"model": "tiny", "prompt": ids + out, "max_tokens": want, "stream": True}
                t0 = time.perf_counter()
                self._t_first = None
                ended = False
                try:
                    ended = await self._gateway_stream(http, body, writer, acc, out, stops, ctl)
                except BadSettingsError:
                    if not out:
                        raise
                    # a continuation failed: end the cloud's part; the device goes on alone
                    acc.decode_s += time.perf_counter() - t0
                    reason = "gateway_error"
                    break
                if ended:
                    reason = "stop"
                first_stream = not acc.prefill_s
                if first_stream and self._t_first is not None:
                    # up to the first token: the prefill; after it: decoding
                    acc.prefill_s = self._t_first - t0
                    acc.decode_s += time.perf_counter() - self._t_first
                else:
                    acc.decode_s += time.perf_counter() - t0
                if ended:
                    break
        acc.tokens, acc.reason = len(out), reason
        writer.write(
            wire.encode(
                {
                    "type": "done",
                    "reason": reason,
                    "cloud_busy_s": acc.busy_s,
                    "cloud_tokens": len(out),
                    "cloud_prefill_s": acc.prefill_s,
                }
            )
        )
        await writer.drain()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvxfer.device.cloud", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny:0")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--gateway", default=None, help="URL of a P/D-Serve gateway to take the tokens from")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    helper = CloudHelper(load_lm(a.model), port=a.port, gateway=a.gateway)
    port = helper.start()
    print(json.dumps({"port": port, **helper.identity}), flush=True)
    try:
        sys.stdin.read()  # runs until its parent closes stdin
    finally:
        helper.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
