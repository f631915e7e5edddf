"""Measures the runtime's compute speed: prefill time per prompt length, decode time per step per
batch size. These figures are the source of the ``profiled`` compute mode (a worker sleeps
for what the real model would take on the named machine).

    python -m kvxfer.models.bench [--model smollm2|tiny] [--device cpu] [--threads N]
                                  [--prompt-lens 64,256,1024] [--batches 1,8] [--context 256]
                                  [--repeats 3]

Prints one JSON object per line (``"kind": "prefill"`` / ``"decode"`` / ``"machine"``), each
figure the median of ``--repeats`` timed runs after one warm-up. The baseline, timed in the
same run unless ``--no-baseline``: transformers' ``LlamaForCausalLM`` (KV-cached) with the
same shape, weights, device and dtype; ``speedup_vs_transformers`` = its time / ours.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time

import torch

from .model import Model
from .pool import PagedKVPool, Sequence


def machine(device: str) -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "kind": "machine",
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_time(fn, repeats: int, device: str) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this process) over ``repeats`` runs after a warm-up.

    The CPU figure is what the run costs when the cores are not shared; on a loaded machine
    the wall figure also counts the time other processes held the cores.
    """
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def prefill_seconds(model: Model, n_tokens: int, repeats: int = 3) -> tuple[float, float]:
    """(wall, CPU) median seconds of one prefill of ``n_tokens`` tokens (first token included)."""
    ids = [(7 * i + 3) % model.config.vocab_size for i in range(n_tokens)]
    return _median_time(lambda: model.prefill(ids), repeats, str(model.device))


def decode_seconds(
    model: Model, batch: int, context: int, repeats: int = 3, block_tokens: int = 16
) -> tuple[float, float]:
    """(wall, CPU) median seconds of one ``decode_step``: ``batch`` sequences of ``context`` tokens."""
    per_seq = -(-(context + repeats + 2) // block_tokens)
    pool = PagedKVPool(model.config, per_seq * batch, block_tokens, device=model.device, dtype=model.dtype)
    seqs = []
    for b in range(batch):
        seq = Sequence(f"b{b}", pool.allocate(context), context, b % model.config.vocab_size)
        # finite, non-trivial K/V: the timing does not depend on the values
        idx = torch.as_tensor(seq.block_table, device=pool.device)
        pool.tensor[:, :, idx] = torch.randn_like(pool.tensor[:, :, idx]) * 0.1
        seqs.append(seq)
    return _median_time(lambda: model.decode_step(pool, seqs), repeats, str(model.device))


def transformers_reference(model: Model, kind: str):
    """The baseline: transformers' LlamaForCausalLM with the same shape (and, for SmolLM2, the same
    weights), on the same device and dtype, timed the same way."""
    import transformers

    if kind == "smollm2":
        from .smollm2 import default_cache_dir

        hf = transformers.LlamaForCausalLM.from_pretrained(str(default_cache_dir()), dtype=model.dtype)
    else:
        with torch.device(model.device):
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf_dict()))
    return hf.to(device=model.device, dtype=model.dtype).eval()


def _hf_forward(hf, ids, cache=None):
    params = inspect.signature(hf.forward).parameters
    kw = {"use_cache": True}
    if cache is not None:  # transformers >= 5.2x renamed past_key_values to cache
        kw["cache" if "cache" in params else "past_key_values"] = cache
    if "logits_to_keep" in params:  # only the last position's logits, as our prefill does
        kw["logits_to_keep"] = 1
    return hf(ids, **kw)


def _hf_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def transformers_prefill_seconds(hf, n_tokens: int, repeats: int = 3) -> tuple[float, float]:
    dev = hf.device
    ids = torch.tensor([[(7 * i + 3) % hf.config.vocab_size for i in range(n_tokens)]], device=dev)
    with torch.no_grad():
        return _median_time(lambda: _hf_forward(hf, ids), repeats, str(dev))


def transformers_decode_seconds(hf, batch: int, context: int, repeats: int = 3) -> tuple[float, float]:
    """One cached decoding step of ``batch`` sequences of ``context`` tokens (the cache grows by one
    token per timed step: negligible next to ``context``)."""
    dev = hf.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf.config.vocab_size, (batch, context), generator=g).to(dev)
    with torch.no_grad():
        cache = _hf_cache(_hf_forward(hf, ids))
        tok = ids[:, -1:]
        return _median_time(lambda: _hf_forward(hf, tok, cache), repeats, str(dev))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvxfer.models.bench", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        choices=["smollm2", "smollm2-shape", "tiny", "medium"],
        default="smollm2",
        help="smollm2-shape: SmolLM2's shape with random weights (no weight files needed); "
        "medium: medium_config() (random weights)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--prompt-lens", default="64,256,1024")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument(
        "--context", type=int, default=256, help="tokens already in the pool per decoded sequence"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--no-baseline", action="store_true", help="skip transformers' LlamaForCausalLM, timed alongside"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.model == "smollm2":
        from .smollm2 import load_smollm2

        _, model = load_smollm2(device=args.device, dtype=dtype)
    elif args.model == "smollm2-shape":
        from .smollm2 import smollm2_config

        model = Model(smollm2_config(), device=args.device, dtype=dtype)
    elif args.model == "medium":
        from .config import medium_config

        model = Model(medium_config(), device=args.device, dtype=dtype)
    else:
        from .config import tiny_config

        model = Model(tiny_config(seed=0), device=args.device, dtype=dtype)
    name = model.config.name + (" (random weights)" if args.model == "smollm2-shape" else "")
    print(json.dumps(machine(args.device)), flush=True)
    hf = None if args.no_baseline else transformers_reference(model, args.model)
    for n in [int(x) for x in args.prompt_lens.split(",") if x]:
        s, cpu = prefill_seconds(model, n, args.repeats)
        row = {
            "kind": "prefill",
            "model": name,
            "tokens": n,
            "seconds": round(s, 5),
            "tokens_per_s": round(n / s, 1),
            "cpu_seconds": round(cpu, 5),
        }
        if hf is not None:
            hs, hcpu = transformers_prefill_seconds(hf, n, args.repeats)
            row.update(
                transformers_seconds=round(hs, 5),
                transformers_cpu_seconds=round(hcpu, 5),
                speedup_vs_transformers=round(hs / s, 2),
            )
        print(json.dumps(row), flush=True)
    for b in [int(x) for x in args.batches.split(",") if x]:
        s, cpu = decode_seconds(model, b, args.context, args.repeats)
        row = {
            "kind": "decode",
            "model": name,
            "batch": b,
            "context": args.context,
            "ms_per_step": round(s * 1e3, 2),
            "tokens_per_s": round(b / s, 1),
            "cpu_ms_per_step": round(cpu * 1e3, 2),
        }
        if hf is not None:
            hs, hcpu = transformers_decode_seconds(hf, b, args.context, args.repeats)
            row.update(
                transformers_ms_per_step=round(hs * 1e3, 2),
                transformers_cpu_ms_per_step=round(hcpu * 1e3, 2),
                speedup_vs_transformers=round(hs / s, 2),
            )
        print(json.dumps(row), flush=True)
    print(json.dumps({"kind": "machine_after", "loadavg_1m": os.getloadavg()[0]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
