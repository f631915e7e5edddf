"""Docs that are true: docs/api.md's signature list matches the code, and the README's
example runs as written, as two processes."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kvxfer

ROOT = Path(__file__).resolve().parents[2]


def _signature_lines() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "api.md").read_text()
    section = text.split("## Signatures", 1)[1]
    out = []
    for m in re.finditer(r"^- `([\w.]+)(\(.*\))`$", section, re.M):
        out.append((m.group(1), m.group(2)))
    return out


def test_api_md_lists_signatures():
    assert len(_signature_lines()) >= 15


@pytest.mark.parametrize(("dotted", "documented"), _signature_lines(), ids=[d for d, _ in _signature_lines()])
def test_api_md_signature_matches_code(dotted, documented):
    obj = kvxfer
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part)
    sig = inspect.signature(obj)
    bare = sig.replace(
        parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    assert str(bare) == documented, f"docs/api.md is out of date for {dotted}"


def _readme_scripts() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    scripts = {}
    for m in re.finditer(r"```python\n# (\w+\.py)[^\n]*\n(.*?)```", text, re.S):
        scripts[m.group(1)] = m.group(2)
    return scripts


@pytest.mark.multiprocess
def test_readme_example_runs_as_written(tmp_path):
    scripts = _readme_scripts()
    assert set(scripts) == {"decode.py", "prefill.py"}, sorted(scripts)
    for name, body in scripts.items():
        (tmp_path / name).write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONSAFEPATH="1")
    decode = subprocess.Popen(
        [sys.executable, "decode.py"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        prefill = subprocess.run(
            [sys.executable, "prefill.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        out, err = decode.communicate(timeout=120)
    finally:
        decode.kill()
    assert prefill.returncode == 0, prefill.stderr
    assert decode.returncode == 0, err
    assert "'parts': 64" in prefill.stdout and "'coalescing_ratio'" in prefill.stdout, prefill.stdout
    assert "req-17" in out and "bytes in place: True" in out, out
