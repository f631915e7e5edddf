"""Typed errors of P/D-Device. Every one derives from :class:`kvxfer.errors.KvxferError`."""

from __future__ import annotations

from kvxfer.errors import InvalidArgumentError, KvxferError, PeerUnreachableError
from kvxfer.errors import TimeoutError as KvxferTimeoutError


class DeviceError(KvxferError):
    """Base class of the P/D-Device errors."""

    code = "DEVICE"


class VersionMismatchError(DeviceError):
    """Cloud and device run a different model version or tokenizer: the session is refused.

    Cloud tokens are only meaningful to a device that runs the same model with the same
    tokenizer, so a mismatch is refused at session start instead of producing garbage."""

    code = "VERSION_MISMATCH"


class BadSettingsError(DeviceError, InvalidArgumentError):
    """Settings (n, rho), a profile or a request field out of range."""

    code = "INVALID_ARGUMENT"


class LinkDownError(DeviceError, PeerUnreachableError):
    """The cloud-device link broke (disconnect, reset) before the cloud stream ended."""

    code = "PEER_UNREACHABLE"


class DeviceTimeoutError(DeviceError, KvxferTimeoutError):
    """A P/D-Device wait passed its deadline."""

    code = "TIMEOUT"


__all__ = [
    "DeviceError",
    "VersionMismatchError",
    "BadSettingsError",
    "LinkDownError",
    "DeviceTimeoutError",
]
