"""Drives KvxferConnector the way vLLM's scheduler and model runner do, with vLLM's own
classes (VllmConfig, KVCacheConfig, Request, KVCacheBlocks, KVConnectorOutput, the
connector factory), real paged KV tensors and a real kvxfer engine. One ``Instance`` is
one vLLM instance with one worker (tp 1): a scheduler-side and a worker-side connector.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from vllm.config import KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request, RequestStatus

LAYERS = 4
NUM_BLOCKS = 64
BLOCK_SIZE = 32  # the CPU attention backend's block sizes are multiples of 32
KV_HEADS = 2
HEAD = 32
DTYPE = torch.bfloat16
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
MODULE = "kvxfer.integrations.vllm"


def vllm_config(role: str, engine_id: str, **extra) -> VllmConfig:
    extra.setdefault("backends", ["shm", "tcp"])
    extra.setdefault("tcp_listen", "127.0.0.1:0")
    cfg = VllmConfig(
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvxferConnector",
            kv_connector_module_path=MODULE,
            kv_role=role,
            engine_id=engine_id,
            kv_connector_extra_config=extra,
        )
    )
    cfg.cache_config.block_size = BLOCK_SIZE
    cfg.scheduler_config.disable_hybrid_kv_cache_manager = True
    return cfg


def kv_cache_config() -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_size=HEAD, dtype=DTYPE)
    per_layer = NUM_BLOCKS * spec.page_size_bytes
    return KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[
            KVCacheTensor(
                size=per_layer, layers=[n], layer_stride=per_layer, block_stride=spec.page_size_bytes
            )
            for n in LAYER_NAMES
        ],
        kv_cache_groups=[KVCacheGroupSpec(LAYER_NAMES, spec)],
    )


def kv_tensors(seed: int | None) -> dict[str, torch.Tensor]:
    """The CPU attention backend's per-layer shape: [blocks, kv heads, block size, 2 * head]."""
    out = {}
    for i, name in enumerate(LAYER_NAMES):
        shape = (NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD)
        if seed is None:
            out[name] = torch.zeros(shape, dtype=DTYPE)
        else:
            g = torch.Generator().manual_seed(seed * 1000 + i)
            out[name] = torch.randint(-(2**15), 2**15, shape, dtype=torch.int16, generator=g).view(DTYPE)
    return out


def request(rid: str, prompt_len: int, params: dict | None) -> Request:
    sp = SamplingParams(
        max_tokens=1, extra_args={"kv_transfer_params": params} if params is not None else None
    )
    return Request(rid, list(range(1, prompt_len + 1)), sp, None)


def blocks(ids: list[int]) -> KVCacheBlocks:
    return KVCacheBlocks((tuple(KVCacheBlock(i) for i in ids),))


@dataclass
class Instance:
    role: str
    engine_id: str
    extra: dict = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        self.config = vllm_config(self.role, self.engine_id, **self.extra)
        kcc = kv_cache_config()
        self.scheduler = KVConnectorFactory.create_connector(self.config, KVConnectorRole.SCHEDULER, kcc)
        self.worker = KVConnectorFactory.create_connector(self.config, KVConnectorRole.WORKER, kcc)
        self.kv = kv_tensors(self.seed)
        self.worker.register_kv_caches(self.kv)
        # What vLLM's EngineCore does after the workers registered their caches.
        self.scheduler.set_xfer_handshake_metadata_pp_aware({(0, 0): self.worker.get_handshake_metadata()})
        self.sent: set[str] = set()
        self.recvd: set[str] = set()
        self.load_errors: set[int] = set()

    def step(self) -> None:
        """One engine step: scheduler metadata -> worker -> output back to the scheduler."""
        meta = self.scheduler.build_connector_meta(None)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)
        self.worker.wait_for_save()
        sent, recvd = self.worker.get_finished(set())
        self.load_errors |= self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        out = KVConnectorOutput(finished_sending=sent, finished_recving=recvd)
        self.scheduler.update_connector_output(out)
        self.sent |= sent or set()
        self.recvd |= recvd or set()

    def run_until(self, cond, timeout: float, period: float = 0.01) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.step()
            if cond():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(period)

    # -- prefill ---------------------------------------------------------------------------
    def finish_prefill(self, rid: str, prompt_len: int, block_ids: list[int], status=None) -> tuple:
        req = request(rid, prompt_len, {"do_remote_decode": True})
        req.status = status or RequestStatus.FINISHED_LENGTH_CAPPED
        return self.scheduler.request_finished(req, block_ids)

    # -- decode ----------------------------------------------------------------------------
    def admit(
        self, rid: str, prompt_len: int, params: dict, block_ids: list[int]
    ) -> tuple[Request, int, bool]:
        req = request(rid, prompt_len, dict(params))
        n, is_async = self.scheduler.get_num_new_matched_tokens(req, 0)
        self.scheduler.update_state_after_alloc(req, blocks(block_ids), n or 0)
        return req, n, is_async

    def leftovers(self) -> dict:
        s = self.scheduler.scheduler_side
        return {
            "scheduler_pending": s.has_pending(),
            **self.worker.worker_side.pending(),
            "notifications": len(self.worker.worker_side.engine.notifications()),
        }

    def close(self) -> None:
        self.worker.shutdown()
