"""Compute profiles for ``profiled`` mode: TTFT by prompt length and TPOT by batch size,
measured from the real model on a named machine, stored as JSON in kvxfer/serve/profiles/.

Measure one: ``python -m kvxfer.serve.profile --model smollm2 [--out FILE]``. The file records
the model's configuration (so a profiled worker needs no weights), dtype, machine, command
and date; lookups interpolate linearly and extrapolate from the last two points.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import MODELS
from .errors import ProfileError

PROFILES = Path(__file__).with_name("profiles")


@dataclass
class Profile:
    model: str
    machine: str
    dtype: str
    config: dict[str, Any]
    prefill: list[tuple[int, float]]  # (prompt tokens computed, seconds)
    decode: list[tuple[int, float]]  # (batch size, seconds per step)
    meta: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def _interp(points: list[tuple[int, float]], x: float) -> float:
        pts = sorted(points)
        if len(pts) == 1:
            return pts[0][1] * max(x, 1) / max(pts[0][0], 1)
        for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
            if x <= x1 or (x1, y1) == pts[-1]:
                return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))
        return pts[-1][1]

    def prefill_s(self, tokens: int) -> float:
        return self._interp(self.prefill, tokens)

    def decode_s(self, batch: int) -> float:
        return self._interp(self.decode, batch)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "machine": self.machine,
            "dtype": self.dtype,
            "config": self.config,
            "prefill": [list(p) for p in self.prefill],
            "decode": [list(p) for p in self.decode],
            "meta": self.meta,
        }


def load_profile(name_or_path: str) -> Profile:
    """A profile by path, or by model name (``kvxfer/serve/profiles/<model>.json``)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES / f"{name_or_path}.json"
    try:
        d = json.loads(path.read_text())
        return Profile(
            model=d["model"],
            machine=d["machine"],
            dtype=d["dtype"],
            config=d["config"],
            prefill=[(int(a), float(b)) for a, b in d["prefill"]],
            decode=[(int(a), float(b)) for a, b in d["decode"]],
            meta=d.get("meta", {}),
        )
    except FileNotFoundError as e:
        raise ProfileError(
            f"no compute profile at {path} (measure one: python -m kvxfer.serve.profile)"
        ) from e
    except (KeyError, TypeError, ValueError) as e:
        raise ProfileError(f"malformed compute profile {path}: {e!r}") from e


def measure(
    model_name: str, prompt_lens: list[int], batches: list[int], context: int, repeats: int,
    device: str = "cpu",
) -> Profile:  # fmt: skip
    import torch

    from kvxfer.models import PagedKVPool, Sequence

    from .machine import machine
    from .runtime import load_model

    load_before = os.getloadavg()[0]
    _, model = load_model(model_name, device=device)
    cfg = model.config
    vocab = cfg.vocab_size
    prefill = []
    for n in prompt_lens:
        ids = [(i * 7919 + 13) % vocab for i in range(n)]
        model.prefill(ids[: min(n, 32)])  # warm up
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.prefill(ids, pad_to=16)
            ts.append(time.perf_counter() - t0)
        prefill.append((n, statistics.median(ts)))
        print(f"prefill {n:>5} tokens: {prefill[-1][1] * 1e3:8.1f} ms", file=sys.stderr)
    decode = []
    for b in batches:
        pool = PagedKVPool(cfg, num_blocks=b * (-(-(context + 64) // 16)), block_tokens=16, dtype=model.dtype,
                           device=device)  # fmt: skip
        res = model.prefill([(i * 31 + 7) % vocab for i in range(context)], pad_to=16)
        seqs = []
        for j in range(b):
            s = Sequence(f"s{j}", pool.allocate(context), context, res.first_token)
            pool.scatter_from_contiguous(res.kv, s.block_table, context)
            seqs.append(s)
        model.decode_step(pool, seqs)
        ts = []
        for _ in range(repeats * 3):
            t0 = time.perf_counter()
            model.decode_step(pool, seqs)
            ts.append(time.perf_counter() - t0)
        decode.append((b, statistics.median(ts)))
        print(f"decode batch {b:>3} (context {context}): {decode[-1][1] * 1e3:8.2f} ms/step", file=sys.stderr)
    dtype = str(model.dtype).replace("torch.", "")
    return Profile(
        model=model_name,
        machine=machine(),
        dtype=dtype,
        config=cfg.to_hf_dict(),
        prefill=prefill,
        decode=decode,
        meta={
            "torch_threads": torch.get_num_threads(),
            "device": device,
            "decode_context": context,
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
            "command": "python -m kvxfer.serve.profile " + " ".join(sys.argv[1:]),
        },
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvxfer.serve.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=list(MODELS))
    p.add_argument("--out", help="default: kvxfer/serve/profiles/<model>.json")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[16, 128, 512, 1024, 2048])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="torch device of the model and KV (cpu, cuda:0, ...)")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    prof = measure(a.model, a.prompt_lens, a.batches, a.context, a.repeats, a.device)
    out = Path(a.out) if a.out else PROFILES / f"{a.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prof.to_json(), indent=1) + "\n")
    print(f"profile written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
