"""The three ways a request's KV goes from a prefill to a decode, over kvxfer.

The decode side pulls (one-sided READ) into its paged pool; the prefill side only keeps
its memory registered and answers control notifications. [inferred: the paper's
"retrieval" suggests a pull; it does not name the verb.]

- **block-free** [paper, P/D-Serve section 3.5]: the prefill wrote the prompt's KV
  layer-major, ``[layer][K/V][tokens][kv_heads][head_dim]``, into ONE contiguous buffer.
  The decode posts ONE kvxfer READ whose local side is its paged block ids and whose remote
  side is that one byte extent: kvxfer scatters the contiguous range into the paged blocks
  (RecvScatter as a function). With ``per_layer=True`` it posts one READ per layer, each
  with the layer's (offset, length) of the same buffer, all in flight together.
- **paged-coalesced**: the prefill keeps paged blocks too; one READ with block ids on both
  sides, which kvxfer coalesces into runs.
- **block-by-block** [paper's baseline]: one kvxfer transfer per block id (its pieces of
  every layer, not coalesced) and one confirmation round trip per block (a kvxfer
  notification to the prefill and its reply) before the next block.

The byte-stream rule that makes block-free exact (docs/api.md, "Transfers"): local blocks
stream in (layer, K/V, list position) order, so block ``ids[j]`` of layer ``l``, K/V ``k``
receives tokens ``[j*bt, (j+1)*bt)`` of plane ``(l, k)`` of the contiguous buffer, whose
token count is padded to a whole number of blocks.

Every function here blocks (kvxfer releases the GIL); call it from a thread in asyncio code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import kvxfer

from .errors import KvTransferError

MODES = ("block-free", "paged-coalesced", "block-by-block")

# Notification payload prefixes (kvxfer notifications between prefill and decode engines).
RELEASED = b"kvx-released"  # decode -> prefill: "the KV of <request_id> has left; free its slot"
BLOCK_ACK = b"kvx-bb"  # decode -> prefill: "block <j> of <request_id> arrived" (block-by-block)
BLOCK_ACK_REPLY = b"kvx-bbok"  # prefill -> decode: "go on with the next block"


@dataclass(frozen=True)
class KvGeometry:
    """The KV shape of one model: what one token costs per layer and K/V plane."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def token_bytes(self) -> int:
        """Bytes of one token in one (layer, K/V) plane."""
        return self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's KV over every layer, K and V."""
        return self.num_layers * 2 * self.token_bytes

    def contiguous_bytes(self, tokens: int) -> int:
        """Size of the layer-major contiguous buffer holding ``tokens`` tokens."""
        return tokens * self.bytes_per_token

    def layer_extent(self, offset: int, tokens: int, layer: int) -> tuple[int, int]:
        """(offset, length) of one layer's K and V inside a contiguous buffer of ``tokens``."""
        plane = tokens * self.token_bytes
        return offset + layer * 2 * plane, 2 * plane

    def paged_layout(self, num_blocks: int, block_tokens: int) -> kvxfer.KvLayout:
        """kvxfer layout of a dense paged pool ``[layer][K/V][block][block_tokens][heads][dim]``."""
        return kvxfer.KvLayout(
            num_layers=self.num_layers,
            num_kv=2,
            num_blocks=num_blocks,
            block_bytes=block_tokens * self.token_bytes,
        )


def make_engine(name: str, backend: str, timeout: float = 60.0, host: str = "127.0.0.1") -> kvxfer.Engine:
    """An engine with one backend; tcp listens on ``host`` (default 127.0.0.1), an ephemeral port."""
    from kvxfer.config import EngineConfig

    cfg = EngineConfig()
    if backend == "tcp":
        cfg.backend.tcp.listen = f"{host}:0"
    return kvxfer.Engine(name, backends=[backend], config=cfg, timeout=timeout)


def padded_tokens(tokens: int, block_tokens: int) -> int:
    """Tokens rounded up to whole blocks: the plane length of a block-free buffer."""
    return -(-tokens // block_tokens) * block_tokens


class NotificationRouter:
    """Owns one engine's incoming notifications: a thread takes them and hands each to the
    handler registered for its prefix (the payload up to the first ``:``), or wakes the
    thread waiting for that exact payload. Unclaimed payloads are counted and dropped."""

    def __init__(self, engine: kvxfer.Engine) -> None:
        self._engine = engine
        self._handlers: dict[bytes, Callable[[kvxfer.Notification], None]] = {}
        self._waiters: dict[bytes, threading.Event] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="kvx-notifications", daemon=True)
        self._thread.start()

    def on(self, prefix: bytes, handler: Callable[[kvxfer.Notification], None]) -> None:
        with self._lock:
            self._handlers[prefix] = handler

    def expect(self, payload: bytes) -> threading.Event:
        """Registers interest in ``payload`` BEFORE the message that triggers it is sent."""
        ev = threading.Event()
        with self._lock:
            self._waiters[payload] = ev
        return ev

    def forget(self, payload: bytes) -> None:
        with self._lock:
            self._waiters.pop(payload, None)

    def _next(self) -> list:
        """Waits up to 0.2 s; core v1 answers a bool (then take), core v2 the notification."""
        try:
            got = self._engine.wait_notification(timeout=0.2)
        except TimeoutError:  # core v2: nothing arrived
            return []
        if isinstance(got, bool):
            return self._engine.notifications() if got else []
        return [got, *self._engine.notifications()]

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                notes = self._next()
            except kvxfer.KvxferError:
                if self._closed.is_set():
                    return
                time.sleep(0.05)
                continue
            for n in notes:
                self._dispatch(n)

    def _dispatch(self, n: kvxfer.Notification) -> None:
        with self._lock:
            ev = self._waiters.pop(n.payload, None)
            handler = None if ev else self._handlers.get(n.payload.split(b":", 1)[0])
        if ev is not None:
            ev.set()
        elif handler is not None:
            try:
                handler(n)
            except Exception:  # a handler's failure must not stop the router
                self.dropped += 1
        else:
            self.dropped += 1

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2.0)


