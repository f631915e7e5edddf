"""Control messages between the gateway, prefill workers and decode workers (version 1).

Transport: HTTP/1.1 with JSON bodies (aiohttp on both ends). Token streams are
newline-delimited JSON (``application/x-ndjson``), one object per line; the gateway turns
them into OpenAI server-sent events. Every message carries ``"v": 1``; a receiver refuses
another version with HTTP 400 and ``{"v": 1, "error": "version"}``.

Endpoints
---------
Prefill worker
  ``POST /v1/prefill``  body :class:`PrefillRequest`.
      429 ``{"v":1,"error":"busy"}`` at once when every slot is taken (reject-retry policy;
      no local queue). 200 + NDJSON stream of :class:`TokenEvent` lines, ending with one
      :class:`DoneEvent` or :class:`ErrorEvent` line. The first token comes from the prefill
      itself; later ones are relayed from the decode worker (decode -> prefill -> gateway).
  ``GET /v1/status``    :class:`WorkerStatus`.
Decode worker
  ``POST /v1/decode``   body :class:`DecodeRequest`: the KV metadata of one range is ONE message.
      429 busy when its pending queue is full; else 200 + NDJSON tokens as above.
  ``GET /v1/status``    :class:`WorkerStatus`.
Both
  ``POST /v1/peer``     ``{"v":1,"descriptor":"<base64 kvxfer descriptor>"}`` -> own descriptor.
Gateway
  ``POST /v1/completions``, ``POST /v1/chat/completions`` (OpenAI-compatible, ``stream``),
  ``GET /v1/models``, ``GET /health``.

Additions by the workers (H2), all backward compatible within v1 (note for the gateway, H3):
  * ``KvRange.blocks`` (default empty): the prefill's paged block ids, used only by the two
    paged baseline modes; block-free ranges leave it empty.
  * ``POST /v1/peer`` may carry ``"role"``, ``"name"`` and ``"url"`` of the sender (a prefill
    learns its decodes' URLs so); the answer also names the worker (``"name"``).
  * A prefill honours the request header ``X-Kvxfer-Policy`` (``reject-retry`` or
    ``local-queue``), else its own default policy.
  * ``DoneEvent.timings`` holds the stages' times: ``prefill_wait_s``, ``prefill_s``,
    ``prefix_len`` (tokens reused), ``decode_pick_s``, ``pending_s``, ``transfer_s``,
    ``decode_s``, ``decode_tokens`` and ``decode`` (the decode worker's name, a string).
  * ErrorEvent codes also include ``"canceled"`` (the caller went away).
  * ``GET /v1/status`` adds role-specific fields (prefix hit rate, rejections, the reject
    decision time, pool blocks, mode, machine, kvxfer stats) to :func:`worker_status`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

VERSION = 1
NDJSON = "application/x-ndjson"


class ProtocolError(ValueError):
    """A message that is malformed, of another version, or missing a field."""


def check_version(body: dict[str, Any]) -> None:
    if not isinstance(body, dict) or body.get("v") != VERSION:
        got = body.get("v") if isinstance(body, dict) else type(body).__name__
        raise ProtocolError(f"unsupported control message version {got!r}; this side speaks v{VERSION}")


@dataclass
class PrefillRequest:
    request_id: str
    scenario: str
    prompt_token_ids: list[int]
    max_tokens: int
    deadline: float  # unix time; the request ends with an error event past it
    stop_token_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"v": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> PrefillRequest:
        check_version(body)
        try:
            return cls(
                request_id=str(body["request_id"]),
                scenario=str(body["scenario"]),
                prompt_token_ids=[int(t) for t in body["prompt_token_ids"]],
                max_tokens=int(body["max_tokens"]),
                deadline=float(body["deadline"]),
                stop_token_ids=[int(t) for t in body.get("stop_token_ids", [])],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"bad prefill request: {e!r}") from e


@dataclass
class KvRange:
    """Where a request's KV waits on the prefill (the block-free sender buffer)."""

    prefill: str  # the prefill engine's kvxfer name
    region: int  # kvxfer region id on the prefill
    offset: int  # byte offset of this request's buffer in the region
    length: int  # bytes
    tokens: int  # prompt tokens whose KV the range holds
    mode: str = "block-free"  # "block-free" | "paged-coalesced" | "block-by-block"
    # Added by the workers' author (backward compatible, defaults to empty): the prefill's paged
    # block ids of the prompt, for the two paged modes; ``region`` is then the paged pool's region
    # and offset/length describe nothing. Block-free ranges leave it empty.
    blocks: list[int] = field(default_factory=list)


@dataclass
class DecodeRequest:
    request_id: str
    kv: KvRange
    prompt_len: int
    first_token: int
    max_tokens: int
    deadline: float
    stop_token_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"v": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> DecodeRequest:
        check_version(body)
        try:
            kv = KvRange(**body["kv"])
            return cls(
                request_id=str(body["request_id"]),
                kv=kv,
                prompt_len=int(body["prompt_len"]),
                first_token=int(body["first_token"]),
                max_tokens=int(body["max_tokens"]),
                deadline=float(body["deadline"]),
                stop_token_ids=[int(t) for t in body.get("stop_token_ids", [])],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"bad decode request: {e!r}") from e


def token_event(index: int, token_id: int) -> dict[str, Any]:
    """TokenEvent: ``{"v":1,"type":"token","index":i,"token_id":t}`` (index 0 = first token)."""
    return {"v": VERSION, "type": "token", "index": index, "token_id": token_id}


def done_event(finish_reason: str, timings: dict[str, float] | None = None) -> dict[str, Any]:
    """DoneEvent: ``finish_reason`` is "stop" or "length"; ``timings`` holds stage times (s)."""
    return {"v": VERSION, "type": "done", "finish_reason": finish_reason, "timings": timings or {}}


def error_event(code: str, message: str) -> dict[str, Any]:
    """ErrorEvent: ``code`` is one of "deadline", "busy", "decode_failed", "prefill_failed",
    "transfer_failed", "internal"."""
    return {"v": VERSION, "type": "error", "code": code, "message": message}


def worker_status(role: str, name: str, slots: int, busy: int, queued: int, open_streams: int) -> dict:
    """WorkerStatus: what a worker reports on ``GET /v1/status``."""
    return {
        "v": VERSION,
        "role": role,
        "name": name,
        "slots": slots,
        "busy": busy,
        "queued": queued,
        "open_streams": open_streams,
    }
