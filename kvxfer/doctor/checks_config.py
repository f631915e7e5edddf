"""The configuration overlay: every ``KVXFER_<SECTION>_<FIELD>`` variable set here is one
this build reads (a misspelt or pre-0.2 name is ignored by kvxfer: warn), and its value is
valid (an invalid one makes every engine creation fail: fail)."""

from __future__ import annotations

import re

from .context import LEGACY_ENV, Context
from .report import Check

# Variables that look like backend configuration (harness variables such as
# KVXFER_SOFTROCE_CACHE or KVXFER_PYTHON are not configuration and are left alone).
CONFIG_LIKE = re.compile(r"^KVXFER_(LOOPBACK|SHM|TCP|IB|IBVERBS|CUDA|ENGINE)_[A-Z0-9_]+$")


def check_env(ctx: Context) -> Check:
    if ctx.overlay is None:
        return Check("config.env", "skip", "this kvxfer build has no configuration overlay list")
    known = {name: field_ for field_, name in ctx.overlay.items()}
    renamed = {old: ctx.overlay.get(field_) for field_, old in LEGACY_ENV.items()}
    set_here = {k: v for k, v in sorted(ctx.env.items()) if CONFIG_LIKE.match(k)}
    data = {"set": set_here, "known": sorted(known)}
    unknown = [k for k in set_here if k not in known]
    import kvxfer

    try:
        with kvxfer.Engine("kvxfer-doctor-config", backends=["loopback"]):
            pass
    except kvxfer.KvxferError as e:
        return Check(
            "config.env",
            "fail",
            f"every engine fails to start here: {e}",
            "fix or unset that variable (`kvxfer.environment_variables()` lists every name and field)",
            data,
        )
    if unknown:
        hints = [f"{k} -> {renamed[k]}" if renamed.get(k) else f"{k}: no such setting" for k in unknown]
        return Check(
            "config.env",
            "warn",
            f"kvxfer ignores {', '.join(unknown)} (not a configuration variable of this build)",
            "rename or remove: " + "; ".join(hints),
            data,
        )
    if set_here:
        values = ", ".join(f"{k}={v!r}" for k, v in set_here.items())
        return Check("config.env", "ok", f"configuration overlay from the environment: {values}", data=data)
    detail = f"no KVXFER_* configuration variable set ({len(known)} exist)"
    return Check("config.env", "ok", detail, data=data)
