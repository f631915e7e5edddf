"""One vLLM instance of the two-process connector test: `prefill ROOT` or `decode ROOT`.

For each backend (shm, then tcp) the prefill finishes two requests (their blocks held
for the decode) and publishes the kv_transfer_params in ROOT; the decode admits them
(vLLM's get_num_new_matched_tokens / update_state_after_alloc), steps until its worker
reports them loaded, and checks every byte of every layer against the prefill's KV; the
prefill steps until its worker reports both sent (the decode's READ notifications), so
the blocks would be freed. Each prints one JSON line; exit 0 = all checks held."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # PYTHONSAFEPATH leaves it out

import torch  # noqa: E402
import vllm_harness as h  # noqa: E402

BACKENDS = ["shm", "tcp"]
# request id -> (prompt tokens, prefill blocks, decode blocks)
REQUESTS = {
    "req-A": (70, [10, 11, 40], [0, 1, 2]),
    "req-B": (128, [5, 6, 7, 8], [20, 31, 32, 63]),
}


def prefill(root: Path) -> int:
    report = {}
    for backend in BACKENDS:
        inst = h.Instance("kv_producer", f"P-{backend}", {"backends": [backend]}, seed=7)
        params = {}
        for rid, (n, pblocks, _) in REQUESTS.items():
            free_later, p = inst.finish_prefill(rid, n, pblocks)
            assert free_later and p is not None, (rid, free_later, p)
            params[rid] = p
        tmp = root / f"params-{backend}.tmp"
        tmp.write_text(json.dumps(params))
        os.rename(tmp, root / f"params-{backend}.json")
        t0 = time.monotonic()
        ok = inst.run_until(lambda inst=inst: set(REQUESTS) <= inst.sent, timeout=90)
        report[backend] = {"sent": sorted(inst.sent), "ok": ok, "s": round(time.monotonic() - t0, 3)}
        report[backend]["leftovers"] = inst.leftovers()
        inst.close()
    print(json.dumps({"role": "prefill", **report}))
    return 0 if all(r["ok"] for r in report.values()) else 1


def decode(root: Path) -> int:
    report = {}
    want = h.kv_tensors(7)  # the prefill's KV, regenerated from its seed
    for backend in BACKENDS:
        inst = h.Instance("kv_consumer", f"D-{backend}", {"backends": [backend]}, seed=None)
        path = root / f"params-{backend}.json"
        deadline = time.monotonic() + 90
        while not path.exists():
            if time.monotonic() > deadline:
                print(json.dumps({"role": "decode", "error": f"no {path.name}"}))
                return 1
            time.sleep(0.05)
        params = json.loads(path.read_text())
        admitted = {}
        for rid, (n, _, dblocks) in REQUESTS.items():
            _, count, is_async = inst.admit(rid, n, params[rid], dblocks)
            admitted[rid] = [count, is_async]
        ok = inst.run_until(lambda inst=inst: set(REQUESTS) <= inst.recvd, timeout=60)
        bad = 0
        touched = sorted({b for _, _, d in REQUESTS.values() for b in d})
        untouched = [b for b in range(h.NUM_BLOCKS) if b not in touched]
        for name in h.LAYER_NAMES:
            got = inst.kv[name].view(torch.int16)
            src = want[name].view(torch.int16)
            for _, pblocks, dblocks in REQUESTS.values():
                bad += int((got[dblocks] != src[pblocks]).sum())
            bad += int((got[untouched] != 0).sum())
        report[backend] = {
            "admitted": admitted,
            "recvd": sorted(inst.recvd),
            "ok": ok,
            "bad_elements": bad,
            "load_errors": sorted(inst.load_errors),
            "via": sorted({p.backend for p in inst.worker.worker_side._peers.values()}),
            "leftovers": inst.leftovers(),
        }
        inst.close()
    print(json.dumps({"role": "decode", **report}))
    good = all(r["ok"] and r["bad_elements"] == 0 and not r["load_errors"] for r in report.values())
    return 0 if good else 1


if __name__ == "__main__":
    role, root = sys.argv[1], Path(sys.argv[2])
    sys.exit(prefill(root) if role == "prefill" else decode(root))
