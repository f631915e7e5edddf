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


def vllm_config(
    role: str, engine_id: str, block_size: int = BLOCK_SIZE, tp_size: int = 1, **extra
) -> VllmConfig:
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
    cfg.cache_config.block_size = block_size
    cfg.scheduler_config.disable_hybrid_kv_cache_manager = True
    cfg.parallel_config.tensor_parallel_size = tp_size  # set after validation: no real TP group
    return cfg


def kv_cache_config(block_size: int = BLOCK_SIZE, kv_heads: int = KV_HEADS) -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=kv_heads, head_size=HEAD, dtype=DTYPE)
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


def kv_tensors(
    seed: int | None, block_size: int = BLOCK_SIZE, kv_heads: int = KV_HEADS
) -> dict[str, torch.Tensor]:
    """The CPU attention backend's per-layer shape: [blocks, kv heads, block size, 2 * head]."""
    out = {}
    for i, name in enumerate(LAYER_NAMES):
        shape = (NUM_BLOCKS, kv_heads, block_size, 2 * HEAD)
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
    """One vLLM instance: a scheduler-side connector and `tp_size` worker-side ones (tp
    ranks are set by hand: there is no real TP group), each with its own KV tensors of
    KV_HEADS // tp_size heads. ``kv`` is rank 0's."""

    role: str
    engine_id: str
    extra: dict = field(default_factory=dict)
    seed: int | None = None
    tp_size: int = 1
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        heads = KV_HEADS // self.tp_size
        self.config = vllm_config(self.role, self.engine_id, self.block_size, self.tp_size, **self.extra)
        kcc = kv_cache_config(self.block_size, heads)
        self.scheduler = KVConnectorFactory.create_connector(self.config, KVConnectorRole.SCHEDULER, kcc)
        self.workers, self.kvs, handshakes = [], [], {}
        for rank in range(self.tp_size):
            w = KVConnectorFactory.create_connector(self.config, KVConnectorRole.WORKER, kcc)
            w.worker_side.tp_rank = rank
            kv = kv_tensors(None if self.seed is None else self.seed + 1000 * rank, self.block_size, heads)
            w.register_kv_caches(kv)
            handshakes[(0, rank)] = w.get_handshake_metadata()
            self.workers.append(w)
            self.kvs.append(kv)
        self.worker, self.kv = self.workers[0], self.kvs[0]
        # What vLLM's EngineCore does after the workers registered their caches.
        self.scheduler.set_xfer_handshake_metadata_pp_aware(handshakes)
        self.sent: set[str] = set()
        self.recvd: set[str] = set()
        self.load_errors: set[int] = set()
        self._partial: dict[tuple[str, str], int] = {}

    def step(self) -> None:
        """One engine step: scheduler metadata -> every worker -> the output back to the
        scheduler, a request finished once every worker reported it (as vLLM's
        KVOutputAggregator does)."""
        meta = self.scheduler.build_connector_meta(None)
        done = {"sent": set(), "recvd": set()}
        for w in self.workers:
            w.bind_connector_metadata(meta)
            w.start_load_kv(None)
            w.wait_for_save()
            sent, recvd = w.get_finished(set())
            self.load_errors |= w.get_block_ids_with_load_errors()
            w.clear_connector_metadata()
            for kind, ids in (("sent", sent), ("recvd", recvd)):
                for rid in ids or ():
                    n = self._partial.get((kind, rid), 0) + 1
                    if n == self.tp_size:
                        self._partial.pop((kind, rid), None)
                        done[kind].add(rid)
                    else:
                        self._partial[(kind, rid)] = n
        out = KVConnectorOutput(finished_sending=done["sent"] or None, finished_recving=done["recvd"] or None)
        self.scheduler.update_connector_output(out)
        self.sent |= done["sent"]
        self.recvd |= done["recvd"]

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
        out = {"scheduler_pending": self.scheduler.scheduler_side.has_pending()}
        for key in ("loads", "sends", "early_reads", "notifications"):
            out[key] = 0
        for w in self.workers:
            for key, n in w.worker_side.pending().items():
                out[key] += n
            out["notifications"] += len(w.worker_side.engine.notifications())
        return out

    def close(self) -> None:
        for w in self.workers:
            w.shutdown()
