"""The connector's worker side: registers vLLM's paged KV tensors with a kvxfer engine,
reads a request's KV from the prefill instance with one multi-region transfer (one part
per layer) whose notification tells the prefill it may free the blocks, and reports
finished sends and loads from keyed notifications and transfer states."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import kvxfer
from kvxfer import errors

from .metadata import READ_DONE_PREFIX, KvxferConnectorMetadata, KvxferHandshakeMetadata, RecvRequest

log = logging.getLogger("kvxfer.integrations.vllm")


@dataclass
class _Load:
    req: RecvRequest
    transfer: Any = None  # kvxfer.Transfer; None when it could not be posted
    error: str = ""
    aborted: bool = False


@dataclass
class _Layer:
    name: str
    region: Any
    block_bytes: int


@dataclass
class WorkerSide:
    engine_id: str
    tp_rank: int
    tp_size: int
    block_size: int
    num_blocks: int
    backends: list[str]
    load_timeout_s: float
    tcp_listen: str = ""
    fault_script: str = ""  # for tests: the fault backend's script
    engine: Any = None
    layers: list[_Layer] = field(default_factory=list)
    _peers: dict[tuple[str, int], Any] = field(default_factory=dict)
    _loads: dict[str, _Load] = field(default_factory=dict)
    _sends: dict[str, float] = field(default_factory=dict)  # request id -> lease end
    _reads_seen: set[str] = field(default_factory=set)  # notified before the metadata came
    _load_errors: set[int] = field(default_factory=set)
    _absorbed: Any = None

    # -- setup --------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        cfg = kvxfer.EngineConfig()
        cfg.backend.tcp.listen = self.tcp_listen
        cfg.backend.fault.script = self.fault_script
        self.engine = kvxfer.Engine(
            f"vllm-{self.engine_id}-tp{self.tp_rank}", list(self.backends), config=cfg
        )
        for name, t in kv_caches.items():
            self.layers.append(self._register(name, t))

    def _register(self, name: str, t: Any) -> _Layer:
        # vLLM's paged tensors are block-major: [num_blocks, ...] (the CPU backend's
        # [num_blocks, kv heads, block size, 2 * head]), each block's page contiguous; the
        # block stride may exceed the page (block-outermost, cross-layer allocations). A
        # block id then addresses one contiguous page of the layer's K and V.
        if t.device.type != "cpu":
            raise errors.UnsupportedError(f"layer {name}: only host KV is supported here, got {t.device}")
        if t.dim() < 2 or t.shape[0] != self.num_blocks or not t[0].is_contiguous():
            raise errors.InvalidArgumentError(
                f"layer {name}: expected a block-major tensor of {self.num_blocks} blocks with contiguous "
                f"pages, got shape {tuple(t.shape)} strides {t.stride()}"
            )
        page = t[0].numel() * t.element_size()
        stride = t.stride(0) * t.element_size()
        layout = kvxfer.KvLayout(num_blocks=self.num_blocks, block_bytes=page, block_stride=stride)
        nbytes = (self.num_blocks - 1) * stride + page
        region = self.engine.register_ptr(t.data_ptr(), nbytes, layout, owner=t)
        return _Layer(name, region, page)

    def handshake(self) -> KvxferHandshakeMetadata:
        return KvxferHandshakeMetadata(
            engine_id=self.engine_id,
            tp_rank=self.tp_rank,
            tp_size=self.tp_size,
            block_size=self.block_size,
            descriptor=self.engine.descriptor(),
            layer_names=[layer.name for layer in self.layers],
        )

    # -- per step -------------------------------------------------------------------------
    def absorb(self, meta: KvxferConnectorMetadata | None) -> None:
        """Takes this step's metadata once (start_load_kv and wait_for_save both call it)."""
        if meta is None or meta is self._absorbed:
            return
        self._absorbed = meta  # held, so a later metadata object cannot reuse its id
        self._sends.update(meta.reqs_to_send)
        for rid in meta.reqs_to_abort:
            load = self._loads.get(rid)
            if load is not None:
                load.aborted = True
                if load.transfer is not None:
                    load.transfer.cancel()
        for rid, req in meta.reqs_to_recv.items():
            self._loads[rid] = self._start_load(req)

    def _peer(self, req: RecvRequest, remote_rank: int) -> Any:
        key = (req.remote_engine_id, remote_rank)
        peer = self._peers.get(key)
        if peer is None or peer.removed:
            peer = self.engine.add_peer(req.descriptors[remote_rank])
            self._peers[key] = peer
        return peer

    def _start_load(self, req: RecvRequest) -> _Load:
        load = _Load(req)
        try:
            if req.remote_tp_size != self.tp_size:
                raise errors.UnsupportedError(
                    f"prefill tp {req.remote_tp_size} != decode tp {self.tp_size} (not supported yet)"
                )
            if req.remote_block_size != self.block_size:
                raise errors.UnsupportedError(
                    f"prefill block size {req.remote_block_size} != decode {self.block_size} "
                    "(not supported yet)"
                )
            if len(req.remote_block_ids) != len(req.local_block_ids):
                raise errors.InvalidArgumentError(
                    f"{len(req.local_block_ids)} local blocks for {len(req.remote_block_ids)} remote ones"
                )
            left = req.expires_at - time.time()
            if left <= 0.5:
                raise errors.TimeoutError(f"the prefill's lease on request {req.request_id} has ended")
            peer = self._peer(req, self.tp_rank)
            remote = {name: region.id for name, region in zip(req.layer_names, peer.regions, strict=False)}
            missing = [layer.name for layer in self.layers if layer.name not in remote]
            if missing:
                raise errors.NotFoundError(f"the prefill has no layers {missing[:3]}...")
            local_ids = np.asarray(req.local_block_ids, dtype=np.int64)
            remote_ids = np.asarray(req.remote_block_ids, dtype=np.int64)
            parts = [
                kvxfer.Part(
                    layer.region, remote[layer.name], local_blocks=local_ids, remote_blocks=remote_ids
                )
                for layer in self.layers
            ]
            # One transfer for the whole request; it ends before the prefill's lease does.
            load.transfer = self.engine.post_parts(
                kvxfer.Op.READ,
                peer,
                parts,
                notify=READ_DONE_PREFIX + req.remote_request_id.encode(),
                timeout=min(self.load_timeout_s, left - 0.5),
            )
        except errors.KvxferError as e:
            load.error = f"{type(e).__name__}: {e}"
            log.warning("kvxfer: loading request %s failed: %s", req.request_id, load.error)
        return load

    def get_finished(self) -> tuple[set[str], set[str]]:
        sent: set[str] = set()
        recvd: set[str] = set()
        # Prefill side: the decode read the blocks (keyed notification), or the lease ended.
        for note in self.engine.notifications():
            if note.payload.startswith(READ_DONE_PREFIX):
                self._reads_seen.add(note.payload[len(READ_DONE_PREFIX) :].decode())
        now = time.time()
        for rid, expires in list(self._sends.items()):
            if rid in self._reads_seen or now >= expires:
                if rid not in self._reads_seen:
                    log.warning("kvxfer: request %s was not read before its lease ended; freeing", rid)
                self._reads_seen.discard(rid)
                del self._sends[rid]
                sent.add(rid)
        # Decode side.
        for rid, load in list(self._loads.items()):
            t = load.transfer
            if t is not None and not (t.done() and t.quiesced):
                continue
            del self._loads[rid]
            err = load.error or (str(t.error) if t is not None and t.error is not None else "")
            if err or load.aborted:
                # Nothing reads the prefill's blocks any more: tell it now rather than
                # let them wait for the lease (best effort; the lease still bounds it).
                self._release_remote(load.req)
            if load.aborted:
                sent.add(rid)  # its blocks may be freed now: nothing writes them any more
                continue
            if err:
                self._load_errors.update(load.req.local_block_ids)
                log.warning("kvxfer: request %s: KV load failed: %s", rid, err)
            recvd.add(rid)
        return sent, recvd

    def _release_remote(self, req: RecvRequest) -> None:
        peer = self._peers.get((req.remote_engine_id, self.tp_rank))
        if peer is None or peer.removed:
            return
        try:
            self.engine.notify(peer, READ_DONE_PREFIX + req.remote_request_id.encode(), timeout=2.0)
        except errors.KvxferError as e:
            log.info("kvxfer: could not tell the prefill to free request %s: %s", req.request_id, e)

    def take_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def pending(self) -> dict[str, int]:
        return {"loads": len(self._loads), "sends": len(self._sends), "early_reads": len(self._reads_seen)}

    def close(self) -> None:
        for load in self._loads.values():
            if load.transfer is not None:
                load.transfer.cancel()
        if self.engine is not None:
            self.engine.close()
