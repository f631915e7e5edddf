"""``--plot FILE.png``: bandwidth against transfer size, transfer against baseline.

A series is one (workload, op, coalescing) combination: solid lines are kvxfer, dashed
lines of the same colour its baseline measured in the same run. When no series has more
than one size (the default run), a grouped bar chart is drawn instead.
"""

from __future__ import annotations

from typing import Any

from .units import fmt_bytes


def median_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merges the records of several runs of the same command: per case (workload, op,
    coalescing, bytes), the record whose GB/s is the median, with gbps, baseline_gbps
    and ratio replaced by their medians over the runs."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["workload"], r["op"], r["coalesce"], r["bytes"]), []).append(r)
    out = []
    for recs in groups.values():
        recs = sorted(recs, key=lambda x: x["gbps"])
        m = dict(recs[(len(recs) - 1) // 2])
        m["gbps"] = statistics.median(x["gbps"] for x in recs)
        base = [x["baseline_gbps"] for x in recs if x.get("baseline_gbps")]
        m["baseline_gbps"] = statistics.median(base) if base else None
        ratios = [x["ratio"] for x in recs if x.get("ratio")]
        m["ratio"] = statistics.median(ratios) if ratios else None
        m["merged_runs"] = len(recs)
        out.append(m)
    return out


def _short(key: tuple, with_op: bool) -> str:
    w, op, c = key
    name = w.removeprefix("paged:").replace(":", " ")
    if w != "contiguous":
        name += ", " + ("coalesced" if c else "block-by-block")
    return f"{name} {op}" if with_op else name


def plot(records: list[dict[str, Any]], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list[dict]] = {}
    for r in records:
        series.setdefault((r["workload"], r["op"], r["coalesce"]), []).append(r)
    if not series:
        raise ValueError("nothing to plot")
    multi = any(len({x["bytes"] for x in v}) > 1 for v in series.values())

    def label(key: tuple) -> str:
        w, op, c = key
        if w == "contiguous":
            return f"contiguous {op}"
        return f"{w} {op} {'coalesced' if c else 'block-by-block'}"

    if multi:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    else:
        height = max(3.0, 1.2 + 0.45 * len(series))
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, height), gridspec_kw={"width_ratios": [3, 1.3]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if multi:
        for i, (key, recs) in enumerate(series.items()):
            recs = sorted(recs, key=lambda x: x["bytes"])
            xs = [x["bytes"] for x in recs]
            col = colors[i % len(colors)]
            ax.plot(xs, [x["gbps"] for x in recs], "o-", color=col, label=label(key))
            if any(x.get("baseline_gbps") for x in recs):
                ax.plot(
                    xs,
                    [x.get("baseline_gbps") or float("nan") for x in recs],
                    "x--",
                    color=col,
                    alpha=0.7,
                    label=f"{recs[0]['baseline']} ({label(key)})",
                )
                ax2.plot(
                    xs,
                    [100 * x["ratio"] if x.get("ratio") else float("nan") for x in recs],
                    "o-",
                    color=col,
                    label=label(key),
                )
        for a in (ax, ax2):
            a.set_xscale("log", base=2)
            ticks = sorted({x["bytes"] for x in records})
            a.set_xticks(ticks)
            a.set_xticklabels([fmt_bytes(t) for t in ticks], rotation=45, ha="right")
            a.set_xlabel("bytes per transfer round")
            a.grid(True, which="major", alpha=0.3)
    else:
        # One size per series: horizontal grouped bars, one row per case, read top-down.
        keys = list(series)[::-1]
        ops = {k[1] for k in keys}
        labels = [_short(k, len(ops) > 1) + f"  ({fmt_bytes(series[k][0]['bytes'])})" for k in keys]
        ys = list(range(len(keys)))
        kv = [series[k][0]["gbps"] for k in keys]
        bl = [series[k][0].get("baseline_gbps") or 0.0 for k in keys]
        ax.barh([y + 0.2 for y in ys], kv, 0.4, label="kvxfer", color=colors[0])
        ax.barh([y - 0.2 for y in ys], bl, 0.4, label=f"baseline ({records[0]['baseline']})", color=colors[1])
        for y, v in zip(ys, kv, strict=True):
            ax.text(v, y + 0.2, f" {v:.1f}", va="center", fontsize=7)
        for y, v in zip(ys, bl, strict=True):
            if v:
                ax.text(v, y - 0.2, f" {v:.1f}", va="center", fontsize=7)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xlabel("GB/s (1e9 bytes/s)")
        ratios = [100 * (series[k][0].get("ratio") or 0) for k in keys]
        ax2.barh(ys, ratios, 0.6, color=colors[2])
        for y, v in zip(ys, ratios, strict=True):
            ax2.text(v, y, f" {v:.0f}%", va="center", fontsize=7)
        ax2.set_yticks(ys)
        ax2.set_yticklabels([])
        ax2.set_xlabel("% of baseline")
        ax2.axvline(100, color="grey", lw=0.8)
        ax.grid(True, axis="x", alpha=0.3)
        ax2.grid(True, axis="x", alpha=0.3)
        ax.margins(x=0.12)
        ax2.margins(x=0.12)
    ax.set_title("bandwidth (median of runs)")
    ax.legend(fontsize=7, loc="best")
    ax2.set_title("kvxfer / baseline, same run")
    if multi:
        ax.set_ylabel("GB/s (1e9 bytes/s)")
        ax2.set_ylabel("% of baseline")
        ax2.axhline(100, color="grey", lw=0.8)
        ax2.legend(fontsize=7, loc="best")
    r0 = records[0]
    m = r0.get("machine", {})
    merged = max((r.get("merged_runs", 1) for r in records), default=1)
    extra = f", medians of {merged} invocations" if merged > 1 else ""
    mem = f", memory {r0['memory']}" if r0.get("memory") else ""
    fig.suptitle(
        title
        or f"kvxfer-bench: {r0['backend']}, {r0['threads']} threads, queue depth {r0['queue_depth']}"
        f"{mem}{extra} - {m.get('cpu', '?')}, {m.get('cores', '?')} cores",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
