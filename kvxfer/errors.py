"""Typed exceptions raised by kvxfer. Every one derives from :class:`KvxferError`.

The native core reports a status code; :func:`from_status` maps it to the class below.
Where natural, a class also derives from the matching builtin, so ``except ValueError``
or ``except TimeoutError`` work as a Python programmer expects.
"""

from __future__ import annotations

import builtins


class KvxferError(Exception):
    """Base class of every kvxfer error. ``code`` is the native status code name;
    ``retryable`` says whether the same request may succeed later (a timeout, a peer that
    was unreachable) rather than being wrong in itself."""

    code = "INTERNAL"
    retryable = False

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgumentError(KvxferError, ValueError):
    """Bad sizes, layouts, mismatched byte totals, malformed arguments."""

    code = "INVALID_ARGUMENT"


class OutOfRangeError(InvalidArgumentError, IndexError):
    """A block id, layer range or extent lies outside its region or layout."""

    code = "OUT_OF_RANGE"


class NotFoundError(KvxferError, LookupError):
    """Unknown region, peer or backend; or memory not registered with this engine."""

    code = "NOT_FOUND"


class UnsupportedError(KvxferError):
    """The backend or this build lacks the capability (e.g. no RDMA device)."""

    code = "UNSUPPORTED"


class TransportError(KvxferError, OSError):
    """An operating-system or verbs call failed; the message carries errno or the WC status."""

    code = "SYSTEM"


class PeerUnreachableError(KvxferError, ConnectionError):
    """The peer is gone: its process exited, or its connection was lost."""

    code = "PEER_UNREACHABLE"
    retryable = True


class RemoteError(KvxferError):
    """The peer rejected the operation (e.g. remote access error, bad rkey)."""

    code = "REMOTE"


class TimeoutError(KvxferError, builtins.TimeoutError):  # noqa: A001 - deliberate shadow
    """A deadline passed."""

    code = "TIMEOUT"
    retryable = True


class WaitTimeoutError(TimeoutError):
    """A wait gave up at its own timeout; the thing waited for has not failed (a transfer
    may still end DONE)."""

    code = "WAIT_TIMEOUT"


class CanceledError(KvxferError):
    """The transfer was canceled, its peer removed, or its engine closed."""

    code = "CANCELED"


class BadDescriptorError(InvalidArgumentError):
    """Peer metadata is malformed, truncated, corrupted or of an unsupported version."""

    code = "BAD_DESCRIPTOR"


class BackPressureError(KvxferError):
    """A bounded queue on the receiving side is full: its application is not taking
    notifications (``Engine.notifications()`` / ``wait_notification``). Nothing was lost:
    the bytes are in place, the notification was not queued, and the sender is told."""

    code = "BACK_PRESSURE"
    retryable = True


class InternalError(KvxferError):
    """A kvxfer bug or a broken internal contract. Please report it."""

    code = "INTERNAL"


_BY_CODE: dict[str, type[KvxferError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        OutOfRangeError,
        NotFoundError,
        UnsupportedError,
        TransportError,
        PeerUnreachableError,
        RemoteError,
        TimeoutError,
        WaitTimeoutError,
        CanceledError,
        BadDescriptorError,
        InternalError,
        BackPressureError,
    )
}


def from_status(code: str, message: str) -> KvxferError:
    """Builds the exception for a native status (used by the native module)."""
    cls = _BY_CODE.get(code, InternalError)
    return cls(message, code)


__all__ = [
    "KvxferError",
    "InvalidArgumentError",
    "OutOfRangeError",
    "NotFoundError",
    "UnsupportedError",
    "TransportError",
    "PeerUnreachableError",
    "RemoteError",
    "TimeoutError",
    "WaitTimeoutError",
    "CanceledError",
    "BadDescriptorError",
    "InternalError",
    "from_status",
]
