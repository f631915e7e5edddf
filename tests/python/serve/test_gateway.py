"""Gateway unit tests against an in-test prefill stub (one piece: the gateway).

The stub speaks :mod:`kvxfer.serve.protocol`: it has ``slots`` slots and no queue (429 when
full), streams NDJSON tokens, and logs every attempt. Its output tokens are the prompt's bytes
reversed, so the text a client receives can be checked character for character. The end-to-end
path through real prefill and decode workers is tested in ``test_gateway_e2e.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import aiohttp
import openai
import pytest
from aiohttp import web

from kvxfer.serve import protocol
from kvxfer.serve.errors import GatewayError
from kvxfer.serve.gateway import Gateway, GatewayConfig
from kvxfer.serve.tokenizers import ByteTokenizer


class StubPrefill:
    def __init__(self, name: str, slots: int, first_delay: float = 0.0, token_delay: float = 0.0):
        self.name, self.slots = name, slots
        self.first_delay, self.token_delay = first_delay, token_delay
        self.busy = 0
        self.max_busy = 0
        self.log: list[tuple[float, str, str, int]] = []  # (time, request_id, policy header, status)
        self.fail_with: str | None = None  # an error code to send instead of tokens
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/prefill", self._prefill)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _prefill(self, request: web.Request) -> web.StreamResponse:
        req = protocol.PrefillRequest.from_json(await request.json())
        policy = request.headers.get("X-Kvxfer-Policy", "")
        if policy == "local-queue":  # the baseline: wait in FIFO order for a slot, then answer
            while self.busy >= self.slots:
                await asyncio.sleep(0.005)
        if self.busy >= self.slots:
            self.log.append((time.time(), req.request_id, policy, 429))
            return web.json_response({"v": 1, "error": "busy"}, status=429)
        self.log.append((time.time(), req.request_id, policy, 200))
        self.busy += 1
        self.max_busy = max(self.max_busy, self.busy)
        try:
            resp = web.StreamResponse(headers={"Content-Type": protocol.NDJSON})
            await resp.prepare(request)
            await asyncio.sleep(self.first_delay)
            if self.fail_with == "malformed":  # a token event without its token id
                await resp.write(_line({"v": 1, "type": "token", "index": 0}))
                return resp
            if self.fail_with:
                await resp.write(_line(protocol.error_event(self.fail_with, "stub failure")))
                return resp
            out = list(reversed(req.prompt_token_ids))[: req.max_tokens]
            for i, t in enumerate(out):
                if i:
                    await asyncio.sleep(self.token_delay)
                await resp.write(_line(protocol.token_event(i, t)))
            reason = "length" if len(out) == req.max_tokens else "stop"
            await resp.write(_line(protocol.done_event(reason)))
            return resp
        finally:
            self.busy -= 1


def _line(ev: dict) -> bytes:
    return (json.dumps(ev) + "\n").encode()


async def _setup(stubs: list[StubPrefill], **cfg) -> Gateway:
    for s in stubs:
        await s.start()
    gw = Gateway(GatewayConfig(routes={"*": [s.url for s in stubs]}, **cfg), ByteTokenizer())
    await gw.start()
    return gw


def _client(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_stream_chat_parsed_by_openai_client():
    async def body():
        stub = StubPrefill("p0", slots=2)
        gw = await _setup([stub], model="tiny")
        client = _client(gw)
        try:
            msgs = [{"role": "user", "content": "Hello, héllo!"}]
            stream = await client.chat.completions.create(
                model="tiny", messages=msgs, stream=True, max_tokens=500
            )
            text, finish, chunks = "", None, 0
            async for chunk in stream:
                chunks += 1
                assert chunk.object == "chat.completion.chunk"
                delta = chunk.choices[0].delta
                text += delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
                assert chunk.model_extra["kvxfer"]["retries"] == 0
            prompt_ids = ByteTokenizer().chat(msgs)
            # the stub answers the prompt's bytes reversed: check the text byte for byte
            expected = bytes(reversed(prompt_ids)).decode("utf-8", errors="replace")
            assert text == expected
            assert finish == "stop"
            assert chunks == len(prompt_ids) + 1  # one chunk per token, then the finish chunk
            models = await client.models.list()
            assert [m.id for m in models.data] == ["tiny"]
        finally:
            await client.close()
            await gw.stop()
            await stub.stop()

    run(body())


def test_completion_stream_and_non_stream_and_length():
    async def body():
        stub = StubPrefill("p0", slots=1)
        gw = await _setup([stub])
        client = _client(gw)
        try:
            resp = await client.completions.create(model="kvxfer", prompt="abcdef", max_tokens=4)
            assert resp.choices[0].text == "fedc"
            assert resp.choices[0].finish_reason == "length"
            assert resp.usage.prompt_tokens == 6 and resp.usage.completion_tokens == 4
            stream = await client.completions.create(model="kvxfer", prompt="xyz", max_tokens=10, stream=True)
            parts = [c.choices[0].text async for c in stream]
            assert "".join(parts) == "zyx"
        finally:
            await client.close()
            await gw.stop()
            await stub.stop()

    run(body())


def test_retry_on_429_tries_candidates_in_rank_order():
    """Two prefills are full; the gateway tries each once, in its ranking, then the free one."""

    async def body():
        stubs = [StubPrefill(f"p{i}", slots=0 if i < 2 else 1) for i in range(3)]
        gw = await _setup(stubs, batch_forwarding=False)
        client = _client(gw)
        try:
            gw._rr = itertools.count(0)  # ties at 0 streams rotate; start the rotation at p0
            resp = await client.completions.create(model="kvxfer", prompt="hi", max_tokens=2)
            assert resp.choices[0].text == "ih"
            assert resp.model_extra["kvxfer"]["retries"] == 2
            rec = gw.records[-1]
            assert rec.retries == 2 and rec.attempts == 3 and rec.prefill == stubs[2].url
            assert rec.outcome == "length" and rec.first_token is not None
            tried = sorted((t, s.name) for s in stubs for (t, _, _, _) in s.log)
            assert [n for _, n in tried] == ["p0", "p1", "p2"]
            assert [st for s in stubs for (*_, st) in s.log] == [429, 429, 200]
        finally:
            await client.close()
            await gw.stop()
            for s in stubs:
                await s.stop()

    run(body())


def test_deadline_ends_request_with_error_event():
    async def body():
        stubs = [StubPrefill("p0", slots=0), StubPrefill("p1", slots=0)]
        gw = await _setup(stubs, ttft_slo_s=0.4)
        client = _client(gw)
        try:
            t0 = time.time()
            stream = await client.completions.create(model="kvxfer", prompt="hi", max_tokens=2, stream=True)
            with pytest.raises(openai.APIError) as info:
                async for _ in stream:
                    pass
            elapsed = time.time() - t0
            assert 0.4 <= elapsed < 1.5
            assert info.value.body["code"] == "deadline"
            retries = info.value.body["kvxfer"]["retries"]
            assert retries >= 4  # kept trying both prefills in turn until the deadline
            # Every counted rejection reached a prefill; one more request may have reached one
            # whose 429 the gateway never read (the deadline cancelled that forward in flight).
            reached = sum(len(s.log) for s in stubs)
            assert retries <= reached <= retries + 1
            rec = gw.records[-1]
            assert rec.outcome == "deadline" and rec.accept is None and rec.retries == retries
            # non-streamed: a 504 with the same error code; per-request SLO from the header
            t0 = time.time()
            with pytest.raises(openai.APIStatusError) as info2:
                await client.completions.create(
                    model="kvxfer", prompt="hi", max_tokens=2, extra_headers={"X-TTFT-SLO": "0.2"}
                )
            assert info2.value.status_code == 504 and info2.value.body["code"] == "deadline"
            assert time.time() - t0 < 1.0
        finally:
            await client.close()
            await gw.stop()
            for s in stubs:
                await s.stop()

    run(body())


def test_first_token_deadline_and_upstream_error_are_error_events():
    async def body():
        slow = StubPrefill("slow", slots=4, first_delay=2.0)
        gw = await _setup([slow], ttft_slo_s=0.3)
        client = _client(gw)
        try:
            t0 = time.time()
            stream = await client.completions.create(model="kvxfer", prompt="hi", max_tokens=2, stream=True)
            with pytest.raises(openai.APIError) as info:
                async for _ in stream:
                    pass
            assert info.value.body["code"] == "deadline" and time.time() - t0 < 1.5
            assert gw.records[-1].accept is not None and gw.records[-1].first_token is None
            slow.first_delay, slow.fail_with = 0.0, "decode_failed"
            stream = await client.chat.completions.create(
                model="kvxfer", messages=[{"role": "user", "content": "x"}], stream=True
            )
            with pytest.raises(openai.APIError) as info:
                async for _ in stream:
                    pass
            assert info.value.body["code"] == "decode_failed"
            assert gw.open_streams[slow.url] == 0
            slow.fail_with = "malformed"  # a bad upstream event is a typed error, not a 500 or a hang
            stream = await client.completions.create(model="kvxfer", prompt="x", stream=True)
            with pytest.raises(openai.APIError) as info:
                async for _ in stream:
                    pass
            assert info.value.body["code"] == "internal" and "KeyError" in info.value.body["message"]
            with pytest.raises(openai.APIStatusError) as info:
                await client.completions.create(model="kvxfer", prompt="x")
            assert info.value.status_code == 500 and info.value.body["code"] == "internal"
            assert gw.records[-1].outcome == "internal"
        finally:
            await client.close()
            await gw.stop()
            await slow.stop()

    run(body())


def test_batch_forwarding_fills_one_prefill_until_it_rejects():
    async def body():
        a, b = StubPrefill("a", slots=3, token_delay=0.3), StubPrefill("b", slots=3, token_delay=0.3)
        gw = await _setup([a, b])
        client = _client(gw)
        try:

            async def one(i: int) -> str:
                r = await client.completions.create(
                    model="kvxfer", prompt="abc", max_tokens=3, extra_body={"scenario": "s"}
                )
                return r.model_extra["kvxfer"]["prefill"]

            tasks = []
            for i in range(4):  # started one after another, each still open when the next comes
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(0.05)
            placed = await asyncio.gather(*tasks)
            first = placed[0]
            assert placed[:3] == [first] * 3  # the idle prefill is filled to its 3 slots
            assert placed[3] != first  # then it rejects and the next one takes over
            assert max(a.max_busy, b.max_busy) == 3
            assert gw.records[-1].retries == 1
        finally:
            await client.close()
            await gw.stop()
            await a.stop()
            await b.stop()

    run(body())


def test_local_queue_policy_picks_fewest_streams_and_marks_requests():
    async def body():
        a, b = StubPrefill("a", slots=8, token_delay=0.3), StubPrefill("b", slots=8, token_delay=0.3)
        gw = await _setup([a, b], policy="local-queue")
        client = _client(gw)
        try:
            tasks = []
            for _ in range(4):
                tasks.append(
                    asyncio.create_task(client.completions.create(model="kvxfer", prompt="ab", max_tokens=2))
                )
                await asyncio.sleep(0.05)
            await asyncio.gather(*tasks)
            assert len(a.log) == 2 and len(b.log) == 2  # fewest open streams alternates them
            assert {p for s in (a, b) for (_, _, p, _) in s.log} == {"local-queue"}
        finally:
            await client.close()
            await gw.stop()
            await a.stop()
            await b.stop()

    run(body())


def test_local_queue_counts_queued_streams_and_ends_them_at_the_deadline():
    async def body():
        a = StubPrefill("a", slots=1, token_delay=0.5)
        gw = await _setup([a], policy="local-queue")
        client = _client(gw)
        try:
            long = asyncio.create_task(client.completions.create(model="kvxfer", prompt="abc", max_tokens=3))
            await asyncio.sleep(0.2)
            t0 = time.time()
            queued = asyncio.create_task(
                client.completions.create(
                    model="kvxfer", prompt="x", max_tokens=1, extra_body={"ttft_slo_s": 0.4}
                )
            )
            await asyncio.sleep(0.2)
            assert gw.open_streams[a.url] == 2  # the queued request counts as an open stream
            with pytest.raises(openai.APIStatusError) as info:
                await queued
            assert info.value.body["code"] == "deadline" and 0.4 <= time.time() - t0 < 1.2
            assert gw.open_streams[a.url] == 1
            assert (await long).choices[0].text == "cba"
            assert gw.open_streams[a.url] == 0
        finally:
            await client.close()
            await gw.stop()
            await a.stop()

    run(body())


def test_waiting_requests_take_turns_by_deadline_and_one_probes_at_a_time():
    async def body():
        a = StubPrefill("a", slots=1, token_delay=0.1)
        gw = await _setup([a])
        client = _client(gw)
        try:
            tasks = []
            for i in range(4):  # each holds the one slot ~0.2 s; they queue at the gateway
                p = f"r{i}"
                tasks.append(
                    asyncio.create_task(client.completions.create(model="k", prompt=p, max_tokens=3))
                )
                await asyncio.sleep(0.02)
            out = [r.choices[0].text for r in await asyncio.gather(*tasks)]
            assert out == ["0r", "1r", "2r", "3r"]
            accepted = [rid for (_, rid, _, st) in a.log if st == 200]
            arrival = [r.request_id for r in gw.records]
            assert accepted == arrival  # FIFO at the gateway
            # a later request with an earlier deadline goes first (earliest deadline first)
            hold = asyncio.create_task(client.completions.create(model="k", prompt="hold", max_tokens=3))
            await asyncio.sleep(0.05)
            loose = asyncio.create_task(
                client.completions.create(model="k", prompt="L", max_tokens=1, extra_body={"ttft_slo_s": 5})
            )
            await asyncio.sleep(0.02)
            tight = asyncio.create_task(
                client.completions.create(model="k", prompt="T", max_tokens=1, extra_body={"ttft_slo_s": 2})
            )
            await asyncio.gather(hold, loose, tight)
            order = [rid for (_, rid, _, st) in a.log if st == 200][-2:]
            by_prompt = {r.request_id: r.prompt_tokens for r in gw.records}
            assert [by_prompt[rid] for rid in order] == [1, 1]
            assert order == [gw.records[-1].request_id, gw.records[-2].request_id]  # tight, then loose
            # ten requests waiting together for 0.5 s: one probes at a time, not ten
            a.token_delay = 1.0
            hold = asyncio.create_task(client.completions.create(model="k", prompt="ab", max_tokens=2))
            await asyncio.sleep(0.1)
            before = len(a.log)
            waiting = [
                client.completions.create(model="k", prompt="x", max_tokens=1, extra_body={"ttft_slo_s": 0.5})
                for _ in range(10)
            ]
            res = await asyncio.gather(*waiting, return_exceptions=True)
            assert all(isinstance(r, openai.APIStatusError) and r.body["code"] == "deadline" for r in res)
            probes = len(a.log) - before
            assert 5 <= probes <= 150, probes  # ~one poller with backoff; ten pollers would be ~10x
            await hold
        finally:
            await client.close()
            await gw.stop()
            await a.stop()

    run(body())


def test_early_drop_ends_a_request_that_cannot_make_its_deadline():
    """After three prefills of ~0.3 s, a request with 0.2 s left is ended at once (no prefill
    slot spent on it); with early_drop off, it is forwarded and misses its deadline later."""

    async def body():
        a = StubPrefill("a", slots=4, first_delay=0.3)
        gw = await _setup([a])
        client = _client(gw)
        try:
            for _ in range(3):
                await client.completions.create(model="k", prompt="abcd", max_tokens=1)
            est = gw.prefill_times.estimate("default", 4)
            assert est is not None and 0.3 <= est < 0.6
            n = len(a.log)
            t0 = time.time()
            with pytest.raises(openai.APIStatusError) as info:
                await client.completions.create(
                    model="k", prompt="wxyz", max_tokens=1, extra_body={"ttft_slo_s": 0.2}
                )
            assert info.value.body["code"] == "deadline" and "cannot be met" in info.value.body["message"]
            assert time.time() - t0 < 0.15 and len(a.log) == n  # ended before any prefill saw it
            # another prompt-length bucket has no estimate yet: forwarded as usual
            r = await client.completions.create(model="k", prompt="a" * 40, max_tokens=1)
            assert r.choices[0].text == "a"
            gw.config.early_drop = False
            with pytest.raises(openai.APIStatusError):
                await client.completions.create(
                    model="k", prompt="wxyz", max_tokens=1, extra_body={"ttft_slo_s": 0.2}
                )
            assert len(a.log) == n + 2
        finally:
            await client.close()
            await gw.stop()
            await a.stop()

    run(body())


def test_two_gateways_share_prefills_without_coordination():
    """Two gateways, two one-slot prefills, eight concurrent requests: every one is served,
    no prefill ever runs two at once, and the gateways learn of full prefills only by 429."""

    async def body():
        stubs = [StubPrefill(f"p{i}", slots=1, token_delay=0.02) for i in range(2)]
        for s in stubs:
            await s.start()
        gws = []
        for _ in range(2):
            gw = Gateway(GatewayConfig(routes={"*": [s.url for s in stubs]}, ttft_slo_s=10), ByteTokenizer())
            await gw.start()
            gws.append(gw)
        clients = [_client(g) for g in gws]
        try:

            async def one(i: int) -> str:
                c = clients[i % 2]
                stream = await c.completions.create(
                    model="kvxfer", prompt=f"req{i}", max_tokens=4, stream=True
                )
                return "".join([ch.choices[0].text async for ch in stream])

            texts = await asyncio.gather(*(one(i) for i in range(8)))
            assert texts == [f"req{i}"[::-1][:4] for i in range(8)]
            assert all(s.max_busy == 1 for s in stubs)
            recs = [r for g in gws for r in g.records]
            assert len(recs) == 8 and all(r.outcome == "length" for r in recs)
            assert sum(r.retries for r in recs) == sum(1 for s in stubs for e in s.log if e[3] == 429)
            assert sum(r.retries for r in recs) > 0
        finally:
            for c in clients:
                await c.close()
            for g in gws:
                await g.stop()
            for s in stubs:
                await s.stop()

    run(body())


def test_bad_requests_are_refused_with_400():
    async def body():
        stub = StubPrefill("p0", slots=1)
        gw = await _setup([stub])
        try:
            async with aiohttp.ClientSession() as s:
                for payload in ({"prompt": ""}, {"messages": []}, {"prompt": "x", "max_tokens": -1}, [1, 2]):
                    path = "/v1/chat/completions" if "messages" in payload else "/v1/completions"
                    async with s.post(gw.url + path, json=payload) as r:
                        assert r.status == 400, payload
                        assert "bad request" in (await r.json())["error"]["message"]
                async with s.post(gw.url + "/v1/completions", data=b"{not json") as r:
                    assert r.status == 400
            assert stub.log == []
        finally:
            await gw.stop()
            await stub.stop()

    run(body())
    with pytest.raises(GatewayError, match="unknown policy"):
        GatewayConfig(routes={"*": ["http://x"]}, policy="fifo")
    with pytest.raises(GatewayError, match="prefill URL"):
        GatewayConfig(routes={"*": []})


def test_loadgen_closed_loop_measures_ttft_success_and_retries():
    """Closed-loop users through the real openai client: counts, TTFT and the gateway's retry
    counts reach the results; a tight SLO against a slow prefill fails with 'deadline'."""
    from kvxfer.serve import loadgen
    from kvxfer.serve.workload import Fixed, Scenario, Workload

    async def body():
        stubs = [StubPrefill(f"p{i}", slots=1, first_delay=0.05) for i in range(2)]
        gw = await _setup(stubs)
        wl = Workload([Scenario("s", 8, Fixed(8), Fixed(3))], seed=1)
        try:
            res = await loadgen.closed_loop(
                gw.url, wl, users=4, ttft_slo_s=5.0, duration_s=30, max_requests=12
            )
            assert len(res) == 12
            assert all(r.success and r.error is None and r.completion_tokens == 3 for r in res)
            assert all(r.ttft_s >= 0.05 for r in res)
            # 4 users on 2 one-slot prefills: some requests were rejected and retried
            assert sum(r.retries for r in res) == sum(1 for s in stubs for e in s.log if e[3] == 429) > 0
            by_id = {r.request_id: r.retries for r in gw.records}
            assert sorted(by_id.values()) == sorted(r.retries for r in res)
            st = loadgen.summarize(res, wall_s=1.0)
            assert st["requests"] == 12 and st["success_rate"] == 1.0 and st["ttft_p99_s"] >= st["ttft_p50_s"]
            for s in stubs:
                s.first_delay = 0.5
            res = await loadgen.closed_loop(
                gw.url, wl, users=2, ttft_slo_s=0.2, duration_s=30, max_requests=2
            )
            assert [r.error for r in res] == ["deadline", "deadline"] and not any(r.success for r in res)
            st = loadgen.summarize(res)
            assert st["success_rate"] == 0.0 and st["errors"] == {"deadline": 2}
        finally:
            await gw.stop()
            for s in stubs:
                await s.stop()

    run(body())


def test_loadgen_open_loop_follows_arrival_times():
    from kvxfer.serve import loadgen
    from kvxfer.serve.workload import Fixed, Scenario, Workload

    async def body():
        stub = StubPrefill("p0", slots=8)
        gw = await _setup([stub])
        reqs = Workload([Scenario("s", 4, Fixed(4), Fixed(2))]).open_loop(20.0, 10)
        try:
            res = await loadgen.open_loop(gw.url, reqs, ttft_slo_s=5.0)
            assert len(res) == 10 and all(r.success for r in res)
            starts = sorted(r.start_s for r in res)
            for got, want in zip(starts, sorted(r.arrival_s for r in reqs), strict=True):
                assert want - 0.01 <= got <= want + 0.2
        finally:
            await gw.stop()
            await stub.stop()

    run(body())


def test_gateway_process_serves_and_stops():
    from kvxfer.serve.gateway import GatewayProcess

    async def body():
        stub = StubPrefill("p0", slots=1)
        await stub.start()
        gp = GatewayProcess([stub.url], policy="local-queue", ttft_slo_s=5)
        try:
            url = await asyncio.to_thread(gp.start, 30)
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
            r = await client.completions.create(model="kvxfer", prompt="abc", max_tokens=8)
            await client.close()
            assert r.choices[0].text == "cba"
            assert [e[2] for e in stub.log] == ["local-queue"]
        finally:
            gp.stop()
            await stub.stop()
        assert gp.proc.poll() is not None

    run(body())
