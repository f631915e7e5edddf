"""P/D-Device with its cloud side on a real P/D-Serve deployment (prefill + decode workers and
the gateway, KV over kvxfer shm), tokens checked against the model's greedy answer."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch", reason="P/D-Serve and the device runtime need torch (kvxfer[serve])")
pytest.importorskip("aiohttp", reason="the P/D-Serve gateway needs aiohttp (kvxfer[serve])")

from kvxfer.device.cloud import CloudHelper  # noqa: E402
from kvxfer.device.device import DeviceProcess, Job  # noqa: E402
from kvxfer.device.lm import serve_tiny_lm  # noqa: E402
from kvxfer.device.profiles import DeviceProfile  # noqa: E402
from kvxfer.serve.deployment import start_local  # noqa: E402

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
EOS = 256  # the byte tokenizer's end of sequence, which the gateway stops on
G = 40


def test_tokens_from_pd_serve_then_the_device():
    torch.set_num_threads(1)
    lm = serve_tiny_lm(0)
    rng = random.Random(3)
    prompt = [rng.randrange(256) for _ in range(600)]
    ref = lm.model.generate(prompt, G, stop_token_ids=[EOS])
    fast = DeviceProfile("test-fast", 4000.0, 4000.0, 10.0)
    with start_local(n_prefill=1, n_decode=1, backend="shm", model="tiny", max_prompt_tokens=1024) as dep:
        with (
            CloudHelper(serve_tiny_lm(0), gateway=dep.gateway_url) as cloud,
            DeviceProcess("serve-tiny:0", fast) as dev,
        ):

            def run(method, **kw):
                j = Job(
                    f"serve-{method}-{kw}",
                    method,
                    prompt,
                    G,
                    cloud=f"127.0.0.1:{cloud.port}",
                    stop_token_ids=[EOS],
                    system_len=60,
                    query_len=20,
                    **kw,
                )
                return dev.run(j), cloud.accounts[j.request_id]

            r, acc = run("cloud-only")
            assert r["tokens"] == ref and set(r["sources"]) == {"c"} and acc.busy_s > 0
            r, acc = run("pd-device", n=10)
            assert r["tokens"] == ref  # P/D-Serve's tokens, then the device's, token for token
            h = r["handoff"]
            if len(ref) > 10:
                assert 1 <= h <= 10 and r["sources"] == "c" * h + "d" * (len(ref) - h)
            assert acc.tokens <= 10
            # the gateway returns no attention mass: rho < 1 is served as rho = 1
            r, _ = run("pd-device", n=10, rho=0.5)
            assert not r["used_refined"] and r["tokens"] == ref
