"""The Azure LLM inference trace 2023 (CC-BY 4.0, Patel et al., Splitwise, ISCA 2024).

Read from the project's copy at ``kvxfer/serve/data/azure-llm-2023/`` when it exists, else from
the shared data folder. Rows: ``(seconds since the first request, prompt tokens, answer tokens)``.
"""

from __future__ import annotations

import csv
import os
from datetime import datetime
from pathlib import Path

from kvxfer.device.errors import DeviceError

_HERE = Path(__file__).resolve().parent
CANDIDATES = (
    _HERE.parent / "serve" / "data" / "azure-llm-2023",
    Path(os.environ.get("KVXFER_SHARED", "/work/shared")) / "data" / "azure-llm-2023",
    _HERE.parents[2] / "shared" / "data" / "azure-llm-2023",
)


def trace_dir() -> Path:
    for d in CANDIDATES:
        if (d / "AzureLLMInferenceTrace_conv.csv").is_file():
            return d
    raise DeviceError(f"Azure LLM trace not found in {[str(d) for d in CANDIDATES]}")


def load(kind: str = "conv", limit: int | None = None) -> list[tuple[float, int, int]]:
    """``kind``: "conv" or "code"."""
    path = trace_dir() / f"AzureLLMInferenceTrace_{kind}.csv"
    rows: list[tuple[float, int, int]] = []
    t0 = None
    with path.open() as f:
        for r in csv.DictReader(f):
            ts = datetime.fromisoformat(r["TIMESTAMP"][:26])
            t0 = t0 or ts
            rows.append(((ts - t0).total_seconds(), int(r["ContextTokens"]), int(r["GeneratedTokens"])))
            if limit is not None and len(rows) >= limit:
                break
    return rows
