"""The environment for a Python child process that must import the same kvxfer as this
one (``python -m kvxfer.serve.worker``, the gateway process, the device runtime).

The parent directory of this process's kvxfer goes first on PYTHONPATH, and
PYTHONSAFEPATH keeps ``-m`` from putting the working directory before it: started from
a source checkout, the child would otherwise import the checkout's ``kvxfer/``, which
has no compiled module unless built in place.
"""

from __future__ import annotations

import os
from pathlib import Path


def child_env(**extra: str) -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONSAFEPATH"] = "1"
    return env
