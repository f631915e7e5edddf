"""``KvxferConnector``: vLLM's V1 KV connector interface over kvxfer.

Pull model: the prefill instance finishes a request and keeps its blocks
(``request_finished`` answers "free later" and returns the block ids and its workers'
kvxfer descriptors as ``kv_transfer_params``); the decode instance allocates blocks,
and each of its workers READs the request's KV with one multi-region kvxfer transfer
(one part per layer, block ids coalesced into runs by the core). The READ's notification
reaches the prefill only after the bytes are read; the prefill's worker reports the
request in ``finished_sending`` and vLLM frees the blocks. A lease bounds how long a
prefill holds blocks nobody reads; aborts and deadlines leave no blocks or
notifications behind.

Options (``kv_connector_extra_config``): ``backends`` (default ``["shm", "tcp"]``),
``tcp_listen`` (default ``""``: every interface, an ephemeral port), ``lease_s`` (30),
``load_timeout_s`` (20), ``fault_script`` (tests only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .metadata import KvxferConnectorMetadata, KvxferHandshakeMetadata
from .scheduler import SchedulerSide
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["KvxferConnector", "KvxferConnectorMetadata", "KvxferHandshakeMetadata"]


def _tp_rank_and_size(vllm_config: VllmConfig) -> tuple[int, int]:
    size = vllm_config.parallel_config.tensor_parallel_size
    try:
        from vllm.distributed.parallel_state import get_tp_group

        return get_tp_group().rank_in_group, size
    except (AssertionError, AttributeError):  # no distributed group (a lone worker)
        return 0, size


class KvxferConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        tc = self._kv_transfer_config
        extra = tc.kv_connector_extra_config or {}
        engine_id = str(tc.engine_id)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(engine_id, float(extra.get("lease_s", 30.0)))
        else:
            rank, size = _tp_rank_and_size(vllm_config)
            self._worker = WorkerSide(
                engine_id=engine_id,
                tp_rank=rank,
                tp_size=size,
                block_size=vllm_config.cache_config.block_size,
                num_blocks=kv_cache_config.num_blocks,
                backends=list(extra.get("backends", ["shm", "tcp"])),
                load_timeout_s=float(extra.get("load_timeout_s", 20.0)),
                tcp_listen=str(extra.get("tcp_listen", "")),
                fault_script=str(extra.get("fault_script", "")),
            )

    # -- scheduler side -----------------------------------------------------------------
    @property
    def scheduler_side(self) -> SchedulerSide:
        assert self._scheduler is not None, "called on the worker-side connector"
        return self._scheduler

    @property
    def worker_side(self) -> WorkerSide:
        assert self._worker is not None, "called on the scheduler-side connector"
        return self._worker

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler_side.build_connector_meta()

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.scheduler_side.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler_side.request_finished(request, block_ids)

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        self.scheduler_side.set_handshakes(metadata)

    def has_pending_block_frees(self) -> bool:
        return self._scheduler is not None and bool(self._scheduler.sending or self._scheduler.loading)

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        return tuple(range(len(self._kv_cache_config.kv_cache_groups)))

    # -- worker side --------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.worker_side.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KvxferHandshakeMetadata | None:
        if self._worker is None or self._worker.engine is None:
            return None
        return self._worker.handshake()

    def _meta(self) -> KvxferConnectorMetadata | None:
        meta = self._connector_metadata
        return meta if isinstance(meta, KvxferConnectorMetadata) else None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker_side.absorb(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole requests between steps (asynchronous), never per layer

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # pull model: the decode reads; the prefill only keeps its blocks

    def wait_for_save(self) -> None:
        self.worker_side.absorb(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sent, recvd = self.worker_side.get_finished()
        return sent or None, recvd or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.take_load_errors()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
