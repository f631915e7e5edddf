"""The forwarding and aggregated experiments end to end, in small configurations: real worker
processes (profiled tiny model), two gateway processes, the openai-client load generator.
The figures themselves are in docs/pd-serve-forwarding.md; here the output contract is checked
(fields, one row per policy and load, the same A and workers for both policies)."""

from __future__ import annotations

import json

import pytest

from kvxfer.experiments import aggregated, forwarding

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

FIELDS = ("experiment", "policy", "load", "users", "success_rate", "ttft_p50_s", "ttft_p99_s", "retries_p99")


def test_forwarding_json_lines(capsys):
    argv = ["--json", "--model", "tiny", "--prefills", "2", "--decodes", "1", "--a", "2", "--loads", "1,2"]
    argv += ["--duration", "2", "--output-tokens", "8", "--scale", "0.0625", "--slo-floor", "1.0"]
    argv += ["--min-requests", "0", "--time-scale", "1"]
    assert forwarding.main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    rows, summary = lines[:-1], lines[-1]
    assert [(r["policy"], r["load"]) for r in rows] == [
        ("local-queue", 1.0),
        ("reject-retry", 1.0),
        ("local-queue", 2.0),
        ("reject-retry", 2.0),
    ]
    for r in rows:
        assert all(k in r for k in FIELDS), r
        assert r["experiment"] == "forwarding" and r["A"] == 2 and r["users"] == round(r["load"] * 2)
        assert r["requests"] > 0 and 0.0 <= r["success_rate"] <= 1.0
        assert r["mode"] == "profiled" and r["machine"] and r["prefills"] == 2
        if r["policy"] == "local-queue":
            assert r["retries_p99"] == 0  # the prefill queues: it never rejects
    # two users on two one-slot prefills never queue, and the SLO has a second of slack
    assert rows[0]["success_rate"] == 1.0 and rows[1]["success_rate"] == 1.0
    assert summary["summary"] is True and set(summary["success_gap"]) == {"1.0", "2.0"}


def test_forwarding_several_gateways_emits_rows_as_measured(capsys):
    """--gateways 2: two gateways per policy, each with its own load generator process (users
    split between them); the gateway-side records of both are merged into ``where``."""
    rows = []
    argv = ["--json", "--model", "tiny", "--prefills", "2", "--decodes", "1", "--a", "4", "--loads", "1"]
    argv += ["--duration", "2", "--output-tokens", "8", "--scale", "0.0625", "--slo-floor", "1.0"]
    argv += ["--min-requests", "10", "--time-scale", "1", "--gateways", "2"]
    args = forwarding.parse(argv)
    out = forwarding.run(args, emit=rows.append)
    assert out == rows and [r["policy"] for r in rows] == ["local-queue", "reject-retry"]
    for r in rows:
        assert r["gateways"] == 2 and r["users"] == 4 and r["requests"] >= 10
        seen = sum(w["requests"] for w in r["where"].values())
        # both gateways' records (the gateways' and the clients' clocks differ by the requests
        # sent near the ramp's end and by the load generator processes' start)
        assert r["requests"] <= seen <= 1.2 * r["requests"] + r["users"], (seen, r["requests"])
    assert rows[1]["success_rate"] == 1.0  # reject-retry, a second of slack, 4 users on 2 prefills


def test_budget_stops_points_that_would_not_fit():
    b = forwarding.Budget(10.0, t0=100.0)
    assert forwarding.Budget(0.0, t0=0.0).allows()  # 0: no limit
    import time as _t

    now = _t.monotonic()
    b.t0 = now - 4.0  # 4 s spent
    assert b.allows()  # no point measured yet
    b.longest = 5.0
    assert b.allows() and not b.allows(share=0.5)  # 4 + 5 <= 10, > 5
    b.longest = 7.0
    assert not b.allows()


def test_eq1_decodes_and_scaled_profile(tmp_path):
    """Decode workers by Eq. 1 from the profile; a scaled profile multiplies every time."""
    import math

    from kvxfer.serve.profile import load_profile

    prof = load_profile("smollm2")
    args = forwarding.parse(["--prefills", "6", "--b-d", "4", "--output-tokens", "32"])
    n_d = forwarding.eq1_decodes("smollm2", args, 512, 128, 0)
    t_p = 0.25 * prof.prefill_s(512) + 0.75 * prof.prefill_s(128)
    t_d = prof.decode_s(4) * 31
    assert n_d == math.ceil(6 * t_d / (4 * t_p))
    # n_d decodes carry at least the prefills' rate, n_d - 1 do not
    assert n_d * 4 / t_d >= 6 / t_p > (n_d - 1) * 4 / t_d
    path = forwarding.scaled_profile("smollm2", 0.25, str(tmp_path))
    fast = load_profile(path)
    assert fast.prefill_s(300) == pytest.approx(0.25 * prof.prefill_s(300))
    assert fast.decode_s(8) == pytest.approx(0.25 * prof.decode_s(8))
    assert fast.meta["time_scale"] == 0.25


def test_aggregated_json_lines(capsys):
    argv = [
        "--json",
        "--model",
        "tiny",
        "--prefills",
        "1",
        "--decodes",
        "1",
        "--users",
        "4",
        "--duration",
        "2",
    ]
    argv += ["--repeats", "1", "--max-prompt", "128"]
    assert aggregated.main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    rows, summary = lines[:-1], lines[-1]
    assert [r["mode"] for r in rows] == ["disaggregated", "aggregated"]
    assert [r["layout"] for r in rows] == ["1P+1D", "2A"]
    for r in rows:
        assert r["experiment"] == "aggregated" and r["instances"] == 2 and r["errors"] == {}
        assert r["throughput_rps"] > 0 and r["tokens_per_s"] > 0
    ratio = rows[0]["throughput_rps"] / rows[1]["throughput_rps"]
    assert summary["throughput_ratio"] == pytest.approx(ratio)