def answer_block_acks(router: NotificationRouter, engine: kvxfer.Engine) -> None:
    """Prefill side of block-by-block: reply to every block confirmation at once."""

    def reply(n: kvxfer.Notification) -> None:
        engine.notify(engine.peer(n.peer), BLOCK_ACK_REPLY + n.payload[len(BLOCK_ACK) :])

    router.on(BLOCK_ACK, reply)


def _wait(transfers: list[kvxfer.Transfer], what: str) -> None:
    try:
        for t in transfers:
            t.wait()
    except kvxfer.KvxferError as e:
        for t in transfers:
            t.cancel()
        raise KvTransferError(f"{what}: {e}") from e


def pull_block_free(
    engine: kvxfer.Engine,
    peer: kvxfer.Peer,
    local: kvxfer.Region,
    remote_region: int,
    remote_offset: int,
    tokens_padded: int,
    local_blocks: np.ndarray,
    geom: KvGeometry,
    *,
    per_layer: bool = False,
    timeout: float | None = None,
) -> int:
    """READs a layer-major contiguous range of ``tokens_padded`` tokens at ``remote_offset``
    of the prefill's region into the local paged blocks ``local_blocks`` (RecvScatter).
    One transfer, or one per layer. Returns the number of kvxfer transfers posted."""
    ids = np.ascontiguousarray(local_blocks, dtype=np.int64)
    if per_layer:
        posts = []
        for layer in range(geom.num_layers):
            off, length = geom.layer_extent(remote_offset, tokens_padded, layer)
            posts.append((layer, [[off, length]]))
    else:
        posts = [(None, [[remote_offset, geom.contiguous_bytes(tokens_padded)]])]
    transfers: list[kvxfer.Transfer] = []
    try:
        for layer, extents in posts:
            transfers.append(
                engine.post(
                    kvxfer.Op.READ,
                    peer,
                    local,
                    remote_region,
                    local_blocks=ids,
                    layers=None if layer is None else (layer, layer + 1),
                    remote_extents=extents,
                    timeout=timeout,
                )
            )
    except kvxfer.KvxferError as e:
        for t in transfers:
            t.cancel()
        raise KvTransferError(f"block-free post failed: {e}") from e
    _wait(transfers, "block-free transfer")
    return len(transfers)


def pull_paged_coalesced(
    engine: kvxfer.Engine,
    peer: kvxfer.Peer,
    local: kvxfer.Region,
    remote_region: int,
    local_blocks: np.ndarray,
    remote_blocks: np.ndarray,
    *,
    timeout: float | None = None,
) -> int:
    """One READ with paged block ids on both sides, coalesced by kvxfer into runs."""
    try:
        t = engine.post(
            kvxfer.Op.READ,
            peer,
            local,
            remote_region,
            local_blocks=local_blocks,
            remote_blocks=remote_blocks,
            timeout=timeout,
        )
    except kvxfer.KvxferError as e:
        raise KvTransferError(f"paged-coalesced post failed: {e}") from e
    _wait([t], "paged-coalesced transfer")
    return 1


def pull_block_by_block(
    engine: kvxfer.Engine,
    peer: kvxfer.Peer,
    router: NotificationRouter,
    local: kvxfer.Region,
    remote_region: int,
    local_blocks: np.ndarray,
    remote_blocks: np.ndarray,
    request_id: str,
    *,
    timeout: float = 30.0,
) -> int:
    """The paper's baseline: per block, one transfer (its per-layer pieces, uncoalesced),
    then one confirmation round trip (notification to the prefill, wait for its reply)."""
    local_blocks = np.asarray(local_blocks, dtype=np.int64)
    remote_blocks = np.asarray(remote_blocks, dtype=np.int64)
    if local_blocks.shape != remote_blocks.shape:
        raise KvTransferError(f"block counts differ: {local_blocks.size} local, {remote_blocks.size} remote")
    deadline = time.monotonic() + timeout
    for j in range(local_blocks.size):
        left = deadline - time.monotonic()
        if left <= 0:
            raise KvTransferError(f"block-by-block transfer of {request_id} passed its deadline at block {j}")
        try:
            t = engine.post(
                kvxfer.Op.READ,
                peer,
                local,
                remote_region,
                local_blocks=local_blocks[j : j + 1],
                remote_blocks=remote_blocks[j : j + 1],
                timeout=left,
                coalesce=False,
            )
        except kvxfer.KvxferError as e:
            raise KvTransferError(f"block-by-block post failed at block {j}: {e}") from e
        _wait([t], f"block {j}")
        tag = f":{request_id}:{j}".encode()
        ev = router.expect(BLOCK_ACK_REPLY + tag)
        try:
            engine.notify(peer, BLOCK_ACK + tag)
        except kvxfer.KvxferError as e:
            router.forget(BLOCK_ACK_REPLY + tag)
            raise KvTransferError(f"block {j} confirmation failed: {e}") from e
        if not ev.wait(max(0.0, deadline - time.monotonic())):
            router.forget(BLOCK_ACK_REPLY + tag)
            raise KvTransferError(f"no confirmation for block {j} of {request_id} before the deadline")
    return int(local_blocks.size)
