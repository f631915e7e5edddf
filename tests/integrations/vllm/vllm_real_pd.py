"""A real two-instance vLLM P/D run on CPU with KvxferConnector: `prefill DIR` or
`decode DIR` (DIR holds the tiny randomly initialised model, see make_model()).

The prefill instance (kv_producer) prefills prompts A and B (max_tokens=1, so each
request ends with its blocks held) and publishes their kv_transfer_params; the decode
instance (kv_consumer) generates for A three ways: aggregated (no params: it prefills A
itself), disaggregated (A's params: A's KV read from the prefill), and a control
(B's params for prompt A: it must decode from B's KV, so the output must differ). The
prefill then steps until it has released both requests' blocks."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB

PROMPTS = {"A": list(range(3, 103)), "B": list(range(200, 300))}  # 100 tokens each


def make_model(path: Path) -> None:
    """A 2-layer Llama with random weights (std 0.2, so the logits are far from flat)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=512,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)


def llm(model: Path, role: str):
    from vllm import LLM

    return LLM(
        model=str(model),
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=256,
        block_size=32,
        enforce_eager=True,
        enable_prefix_caching=False,  # the aggregated run must not leave A's blocks cached
        seed=0,
        max_num_seqs=4,
        kv_transfer_config={
            "kv_connector": "KvxferConnector",
            "kv_connector_module_path": "kvxfer.integrations.vllm",
            "kv_role": role,
            "kv_connector_extra_config": {"backends": ["shm", "tcp"], "lease_s": 120},
        },
    )


def publish(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.rename(tmp, path)


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout} s")
        time.sleep(0.1)


def prefill(root: Path) -> int:
    from vllm import SamplingParams

    t0 = time.monotonic()
    engine = llm(root / "model", "kv_producer")
    started = time.monotonic() - t0
    sp = SamplingParams(
        max_tokens=1, temperature=0, extra_args={"kv_transfer_params": {"do_remote_decode": True}}
    )
    outs = engine.generate([{"prompt_token_ids": PROMPTS[k]} for k in ("A", "B")], sp)
    publish(root / "params.json", {k: o.kv_transfer_params for k, o in zip(("A", "B"), outs, strict=True)})
    conn = engine.llm_engine.engine_core.engine_core.scheduler.get_kv_connector()
    held = sorted(conn.scheduler_side.sending)
    wait_for(root / "decode.json", 300)
    # Steps of another request let the connector see the decode's reads and free blocks.
    t1 = time.monotonic()
    while conn.scheduler_side.sending and time.monotonic() - t1 < 30:
        engine.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2, temperature=0))
    publish(
        root / "prefill.json",
        {"startup_s": round(started, 1), "held": held, "still_held": sorted(conn.scheduler_side.sending)},
    )
    return 0


def decode(root: Path) -> int:
    from vllm import SamplingParams

    t0 = time.monotonic()
    engine = llm(root / "model", "kv_consumer")
    started = time.monotonic() - t0

    def run(params: dict | None) -> dict:
        extra = {"kv_transfer_params": dict(params)} if params else None
        sp = SamplingParams(max_tokens=8, temperature=0, logprobs=3, extra_args=extra)
        out = engine.generate([{"prompt_token_ids": PROMPTS["A"]}], sp)[0].outputs[0]
        lps = [{str(k): round(v.logprob, 3) for k, v in d.items()} for d in (out.logprobs or [])]
        return {"tokens": list(out.token_ids), "logprobs": lps}

    agg = run(None)
    wait_for(root / "params.json", 300)
    params = json.loads((root / "params.json").read_text())
    t1 = time.monotonic()
    pd = run(params["A"])
    pd_s = time.monotonic() - t1
    control = run(params["B"])
    publish(
        root / "decode.json",
        {"startup_s": round(started, 1), "agg": agg, "pd": pd, "control": control, "pd_s": round(pd_s, 3)},
    )
    return 0


if __name__ == "__main__":
    role, root = sys.argv[1], Path(sys.argv[2])
    sys.exit(prefill(root) if role == "prefill" else decode(root))
