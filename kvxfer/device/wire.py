"""The cloud-device session protocol (version 1): newline-delimited JSON over one TCP connection,
one request per connection, both directions at once.

device -> cloud
  ``{"v":1,"type":"hello","model":..,"model_version":..,"tokenizer_hash":..}``
  ``{"v":1,"type":"generate","request_id":..,"prompt_token_ids":[..],"n":N,"rho":R,
     "system_len":S,"query_len":Q,"max_tokens":G,"stop_token_ids":[..]}``
  at any time after: ``{"type":"caught_up","index":h}`` (stop; the device owns token h on),
  ``{"type":"more","n":k}`` (raise the quota by k), ``{"type":"finish"}`` (stream to the end).
cloud -> device
  ``{"v":1,"type":"hello_ok",..identity}`` or ``{"v":1,"type":"error","code":"version_mismatch",..}``
  ``{"type":"token","index":i,"token_id":t}``; token 0 carries ``"refined":[kept indices]`` when
  rho < 1 (the refined prompt travels with the first token);
  ``{"type":"done","reason":"quota"|"caught_up"|"length"|"stop","cloud_busy_s":..,"cloud_tokens":..,
     "cloud_prefill_s":..}``
Closing the connection also stops the cloud (the device may just hang up once caught up).
"""

from __future__ import annotations

import json
from typing import Any

from kvxfer.device.errors import BadSettingsError

VERSION = 1


def encode(msg: dict[str, Any]) -> bytes:
    return (json.dumps({"v": VERSION, **msg}, separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except ValueError as e:
        raise BadSettingsError(f"malformed session message: {line[:80]!r}") from e
    if not isinstance(msg, dict) or msg.get("v") != VERSION or "type" not in msg:
        raise BadSettingsError(f"session message of another version or without a type: {line[:80]!r}")
    return msg


def check_identity(mine: dict, theirs: dict) -> str | None:
    """None when both sides run the same model and tokenizer, else what differs."""
    diffs = [k for k in ("model_version", "tokenizer_hash") if mine.get(k) != theirs.get(k)]
    if not diffs:
        return None
    return ", ".join(f"{k}: cloud {mine.get(k)!r} vs device {theirs.get(k)!r}" for k in diffs)
