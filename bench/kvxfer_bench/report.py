"""Human and machine output: banner, fixed-column table, JSON lines, progress bar."""

from __future__ import annotations

import json
import math
import sys
from typing import IO, Any

from . import __version__, machine
from .units import fmt_bytes, fmt_count, fmt_us

# (header, width, right-aligned)
COLUMNS = [
    ("workload", 38, False),
    ("op", 5, False),
    ("coal", 4, False),
    ("bytes", 6, True),
    ("pieces", 8, True),
    ("runs", 8, True),
    ("GB/s", 7, True),
    ("ops/s", 8, True),
    ("p50 us", 8, True),
    ("p99 us", 8, True),
    ("post us", 8, True),
    ("base GB/s", 9, True),
    ("ratio", 6, True),
]


def _cell(text: str, width: int, right: bool) -> str:
    if len(text) > width:
        text = text[: width - 1] + "~"
    return text.rjust(width) if right else text.ljust(width)


def header() -> str:
    return " ".join(_cell(h, w, r) for h, w, r in COLUMNS)


def row(rec: dict[str, Any]) -> str:
    base = rec.get("baseline_gbps")
    ratio = rec.get("ratio")
    vals = [
        rec["workload"],
        rec["op"],
        "on" if rec["coalesce"] else "off",
        fmt_bytes(rec["bytes"]),
        fmt_count(rec["pieces"]),
        fmt_count(rec["runs"]),
        f"{rec['gbps']:.2f}",
        fmt_count(rec["ops_per_s"]),
        fmt_us(None if rec.get("p50_us") is None else rec["p50_us"] / 1e6),
        fmt_us(None if rec.get("p99_us") is None else rec["p99_us"] / 1e6),
        fmt_us(None if rec.get("post_us") is None else rec["post_us"] / 1e6),
        "-" if base is None else f"{base:.2f}",
        "-" if ratio is None else f"{ratio * 100:.0f}%",
    ]
    return " ".join(_cell(v, w, r) for v, (_, w, r) in zip(vals, COLUMNS, strict=False))


def banner(
    *,
    backend: str,
    describe: str,
    target_describe: str,
    mode: str,
    threads: int,
    queue_depth: int,
    coalesce: str,
    iters: str,
    repeat: int,
    verify: str,
    baseline: str,
    local: dict,
    target_machine: dict | None,
    target_pid: int | None,
    memory: str = "numpy",
) -> str:
    lines = [
        f"kvxfer-bench {__version__}: backend {backend}, target {mode}"
        + (f" (pid {target_pid})" if target_pid and mode != "remote" else ""),
        f"  initiator: {describe}",
        f"  target:    {target_describe}",
        f"  threads {threads}, queue depth {queue_depth}, coalescing {coalesce}, iters {iters}, "
        f"repeat {repeat} (medians), verify {verify}",
        f"  baseline:  {baseline}",
        f"  memory:    {MEMORY.get(memory, memory)}",
        f"  machine:   {machine.one_line(local)}",
    ]
    if target_machine:
        lines.append(f"  target machine: {machine.one_line(target_machine)}")
    load, cores = local.get("loadavg_1m", 0) or 0, local.get("usable_cores", 1) or 1
    if load > 0.5 * cores:
        lines.append(
            f"  WARNING: load average {load} on {cores} cores: other processes compete for the CPUs "
            "and memory bandwidth; figures will be low and noisy"
        )
    lines.append(
        "  GB/s = 1e9 bytes/s; ops = pieces (block x layer x K/V, or 1 MiB of an extent) before "
        "coalescing; runs = operations after it; p50/p99 per transfer (post to completion)"
    )
    return "\n".join(lines)


MEMORY = {
    "numpy": "numpy arrays (np.empty: anonymous memory; shm moves it with cross-memory attach)",
    "kvxfer": "kvxfer.empty (memfd-backed shareable memory; shm maps the peer's and copies with memcpy)",
}


class Progress:
    """A one-line bar on stderr, redrawn in place; silent unless enabled."""

    def __init__(self, total: int, enabled: bool, stream: IO[str] | None = None):
        self.total = max(1, total)
        self.n = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.shown = False

    def step(self, label: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        width = 24
        done = min(width, math.floor(width * (self.n - 1) / self.total))
        bar = "#" * done + "." * (width - done)
        text = f"[{bar}] {self.n}/{self.total} {label}"
        self.stream.write("\r" + text[:110].ljust(110))
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.enabled and self.shown:
            self.stream.write("\r" + " " * 110 + "\r")
            self.stream.flush()
            self.shown = False


class Reporter:
    def __init__(self, table_stream: IO[str], json_stream: IO[str] | None, progress: Progress):
        self.table = table_stream
        self.json = json_stream
        self.progress = progress
        self.rows = 0

    def text(self, text: str) -> None:
        self.progress.clear()
        print(text, file=self.table, flush=True)

    def note(self, text: str) -> None:
        """Errors, warnings and notes: always stderr."""
        self.progress.clear()
        print(text, file=sys.stderr, flush=True)

    def result(self, rec: dict[str, Any]) -> None:
        self.progress.clear()
        if self.rows == 0:
            print(header(), file=self.table)
        self.rows += 1
        print(row(rec), file=self.table, flush=True)
        if self.json is not None:
            self.json.write(json.dumps(rec, sort_keys=True) + "\n")
            self.json.flush()
