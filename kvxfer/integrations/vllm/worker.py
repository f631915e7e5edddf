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

from .metadata import (
    KvxferConnectorMetadata,
    KvxferHandshakeMetadata,
    RecvRequest,
    parse_read_done,
    read_done,
)

log = logging.getLogger("kvxfer.integrations.vllm")

# How long a read notification for a request this rank does not hold is kept, waiting
# for the step metadata that names it (normally one step).
_UNKNOWN_READ_TTL_S = 300.0


@dataclass
class _Load:
    req: RecvRequest
    transfers: list = field(default_factory=list)  # one kvxfer.Transfer per prefill rank read
    sources: list[int] = field(default_factory=list)  # those prefill ranks
    readers: int = 1  # decode ranks that read from each of them
    error: str = ""
    aborted: bool = False

    def settled(self) -> bool:
        return all(t.done() and t.quiesced for t in self.transfers)

    def failure(self) -> str:
        errs = [str(t.error) for t in self.transfers if t.error is not None]
        return self.error or "; ".join(errs)


@dataclass
class _Layer:
    name: str
    region: Any
    page_bytes: int
    stride: int
    kv_heads: int = -1  # the CPU layout [blocks, kv_heads, block_size, row]; -1 otherwise
    row_bytes: int = -1


@dataclass
class _Source:
    """One prefill rank a decode rank reads from, and which heads: the decode's heads
    [local_head0, local_head0 + heads) are the prefill rank's [remote_head0, ...)."""

    rank: int
    local_head0: int
    remote_head0: int
    heads: int


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
    _reads_seen: dict[str, list[int]] = field(default_factory=dict)  # request id -> [seen, expected]
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
        if t.dim() == 4 and t.shape[2] == self.block_size:
            return _Layer(name, region, page, stride, int(t.shape[1]), int(t.shape[3]) * t.element_size())
        return _Layer(name, region, page, stride)

    def handshake(self) -> KvxferHandshakeMetadata:
        return KvxferHandshakeMetadata(
            engine_id=self.engine_id,
            tp_rank=self.tp_rank,
            tp_size=self.tp_size,
            block_size=self.block_size,
            descriptor=self.engine.descriptor(),
            layer_names=[layer.name for layer in self.layers],
            kv_heads=self.layers[0].kv_heads if self.layers else -1,
            row_bytes=self.layers[0].row_bytes if self.layers else -1,
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
                for t in load.transfers:
                    t.cancel()
        for rid, req in meta.reqs_to_recv.items():
            self._loads[rid] = self._start_load(req)

    def _peer(self, req: RecvRequest, remote_rank: int) -> Any:
        key = (req.remote_engine_id, remote_rank)
        peer = self._peers.get(key)
        if peer is None or peer.removed:
            peer = self.engine.add_peer(req.descriptors[remote_rank])
            self._peers[key] = peer
        return peer

    def _sources(self, req: RecvRequest) -> tuple[list[_Source], int]:
        """Which prefill ranks this decode rank reads, which heads, and how many decode
        ranks read each of those prefill ranks."""
        p_tp, d_tp = req.remote_tp_size, self.tp_size
        if p_tp == d_tp:
            return [_Source(self.tp_rank, 0, 0, -1)], 1
        heads_l, heads_r = self.layers[0].kv_heads, req.remote_kv_heads
        if heads_l <= 0 or heads_r <= 0:
            raise errors.UnsupportedError("different TP sizes need vLLM's CPU KV layout on both sides")
        if d_tp > p_tp:
            k = d_tp // p_tp
            if d_tp % p_tp or heads_r != k * heads_l:
                raise errors.UnsupportedError(
                    f"decode tp {d_tp} x {heads_l} kv heads does not split prefill tp {p_tp} x {heads_r}"
                )
            return [_Source(self.tp_rank // k, 0, (self.tp_rank % k) * heads_l, heads_l)], k
        k = p_tp // d_tp
        if p_tp % d_tp or heads_l != k * heads_r:
            raise errors.UnsupportedError(
                f"prefill tp {p_tp} x {heads_r} kv heads does not split into decode tp {d_tp} x {heads_l}"
            )
        return [_Source(self.tp_rank * k + j, j * heads_r, 0, heads_r) for j in range(k)], 1

    def _extents(self, req: RecvRequest, src: _Source, remote_stride: int) -> tuple[np.ndarray, np.ndarray]:
        """Byte extents moving heads of a request's tokens between pages of different
        block sizes and/or head counts (vLLM's CPU layout: a page is
        [kv_heads, block_size, row], so a head's tokens are contiguous rows)."""
        layer = self.layers[0]
        row, bs_l, bs_r = layer.row_bytes, self.block_size, req.remote_block_size
        heads = src.heads if src.heads > 0 else layer.kv_heads
        n_tokens = min(len(req.local_block_ids) * bs_l, len(req.remote_block_ids) * bs_r)
        local, remote = [], []
        for h in range(heads):
            hl, hr = src.local_head0 + h, src.remote_head0 + h
            t = 0
            while t < n_tokens:
                i, ti = divmod(t, bs_r)
                j, tj = divmod(t, bs_l)
                run = min(bs_r - ti, bs_l - tj, n_tokens - t)
                remote.append((req.remote_block_ids[i] * remote_stride + (hr * bs_r + ti) * row, run * row))
                local.append((req.local_block_ids[j] * layer.stride + (hl * bs_l + tj) * row, run * row))
                t += run
        return np.asarray(local, dtype=np.uint64), np.asarray(remote, dtype=np.uint64)

    def _start_load(self, req: RecvRequest) -> _Load:
        load = _Load(req)
        try:
            if not req.descriptors:
                raise errors.InvalidArgumentError(
                    f"request {req.request_id} has no usable kv_transfer_params"
                )
            left = req.expires_at - time.time()
            if left <= 0.5:
                raise errors.TimeoutError(f"the prefill's lease on request {req.request_id} has ended")
            sources, load.readers = self._sources(req)
            same_shape = req.remote_tp_size == self.tp_size and req.remote_block_size == self.block_size
            if same_shape and len(req.remote_block_ids) != len(req.local_block_ids):
                raise errors.InvalidArgumentError(
                    f"{len(req.local_block_ids)} local blocks for {len(req.remote_block_ids)} remote ones"
                )
            if not same_shape and (
                self.layers[0].row_bytes <= 0 or self.layers[0].row_bytes != req.remote_row_bytes
            ):
                raise errors.UnsupportedError(
                    "different block sizes or TP need vLLM's CPU KV layout with equal rows on both sides"
                )
            for src in sources:
                peer = self._peer(req, src.rank)
                load.sources.append(src.rank)
                remote = {name: region for name, region in zip(req.layer_names, peer.regions, strict=False)}
                missing = [layer.name for layer in self.layers if layer.name not in remote]
                if missing:
                    raise errors.NotFoundError(f"the prefill has no layers {missing[:3]}...")
                if same_shape:
                    ids_l = np.asarray(req.local_block_ids, dtype=np.int64)
                    ids_r = np.asarray(req.remote_block_ids, dtype=np.int64)
                    sides = {"local_blocks": ids_l, "remote_blocks": ids_r}
                else:
                    # Every layer has the same geometry: one pair of arrays, one plan.
                    stride = remote[self.layers[0].name].layout.block_stride
                    ext_l, ext_r = self._extents(req, src, stride)
                    sides = {"local_extents": ext_l, "remote_extents": ext_r}
                parts = [kvxfer.Part(layer.region, remote[layer.name].id, **sides) for layer in self.layers]
                # One transfer per prefill rank for the whole request (one part per layer);
                # it ends before the prefill's lease does.
                load.transfers.append(
                    self.engine.post_parts(
                        kvxfer.Op.READ,
                        peer,
                        parts,
                        notify=read_done(req.remote_request_id, load.readers),
                        timeout=min(self.load_timeout_s, left - 0.5),
                    )
                )
        except errors.KvxferError as e:
            load.error = f"{type(e).__name__}: {e}"
            log.warning("kvxfer: loading request %s failed: %s", req.request_id, load.error)
        return load

    def get_finished(self) -> tuple[set[str], set[str]]:
        sent: set[str] = set()
        recvd: set[str] = set()
        # Prefill side: every decode rank reading this rank's blocks said so (keyed
        # notifications), or the lease ended.
        for note in self.engine.notifications():
            parsed = parse_read_done(note.payload)
            if parsed is not None:
                seen = self._reads_seen.setdefault(parsed[0], [0, parsed[1], time.time()])
                seen[0] += 1
        now = time.time()
        for rid, seen in list(self._reads_seen.items()):
            if rid not in self._sends and now - seen[2] > _UNKNOWN_READ_TTL_S:
                del self._reads_seen[rid]  # for a request this rank never held (or freed long ago)
        for rid, expires in list(self._sends.items()):
            seen = self._reads_seen.get(rid)
            read = seen is not None and seen[0] >= seen[1]
            if read or now >= expires:
                if not read:
                    log.warning("kvxfer: request %s was not read before its lease ended; freeing", rid)
                self._reads_seen.pop(rid, None)
                del self._sends[rid]
                sent.add(rid)
        # Decode side.
        for rid, load in list(self._loads.items()):
            if not load.settled():
                continue
            del self._loads[rid]
            err = load.failure()
            if err or load.aborted:
                # Nothing reads the prefill's blocks any more: tell it now rather than
                # let them wait for the lease (best effort; the lease still bounds it).
                self._release_remote(load)
            if load.aborted:
                sent.add(rid)  # its blocks may be freed now: nothing writes them any more
                continue
            if err:
                self._load_errors.update(load.req.local_block_ids)
                log.warning("kvxfer: request %s: KV load failed: %s", rid, err)
            recvd.add(rid)
        return sent, recvd

    def _release_remote(self, load: _Load) -> None:
        """Sends the read-done notification a failed or canceled READ did not deliver."""
        delivered = {r for r, t in zip(load.sources, load.transfers, strict=False) if t.error is None}
        for rank in load.sources:
            peer = self._peers.get((load.req.remote_engine_id, rank))
            if rank in delivered or peer is None or peer.removed:
                continue
            try:
                self.engine.notify(peer, read_done(load.req.remote_request_id, load.readers), timeout=2.0)
            except errors.KvxferError as e:
                log.info(
                    "kvxfer: could not tell prefill rank %d to free %s: %s", rank, load.req.request_id, e
                )

    def take_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def pending(self) -> dict[str, int]:
        return {"loads": len(self._loads), "sends": len(self._sends), "early_reads": len(self._reads_seen)}

    def close(self) -> None:
        for load in self._loads.values():
            for t in load.transfers:
                t.cancel()
        if self.engine is not None:
            self.engine.close()
