"""The Engine facade: the native engine plus buffer adapters and conveniences.

Thread contract (from the core): every method may be called from any thread; calls that
block (``add_peer``, ``post``, ``Transfer.wait``, ``wait_notification``) release the GIL.
Bytes move on each backend's own threads; nothing needs to be polled for progress.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from . import _native
from ._native import KvLayout, Op, Peer, Region, Transfer


class Notification(NamedTuple):
    """A message a peer attached to a transfer (or sent alone), delivered after its data."""

    peer: str
    peer_instance: int
    payload: bytes


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
    count = int(np.prod(shape, dtype=np.int64))
    buf = _native.HostBuffer(max(1, count * dt.itemsize))
    return np.frombuffer(buf, dtype=np.uint8, count=count * dt.itemsize).view(dt).reshape(shape)


def _as_ids(blocks: Any) -> np.ndarray | None:
    if blocks is None:
        return None
    arr = np.asarray(blocks)
    if arr.size and arr.dtype.kind not in "iu":
        raise _error("INVALID_ARGUMENT", f"block ids must be an integer array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _as_extents(extents: Any) -> np.ndarray | None:
    if extents is None:
        return None
    arr = np.ascontiguousarray(extents, dtype=np.uint64)
    return arr.reshape(-1, 2) if arr.ndim == 1 and arr.size == 2 else arr


def _sides(local_blocks, remote_blocks, local_extents, remote_extents, layers, remote_layers) -> dict:
    """The keyword arguments describing both sides, as the native post()/plan() take them."""
    return {
        "local_blocks": _as_ids(local_blocks),
        "remote_blocks": _as_ids(remote_blocks),
        "local_extents": _as_extents(local_extents),
        "remote_extents": _as_extents(remote_extents),
        "layers": layers,
        "remote_layers": remote_layers,
    }


class Engine(_native.Engine):
    """One per process (or GPU worker). See the module docstring for the thread contract.

    ``Engine(name, backends=None, threads=0, device="", timeout=30.0, connect_timeout=10.0)``:
    ``backends`` lists the backends to start in order of preference (default: every
    available one that is on by default); ``timeout`` is the default transfer deadline in
    seconds, applied when ``post`` gets none.
    """

    def __enter__(self) -> Engine:
        return self

    def __del__(self) -> None:
        # The native engine holds its peers and they hold it: without close() it would
        # live (with its threads) until the process ends.
        try:
            self.close()
        except Exception:
            pass

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register(self, buffer: Any, layout: KvLayout | None = None) -> Region:
        """Registers host memory: any writable C-contiguous buffer (numpy array, bytearray,
        mmap) or a CPU torch tensor. The region keeps ``buffer`` alive."""
        if hasattr(buffer, "data_ptr") and hasattr(buffer, "element_size"):  # torch.Tensor
            if getattr(buffer, "device", None) is not None and str(buffer.device) != "cpu":
                raise _error("UNSUPPORTED", f"tensor on {buffer.device}: only host memory is supported")
            if not buffer.is_contiguous():
                raise _error("INVALID_ARGUMENT", "tensor is not contiguous")
            nbytes = buffer.numel() * buffer.element_size()
            return self.register_ptr(buffer.data_ptr(), nbytes, layout, owner=buffer)
        return self.register_buffer(buffer, layout)

    def post(  # type: ignore[override]
        self,
        op: Op,
        peer: Peer,
        local: Region,
        remote_region: int,
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

        Each side is block ids of its region's KV layout (``*_blocks``, 1-D ints; the
        remote side defaults to the local ids) or byte extents (``*_extents``, an (N, 2)
        array of [offset, length]). ``layers=(begin, end)`` restricts blocks to a layer
        range. The local byte stream (blocks in (layer, K/V, list position) order) lands on
        the remote byte stream in the same order. ``notify`` reaches the peer only after
        every byte is visible there. Invalid input raises before anything moves.
        """
        return super().post(
            op,
            peer,
            local,
            remote_region,
            **_sides(local_blocks, remote_blocks, local_extents, remote_extents, layers, remote_layers),
            notify=notify,
            timeout=timeout,
            coalesce=coalesce,
        )

    def plan(  # type: ignore[override]
        self,
        op: Op,
        peer: Peer,
        local: Region,
        remote_region: int,
        *,
        local_blocks: Any = None,
        remote_blocks: Any = None,
        local_extents: Any = None,
        remote_extents: Any = None,
        layers: tuple[int, int] | None = None,
        remote_layers: tuple[int, int] | None = None,
        coalesce: bool = True,
    ) -> dict[str, float]:
        """Validates and plans without moving bytes: ``bytes``, ``pieces`` (blocks x layers
        x K/V before coalescing), ``runs`` (operations after), ``coalescing_ratio``."""
        return super().plan(
            op,
            peer,
            local,
            remote_region,
            **_sides(local_blocks, remote_blocks, local_extents, remote_extents, layers, remote_layers),
            coalesce=coalesce,
        )

    def write(self, peer: Peer, local: Region, remote_region: int, blocks: Any, **kw: Any) -> Transfer:
        """``post(Op.WRITE, ...)`` with the same block ids on both sides unless
        ``remote_blocks`` is given."""
        return self.post(Op.WRITE, peer, local, remote_region, local_blocks=blocks, **kw)

    def read(self, peer: Peer, local: Region, remote_region: int, blocks: Any, **kw: Any) -> Transfer:
        """``post(Op.READ, ...)``: pulls the peer's blocks into the local ones."""
        return self.post(Op.READ, peer, local, remote_region, local_blocks=blocks, **kw)

    def notifications(self, max: int = 0) -> list[Notification]:  # type: ignore[override]  # noqa: A002
        """Takes the notifications received so far (at most ``max`` if > 0)."""
        return [Notification(*n) for n in super().notifications(max)]

    def wait_for_notifications(self, count: int, timeout: float) -> list[Notification]:
        """Collects ``count`` notifications or raises kvxfer.errors.TimeoutError."""
        import time

        got: list[Notification] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            left = deadline - time.monotonic()
            if left <= 0 or not self.wait_notification(max(left, 1e-3)):
                if len(got) < count:
                    got.extend(self.notifications(count - len(got)))
                if len(got) < count:
                    raise _error("TIMEOUT", f"received {len(got)} of {count} notifications in {timeout} s")
                break
            got.extend(self.notifications(count - len(got)))
        return got

    def wait_all(self, transfers: Sequence[Transfer], timeout: float | None = None) -> None:
        """Waits for every transfer; raises the first failure."""
        for t in transfers:
            t.wait(timeout)


def _error(code: str, message: str) -> Exception:
    from .errors import from_status

    return from_status(code, message)
