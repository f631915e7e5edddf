"""Quality of the refined prompt against rho, with the real SmolLM2-135M-Instruct weights.

Task (written here and shipped, no download): a needle in filler, as a chat prompt. The system
part asks for a one-word answer; the user part has ``filler`` everyday sentences with one
"<name> moved to <city> last spring." among them, then asks which city that person moved to.
For each prompt, the cloud's prefill (chunked; the last chunk is the question and returns the
attention mass) gives the full prompt's greedy answer; then each rho keeps the system part, the
question and the top attention-mass tokens in between, and the refined prompt is answered
greedily.

Per rho: ``agreement`` = share of prompts whose refined answer equals the full prompt's answer
token for token (up to ``max_tokens`` or the end-of-turn token); ``accuracy`` = share whose
answer names the right city (the rho = 1 row: the full prompt). ``random`` rows keep random middle
tokens instead (same count), the control for attention mass.

``python -m kvxfer.device.quality [--prompts 40] [--filler 24] [--out FILE] [--plot PNG]``
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from kvxfer.device.errors import BadSettingsError
from kvxfer.device.lm import LM, KvState, smollm2_lm
from kvxfer.device.refiner import cloud_prefill, refine

RHOS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3)
CURVE = Path(__file__).with_name("quality_curve.json")
NAMES = (
    "Anna Boris Carla Dmitri Elena Farid Greta Hiro Ines Jonas Kemal Lena Marco Nadia Oscar Priya Quentin "
    "Rosa Sven Tara Umar Vera Wen Xenia Yusuf Zoe"
).split()
CITIES = (
    "Paris London Madrid Berlin Rome Vienna Prague Lisbon Dublin Oslo Warsaw Athens Cairo Tokyo Seoul "
    "Lima Toronto Sydney Nairobi Mumbai Chicago Boston Denver Dallas"
).split()


FILLER = (
    "The weather was mild and the market opened early.",
    "Many people enjoy walking in the park on Sundays.",
    "The library added new shelves for history books.",
    "A small boat crossed the river before noon.",
    "The bakery sells bread, cakes and fresh coffee.",
    "Children played football near the old school.",
    "The train to the coast leaves every hour.",
    "A new bridge was built over the canal last year.",
    "The museum shows paintings from three centuries.",
    "Farmers brought apples and pears to the square.",
    "The concert in the town hall ended late.",
    "Workers repaired the road after the storm.",
    "The garden behind the house is full of roses.",
    "A cat slept on the warm steps of the church.",
    "The shop on the corner closes at six.",
    "Students waited for the bus in the rain.",
)


def make_prompts(tok, count: int = 16, filler: int = 20, seed: int = 0) -> list[dict]:
    """Needle in filler: one sentence says which city a person moved to; the question asks it."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        name, city = rng.choice(NAMES), rng.choice(CITIES)
        body = [rng.choice(FILLER) for _ in range(filler)]
        body.insert(rng.randrange(filler), f"{name} moved to {city} last spring.")
        sys_text = "<|im_start|>system\nYou are a helpful assistant. Answer with one word.<|im_end|>\n"
        sys_text += "<|im_start|>user\n"
        query = f"Question: Which city did {name} move to?<|im_end|>\n<|im_start|>assistant\n"
        s, b, q = (tok.encode(t, add_special_tokens=False) for t in (sys_text, " ".join(body) + "\n", query))
        out.append({"ids": s + b + q, "system_len": len(s), "query_len": len(q), "answer": city})
    return out


def _answer(lm: LM, st: KvState, max_tokens: int, stop: int | None) -> list[int]:
    out = [st.next_token]
    while len(out) < max_tokens and out[-1] != stop:
        out.append(lm.decode(st, max_tokens))
    return out[:-1] if out and out[-1] == stop else out


