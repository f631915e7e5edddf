"""End to end: the ``openai`` client streams through gateway -> prefill -> decode worker
processes running the seeded tiny model (real compute, real kvxfer KV transfer over shm).
The streamed token ids must equal the model's own greedy generation, token for token."""

from __future__ import annotations

import asyncio

import openai
import pytest

from kvxfer.serve.deployment import start_local
from kvxfer.serve.gateway import GatewayProcess
from kvxfer.serve.runtime import TINY_VOCAB, tiny_model_config
from kvxfer.serve.tokenizers import load_tokenizer

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

PROMPTS = ["What is the capital of France?", "Tell me a story about a cat.", "x"]


async def _stream_chat(url: str, content: str, max_tokens: int) -> tuple[list[int], str, str, int]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": content}],
            stream=True,
            max_tokens=max_tokens,
            extra_body={"scenario": "chat"},
        )
        ids, text, finish, retries = [], "", None, -1
        async for chunk in stream:
            meta = chunk.model_extra["kvxfer"]
            retries = meta["retries"]
            if "token_id" in meta:
                ids.append(meta["token_id"])
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        return ids, text, finish, retries
    finally:
        await client.close()


def test_openai_client_streams_chat_through_prefill_and_decode_processes():
    from kvxfer.models import Model

    tok = load_tokenizer(f"bytes:{TINY_VOCAB}")
    model = Model(tiny_model_config(0))
    with start_local(n_prefill=2, n_decode=1, model="tiny", mode="real", b_p=2, b_d=4, seed=0) as dep:
        # a second gateway, another process, over the same prefills (no coordination between them)
        with GatewayProcess(dep.prefill_urls, tokenizer=f"bytes:{TINY_VOCAB}") as gw2:

            async def all_of_them():
                jobs = [_stream_chat(dep.gateway_url, p, 12) for p in PROMPTS]
                jobs += [_stream_chat(gw2.url, p, 12) for p in PROMPTS]
                return await asyncio.gather(*jobs)

            results = asyncio.run(asyncio.wait_for(all_of_them(), 300))
    for i, (ids, text, finish, retries) in enumerate(results):
        prompt_ids = tok.chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        want = model.generate(prompt_ids, 12, stop_token_ids=tok.eos_token_ids)
        assert ids == want, f"prompt {i}: streamed {ids} != greedy {want}"
        detok = tok.detokenizer()
        assert text == "".join(detok.add(t) for t in want) + detok.flush()
        assert finish == ("stop" if want and want[-1] in tok.eos_token_ids else "length")
        assert retries >= 0
