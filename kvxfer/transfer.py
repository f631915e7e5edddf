"""The public transfer handle: state, error, wait, cancel, telemetry, and ``await``.

A ``Transfer`` wraps the native handle (which shares the core's job) and knows its
engine, so ``await transfer`` can use the engine's completion file descriptor on the
running event loop without a thread per waiter.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from . import _native
from .errors import WaitTimeoutError

if TYPE_CHECKING:
    from .engine import Engine

TransferState = _native.TransferState
Op = _native.Op


class Transfer:
    """One posted transfer. Ends DONE or FAILED by its deadline, whoever watches it."""

    # Engine.post_extent (the small-request path) builds a Transfer without calling
    # __init__ and sets these slots itself: a slot added here must be set there too.
    __slots__ = ("_t", "_engine", "__weakref__")

    def __init__(self, native: Any, engine: Engine) -> None:
        self._t = native
        self._engine = engine

    @property
    def id(self) -> int:
        return self._t.id

    @property
    def op(self) -> Any:
        return self._t.op

    @property
    def state(self) -> Any:
        """PENDING, DONE or FAILED; applies the deadline (never blocks)."""
        return self._t.state

    def poll(self) -> Any:
        return self._t.state

    def done(self) -> bool:
        return self._t.state != TransferState.PENDING

    @property
    def error(self) -> BaseException | None:
        """The failure (a kvxfer.errors instance) once FAILED, else None."""
        return self._t.error

    @property
    def quiesced(self) -> bool:
        """True once no backend touches the transfer's memory any more."""
        return self._t.quiesced

    @property
    def bytes(self) -> int:
        return self._t.bytes

    @property
    def plan(self) -> dict[str, float]:
        """``bytes``, ``pieces`` (blocks x layers x K/V before coalescing), ``runs``,
        ``planes``, ``parts`` (regions), ``coalescing_ratio``."""
        return self._t.plan

    @property
    def telemetry(self) -> dict[str, float]:
        """``bytes``, ``runs``, ``pieces``, ``parts``, ``post_cpu_us`` (validation,
        planning and submission on the caller's thread), ``data_s`` (post to data done)
        and ``total_s`` (post to terminal); -1 while not reached."""
        return self._t.telemetry

    def wait(self, timeout: float | None = None) -> Any:
        """Blocks until DONE (returned) or FAILED (raises its error). Without a timeout it
        waits until the transfer ends, which its deadline bounds. With one, raises
        :class:`kvxfer.errors.WaitTimeoutError` if it gave up first: the transfer itself
        has not failed and may still end DONE."""
        try:
            return self._t.wait(timeout)
        except TimeoutError:
            if self._t.state == TransferState.PENDING:
                raise WaitTimeoutError(
                    f"wait() gave up after {timeout} s; transfer {self.id} is still pending"
                ) from None
            raise

    def cancel(self) -> bool:
        """Requests cancellation; True if this call ended it (FAILED, CanceledError).
        A transfer whose notification is already on its way cannot be canceled."""
        return self._t.cancel()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._engine._aio().wait_transfer(self).__await__()

    def __repr__(self) -> str:
        return repr(self._t)