def measure(lm: LM, prompts: list[dict], rhos=RHOS, max_tokens: int = 8, random_rhos=(0.5, 0.3)) -> dict:
    tok = lm.tokenizer
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    rows: dict[str, dict] = {}
    rng = random.Random(1)
    t0 = time.time()
    for i, p in enumerate(prompts):
        ids, s, q = p["ids"], p["system_len"], p["query_len"]
        cp = cloud_prefill(lm, ids, want_mass=True, window=q)
        full = _answer(lm, cp.state, max_tokens, stop)
        full_ok = p["answer"].lower() in tok.decode(full).lower()
        runs = [(f"{r}", r, "mass") for r in rhos if r < 1] + [
            (f"random-{r}", r, "random") for r in random_rhos
        ]
        for key, rho, how in runs:
            kept = refine(ids, cp.mass, rho, s, q)
            if how == "random":
                mid = rng.sample(range(s, len(ids) - q), len(kept) - s - q)
                kept = list(range(s)) + sorted(mid) + list(range(len(ids) - q, len(ids)))
            st = KvState()
            lm.extend(st, [ids[j] for j in kept])
            ans = _answer(lm, st, max_tokens, stop)
            row = rows.setdefault(key, {"rho": rho, "kind": how, "agree": 0, "correct": 0, "n": 0})
            row["agree"] += ans == full
            row["correct"] += p["answer"].lower() in tok.decode(ans).lower()
            row["n"] += 1
        full_row = rows.setdefault("1.0", {"rho": 1.0, "kind": "mass", "agree": 0, "correct": 0, "n": 0})
        full_row["agree"] += 1
        full_row["correct"] += full_ok
        full_row["n"] += 1
        print(f"prompt {i + 1}/{len(prompts)} ({len(ids)} tokens) {time.time() - t0:.0f} s", file=sys.stderr)
    curve = []
    for row in rows.values():
        curve.append(
            {
                "rho": row["rho"],
                "kind": row["kind"],
                "agreement": row["agree"] / row["n"],
                "accuracy": row["correct"] / row["n"],
                "prompts": row["n"],
            }
        )
    curve.sort(key=lambda r: (r["kind"], -r["rho"]))
    return {
        "model": lm.identity(),
        "task": f"needle in filler (kvxfer.device.quality), greedy, max_tokens={max_tokens}",
        "prompt_tokens": [len(p["ids"]) for p in prompts],
        "curve": curve,
    }


def load_curve(path: Path | str = CURVE, metric: str = "accuracy"):
    """``quality(rho)`` from the measured curve, linear between measured rhos. ``metric``:
    "accuracy" = the share of answers naming the right city relative to the full prompt's share
    (capped at 1: a refined prompt may answer better than the full one); "agreement" = the share
    of answers identical to the full prompt's answer, token for token."""
    data = json.loads(Path(path).read_text())
    if metric not in ("accuracy", "agreement"):
        raise BadSettingsError(f"quality metric must be accuracy or agreement, got {metric!r}")
    rows = [r for r in data["curve"] if r["kind"] == "mass"]
    if metric == "accuracy":
        full = max(1e-9, next(r["accuracy"] for r in rows if r["rho"] >= 1.0))
        pts = sorted((r["rho"], min(1.0, r["accuracy"] / full)) for r in rows)
    else:
        pts = sorted((r["rho"], r["agreement"]) for r in rows)

    def quality(rho: float) -> float:
        if rho >= pts[-1][0]:
            return pts[-1][1]
        if rho <= pts[0][0]:
            return pts[0][1]
        for (r0, q0), (r1, q1) in zip(pts, pts[1:]):  # noqa: B905
            if r0 <= rho <= r1:
                return q0 + (q1 - q0) * (rho - r0) / (r1 - r0)
        return pts[0][1]

    return quality


def plot_curve(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, metric, style in (
        ("mass", "accuracy", "o-"),
        ("mass", "agreement", "s--"),
        ("random", "accuracy", "x:"),
        ("random", "agreement", "+:"),
    ):
        pts = sorted((r["rho"], r[metric]) for r in data["curve"] if r["kind"] == kind)
        if kind == "random":
            full = [(r["rho"], r[metric]) for r in data["curve"] if r["kind"] == "mass" and r["rho"] >= 1]
            pts = sorted(pts + full)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{metric}, keep by {kind}")
    n = data["curve"][0]["prompts"]
    ax.set(xlabel="rho (kept share of the prompt)", ylabel="share of prompts", ylim=(0, 1.05),
           title=f"refined prompt quality, SmolLM2-135M, {n} prompts")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvxfer.device.quality")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--filler", type=int, default=20)
    ap.add_argument("--out", default=str(CURVE))
    ap.add_argument("--plot", default=None, help="PNG of the curve in --out (no measurement)")
    a = ap.parse_args(argv)
    if a.plot:
        plot_curve(json.loads(Path(a.out).read_text()), a.plot)
        return 0
    torch.set_num_threads(1)
    lm = smollm2_lm()
    res = measure(lm, make_prompts(lm.tokenizer, a.prompts, a.filler))
    res["command"] = "python -m kvxfer.device.quality " + " ".join(argv or sys.argv[1:])
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    for r in res["curve"]:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
