"""``kvxfer experiment equivalence``: greedy output of the disaggregated path (prefill process
-> kvxfer block-free transfer -> decode process, continuous batching) against aggregated
generation (``Model.generate`` in this process), token for token.

Prompts: seeded random token sequences of 4..400 tokens; every odd prompt belongs to one of
three scenarios sharing a 32-token setting part, so the prefill's prefix-KV reuse is on
the path too. ``--concurrency`` requests are in flight at once (they share decode batches).

JSON: ``{"experiment":"equivalence","backend":..,"prompts":N,"identical":K}`` plus model,
mode, transfer mode, prefix hits, machine, and the first mismatches if any.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

_REFERENCE: dict[tuple, list[int]] = {}


def make_prompts(n: int, vocab: int, seed: int, max_len: int) -> list[tuple[str, list[int]]]:
    """Odd prompts: one of three shared scenarios (32-token setting part + query); even: unique."""
    rng = random.Random(seed)
    settings = [[rng.randrange(vocab) for _ in range(32)] for _ in range(3)]
    out: list[tuple[str, list[int]]] = []
    for i in range(n):
        if i % 2:
            k = (i // 2) % 3
            query = [rng.randrange(vocab) for _ in range(rng.randint(4, 80))]
            out.append((f"shared-{k}", settings[k] + query))
        else:
            out.append((f"unique-{i}", [rng.randrange(vocab) for _ in range(rng.randint(4, max_len))]))
    return out


async def _disaggregated(url: str, prompts, max_tokens: int, concurrency: int) -> list:
    import aiohttp

    from kvxfer.serve import client

    sem = asyncio.Semaphore(concurrency)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:

        async def one(i: int, scen: str, ids: list[int]):
            async with sem:
                for _ in range(600):  # 429 while every slot is taken: retry, like the gateway
                    r = await client.prefill(s, url, ids, max_tokens, scenario=scen, request_id=f"eq-{i}")
                    if r.status != 429:
                        return r
                    await asyncio.sleep(0.01)
                return r

        return await asyncio.gather(*(one(i, scen, ids) for i, (scen, ids) in enumerate(prompts)))


def run(args: argparse.Namespace) -> dict:
    import torch

    from kvxfer.serve.deployment import start_local
    from kvxfer.serve.machine import machine
    from kvxfer.serve.runtime import load_model

    torch.set_num_threads(1)
    _, model = load_model(args.model, device=args.prefill_device)  # the aggregated reference
    vocab = model.config.vocab_size
    prompts = make_prompts(args.prompts, vocab, args.seed, args.max_prompt)
    t0 = time.monotonic()
    with start_local(
        1,
        1,
        backend=args.backend,
        model=args.model,
        gateway=False,
        b_p=args.concurrency,
        b_d=args.concurrency,
        max_prompt_tokens=max(len(p) for _, p in prompts),
        max_new_tokens=args.max_tokens,
        transfer_mode=args.transfer_mode,
        per_layer=args.per_layer,
        role_devices={"prefill": args.prefill_device, "decode": args.decode_device},
    ) as dep:
        print(f"deployment up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        results = asyncio.run(_disaggregated(dep.prefill_urls[0], prompts, args.max_tokens, args.concurrency))
        pstat = dep.status("prefill-0")
        dstat = dep.status("decode-0")
    identical, mismatches = 0, []
    for i, ((_, ids), r) in enumerate(zip(prompts, results, strict=True)):
        key = (args.model, args.prefill_device, tuple(ids), args.max_tokens)
        if key not in _REFERENCE:  # computed once for every backend
            _REFERENCE[key] = model.generate(ids, args.max_tokens)
        want = _REFERENCE[key]
        if r.error is None and r.tokens == want:
            identical += 1
        elif len(mismatches) < 5:
            mismatches.append({"prompt": i, "len": len(ids), "got": r.tokens, "want": want, "error": r.error})
    return {
        "experiment": "equivalence",
        "backend": args.backend,
        "prompts": len(prompts),
        "identical": identical,
        "model": args.model,
        "mode": "real",
        "transfer_mode": args.transfer_mode + ("/per-layer" if args.per_layer else ""),
        "prefill_device": args.prefill_device,
        "decode_device": args.decode_device,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "prefix_hits": pstat["prefix_hits"],
        "kv_transfers": dstat["kvxfer"]["transfers_done"],
        "machine": machine(),
        "mismatches": mismatches,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvxfer experiment equivalence", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="12 prompts, 12 tokens each")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="(no plot for this experiment; accepted for uniformity)")
    p.add_argument("--backend", nargs="+", default=["shm", "tcp"], choices=["shm", "tcp", "cuda_ipc"])
    p.add_argument("--prefill-device", default="cpu", help="torch device of the prefill (e.g. cuda:0)")
    p.add_argument("--decode-device", default="cpu", help="torch device of the decode (e.g. cuda:1)")
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    p.add_argument("--prompts", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument(
        "--transfer-mode", default="block-free", choices=["block-free", "paged-coalesced", "block-by-block"]
    )
    p.add_argument("--per-layer", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.quick:
        args.prompts, args.max_tokens, args.max_prompt = 12, 12, 200
    rc = 0
    for backend in args.backend:
        args.backend = backend
        t0 = time.monotonic()
        row = run(args)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(
                f"{backend}: {row['identical']} of {row['prompts']} prompts identical "
                f"({row['prefix_hits']} prefix hits, {row['kv_transfers']} KV transfers)",
                flush=True,
            )
            for m in row["mismatches"]:
                print(f"  mismatch: {m}", flush=True)
        print(f"{backend}: {time.monotonic() - t0:.1f} s", file=sys.stderr)
        rc |= row["identical"] != row["prompts"]
    return rc


if __name__ == "__main__":
    sys.exit(main())
