"""Data patterns, piece tables and checksums for verification.

A transfer moves a *byte stream*: pieces (block x layer x K/V, or chunks of an extent)
in stream order on the source land on the same-numbered pieces on the destination. Both
sides compute the same per-group CRC-32 list over their own memory (a group is one
piece, or consecutive small pieces adding up to at least ``GROUP_BYTES``) and the lists
must be equal. Each side computes on its own memory, so for a WRITE the target sends its
list back over the control connection.

Before each case the source pieces are filled with a pattern derived from a seed: a
random tile (its length is not a power of two, so offsets a power of two apart hold
different bytes) plus a hash of the absolute offset every ``stamp_stride`` bytes, so a
piece that lands in the wrong place, or comes from the wrong place, never checksums
equal. The destination is poisoned before each run, so a transfer that moves nothing
is caught too.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

GROUP_BYTES = 64 * 1024
EXTENT_CHUNK = 1 << 20
_TILE = (8 << 20) + 8 * 4099  # not a multiple of any large power of two
_FILL_CHUNK = 32 << 20
_STAMP_MUL = np.uint64(0x9E3779B97F4A7C15)


class VerifyError(Exception):
    """Destination checksums differ from the source's."""

    def __init__(self, message: str, first_group: int = -1, mismatches: int = 0):
        super().__init__(message)
        self.first_group = first_group
        self.mismatches = mismatches


