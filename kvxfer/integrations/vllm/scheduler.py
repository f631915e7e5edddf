"""The connector's scheduler side: decides what is loaded from a prefill instance,
hands block ids to the workers, and holds a prefill's blocks until the decode has read
them (or the lease ends)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .metadata import (
    KvxferConnectorMetadata,
    KvxferHandshakeMetadata,
    RecvRequest,
    decode_params,
    encode_params,
)

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvxfer.integrations.vllm")


class SchedulerSide:
    def __init__(self, engine_id: str, lease_s: float) -> None:
        self.engine_id = engine_id
        self.lease_s = lease_s
        self.handshakes: dict[int, KvxferHandshakeMetadata] = {}
        self._to_recv: dict[str, RecvRequest] = {}  # decided this step
        self._to_send: dict[str, float] = {}  # decided this step
        self._to_abort: set[str] = set()
        self.loading: set[str] = set()  # handed to workers, not yet reported finished
        self.sending: set[str] = set()  # blocks held for a remote reader

    # -- decode side ------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return 0, False
        count = len(request.prompt_token_ids or ()) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return
        params["do_remote_prefill"] = False  # once: a second call is for blocks after the load
        if num_external_tokens <= 0:
            return
        local = blocks.get_unhashed_block_ids()
        skip = len(request.prompt_token_ids or ()) - num_external_tokens  # the local prefix hit
        try:
            recv = decode_params(request.request_id, params, local, skip)
        except (KeyError, TypeError, ValueError) as e:
            # Malformed or unusable parameters: load nothing; the worker reports the
            # blocks as failed so vLLM's kv_load_failure_policy applies.
            log.warning("kvxfer: request %s: bad kv_transfer_params: %s", request.request_id, e)
            recv = RecvRequest(request.request_id, local, [], "", "", 0, 0, {}, [], 0.0)
        self._to_recv[request.request_id] = recv

    # -- prefill side -----------------------------------------------------------------
    def set_handshakes(self, metadata: dict[int, Any]) -> None:
        self.handshakes = {int(r): m for r, m in metadata.items() if isinstance(m, KvxferHandshakeMetadata)}

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        if rid in self.loading:
            # A decode request ended (abort, deadline) while its KV is still being read
            # into these blocks: keep them until the worker has stopped the transfer.
            self._to_abort.add(rid)
            self._to_recv.pop(rid, None)
            return True, None
        if self._to_recv.pop(rid, None) is not None:
            return False, None  # never handed to a worker: nothing touches the blocks
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_decode"):
            return False, None
        from vllm.v1.request import RequestStatus

        if request.status != RequestStatus.FINISHED_LENGTH_CAPPED or not block_ids:
            return False, None  # aborted or stopped early: no decode will read
        if not self.handshakes:
            log.warning("kvxfer: no worker handshake yet; request %s is not handed off", rid)
            return False, None
        expires_at = time.time() + self.lease_s
        self._to_send[rid] = expires_at
        self.sending.add(rid)
        return True, encode_params(self.handshakes, block_ids, rid, expires_at)

    # -- both ---------------------------------------------------------------------------
    def build_connector_meta(self) -> KvxferConnectorMetadata:
        meta = KvxferConnectorMetadata(
            reqs_to_recv=self._to_recv, reqs_to_send=self._to_send, reqs_to_abort=self._to_abort
        )
        self.loading.update(self._to_recv)
        self._to_recv, self._to_send, self._to_abort = {}, {}, set()
        return meta

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        for rid in output.finished_recving or ():
            self.loading.discard(rid)
        for rid in output.finished_sending or ():
            self.sending.discard(rid)
            self.loading.discard(rid)  # an aborted load ends as a "send" (its blocks freed)

    def has_pending(self) -> bool:
        return bool(self.sending or self.loading or self._to_send or self._to_recv or self._to_abort)
