"""Tokenizers of the P/D-Serve gateway: what it needs from one (:class:`Tokenizer`), the
deterministic byte-level tokenizer of the seeded tiny models, a wrapper around a
``transformers`` tokenizer (SmolLM2's, with its chat template), and :func:`load_tokenizer`."""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any, Protocol

from kvxfer.serve.errors import GatewayError


class Tokenizer(Protocol):
    """What the gateway needs from a tokenizer."""

    name: str
    eos_token_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def chat(self, messages: Sequence[dict[str, Any]]) -> list[int]: ...

    def detokenizer(self) -> Detokenizer: ...


class Detokenizer(Protocol):
    def add(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class ByteTokenizer:
    """Deterministic byte-level tokenizer for the seeded random tiny models.

    A token id below 256 is that byte; ``eos_token_id`` (default 256) ends a sequence; ids above
    it map to byte ``id % 256`` so any model output decodes. ``encode`` of ASCII text gives one
    token per character, which is what the workload uses to hit exact prompt lengths.
    """

    def __init__(self, vocab_size: int = 512, eos_token_id: int = 256) -> None:
        if vocab_size < 257 or not 0 <= eos_token_id < vocab_size:
            raise GatewayError(f"byte tokenizer needs vocab_size >= 257 and eos in range, got {vocab_size}")
        self.name = "bytes"
        self.vocab_size = vocab_size
        self.eos_token_ids = [eos_token_id]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        parts = [f"<|{m.get('role', 'user')}|>{_content_text(m.get('content', ''))}\n" for m in messages]
        return self.encode("".join(parts) + "<|assistant|>")

    def detokenizer(self) -> Detokenizer:
        return _ByteDetokenizer(self.eos_token_ids)


class _ByteDetokenizer:
    def __init__(self, eos: list[int]) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._eos = set(eos)

    def add(self, token_id: int) -> str:
        if token_id in self._eos:
            return ""
        return self._dec.decode(bytes([token_id % 256]))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class HfTokenizer:
    """A ``transformers`` tokenizer (e.g. SmolLM2's), with its chat template."""

    def __init__(self, tokenizer: Any, name: str = "hf") -> None:
        self._tok = tokenizer
        self.name = name
        eos = tokenizer.eos_token_id
        self.eos_token_ids = [] if eos is None else [int(eos)]

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        msgs = [
            {"role": m.get("role", "user"), "content": _content_text(m.get("content", ""))} for m in messages
        ]
        ids = self._tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def detokenizer(self) -> Detokenizer:
        return _HfDetokenizer(self._tok, self.eos_token_ids)


class _HfDetokenizer:
    """Incremental detokenization: decode the whole output, emit the new suffix once it is whole."""

    def __init__(self, tok: Any, eos: list[int]) -> None:
        self._tok = tok
        self._ids: list[int] = []
        self._sent = 0
        self._eos = set(eos)

    def add(self, token_id: int) -> str:
        if token_id in self._eos:
            return ""
        self._ids.append(token_id)
        text = self._tok.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character
            return ""
        new, self._sent = text[self._sent :], len(text)
        return new

    def flush(self) -> str:
        text = self._tok.decode(self._ids, skip_special_tokens=True)
        new, self._sent = text[self._sent :], len(text)
        return new


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise GatewayError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"`` (or ``"bytes:VOCAB"``) for the tiny random models; ``"smollm2"`` for the real
    weights (the tokenizer that :func:`kvxfer.models.load_smollm2` returns); otherwise a local
    ``transformers`` tokenizer directory."""
    if spec == "bytes" or spec.startswith("bytes:"):
        vocab = int(spec.split(":", 1)[1]) if ":" in spec else 512
        return ByteTokenizer(vocab_size=vocab)
    if spec == "smollm2":
        from kvxfer import models  # the serving extras' model loader

        loaded = models.load_smollm2()
        tok = getattr(loaded, "tokenizer", None)
        if tok is None and isinstance(loaded, tuple):
            tok = next((x for x in loaded if hasattr(x, "apply_chat_template")), None)
        if tok is None:
            raise GatewayError("kvxfer.models.load_smollm2() returned no tokenizer")
        return HfTokenizer(tok, name="smollm2")
    from transformers import AutoTokenizer

    return HfTokenizer(AutoTokenizer.from_pretrained(spec, local_files_only=True), name=spec)
