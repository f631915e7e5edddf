"""Parsing and formatting of sizes, counts and size sweeps."""

from __future__ import annotations

import re

_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``4096``, ``4K``, ``4KiB``, ``1.5M``, ``1G`` -> bytes (binary multiples)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 4K, 32KiB, 1G)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if value <= 0 or value != int(value):
        raise ValueError(f"size must be a positive whole number of bytes: {text!r}")
    return int(value)


def _parse_sweep(text: str, parse_one, default_factor: int, what: str) -> list[int]:
    """Comma-separated values and ``LO..HI`` / ``LO..HI*F`` geometric sweeps, sorted, unique."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if ".." in part:
            lo_text, hi_text = part.split("..", 1)
            factor = default_factor
            if "*" in hi_text:
                hi_text, f = hi_text.split("*", 1)
                factor = int(f)
                if factor < 2:
                    raise ValueError(f"sweep factor must be >= 2: {part!r}")
            lo, hi = parse_one(lo_text), parse_one(hi_text)
            if lo <= 0 or lo > hi:
                raise ValueError(f"empty sweep {part!r}")
            v = lo
            while v <= hi:
                out.append(v)
                v *= factor
        else:
            out.append(parse_one(part))
    if not out or min(out) <= 0:
        raise ValueError(f"{what} must be positive: {text!r}")
    return sorted(set(out))


def parse_sizes(text: str) -> list[int]:
    """A sweep: ``4K..1G`` (powers of 4), ``4K..1G*2`` (factor 2), or a list ``4K,1M,1G``."""
    return _parse_sweep(text, parse_size, 4, "sizes")


def parse_counts(text: str) -> list[int]:
    """Block counts: ``512``, ``1_000_000``, ``64,512``, or ``16..1024`` (powers of 2)."""
    return _parse_sweep(text, lambda t: int(t.strip()), 2, "block counts")


def fmt_bytes(n: float) -> str:
    """Binary units, short: ``4K``, ``32K``, ``1.0G``, ``384M``."""
    n = float(n)
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n:.0f}B"


def fmt_count(n: float) -> str:
    """``950``, ``12.3k``, ``1.05M``."""
    n = float(n)
    if n >= 1e9:
        return f"{n / 1e9:.2f}G"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def fmt_us(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    us = seconds * 1e6
    if us >= 1e5:
        return f"{us / 1e3:.0f}ms"
    if us >= 100:
        return f"{us:.0f}"
    return f"{us:.1f}"