@dataclass
class Pieces:
    """Pieces of one side's byte stream, in stream order."""

    offsets: np.ndarray  # uint64
    lengths: np.ndarray  # uint64
    uniform: int  # the common length, or 0 if lengths differ

    @property
    def count(self) -> int:
        return int(self.offsets.size)

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum()) if self.count else 0

    def group_size(self) -> int:
        """Pieces per checksum group (the same on both sides of a transfer)."""
        if self.uniform and self.uniform < GROUP_BYTES:
            return max(1, GROUP_BYTES // self.uniform)
        return 1


def block_pieces(layout: dict, ids: np.ndarray, layers: tuple[int, int] | None = None) -> Pieces:
    """Pieces of block ids in a KV layout, in (layer, kv, list position) order.

    ``layout`` holds the normalized KvLayout fields (num_layers, num_kv, block_bytes,
    block_stride, kv_stride, layer_stride, offset)."""
    lb, le = layers if layers else (0, layout["num_layers"])
    ls = np.arange(lb, le, dtype=np.uint64)[:, None, None] * np.uint64(layout["layer_stride"])
    ks = np.arange(layout["num_kv"], dtype=np.uint64)[None, :, None] * np.uint64(layout["kv_stride"])
    bs = np.asarray(ids, dtype=np.uint64)[None, None, :] * np.uint64(layout["block_stride"])
    offsets = (ls + ks + bs + np.uint64(layout["offset"])).ravel()
    bb = int(layout["block_bytes"])
    return Pieces(offsets, np.full(offsets.size, bb, dtype=np.uint64), bb)


def extent_pieces(extents: np.ndarray, chunk: int = EXTENT_CHUNK) -> Pieces:
    """Pieces of byte extents ((N, 2) [offset, length]), each cut into ``chunk`` bytes."""
    offs: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    for off, length in np.asarray(extents, dtype=np.uint64).reshape(-1, 2):
        off, length = int(off), int(length)
        starts = np.arange(0, length, chunk, dtype=np.uint64)
        offs.append(starts + np.uint64(off))
        lens.append(np.minimum(np.uint64(chunk), np.uint64(length) - starts))
    offsets = np.concatenate(offs) if offs else np.zeros(0, np.uint64)
    lengths = np.concatenate(lens) if lens else np.zeros(0, np.uint64)
    uniform = int(lengths[0]) if lengths.size and bool((lengths == lengths[0]).all()) else 0
    return Pieces(offsets, lengths, uniform)


def stamp_stride_for(piece_bytes: int) -> int:
    """The largest power of two <= 256 dividing ``piece_bytes`` (at least 8)."""
    s = 256
    while s > 8 and piece_bytes % s:
        s //= 2
    return s


def fill_pieces(buf: np.ndarray, pieces: Pieces, seed: int, stamp_stride: int = 256) -> None:
    """Fills the pieces of ``buf`` (1-D uint8) with the seed's pattern: the byte at
    absolute offset o is ``tile[o % len(tile)]``, except that every 8-byte word at an
    offset that is a multiple of ``stamp_stride`` holds a hash of that offset."""
    if pieces.count == 0:
        return
    rng = np.random.default_rng(seed)
    longest = int(pieces.lengths.max())
    tile = np.frombuffer(rng.bytes(_TILE + min(longest, _FILL_CHUNK)), dtype=np.uint8)
    key = np.uint64(rng.integers(0, 2**63))
    aligned = buf.ctypes.data % 8 == 0
    words = buf[: (buf.size // 8) * 8].view(np.uint64) if aligned else None
    rows = _rows(buf, pieces)
    p = pieces.uniform
    if rows is not None and p <= _FILL_CHUNK:
        windows = np.lib.stride_tricks.sliding_window_view(tile, p)
        batch = max(1, (32 << 20) // p)
        s = stamp_stride if (p % stamp_stride == 0 and p >= 8) else 0
        cols = np.arange(0, p, s, dtype=np.uint64) if s else None
        for b in range(0, pieces.count, batch):
            offs = pieces.offsets[b : b + batch]
            rows[offs // np.uint64(p)] = windows[(offs % np.uint64(_TILE)).astype(np.intp)]
            if s and words is not None:
                pos = offs[:, None] + cols[None, :]
                words[(pos // np.uint64(8)).astype(np.intp)] = (pos * _STAMP_MUL) ^ key
        return
    for o, n in zip(pieces.offsets.tolist(), pieces.lengths.tolist(), strict=False):
        for c in range(o, o + n, _FILL_CHUNK):
            e = min(o + n, c + _FILL_CHUNK)
            t = c % _TILE
            buf[c:e] = tile[t : t + (e - c)]
        if words is not None:
            first = -(-o // stamp_stride) * stamp_stride
            pos = np.arange(first, o + n - 7, stamp_stride, dtype=np.uint64)
            if pos.size:
                words[(pos // np.uint64(8)).astype(np.intp)] = (pos * _STAMP_MUL) ^ key


def prefault(buf: np.ndarray, page: int = 4096) -> None:
    """Writes one byte per page so that first-touch page faults happen now, not while
    timing (on a VM with free page reporting a first touch costs ~1-4 s per GiB)."""
    for b in range(0, buf.size, 1 << 30):
        buf[b : b + (1 << 30) : page] = 0


def allocate(nbytes: int, memory: str) -> np.ndarray:
    """A pre-faulted 1-D uint8 buffer: ``numpy`` (np.empty; anonymous memory, transparent
    huge pages where numpy asks for them) or ``kvxfer`` (kvxfer.empty: memfd-backed,
    shareable, so a same-host shm peer maps it and copies with memcpy)."""
    if memory == "kvxfer":
        import kvxfer

        return kvxfer.empty(nbytes, np.uint8)  # populated by the allocator
    buf = np.empty(nbytes, dtype=np.uint8)
    prefault(buf)
    return buf


def _rows(buf: np.ndarray, pieces: Pieces) -> np.ndarray | None:
    """A (rows, piece_len) view of ``buf`` when every piece is a whole row of it."""
    p = pieces.uniform
    if not p or buf.size < p:
        return None
    if pieces.count and bool((pieces.offsets % np.uint64(p)).any()):
        return None
    return buf[: (buf.size // p) * p].reshape(-1, p)


def checksums(buf: np.ndarray, pieces: Pieces) -> np.ndarray:
    """CRC-32 of each group of pieces (concatenated in stream order), as uint32."""
    g = pieces.group_size()
    ngroups = (pieces.count + g - 1) // g
    out = np.zeros(ngroups, dtype=np.uint32)
    rows = _rows(buf, pieces) if g > 1 else None
    if rows is not None:
        # Small pieces: gather a batch into one buffer, then one CRC call per group.
        p = pieces.uniform
        batch = max(g, ((32 << 20) // p) // g * g)
        idx_all = pieces.offsets // np.uint64(p)
        for b in range(0, pieces.count, batch):
            gathered = rows[idx_all[b : b + batch]].reshape(-1)
            mv = memoryview(gathered)
            step = g * p
            for k, off in enumerate(range(0, gathered.size, step)):
                out[b // g + k] = zlib.crc32(mv[off : off + step])
        return out
    mv = memoryview(buf)
    offs = pieces.offsets.tolist()
    lens = pieces.lengths.tolist()
    crc = 0
    for i, (o, n) in enumerate(zip(offs, lens, strict=False)):
        crc = zlib.crc32(mv[o : o + n], crc)
        if (i + 1) % g == 0 or i + 1 == len(offs):
            out[i // g] = crc
            crc = 0
    return out


def poison(buf: np.ndarray, pieces: Pieces, value: int) -> None:
    """Overwrites every piece with the byte ``value``."""
    rows = _rows(buf, pieces)
    if rows is not None:
        idx = pieces.offsets // np.uint64(pieces.uniform)
        for b in range(0, idx.size, 1 << 16):
            rows[idx[b : b + (1 << 16)]] = value
        return
    for o, n in zip(pieces.offsets.tolist(), pieces.lengths.tolist(), strict=False):
        buf[o : o + n] = value


def corrupt(buf: np.ndarray, pieces: Pieces) -> int:
    """Flips one byte in the middle piece (for testing verification); returns its offset."""
    i = pieces.count // 2
    off = int(pieces.offsets[i]) + int(pieces.lengths[i]) // 2
    buf[off] ^= 0xFF
    return off


def compare(expected: np.ndarray, got: np.ndarray, pieces: Pieces, what: str) -> None:
    """Raises VerifyError naming the first differing group and its piece range."""
    if expected.shape != got.shape:
        raise VerifyError(f"{what}: {got.size} checksums received, {expected.size} expected")
    bad = np.flatnonzero(expected != got)
    if bad.size:
        g = pieces.group_size()
        first = int(bad[0])
        lo, hi = first * g, min(pieces.count, (first + 1) * g) - 1
        raise VerifyError(
            f"{what}: {bad.size} of {expected.size} checksum groups differ; first is group {first} "
            f"(pieces {lo}..{hi}, destination offset {int(pieces.offsets[lo])}): "
            f"crc32 {int(got[first]):#010x}, expected {int(expected[first]):#010x}",
            first,
            int(bad.size),
        )


def merge_runs(src: Pieces, dst: Pieces) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coalesces consecutive pieces that continue each other on both sides: the runs a
    coalescing planner would produce. Returns (src_offsets, dst_offsets, lengths)."""
    if src.count == 0:
        z = np.zeros(0, np.uint64)
        return z, z, z
    so, do, ln = src.offsets, dst.offsets, src.lengths
    cont = (so[1:] == so[:-1] + ln[:-1]) & (do[1:] == do[:-1] + ln[:-1])
    starts = np.concatenate(([0], np.flatnonzero(~cont) + 1))
    lengths = np.add.reduceat(ln, starts).astype(np.uint64)
    return so[starts].copy(), do[starts].copy(), lengths
