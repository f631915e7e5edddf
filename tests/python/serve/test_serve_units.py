"""Unit tests of single pieces of the serving layer: configuration, profiles, prefix cache,
and a deployment whose worker cannot start."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kvxfer.errors import KvxferError
from kvxfer.serve.config import WorkerConfig
from kvxfer.serve.errors import ConfigError, ProfileError, WorkerStartError
from kvxfer.serve.profile import Profile, load_profile
from kvxfer.serve.runtime import PrefixCache


@pytest.mark.parametrize(
    "bad",
    [{"role": "router"}, {"mode": "fast"}, {"policy": "lifo"}, {"backend": "udp"}, {"transfer_mode": "x"},
     {"b_p": 0}, {"model": "gpt"}],
)  # fmt: skip
def test_config_refuses_unknown_values_with_a_typed_error(bad):
    with pytest.raises(ConfigError) as e:
        WorkerConfig(**bad)
    assert isinstance(e.value, KvxferError) and list(bad)[0].split("_")[0] in str(e.value)


def test_config_round_trips_through_json_and_refuses_unknown_fields():
    cfg = WorkerConfig(role="decode", b_d=3, routes={"a": ["http://x"]})
    assert WorkerConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="bogus"):
        WorkerConfig.from_json(json.dumps({"bogus": 1}))


def test_profile_interpolates_and_extrapolates(tmp_path):
    p = Profile("m", "box", "float32", {}, prefill=[(100, 1.0), (200, 3.0)], decode=[(1, 0.01), (4, 0.04)])
    assert p.prefill_s(150) == pytest.approx(2.0)
    assert p.prefill_s(300) == pytest.approx(5.0)  # the last segment's slope
    assert p.decode_s(2) == pytest.approx(0.02)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(p.to_json()))
    assert load_profile(str(path)).prefill == p.prefill
    with pytest.raises(ProfileError, match="no compute profile"):
        load_profile(str(tmp_path / "missing.json"))
    path.write_text("{}")
    with pytest.raises(ProfileError, match="malformed"):
        load_profile(str(path))


@pytest.mark.parametrize("name", ["tiny", "medium"])
def test_committed_profiles_name_their_machine(name):
    prof = load_profile(name)
    assert prof.machine and prof.meta["command"].startswith("python -m kvxfer.serve.profile")
    assert all(s > 0 for _, s in prof.prefill + prof.decode)


def test_prefix_cache_keeps_the_setting_part():
    c = PrefixCache(min_tokens=4)
    kv = torch.arange(2 * 2 * 12 * 1 * 1, dtype=torch.float32).view(2, 2, 12, 1, 1)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert c.lookup("s", a) == (None, 0)
    c.update("s", a, kv)
    b = [1, 2, 3, 4, 5, 6, 70, 80]
    pkv, n = c.lookup("s", b)
    assert n == 6 and torch.equal(pkv[:, :, :6], kv[:, :, :6])
    c.update("s", b, None)  # the entry shrinks to the common part
    pkv, n = c.lookup("s", [1, 2, 3, 4, 5, 6, 7])
    assert n == 6 and pkv.shape[2] == 6
    assert c.lookup("s", [9, 9, 9, 9, 9]) == (None, 0)  # another setting: a miss
    assert c.lookup("other", a) == (None, 0)
    st = c.stats()
    assert (
        st["prefix_lookups"] == 5 and st["prefix_hits"] == 2 and st["prefix_hit_rate"] == pytest.approx(0.4)
    )
    assert c.lookup("s", [1, 2, 3, 4, 5, 6])[1] == 5  # at least the last token is computed


@pytest.mark.multiprocess
def test_a_worker_that_cannot_start_fails_the_deployment_with_its_reason(tmp_path):
    from kvxfer.serve.deployment import start_local

    with pytest.raises(WorkerStartError, match="no compute profile"):
        start_local(1, 1, model="tiny", mode="profiled", profile=str(tmp_path / "none.json"), gateway=False)


def test_medium_model_is_one_fixed_shape_in_real_and_profiled_workers(tmp_path):
    """``model="medium"``: a real-mode worker builds the seeded medium model (byte tokenizer's
    vocabulary), a profiled one the same shape from its profile, and the forwarding experiment
    talks to it with the byte tokenizer; an unknown model name is refused by name."""
    from kvxfer.experiments import forwarding
    from kvxfer.models import medium_config
    from kvxfer.serve.runtime import RANDOM_MODELS, make_compute

    cfg = RANDOM_MODELS["medium"](0)
    assert cfg == medium_config(seed=0, vocab_size=512)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        8,
        512,
        8,
        2,
        64,
    )
    params = cfg.num_layers * (
        cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
        + 3 * cfg.hidden_size * cfg.intermediate_size
    )
    assert 20e6 < params < 30e6
    tok, real = make_compute(WorkerConfig(model="medium", mode="real", seed=3))
    assert tok is None and real.mode == "real" and real.model.config == RANDOM_MODELS["medium"](3)
    assert real.model.prefill([1, 2, 3]).num_tokens == 3
    prof = load_profile("medium")
    assert prof.config["hidden_size"] == 512 and prof.prefill_s(512) > 2 * prof.prefill_s(128)
    _, profiled = make_compute(WorkerConfig(model="medium", mode="profiled"))
    assert profiled.mode == "profiled" and profiled.geometry == real.geometry
    assert forwarding.tokenizer_spec("medium", "real") == ("bytes:512", "char", 512)
    assert forwarding.parse(["--model", "medium", "--mode", "real"]).model == "medium"
    with pytest.raises(ConfigError, match="'large'"):
        WorkerConfig(model="large")


def test_cpu_lists_and_physical_cores():
    from kvxfer.serve.deployment import _cpu_list, physical_cores

    assert _cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11] and _cpu_list("5") == [5]
    cores = physical_cores()
    flat = [c for core in cores for c in core]
    assert sorted(flat) == sorted(os.sched_getaffinity(0)) and len(flat) == len(set(flat))
    with pytest.raises(ConfigError, match="cpus"):
        WorkerConfig(cpus=[-1])
