"""Accounting and reports: merge per-shard counts, check nothing was lost, write summary.json and PNGs."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

from matplotlib.figure import Figure

from pipeline.jobs import SPLITS, AccountingError  # noqa: F401  (one accounting error for every job)


def merge_counts(markers: list[dict], splits=SPLITS[:2]) -> dict:
    """Sum shard markers: {input, <split>..., reasons, sources: {src: {input, <split>...}}}."""
    total = {"input": 0, **{s: 0 for s in splits}}
    reasons: Counter = Counter()
    sources: dict[str, Counter] = {}
    for m in markers:
        total["input"] += m["input"]
        for s in splits:
            total[s] += m.get(s, 0)
        reasons.update(m.get("reasons", {}))
        for src, c in m.get("sources", {}).items():
            sources.setdefault(src, Counter()).update(c)
    total["reasons"] = dict(sorted(reasons.items()))
    total["sources"] = {k: dict(v) for k, v in sorted(sources.items())}
    return total


def json_safe(x):
    """Nested data as strict JSON values: a NaN or infinite figure becomes null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x if isinstance(x, str | int | float | bool) or x is None else str(x)


def write_summary(out_dir: str, summary: dict) -> str:
    from pipeline.io import atomic_write_bytes

    path = os.path.join(out_dir, "report", "summary.json")
    atomic_write_bytes(path, json.dumps(json_safe(summary), indent=2, sort_keys=True, allow_nan=False).encode())
    return path


def _save_png(fig, path: str) -> None:
    """Render into memory and commit through pipeline.io, so a report folder may be any storage URI."""
    import io

    from pipeline.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def bar_chart(counts: dict[str, float], path: str, title: str, xlabel: str = "rows") -> str | None:
    """A horizontal bar chart (largest first); nothing is drawn for an empty dict."""
    if not counts:
        return None
    items = sorted(counts.items(), key=lambda kv: kv[1])[-40:]
    height = 0.35 * len(items) + 1.2
    fig = Figure(figsize=(8, height))  # no pyplot: nothing global, any thread may draw
    ax = fig.subplots()
    ax.barh([k for k, _ in items], [v for _, v in items], color="#4c72b0")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, max(max(v for _, v in items), 1e-9) * 1.15)  # room for the value right of the longest bar
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:g}", va="center", fontsize=8)
    # margins from the longest label (10 pt DejaVu Sans: ~0.085 in per character), not tight_layout,
    # which lays every text out once more: a third of a chart's time
    left = min(0.6, (0.3 + 0.085 * max(len(k) for k, _ in items)) / 8)
    fig.subplots_adjust(left=left, right=0.97, top=1 - 0.4 / height, bottom=0.55 / height)
    _save_png(fig, path)
    return path


def histogram(values, path: str, title: str, thresholds: list[float] | None = None, bins: int = 40) -> str | None:
    """A histogram with dashed lines at the thresholds, so a person sees what a cut removes."""
    values = [v for v in values if v is not None and v == v]
    return binned_histogram(values, [1] * len(values), path, title, thresholds, bins)


def binned_histogram(values: list[float], counts: list[int], path: str, title: str,
                     thresholds: list[float] | None = None, bins: int = 40) -> str | None:
    """`histogram` drawn from pre-binned counts (pipeline/jobs.Histogram), so no shard is re-read.
    One filled step outline (`stairs`) and fixed margins: cheaper than `hist`'s bar per bin plus
    tight_layout, and a curate report draws one per score column."""
    if not values:
        return None
    import numpy as np

    weights, edges = np.histogram(values, bins=bins, weights=counts)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.stairs(weights, edges, fill=True, color="#55a868")
    for t in thresholds or []:
        ax.axvline(t, color="#c44e52", linestyle="--", label=f"threshold {t:g}")
    if thresholds:
        ax.legend()
    ax.set_title(title)
    ax.set_ylabel("rows")
    fig.subplots_adjust(left=0.16, right=0.97, top=0.91, bottom=0.1)  # room for 6-digit counts and the title
    _save_png(fig, path)
    return path
