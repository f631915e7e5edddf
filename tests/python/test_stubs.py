"""The checked-in stubs of the compiled module match it (mypy's stubtest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ALLOWLIST = Path(__file__).with_name("stubtest-allowlist.txt")


def test_native_stubs_match_the_module():
    pytest.importorskip("mypy", reason="mypy (stubtest) is installed by scripts/setup.sh")
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "kvxfer._native", "--allowlist", str(ALLOWLIST)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
