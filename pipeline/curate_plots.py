"""The curate report's PNGs, drawn from the merged markers only (no output shard is read for them).

What each operator contributes (the thresholds drawn on its score histograms) comes from the operator
itself (`Operator.thresholds()`), so this module names no operator.
"""

from __future__ import annotations

from pipeline.curate_config import CurateConfig, Stage
from pipeline.io import join
from pipeline.jobs import Histogram
from pipeline.llm_report import llm_plots
from pipeline.report import bar_chart, binned_histogram


def stage_thresholds(cfg: CurateConfig) -> dict[str, list[float]]:
    """Score column -> thresholds the configured operators cut at (drawn on the histograms)."""
    out: dict[str, list[float]] = {}
    for stage in cfg.stages:
        for col, ts in stage.build().thresholds().items():
            out.setdefault(col, []).extend(ts)
    return out


def write_plots(out_dir: str, summary: dict, thresholds: dict[str, list[float]] | None = None,
                stages: list[Stage] | None = None) -> None:
    """Rows per reason, kept fraction per source, the LLM figures, one histogram per score column.

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
    for c, h in summary.get("histograms", {}).items():
        values, counts = Histogram(**h).values_and_counts()
        binned_histogram(values, counts, join(rdir, f"hist_{c}.png"), f"{c} (all rows)", thresholds.get(c))
