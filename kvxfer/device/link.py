"""An emulated cloud-device link: a real TCP proxy (asyncio, loopback) with delay, jitter, rate,
loss and injected disconnects. This kernel has no netem, so the proxy does the shaping itself.

Per direction, each chunk read from one side is delivered to the other side at
``max(previous delivery, serialization end + delay + jitter)`` (FIFO: TCP never reorders bytes),
where serialization runs at ``rate`` bytes/s. A lost chunk is delivered after an extra ``rto``
(what TCP's retransmission makes of a loss: a stall, not a hole) [inferred]. A disconnect aborts
both sockets of a connection (the peers see a reset or EOF mid-stream): at a time after the
connection opened, after a number of downlink bytes, or on demand with :meth:`LinkProxy.cut`.

The proxy runs its own event loop in a thread, so synchronous code can start and stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from dataclasses import dataclass, field

from kvxfer.device.errors import BadSettingsError, DeviceTimeoutError


@dataclass(frozen=True)
class LinkSpec:
    """One direction. Times in seconds, ``rate`` in bytes/s (None: unlimited)."""

    delay: float = 0.0
    jitter: float = 0.0  # std of a normal extra delay, clipped at 0
    rate: float | None = None
    loss: float = 0.0  # probability a chunk is lost (then resent after rto)
    rto: float = 0.2

    def __post_init__(self) -> None:
        if self.delay < 0 or self.jitter < 0 or not 0 <= self.loss < 1 or self.rto < 0:
            raise BadSettingsError(f"bad link spec {self!r}")
        if self.rate is not None and self.rate <= 0:
            raise BadSettingsError(f"link rate must be positive, got {self.rate}")


@dataclass
class Cut:
    """Disconnect injection for connections through the proxy."""

    after_s: float | None = None  # seconds after the connection opened
    after_down_bytes: int | None = None  # once this many downlink bytes were delivered


@dataclass
class LinkStats:
    connections: int = 0
    up_bytes: int = 0
    down_bytes: int = 0
    lost_chunks: int = 0
    cuts: list[float] = field(default_factory=list)  # unix times of injected disconnects


class _Pipe:
    def __init__(self, spec: LinkSpec, rng: random.Random) -> None:
        self.spec, self.rng = spec, rng
        self.tx_free = 0.0  # when the serializer is free
        self.last = 0.0  # last delivery time (FIFO)

    def schedule(self, n: int, now: float) -> tuple[float, bool]:
        s = self.spec
        start = max(now, self.tx_free)
        self.tx_free = start + (n / s.rate if s.rate else 0.0)
        t = self.tx_free + s.delay + (max(0.0, self.rng.gauss(0.0, s.jitter)) if s.jitter else 0.0)
        lost = s.loss > 0 and self.rng.random() < s.loss
        if lost:
            t += s.rto
        self.last = max(self.last, t)
        return self.last, lost


class LinkProxy:
    """``LinkProxy(target_port, up=LinkSpec(...), down=LinkSpec(...), cut=Cut(...))``;
    ``start()`` returns the port to connect to instead of the target. Up = device -> cloud."""

    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        up: LinkSpec | None = None,
        down: LinkSpec | None = None,
        cut: Cut | None = None,
        seed: int = 0,
    ) -> None:
        self.target = (target_host, int(target_port))
        self.up, self.down = up or LinkSpec(), down or LinkSpec()
        self.cut_spec = cut or Cut()
        self.rng = random.Random(seed)
        self.stats = LinkStats()
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._ready = threading.Event()

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> int:
        self._thread = threading.Thread(target=self._run, name="link-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise DeviceTimeoutError("link proxy did not start in time")
        assert self.port is not None
        return self.port

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._shutdown())
            self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._abort_all()
        pending = [t for t in asyncio.all_tasks(self._loop) if t is not asyncio.current_task()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop = None

    def __enter__(self) -> LinkProxy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def cut(self) -> None:
        """Disconnect every open connection now (the peers see a reset mid-stream)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._abort_all)

    def _abort_all(self) -> None:
        if self._conns:
            self.stats.cuts.append(time.time())
        for a, b in list(self._conns):
            for w in (a, b):
                with contextlib.suppress(Exception):
                    w.transport.abort()
        self._conns.clear()

    # ---- data path -------------------------------------------------------------------------
    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            sreader, swriter = await asyncio.open_connection(*self.target)
        except OSError:
            cwriter.transport.abort()
            return
        self.stats.connections += 1
        pair = (cwriter, swriter)
        self._conns.add(pair)
        opened = time.monotonic()
        tasks = [
            asyncio.create_task(self._pump(creader, swriter, _Pipe(self.up, self.rng), pair, "up")),
            asyncio.create_task(self._pump(sreader, cwriter, _Pipe(self.down, self.rng), pair, "down")),
        ]
        if self.cut_spec.after_s is not None:
            tasks.append(asyncio.create_task(self._cut_later(pair, opened + self.cut_spec.after_s)))
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _cut_later(self, pair, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        self._abort(pair)

    def _abort(self, pair) -> None:
        if pair in self._conns:
            self._conns.discard(pair)
            self.stats.cuts.append(time.time())
            for w in pair:
                with contextlib.suppress(Exception):
                    w.transport.abort()

    async def _pump(self, reader, writer, pipe: _Pipe, pair, direction: str) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while True:
                item = await queue.get()
                if item is None:
                    with contextlib.suppress(Exception):
                        writer.write_eof()
                    return
                at, data = item
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                if pair not in self._conns:
                    return
                if direction == "down" and self.cut_spec.after_down_bytes is not None:
                    room = self.cut_spec.after_down_bytes - self.stats.down_bytes
                    if room <= len(data):
                        writer.write(data[: max(0, room)])
                        with contextlib.suppress(Exception):
                            await writer.drain()
                        self.stats.down_bytes += max(0, room)
                        self._abort(pair)
                        return
                writer.write(data)
                try:
                    await writer.drain()
                except (ConnectionError, OSError):
                    self._abort(pair)
                    return
                if direction == "up":
                    self.stats.up_bytes += len(data)
                else:
                    self.stats.down_bytes += len(data)

        sender = asyncio.create_task(deliver())
        try:
            while True:
                try:
                    data = await reader.read(65536)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    await queue.put(None)
                    break
                at, lost = pipe.schedule(len(data), time.monotonic())
                self.stats.lost_chunks += lost
                await queue.put((at, data))
            await sender
        finally:
            sender.cancel()
