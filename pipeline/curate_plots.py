"""The curate report's PNGs, drawn from the merged markers only (no output shard is read for them).

What each operator contributes (the thresholds drawn on its score histograms) comes from the operator
itself (`Operator.thresholds()`), so this module names no operator.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from pipeline.curate_config import CurateConfig, Stage
from pipeline.io import join, read_marker
from pipeline.jobs import Histogram, Marker, merge
from pipeline.llm_report import llm_plots
from pipeline.report import bar_chart, binned_histogram


def stage_thresholds(cfg: CurateConfig) -> dict[str, list[float]]:
    """Score column -> thresholds the configured operators cut at (drawn on the histograms)."""
    out: dict[str, list[float]] = {}
    for stage in cfg.stages:
        for col, ts in stage.build().thresholds().items():
            out.setdefault(col, []).extend(ts)
    return out


def draw_histograms(out_dir: str, histograms: dict[str, dict], thresholds: dict[str, list[float]]) -> dict:
    """One PNG per score column from merged histograms ({column: {bins, missing}}); returns them."""
    for c, h in histograms.items():
        values, counts = Histogram(**h).values_and_counts()
        binned_histogram(values, counts, join(out_dir, "report", f"hist_{c}.png"), f"{c} (all rows)", thresholds.get(c))
    return histograms


def _in_idle_time(fn, *args):
    """fn(*args) on this thread at the lowest CPU priority (Linux nices threads one by one), so the
    drawing takes only what the dedup and routing tasks leave idle."""
    with contextlib.suppress(OSError, AttributeError):  # (elsewhere it runs at the driver's priority)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    return fn(*args)


class EarlyHistograms:
    """With dedup, every unit's verdicts marker holds its score histograms (over all its rows, as its routed
    marker will), so they are drawn on a driver thread while the dedup and routing run; `drawn()` waits
    and gives what was drawn ({} when some unit had none: a resumed job draws them at the end)."""

    def __init__(self, out_dir: str, keys: list[str], thresholds: dict[str, list[float]]):
        markers = [read_marker(out_dir, f"verdicts-{k}") for k in keys]
        self.pool = self.future = None
        if markers and all(m is not None and "histograms" in m for m in markers):
            merged = merge([Marker(key=k, input=0, histograms={c: Histogram(**h) for c, h in m["histograms"].items()})
                            for k, m in zip(keys, markers)])["histograms"]
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="ivl-plots")
            self.future = self.pool.submit(_in_idle_time, draw_histograms, out_dir, merged, thresholds)

    def drawn(self) -> dict:
        if self.future is None:
            return {}
        try:
            return self.future.result()
        finally:
            self.pool.shutdown()


def write_plots(out_dir: str, summary: dict, thresholds: dict[str, list[float]] | None = None,
                stages: list[Stage] | None = None, drawn: dict | None = None) -> None:
    """Rows per reason, kept fraction per source, the LLM figures, one histogram per score column
    (unless `drawn`, EarlyHistograms', are the summary's histograms already).

    Drawn on the driver, ~0.1 s each: a Ray task sharing them would first import matplotlib and draw its
    first figure (~0.8 s on a curate worker), as much as half the default report (docs/benchmarks.md)."""
    thresholds = thresholds or {}
    rdir = join(out_dir, "report")
    bar_chart(summary["reasons"], join(rdir, "rejected_by_rule.png"), "curate: rows rejected per rule")
    bar_chart(summary.get("review_reasons", {}), join(rdir, "review_by_rule.png"),
              "curate: rows sent to review per rule")
    frac = {s: round(c.get("kept", 0) / c["input"], 3) for s, c in summary["sources"].items() if c.get("input")}
    bar_chart(frac, join(rdir, "kept_fraction_by_source.png"), "curate: kept fraction per source", "fraction")
    llm_plots(out_dir, summary, thresholds, stages)  # per-domain LLM score histograms, decisions, rows/s
    if drawn != summary.get("histograms", {}):
        draw_histograms(out_dir, summary.get("histograms", {}), thresholds)
