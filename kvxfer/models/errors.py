"""Typed errors of the model runtime. Every one derives from :class:`ModelError`, itself a
:class:`kvxfer.errors.KvxferError`, and where natural also from the matching builtin."""

from __future__ import annotations

from ..errors import KvxferError


class ModelError(KvxferError):
    """Base class of the model runtime's errors."""

    code = "MODEL"


class EmptyPromptError(ModelError, ValueError):
    """A prompt with no tokens (prefill needs at least one)."""

    code = "MODEL_EMPTY_PROMPT"


class ContextLengthError(ModelError, ValueError):
    """A prompt, or a sequence being decoded, longer than the model's max_position_embeddings."""

    code = "MODEL_CONTEXT_LENGTH"


class InvalidTokenError(ModelError, ValueError):
    """A token id outside [0, vocab_size)."""

    code = "MODEL_INVALID_TOKEN"


class BufferTooSmallError(ModelError, ValueError):
    """A preallocated KV buffer (kv_out) smaller than the prompt's KV."""

    code = "MODEL_BUFFER_TOO_SMALL"


class PoolExhaustedError(ModelError):
    """The paged KV pool has fewer free blocks than asked for. Nothing was allocated."""

    code = "MODEL_POOL_EXHAUSTED"


class InvalidArgumentError(ModelError, ValueError):
    """Shapes, dtypes, devices, block ids or sequence state that do not fit."""

    code = "MODEL_INVALID_ARGUMENT"


class WeightsError(ModelError):
    """A state dict that does not match the configuration, or weights that cannot be found/converted."""

    code = "MODEL_WEIGHTS"


__all__ = [
    "BufferTooSmallError",
    "ContextLengthError",
    "EmptyPromptError",
    "InvalidArgumentError",
    "InvalidTokenError",
    "ModelError",
    "PoolExhaustedError",
    "WeightsError",
]
