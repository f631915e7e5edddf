"""What the connector's two sides and the two instances exchange.

- ``KvxferHandshakeMetadata``: one per worker (tp rank), from ``get_handshake_metadata``
  to the scheduler (vLLM's EngineCore collects them); it is the worker's kvxfer
  descriptor plus the names of the layers in region order.
- ``kv_transfer_params``: the prefill's ``request_finished`` returns them; the router
  hands them to the decode's request. Plain JSON (descriptors base64).
- ``KvxferConnectorMetadata``: scheduler -> worker, once per step.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)

# Notification a decode worker attaches to its READ (or sends when it gives up): the
# prefill may free the blocks once all readers said so. Payload:
# READ_DONE_PREFIX + b"<readers>:" + request id, readers = decode ranks reading from
# each prefill rank (heterogeneous TP).
READ_DONE_PREFIX = b"kvxfer-read:"


def read_done(request_id: str, readers: int) -> bytes:
    return READ_DONE_PREFIX + f"{readers}:{request_id}".encode()


def parse_read_done(payload: bytes) -> tuple[str, int] | None:
    if not payload.startswith(READ_DONE_PREFIX):
        return None
    head, _, rid = payload[len(READ_DONE_PREFIX) :].decode(errors="replace").partition(":")
    return (rid, int(head)) if head.isdigit() and int(head) > 0 else None


@dataclass
class KvxferHandshakeMetadata(KVConnectorHandshakeMetadata):
    engine_id: str
    tp_rank: int
    tp_size: int
    block_size: int
    descriptor: bytes
    layer_names: list[str]  # region i of the descriptor holds layer_names[i]
    # Page geometry of vLLM's CPU layout [blocks, kv_heads, block_size, row]; -1 when the
    # tensors have another shape (then only equal TP and block sizes are served).
    kv_heads: int = -1
    row_bytes: int = -1


@dataclass
class RecvRequest:
    """A decode request whose prompt KV is read from a prefill instance."""

    request_id: str
    local_block_ids: list[int]
    remote_block_ids: list[int]
    remote_request_id: str
    remote_engine_id: str
    remote_tp_size: int
    remote_block_size: int
    descriptors: dict[int, bytes]  # prefill tp rank -> kvxfer descriptor
    layer_names: list[str]
    expires_at: float  # wall clock: the prefill frees the blocks then
    remote_kv_heads: int = -1  # per prefill rank
    remote_row_bytes: int = -1


@dataclass
class KvxferConnectorMetadata(KVConnectorMetadata):
    reqs_to_recv: dict[str, RecvRequest] = field(default_factory=dict)
    reqs_to_send: dict[str, float] = field(default_factory=dict)  # request id -> lease end (wall clock)
    reqs_to_abort: set[str] = field(default_factory=set)  # decode requests finished while loading


def encode_params(
    handshakes: dict[int, KvxferHandshakeMetadata], block_ids: list[int], request_id: str, expires_at: float
) -> dict[str, Any]:
    first = handshakes[min(handshakes)]
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_request_id": request_id,
        "remote_block_ids": list(block_ids),
        "remote_engine_id": first.engine_id,
        "remote_tp_size": first.tp_size,
        "remote_block_size": first.block_size,
        "remote_layer_names": list(first.layer_names),
        "remote_descriptors": {
            str(r): base64.b64encode(h.descriptor).decode() for r, h in handshakes.items()
        },
        "remote_expires_at": expires_at,
        "remote_kv_heads": first.kv_heads,
        "remote_row_bytes": first.row_bytes,
    }


def decode_params(
    request_id: str, params: dict[str, Any], local_block_ids: list[int], skip_tokens: int = 0
) -> RecvRequest:
    """`skip_tokens`: prompt tokens the decode has already (a local prefix-cache hit); the
    remote blocks holding them are not read. A hit that does not end on a prefill block
    boundary is refused when the decode's blocks are loaded."""
    remote = list(params["remote_block_ids"])
    bs = int(params["remote_block_size"])
    if skip_tokens % bs:
        raise ValueError(f"a local prefix of {skip_tokens} tokens does not end on a prefill block of {bs}")
    remote = remote[skip_tokens // bs :]
    return RecvRequest(
        request_id=request_id,
        local_block_ids=list(local_block_ids),
        remote_block_ids=remote,
        remote_request_id=str(params.get("remote_request_id", request_id)),
        remote_engine_id=str(params["remote_engine_id"]),
        remote_tp_size=int(params["remote_tp_size"]),
        remote_block_size=int(params["remote_block_size"]),
        descriptors={int(r): base64.b64decode(d) for r, d in params["remote_descriptors"].items()},
        layer_names=list(params["remote_layer_names"]),
        expires_at=float(params["remote_expires_at"]),
        remote_kv_heads=int(params.get("remote_kv_heads", -1)),
        remote_row_bytes=int(params.get("remote_row_bytes", -1)),
    )
