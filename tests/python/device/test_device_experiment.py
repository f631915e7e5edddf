"""``kvxfer experiment device`` end to end on a small configuration (real processes)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="the device experiment needs torch (pip install kvxfer[serve])")

from kvxfer.experiments import device as exp  # noqa: E402

pytestmark = pytest.mark.multiprocess

FIELDS = (
    "experiment",
    "method",
    "prompt_tokens",
    "ttft_s",
    "tpot_max_s",
    "tpot_p99_s",
    "cloud_busy_s",
    "cloud_tokens",
    "quality",
)


def test_experiment_emits_the_issue_fields(capsys, tmp_path):
    rc = exp.main(
        [
            "--buckets",
            "1536",
            "--answer",
            "24",
            "--repeats",
            "1",
            "--regret-rows",
            "30",
            "--json",
            "--ttft-slo",
            "0.5",
            "--save",
            str(tmp_path / "run.json"),
        ]
    )
    assert rc == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    methods = {r["method"]: r for r in rows if "method" in r}
    assert set(methods) == {"pd-device", "device-only", "cloud-only", "naive-hybrid"}
    for name, r in methods.items():
        assert all(f in r for f in FIELDS) and r["experiment"] == "device"
        if name != "pd-device" or r["rho"] == 1.0:
            assert r["quality"] == 1.0  # the same tokens as the cloud-only answer
    assert methods["cloud-only"]["cloud_tokens"] == 24 and methods["device-only"]["cloud_busy_s"] == 0
    # a 1536-token prompt at 1000 tokens/s: device-only waits ~1.5 s, the cloud answers first
    assert methods["pd-device"]["ttft_s"] < methods["device-only"]["ttft_s"]
    # the settings planned n with the margin the device's pacer uses (measured from its start)
    pd = methods["pd-device"]
    assert 0.001 <= pd["planned_margin_s"] <= pd["pacer_margin_s"] + 1e-12
    kinds = {r.get("kind"): r for r in rows}
    summary = kinds["summary"]
    if summary["decision"] == "pd-device":  # the bound on the busy ratio at the chosen rho
        assert summary["n_min"] >= 1 and summary["busy_ratio_bound"] > 0 and summary["cloud_tau_s"] > 0
    drop = kinds["link-drop"]
    assert drop["stream_end"] == "link_down" and drop["answer_equals_cloud_only"] and drop["link_gap_s"] > 0
    assert kinds["settings-regret"]["requests"] == 30
    saved = json.loads((tmp_path / "run.json").read_text())
    assert "1536" in saved["timelines"]
