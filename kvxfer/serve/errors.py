"""Typed errors of the P/D-Serve layer. Every one derives from :class:`ServeError`, itself a
:class:`kvxfer.errors.KvxferError`."""

from __future__ import annotations

from ..errors import KvxferError


class ServeError(KvxferError):
    """Base class of the serving layer's errors."""

    code = "SERVE"


class ConfigError(ServeError, ValueError):
    """A worker or deployment option that does not fit (unknown mode, b_p < 1, ...)."""

    code = "SERVE_CONFIG"


class KvTransferError(ServeError):
    """A KV range could not be moved (the underlying kvxfer error is the __cause__)."""

    code = "SERVE_KV_TRANSFER"


class WorkerStartError(ServeError, RuntimeError):
    """A worker process exited or did not report ready before its deadline."""

    code = "SERVE_WORKER_START"


class ProfileError(ServeError, ValueError):
    """A compute profile that is missing or malformed."""

    code = "SERVE_PROFILE"


class GatewayError(KvxferError):
    """Bad gateway configuration or a request the gateway refuses (bad JSON, unknown field value)."""

    code = "INVALID_ARGUMENT"
