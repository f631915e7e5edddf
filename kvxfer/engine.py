"""The Engine facade: the native engine by composition, plus memory adapters, transfers
across many regions, keyed notifications and asyncio.

Thread contract (from the core): every method may be called from any thread; calls that
block (``add_peer``, ``post``, ``Transfer.wait``, ``wait_notification``) release the GIL.
Bytes move on each backend's own threads; nothing needs to be polled for progress.
Lifetimes: a Region, Peer or Transfer keeps the native engine alive; ``close()`` (also on
``with`` exit and garbage collection) fails in-flight transfers and rejects new work.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from . import _native
from .config import EngineConfig
from .errors import InvalidArgumentError
from .memory import MemoryKind, as_span
from .notify import KeyFn, Mailbox, Notification, payload_key
from .transfer import Op, Transfer

KvLayout = _native.KvLayout
Region = _native.Region
Peer = _native.Peer


class BackendInfo(NamedTuple):
    name: str
    available: bool
    reason: str
    on_by_default: bool


def list_backends() -> list[BackendInfo]:
    """Every backend this build knows, whether it can start here, and why not."""
    return [BackendInfo(*row) for row in _native.list_backends()]


def empty(shape: Any, dtype: Any = np.uint8) -> np.ndarray:
    """A numpy array in shareable host memory (memfd-backed, page-aligned, prefaulted).

    Register it like any array; a same-host peer then maps it and moves bytes with plain
    memcpy (the shm backend's fast path) instead of cross-memory attach. The array keeps
    the memory alive. Contents are zero.
    """
    dt = np.dtype(dtype)
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    for d in dims:
        if not isinstance(d, (int, np.integer)) or d < 0:
            raise InvalidArgumentError(f"kvxfer.empty: shape {shape!r} must be non-negative integers")
    count = int(np.prod(dims, dtype=np.int64))
    nbytes = count * dt.itemsize
    buf = _native.HostBuffer(max(1, nbytes))
    view = memoryview(buf)  # type: ignore[arg-type]  # HostBuffer exports the buffer protocol
    return np.frombuffer(view, dtype=np.uint8, count=nbytes).view(dt).reshape(dims)


class RegionGroup(tuple):
    """Regions addressed together by block ids, e.g. one region per layer for K and one
    for V as vLLM and SGLang hold their KV: a post with a group moves the same block ids
    in every member (one part each, one plan for all)."""

    @property
    def ids(self) -> list[int]:
        return [r.id for r in self]


@dataclass
class Part:
    """One part of a transfer: bytes of one local region to or from one remote region.
    Each side is block ids (of its region's layout) or byte extents; the remote side
    defaults to the local block ids and layer range."""

    local: Any  # Region
    remote_region: int
    local_blocks: Any = None
    remote_blocks: Any = None
    local_extents: Any = None
    remote_extents: Any = None
    layers: tuple[int, int] | None = None
    remote_layers: tuple[int, int] | None = None

    def as_tuple(self) -> tuple:
        return (
            self.local,
            self.remote_region,
            _as_ids(self.local_blocks),
            _as_ids(self.remote_blocks),
            _as_extents(self.local_extents),
            _as_extents(self.remote_extents),
            self.layers,
            self.remote_layers,
        )


def _as_ids(blocks: Any) -> Any:
    # Arrays, and lists/tuples (the native side reads a short list of ints directly and
    # converts anything else itself), go through as they are.
    if blocks is None or type(blocks) in _PASS_THROUGH:
        return blocks
    arr = np.asarray(blocks)
    if arr.size == 0:
        return arr.astype(np.int64)
    return arr


def _as_extents(extents: Any) -> Any:
    if extents is None or type(extents) is np.ndarray:
        return extents
    if type(extents) in (list, tuple) and _plain_extents(extents):
        return extents  # exact non-negative ints: the native side reads them directly
    # Python ints may exceed int64 (offsets near 2**64): numpy would turn them into
    # floats. Keep them exact; fractions are refused by the native side.
    arr = np.asarray(extents, dtype=object)
    flat = arr.reshape(-1)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in flat):
        dtype = np.uint64 if all(int(v) >= 0 for v in flat) else np.int64
        try:
            return np.asarray(extents, dtype=dtype)
        except OverflowError:
            raise InvalidArgumentError(f"extents {extents!r} do not fit in 64 bits") from None
    return np.asarray(extents)


_PASS_THROUGH = (np.ndarray, list, tuple)


def _plain_extents(extents: list | tuple) -> bool:
    """True for [offset, length] or a list of them, every value an int in [0, 2**64)."""
    if len(extents) == 2 and type(extents[0]) is int:
        pairs: Any = (extents,)
    else:
        pairs = extents
    for pair in pairs:
        if type(pair) not in (list, tuple) or len(pair) != 2:
            return False
        for v in pair:
            if type(v) is not int or v < 0 or v >= 1 << 64:
                return False
    return True


def _payload(notify: Any) -> bytes:
    if type(notify) is bytes:
        return notify
    if isinstance(notify, (bytes, bytearray, memoryview)):
        return bytes(notify)
    raise InvalidArgumentError(f"notify must be bytes, got {type(notify).__name__}")


class Engine:
    """One per process (or GPU worker). See the module docstring for the contracts.

    ``Engine(name, backends=None, *, config=None, timeout=None, connect_timeout=None,
    threads=None, notification_key=None)``: ``backends`` lists the backends to start in
    order of preference (default: every available one that is on by default); ``config``
    is a :class:`kvxfer.config.EngineConfig` (its name and backends are overridden by the
    arguments when given); ``timeout`` is the default transfer deadline in seconds;
    ``threads`` sets the copy threads of the loopback and shm backends;
    ``notification_key(note)`` gives the key notifications are waited for by (default: the
    whole payload).
    """

    def __init__(
        self,
        name: str,
        backends: Sequence[str] | None = None,
        *,
        config: EngineConfig | None = None,
        timeout: float | None = None,
        connect_timeout: float | None = None,
        threads: int | None = None,
        notification_key: KeyFn | None = None,
    ) -> None:
        cfg = replace(config) if config is not None else EngineConfig()
        cfg.name = name
        if backends is not None:
            if isinstance(backends, str):
                raise InvalidArgumentError("backends must be a list of names, not a string")
            cfg.backends = list(backends)
        if timeout is not None:
            cfg.timeout = timeout
        if connect_timeout is not None:
            cfg.connect_timeout = connect_timeout
        if threads is not None:
            if not isinstance(threads, int) or threads < 0:
                raise InvalidArgumentError(f"threads must be a non-negative int, got {threads!r}")
            cfg.backend.loopback.threads = max(1, threads)
            cfg.backend.shm.threads = threads
        self._config = cfg
        self._native = _native.Engine(cfg.to_native())
        self._mailbox = Mailbox(self._native, notification_key or payload_key)
        self._bridges: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # --- identity ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._native.name

    @property
    def instance_id(self) -> int:
        return self._native.instance_id

    @property
    def backends(self) -> list[str]:
        return self._native.backends

    @property
    def config(self) -> EngineConfig:
        return self._config

    def backend_caps(self) -> dict[str, dict]:
        """Per started backend: ops, memory kinds, same-host/process limits, lanes."""
        return self._native.backend_caps()

    def describe_backends(self) -> str:
        return self._native.describe_backends()

    # --- memory -----------------------------------------------------------------------
    def register(
        self, buffer: Any, layout: KvLayout | None = None, *, kind: Any = None, device: int = -1
    ) -> Region:
        """Registers memory: a writable C-contiguous buffer (numpy array, bytearray, mmap),
        a torch tensor (CPU or CUDA), a ``__cuda_array_interface__`` or DLPack object. The
        region keeps ``buffer`` alive. ``kind``/``device`` override the detected kind."""
        span = as_span(buffer, kind, device)
        return self._native.register_ptr(span.ptr, span.nbytes, layout, span.owner, span.kind, span.device)

    def register_ptr(
        self,
        ptr: int,
        nbytes: int,
        layout: KvLayout | None = None,
        owner: Any = None,
        kind: Any = MemoryKind.HOST,
        device: int = -1,
    ) -> Region:
        """Registers raw memory; ``owner`` (any object) is kept alive with the region."""
        if not isinstance(ptr, int) or not isinstance(nbytes, int) or ptr <= 0 or nbytes <= 0:
            raise InvalidArgumentError(
                f"register_ptr needs a positive pointer and size, got {ptr!r}, {nbytes!r}"
            )
        if kind == MemoryKind.CUDA and device < 0:
            device = _native.cuda_pointer_device(ptr)  # raises if the driver does not know it
        return self._native.register_ptr(ptr, nbytes, layout, owner, kind, device)

    def register_group(self, buffers: Sequence[Any], layout: KvLayout | None = None) -> RegionGroup:
        """Registers each buffer with the same layout; see :class:`RegionGroup`."""
        return RegionGroup(self.register(b, layout) for b in buffers)

    def deregister(self, region: Region) -> None:
        """Stops publishing the region; its registration ends with its last transfer."""
        self._native.deregister(region)

    # --- peers ------------------------------------------------------------------------
    def descriptor(self) -> bytes:
        """This engine's descriptor: ship it to peers any way you like."""
        return self._native.descriptor()

    def add_peer(self, descriptor: bytes) -> Peer:
        if not isinstance(descriptor, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(f"descriptor must be bytes, got {type(descriptor).__name__}")
        return self._native.add_peer(bytes(descriptor))

    def remove_peer(self, name: str) -> None:
        self._native.remove_peer(name)

    def peer(self, name: str) -> Peer:
        return self._native.peer(name)

    # --- transfers --------------------------------------------------------------------
    def _parts(self, local: Any, remote_region: Any, sides: dict) -> list[tuple]:
        if isinstance(local, (RegionGroup, list, tuple)):
            remotes = list(remote_region) if isinstance(remote_region, (list, tuple, RegionGroup)) else None
            if remotes is None or len(remotes) != len(local):
                raise InvalidArgumentError(
                    f"a group of {len(local)} local regions needs as many remote region ids,"
                    f" got {remote_region!r}"
                )
            base = Part(None, 0, **sides).as_tuple()
            return [
                (loc, int(getattr(rem, "id", rem)), *base[2:])
                for loc, rem in zip(local, remotes, strict=True)
            ]
        return [Part(local, _region_id(remote_region), **sides).as_tuple()]

    def post(
        self,
        op: Op,
        peer: Peer,
        local: Any,
        remote_region: Any,
        *,
        local_blocks: Any = None,
        remote_blocks: Any = None,
        local_extents: Any = None,
        remote_extents: Any = None,
        layers: tuple[int, int] | None = None,
        remote_layers: tuple[int, int] | None = None,
        notify: bytes = b"",
        timeout: float | None = None,
        coalesce: bool = True,
    ) -> Transfer:
        """Starts a one-sided transfer and returns its handle at once.

        ``local`` is a Region, or a RegionGroup / list of Regions with ``remote_region``
        a list of as many remote region ids (one part each, same block ids). Each side is
        block ids (``*_blocks``, 1-D ints) or byte extents (``*_extents``, (N, 2) of
        [offset, length]); ``layers=(begin, end)`` restricts blocks to a layer range. The
        local byte stream (layer, K/V, list position) lands on the remote one in the same
        order. ``notify`` reaches the peer only after every byte of every part. Invalid
        input raises before anything moves."""
        if type(local) is Region:  # one region: no Part objects on this path
            parts = [
                (
                    local,
                    _region_id(remote_region),
                    _as_ids(local_blocks),
                    _as_ids(remote_blocks),
                    _as_extents(local_extents),
                    _as_extents(remote_extents),
                    layers,
                    remote_layers,
                )
            ]
            return Transfer(
                _native.post(self._native, op, peer, parts, _payload(notify), timeout, coalesce), self
            )
        sides = {
            "local_blocks": local_blocks,
            "remote_blocks": remote_blocks,
            "local_extents": local_extents,
            "remote_extents": remote_extents,
            "layers": layers,
            "remote_layers": remote_layers,
        }
        parts = self._parts(local, remote_region, sides)
        return Transfer(
            _native.post(self._native, op, peer, parts, _payload(notify), timeout, coalesce), self
        )

    def post_extent(
        self,
        op: Op,
        peer: Peer,
        local: Region,
        remote_region: Any,
        local_offset: int,
        remote_offset: int,
        nbytes: int,
        *,
        notify: bytes = b"",
        timeout: float | None = None,
    ) -> Transfer:
        """One extent: ``nbytes`` at ``local_offset`` of ``local`` to or from
        ``remote_offset`` of the peer's region. The same transfer as ``post`` with one
        extent on each side, without array conversions: the small-request path."""
        # The common argument types are checked inline (a call less each, per request).
        if type(remote_region) is not int or not 0 <= remote_region < 2**32:
            remote_region = _region_id(remote_region)
        if type(notify) is not bytes:
            notify = _payload(notify)
        t = _new_transfer(Transfer)
        t._t = _native.post_extent(
            self._native, op, peer, local, remote_region, local_offset, remote_offset, nbytes, notify, timeout
        )
        t._engine = self
        return t

    def post_parts(
        self,
        op: Op,
        peer: Peer,
        parts: Sequence[Part],
        *,
        notify: bytes = b"",
        timeout: float | None = None,
        coalesce: bool = True,
    ) -> Transfer:
        """One transfer of any number of parts (regions), one deadline, one notification
        after all of them. No parts and a notification is legal (nothing to move, e.g. a
        full prefix-cache hit)."""
        tuples = [p.as_tuple() if isinstance(p, Part) else p for p in parts]
        return Transfer(
            _native.post(self._native, op, peer, tuples, _payload(notify), timeout, coalesce), self
        )

    def plan(
        self, op: Op, peer: Peer, local: Any, remote_region: Any, *, coalesce: bool = True, **sides
    ) -> dict:
        """Validates and plans without moving bytes: ``bytes``, ``pieces``, ``runs``,
        ``planes``, ``parts``, ``coalescing_ratio``."""
        parts = self._parts(local, remote_region, sides)
        return _native.plan(self._native, op, peer, parts, coalesce)

    def write(self, peer: Peer, local: Any, remote_region: Any, blocks: Any, **kw: Any) -> Transfer:
        """``post(Op.WRITE, ...)`` with the same block ids on both sides unless
        ``remote_blocks`` is given."""
        return self.post(Op.WRITE, peer, local, remote_region, local_blocks=blocks, **kw)

    def read(self, peer: Peer, local: Any, remote_region: Any, blocks: Any, **kw: Any) -> Transfer:
        """``post(Op.READ, ...)``: pulls the peer's blocks into the local ones."""
        return self.post(Op.READ, peer, local, remote_region, local_blocks=blocks, **kw)

    def wait_all(self, transfers: Sequence[Transfer], timeout: float | None = None) -> None:
        """Waits for every transfer; raises the first failure."""
        for t in transfers:
            t.wait(timeout)

    @staticmethod
    def poll_many(transfers: Sequence[Transfer]) -> list[Any]:
        """The states (PENDING, DONE, FAILED) of many transfers in one call; never blocks."""
        return _native.poll_many(transfers)

    # --- notifications ----------------------------------------------------------------
    def notify(self, peer: Peer, payload: bytes, timeout: float | None = None) -> None:
        """Sends a standalone notification, ordered after this engine's finished transfers
        to that peer."""
        self._native.notify(peer, _payload(payload), timeout)

    def notifications(self, max: int = 0, key: Hashable | None = None) -> list[Notification]:  # noqa: A002
        """Takes the notifications received so far (at most ``max`` if > 0; only those
        with ``key`` if given)."""
        return self._mailbox.take(max, key)

    def wait_notification(self, key: Hashable | None = None, timeout: float = 30.0) -> Notification:
        """The next notification with ``key`` (any if None); raises WaitTimeoutError."""
        return self._mailbox.wait(key, timeout)

    def wait_for_notifications(self, count: int, timeout: float) -> list[Notification]:
        """Collects ``count`` notifications (any keys) or raises WaitTimeoutError."""
        import time

        deadline = time.monotonic() + timeout
        got: list[Notification] = []
        while len(got) < count:
            got.append(self._mailbox.wait(None, max(deadline - time.monotonic(), 1e-6)))
        return got

    # --- asyncio ----------------------------------------------------------------------
    def _aio(self):
        from .aio import LoopBridge

        loop = asyncio.get_running_loop()
        bridge = self._bridges.get(loop)
        if bridge is None:
            bridge = LoopBridge(self, loop)
            self._bridges[loop] = bridge
        return bridge

    async def notification(self, key: Hashable | None = None) -> Notification:
        """Awaits the next notification with ``key`` (any if None)."""
        return await self._aio().wait_notification(key)

    def notifications_async(self, key: Hashable | None = None) -> AsyncIterator[Notification]:
        """``async for note in engine.notifications_async():`` every notification (with
        ``key`` if given) as it arrives."""
        return self._aio().iterate(key)

    # --- lifecycle --------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return self._native.stats()

    @property
    def closed(self) -> bool:
        return self._native.closed

    def close(self) -> None:
        """Fails in-flight transfers (CanceledError), drops the peers, rejects new work; returns
        once every native thread of the engine has ended."""
        for bridge in list(self._bridges.values()):
            bridge.close()
        self._native.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # The native engine holds its peers and they hold it: without close() it would
        # live (with its threads) until the process ends.
        try:
            self._native.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<kvxfer.Engine {self.name!r} backends={self.backends}>"


_new_transfer = object.__new__  # Transfer without its __init__ call: post_extent sets both slots


def _region_id(remote_region: Any) -> int:
    if type(remote_region) is int and 0 <= remote_region < 2**32:  # the common case, cheaply
        return remote_region
    rid = getattr(remote_region, "id", remote_region)
    if isinstance(rid, bool) or not isinstance(rid, (int, np.integer)):
        raise InvalidArgumentError(f"remote_region must be a region id (int), got {remote_region!r}")
    if not 0 <= int(rid) < 2**32:
        raise InvalidArgumentError(f"remote_region {int(rid)} is not a region id (0 <= id < 2**32)")
    return int(rid)
