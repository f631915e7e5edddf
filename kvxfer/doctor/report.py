"""What a doctor check returns, the exit-code rule, and the two renderings (table, JSON).

Contract:
- a check is ``Check(name, status, detail, fix, data)``; ``status`` is one of ``ok``
  (works), ``warn`` (works, or is not needed here, but something is off), ``fail``
  (something kvxfer needs on this host is wrong: ``fix`` says what to do) and ``skip``
  (not applicable here, ``detail`` says why);
- the exit code is 1 when any check failed, else 0 (``warn`` and ``skip`` never fail);
- the JSON form is one object: ``{"schema": 1, "kvxfer": ..., "host": ..., "need": [...],
  "exit_code": n, "summary": {status: count}, "checks": [check, ...]}`` where each check
  has exactly the keys ``name status detail fix data`` (``fix`` is "" when there is
  nothing to do; ``data`` holds the facts behind ``detail`` as plain JSON values).
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

STATUSES = ("ok", "warn", "fail", "skip")
SCHEMA_VERSION = 1


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name!r}: status {self.status!r} is not one of {STATUSES}")


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == "fail" for c in checks) else 0


def summary(checks: list[Check]) -> dict[str, int]:
    return {s: sum(c.status == s for c in checks) for s in STATUSES}


def to_json(checks: list[Check], header: dict[str, Any]) -> str:
    doc = dict(header)
    doc["schema"] = SCHEMA_VERSION
    doc["exit_code"] = exit_code(checks)
    doc["summary"] = summary(checks)
    doc["checks"] = [asdict(c) for c in checks]
    return json.dumps(doc, indent=2, sort_keys=False)


def to_table(checks: list[Check], header: dict[str, Any], width: int = 110) -> str:
    """A human table: one row per check, the fix indented under a warn or fail row."""
    name_w = max(len(c.name) for c in checks) if checks else 10
    lines = [
        f"kvxfer doctor: kvxfer {header.get('kvxfer', '?')} on {header.get('host', '?')}, "
        f"needs {', '.join(header.get('need', [])) or 'nothing'}",
        "",
        f"{'STATUS':<6}  {'CHECK':<{name_w}}  DETAIL",
    ]
    indent = " " * (6 + 2 + name_w + 2)
    body_w = max(40, width - len(indent))
    for c in checks:
        detail = textwrap.wrap(c.detail, body_w) or [""]
        lines.append(f"{c.status.upper():<6}  {c.name:<{name_w}}  {detail[0]}")
        lines += [indent + d for d in detail[1:]]
        if c.fix and c.status != "ok":
            fix = textwrap.wrap("fix: " + c.fix, body_w)
            lines += [indent + f for f in fix]
    s = summary(checks)
    lines.append("")
    lines.append(", ".join(f"{s[k]} {k}" for k in STATUSES))
    failed = [c.name for c in checks if c.status == "fail"]
    if failed:
        lines.append(f"exit 1: {', '.join(failed)} failed (the fix is under each)")
    else:
        lines.append("exit 0: nothing kvxfer needs here is wrong")
    return "\n".join(lines)
