#!/usr/bin/env python3
"""Registration cost of an ibverbs region (docs/security.md, "deregister() fences ibverbs"):
kvxfer registers every region twice (a local MR and a remote MR, so that deregister() can end
remote access at once), against one plain ibv_reg_mr of the same memory through pyverbs,
measured in the same run. Prints JSON lines; medians of 5.

    tools/softroce/softroce-vm env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 PYTHONPATH=$PWD \\
        $(python3 -c 'import sys;print(sys.executable)') tests/rdma/measure_register.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import numpy as np  # noqa: E402
import rdma_helpers as h  # noqa: E402


def main() -> int:
    import pyverbs_peer as pp

    pp.import_pyverbs(tempfile.mkdtemp())
    import pyverbs.enums as e
    from pyverbs.device import Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD

    dev = h.rdma_devices()[0]
    ctx = Context(name=dev)
    pd = PD(ctx)
    access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
    eng = h.make_engine("register-cost", device=dev)
    for mib in (64, 256):
        buf = np.ones(mib << 20, np.uint8)  # touched: registration pins, it does not fault
        plain, kv = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            mr = MR(pd, buf.nbytes, access, address=buf.ctypes.data)
            plain.append(time.perf_counter() - t0)
            mr.close()
            t0 = time.perf_counter()
            region = eng.register(buf)
            kv.append(time.perf_counter() - t0)
            eng.deregister(region)
            del region
        p, k = statistics.median(plain), statistics.median(kv)
        print(
            json.dumps(
                {
                    "region_mib": mib,
                    "one_ibv_reg_mr_ms": round(p * 1e3, 2),
                    "kvxfer_register_ms": round(k * 1e3, 2),
                    "ratio": round(k / p, 2),
                }
            ),
            flush=True,
        )
    eng.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
