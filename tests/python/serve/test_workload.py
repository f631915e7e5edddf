"""Workload: determinism, per-scenario statistics, exact lengths, and the Azure trace replay."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from kvxfer.serve.tokenizers import ByteTokenizer
from kvxfer.serve.workload import (
    TRACE_DIR,
    TRACE_FILES,
    Choice,
    Fixed,
    LengthScale,
    LogNormal,
    Scenario,
    Uniform,
    Workload,
    WorkloadError,
    _parse_ts,
    azure_trace_workload,
    load_trace,
    paper_mix,
    poisson_arrivals,
    scenario_stats,
    tidal_arrivals,
)

SCENARIOS = [
    Scenario("chat", 40, Uniform(10, 50), Fixed(8), weight=3),
    Scenario("code", 200, Choice((100, 400), (3, 1)), LogNormal(20, 0.5, 1, 200), weight=1),
]


def test_same_seed_same_requests_other_seed_other_requests():
    a = Workload(SCENARIOS, seed=7).requests(50)
    b = Workload(SCENARIOS, seed=7).requests(50)
    c = Workload(SCENARIOS, seed=8).requests(50)
    assert [(r.scenario, r.prompt, r.max_tokens) for r in a] == [
        (r.scenario, r.prompt, r.max_tokens) for r in b
    ]
    assert [r.prompt for r in a] != [r.prompt for r in c]
    # a closed-loop user's k-th request does not depend on other users or on the order of draws
    w = Workload(SCENARIOS, seed=7)
    u1 = [next(iter_) for iter_ in [w.user_stream(1)] for _ in range(5)]
    w2 = Workload(SCENARIOS, seed=7)
    _ = [next(w2.user_stream(0)) for _ in range(3)]
    assert w2.request("u", 1, 3).prompt == u1[3].prompt


def test_prompts_have_exact_lengths_and_share_the_setting_part():
    w = Workload(SCENARIOS, seed=1)
    tok = ByteTokenizer()
    reqs = w.requests(200)
    for r in reqs:
        assert len(tok.encode(r.prompt)) == r.prompt_tokens  # byte tokenizer: exact
        assert r.prompt.startswith(w.setting(r.scenario))
        assert r.setting_tokens == w.by_name[r.scenario].setting_tokens
    # queries differ within a scenario; settings differ across scenarios
    chat = [r for r in reqs if r.scenario == "chat"]
    assert len({r.prompt for r in chat}) == len(chat)
    assert w.setting("chat") != w.setting("code")[:40]


def test_per_scenario_statistics_match_the_configuration():
    reqs = Workload(SCENARIOS, seed=3).requests(4000)
    st = scenario_stats(reqs)
    assert st["chat"]["share"] == pytest.approx(0.75, abs=0.03)
    assert st["code"]["share"] == pytest.approx(0.25, abs=0.03)
    assert st["chat"]["prompt_mean"] == pytest.approx(40 + 30, abs=1.0)
    assert st["chat"]["output_mean"] == 8
    assert st["code"]["prompt_mean"] == pytest.approx(200 + 0.75 * 100 + 0.25 * 400, rel=0.05)
    assert st["code"]["output_p50"] == pytest.approx(20, abs=2)
    code_prompts = {r.prompt_tokens for r in reqs if r.scenario == "code"}
    assert code_prompts == {300, 600}


def test_word_unit_is_close_to_token_count_for_a_bpe_tokenizer():
    w = Workload([Scenario("s", 30, Fixed(100), Fixed(4))], unit="word")
    r = w.requests(1)[0]
    assert len(r.prompt.split()) == 130


def test_paper_mix_one_long_among_short():
    s = paper_mix(scale=1 / 16)
    reqs = Workload([s], seed=0).requests(2000)
    lens = np.array([r.prompt_tokens for r in reqs])
    assert set(lens) == {512, 128}
    assert (lens == 512).mean() == pytest.approx(0.25, abs=0.03)


def test_arrivals_are_poisson_and_deterministic():
    t = poisson_arrivals(50.0, 5000, seed=2)
    assert np.all(np.diff(t) > 0)
    assert 5000 / t[-1] == pytest.approx(50.0, rel=0.05)
    assert np.array_equal(t, poisson_arrivals(50.0, 5000, seed=2))
    tt = tidal_arrivals([(10, 10.0), (10, 100.0)], seed=1)
    assert (tt < 10).sum() == pytest.approx(100, rel=0.3)
    assert (tt >= 10).sum() == pytest.approx(1000, rel=0.15)
    assert tt.max() < 20
    reqs = Workload(SCENARIOS).open_loop(20.0, 10)
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)


def test_bad_specs_raise_typed_errors():
    with pytest.raises(WorkloadError, match="at least one"):
        Workload([])
    with pytest.raises(WorkloadError, match="unique"):
        Workload([SCENARIOS[0], SCENARIOS[0]])
    with pytest.raises(WorkloadError, match="weights"):
        Choice((1, 2), (1.0,))
    with pytest.raises(WorkloadError, match="unknown scenario"):
        Workload(SCENARIOS).make("nope", 3, 3, np.random.default_rng(0), "x")
    with pytest.raises(WorkloadError, match="rate"):
        poisson_arrivals(0, 3)
    with pytest.raises(WorkloadError, match="scenarios"):
        load_trace("chat")


def test_azure_trace_copy_has_license_and_attribution():
    for f in (*TRACE_FILES.values(), "LICENSE", "AzureLLMInferenceDataset2023.md", "README.md"):
        assert (TRACE_DIR / f).is_file(), f
    readme = (TRACE_DIR / "README.md").read_text()
    assert "CC-BY 4.0" in readme and "Splitwise" in readme and "ISCA 2024" in readme
    assert "Attribution 4.0 International" in (TRACE_DIR / "LICENSE").read_text(encoding="utf-8-sig")


def test_azure_trace_replay_is_the_trace_scaled_and_deterministic():
    scale = LengthScale(prompt_factor=0.25, max_prompt_tokens=1024, output_factor=0.5, max_output_tokens=64)
    wl, reqs = azure_trace_workload(scale, duration_s=120)
    _, again = azure_trace_workload(scale, duration_s=120)
    assert [(r.request_id, r.prompt, r.max_tokens, r.arrival_s) for r in reqs] == [
        (r.request_id, r.prompt, r.max_tokens, r.arrival_s) for r in again
    ]
    assert {r.scenario for r in reqs} == {"code", "conversation"}
    assert reqs[0].arrival_s == 0 and all(0 <= r.arrival_s < 120 for r in reqs)
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)
    # the same rows as a direct read of the CSVs, lengths scaled as declared
    raw = []
    for name, f in TRACE_FILES.items():
        with open(TRACE_DIR / f) as fh:
            raw += [
                (row["TIMESTAMP"], name, int(row["ContextTokens"]), int(row["GeneratedTokens"]))
                for row in csv.DictReader(fh)
            ]
    raw.sort()
    first = raw[0][0]
    want = [x for x in raw if _parse_ts(x[0]) - _parse_ts(first) < 120]
    assert len(want) == len(reqs)
    tok = ByteTokenizer()
    for (_, name, ctx, gen), r in zip(want, reqs, strict=True):
        assert r.scenario == name
        assert r.meta == {"trace_context_tokens": ctx, "trace_generated_tokens": gen}
        assert r.prompt_tokens == min(1024, max(2, round(ctx * 0.25)))
        assert r.max_tokens == min(64, max(1, round(gen * 0.5)))
        assert len(tok.encode(r.prompt)) == r.prompt_tokens
        assert r.prompt.startswith(wl.setting(name)[: r.setting_tokens])
    # time compression is explicit
    _, fast = azure_trace_workload(LengthScale(time_factor=0.1), limit=50)
    _, slow = azure_trace_workload(LengthScale(), limit=50)
    assert [f.arrival_s for f in fast] == pytest.approx([s.arrival_s * 0.1 for s in slow])
    # the whole trace: both services, their full row counts
    _, everything = azure_trace_workload(LengthScale(max_prompt_tokens=64, max_output_tokens=4))
    st = scenario_stats(everything)
    assert st["code"]["count"] == 8819 and st["conversation"]["count"] == 19366
