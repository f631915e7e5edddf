"""Workloads: what is moved, in which regions, and how it is cut into requests.

* contiguous: one extent of SIZE bytes at offset 0 on both sides.
* paged: ``--blocks`` block ids out of a pool of ``--pool-blocks`` on each side of a
  dense KvLayout [layer][K/V][block] whose ``block_bytes`` comes from the model geometry
  (models.py). Patterns: ``random`` (a uniform sample without replacement, in random
  order, drawn independently on each side: what block tables look like after a while),
  ``runs:N`` (runs of N consecutive ids at random N-aligned places, independently on
  each side), ``seq`` (ids 0..B-1 on both sides). A request moves every layer (whole-KV)
  or one layer (``--per-layer``: one post per layer).

The byte streams of both sides are in (layer, K/V, list position) order, the order the
engine defines; coalescing merges pieces that continue each other on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import models, verify
from .units import fmt_bytes


@dataclass
class Geometry:
    key: str
    nbytes: int
    layout: dict | None  # KvLayout(**layout) kwargs, or None for plain memory

    def normalized_layout(self) -> dict | None:
        if self.layout is None:
            return None
        lay = dict(self.layout)
        bs = lay["block_bytes"]
        ks = lay["num_blocks"] * bs
        return {**lay, "block_stride": bs, "kv_stride": ks, "layer_stride": lay["num_kv"] * ks, "offset": 0}


@dataclass
class Selection:
    """The bytes a workload moves, on each side (shared by its op/coalesce variants)."""

    sid: str
    geometry: Geometry
    kind: str  # "blocks" or "extents"
    local_ids: np.ndarray | None = None
    remote_ids: np.ndarray | None = None
    extents: np.ndarray | None = None  # (N, 2) uint64, the same on both sides
    standin_ids: np.ndarray | None = None  # see standin()
    standin_extents: np.ndarray | None = None

    def pieces(self, side: str, layers: tuple[int, int] | None = None) -> verify.Pieces:
        if self.kind == "extents":
            return verify.extent_pieces(self.extents)
        ids = self.local_ids if side == "local" else self.remote_ids
        return verify.block_pieces(self.geometry.normalized_layout(), ids, layers)

    def standin(self, rng: np.random.Generator, pattern: str | None) -> bool:
        """For a memcpy baseline inside the local buffer: picks destination pieces that
        stand in for the remote ones, disjoint from the local (source) pieces: block ids
        with the same pattern among the ids the local side does not use, or for an
        extent the bytes right after it. False if they do not fit."""
        if self.kind == "extents":
            end = int((self.extents[:, 0] + self.extents[:, 1]).max())
            if end + int(self.extents[:, 1].sum()) > self.geometry.nbytes:
                return False
            self.standin_extents = self.extents.copy()
            self.standin_extents[:, 0] += np.uint64(end)
            return True
        try:
            pool = self.geometry.layout["num_blocks"]
            count = len(self.local_ids)
            self.standin_ids = pick_blocks(rng, pattern or "random", pool, count, self.local_ids)
        except ValueError:
            return False
        return True

    def standin_pieces(self, layers: tuple[int, int] | None = None) -> verify.Pieces:
        if self.kind == "extents":
            return verify.extent_pieces(self.standin_extents)
        return verify.block_pieces(self.geometry.normalized_layout(), self.standin_ids, layers)

    def num_layers(self) -> int:
        return self.geometry.layout["num_layers"] if self.kind == "blocks" else 1


@dataclass
class Case:
    workload: str
    kind: str  # "paged" or "contiguous"
    op: str  # "write" or "read"
    coalesce: bool
    per_layer: bool
    selection: Selection
    meta: dict[str, Any] = field(default_factory=dict)

    def requests(self) -> list[dict[str, Any]]:
        """Keyword arguments of the posts of one round (one post, or one per layer)."""
        s = self.selection
        if s.kind == "extents":
            return [{"local_extents": s.extents, "remote_extents": s.extents, "coalesce": self.coalesce}]
        base = {"local_blocks": s.local_ids, "remote_blocks": s.remote_ids, "coalesce": self.coalesce}
        if not self.per_layer:
            return [base]
        return [{**base, "layers": (lay, lay + 1)} for lay in range(s.num_layers())]

    def request_layers(self) -> list[tuple[int, int] | None]:
        if self.selection.kind == "blocks" and self.per_layer:
            return [(lay, lay + 1) for lay in range(self.selection.num_layers())]
        return [None]


def pick_blocks(
    rng: np.random.Generator, pattern: str, pool: int, count: int, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Block ids following ``pattern``, out of ``pool`` ids minus ``exclude``."""
    free = np.ones(pool, dtype=bool)
    if exclude is not None and len(exclude):
        free[np.asarray(exclude, dtype=np.int64)] = False
    avail = np.flatnonzero(free)
    if count > avail.size:
        raise ValueError(f"--blocks {count} is more than the {avail.size} free blocks of a pool of {pool}")
    if pattern == "random":
        ids = rng.choice(avail, size=count, replace=False)
    elif pattern == "seq":
        ids = avail[:count]
    elif pattern.startswith("runs:"):
        n = int(pattern.split(":", 1)[1])
        if n < 1:
            raise ValueError(f"bad pattern {pattern!r}: N must be >= 1")
        nslots = pool // n
        slot_free = free[: nslots * n].reshape(nslots, n).all(axis=1)
        slots = np.flatnonzero(slot_free)
        need = -(-count // n)
        if need > slots.size:
            raise ValueError(f"{count} blocks in runs of {n} do not fit a pool of {pool}")
        chosen = rng.choice(slots, size=need, replace=False)
        ids = (chosen[:, None] * n + np.arange(n)[None, :]).ravel()[:count]
    else:
        raise ValueError(f"unknown pattern {pattern!r} (random, runs:N, seq)")
    return np.ascontiguousarray(ids, dtype=np.int64)


def check_pattern(pattern: str) -> str:
    if pattern in ("random", "seq"):
        return pattern
    if pattern.startswith("runs:") and pattern[5:].isdigit() and int(pattern[5:]) >= 1:
        return pattern
    raise ValueError(f"unknown pattern {pattern!r} (random, runs:N, seq)")


@dataclass
class PagedSpec:
    name: str  # model name or "custom"
    layers: int
    num_kv: int
    block_bytes: int
    model: models.Model | None


def paged_specs(
    model_arg: str,
    block_bytes: int | None,
    layers: int | None,
    num_kv: int | None,
    tokens_per_block: int,
    kv_dtype: str | None,
) -> list[PagedSpec]:
    out = []
    for name in [m.strip() for m in model_arg.split(",") if m.strip()]:
        if name.lower() == "none":
            if not block_bytes:
                raise ValueError("--model none needs --block-bytes")
            out.append(PagedSpec(f"{block_bytes}B", layers or 1, num_kv or 1, block_bytes, None))
            continue
        m = models.get(name)
        dt = models.DTYPE_BYTES[kv_dtype] if kv_dtype else None
        bb = block_bytes or m.block_bytes(tokens_per_block, dt)
        out.append(PagedSpec(m.name, layers or m.layers, num_kv or m.num_kv, bb, m))
    return out


def build_cases(
    *,
    paged: list[PagedSpec],
    blocks: list[int],
    pool_blocks: int,
    patterns: list[str],
    per_layer: str,
    contiguous_sizes: list[int],
    ops: list[str],
    coalesce: list[bool],
    seed: int,
) -> list[Case]:
    """Every (workload x op x coalescing) case, grouped so cases sharing a region are adjacent."""
    cases: list[Case] = []
    geoms: dict[str, Geometry] = {}
    counter = 0

    def geometry(key: str, nbytes: int, layout: dict | None) -> Geometry:
        if key not in geoms:
            geoms[key] = Geometry(key, nbytes, layout)
        return geoms[key]

    for spec in paged:
        lay = {
            "num_layers": spec.layers,
            "num_kv": spec.num_kv,
            "num_blocks": pool_blocks,
            "block_bytes": spec.block_bytes,
        }
        g = geometry(
            f"paged-{spec.layers}x{spec.num_kv}x{pool_blocks}x{spec.block_bytes}",
            spec.layers * spec.num_kv * pool_blocks * spec.block_bytes,
            lay,
        )
        for pattern in patterns:
            for nblocks in blocks:
                counter += 1
                rng = np.random.default_rng([seed, counter])
                sel = Selection(
                    f"s{counter}",
                    g,
                    "blocks",
                    local_ids=pick_blocks(rng, pattern, pool_blocks, nblocks),
                    remote_ids=pick_blocks(rng, pattern, pool_blocks, nblocks),
                )
                meta = {
                    "model": spec.name if spec.model else None,
                    "pattern": pattern,
                    "blocks": nblocks,
                    "pool_blocks": pool_blocks,
                    "block_bytes": spec.block_bytes,
                    "layers": spec.layers,
                    "num_kv": spec.num_kv,
                }
                grans = {"off": [False], "only": [True], "both": [False, True]}[per_layer]
                for pl in grans:
                    name = f"paged:{spec.name}:{pattern}" + (":per-layer" if pl else "")
                    for op in ops:
                        for c in coalesce:
                            cases.append(Case(name, "paged", op, c, pl, sel, dict(meta)))

    if contiguous_sizes:
        biggest = max(geoms.values(), key=lambda g: g.nbytes) if geoms else None
        plain_size = max(contiguous_sizes)
        for size in contiguous_sizes:
            if biggest is not None and size <= biggest.nbytes:
                g = biggest
            else:
                g = geometry(f"plain-{plain_size}", plain_size, None)
            counter += 1
            ext = np.array([[0, size]], dtype=np.uint64)
            sel = Selection(f"s{counter}", g, "extents", extents=ext)
            # One extent: coalescing has nothing to merge, so it runs once ("on" unless only
            # "off" was asked for).
            c = coalesce[-1] if len(coalesce) == 1 else True
            for op in ops:
                cases.append(
                    Case(
                        "contiguous",
                        "contiguous",
                        op,
                        c,
                        False,
                        sel,
                        {
                            "model": None,
                            "pattern": None,
                            "blocks": None,
                            "pool_blocks": None,
                            "block_bytes": None,
                            "layers": None,
                            "num_kv": None,
                            "size": size,
                        },
                    )
                )

    # Group by geometry (first appearance order), keeping the order inside a group.
    order = {k: i for i, k in enumerate(geoms)}
    cases.sort(key=lambda c: order[c.selection.geometry.key])
    return cases


def describe_case(c: Case) -> str:
    s = c.selection
    if s.kind == "extents":
        return f"contiguous {fmt_bytes(int(s.extents[0, 1]))}"
    m = c.meta
    return (
        f"{c.workload} {m['blocks']} of {m['pool_blocks']} blocks x {m['layers']} layers x {m['num_kv']} "
        f"x {fmt_bytes(m['block_bytes'])}"
    )
