"""The curate report's PNGs, drawn from the merged markers only (no output shard is read for them).

What each operator contributes (the thresholds drawn on its score histograms) comes from the operator
itself (`Operator.thresholds()`), so this module names no operator.
"""

from __future__ import annotations

from collections.abc import Callable

import ray

from pipeline.curate_config import CurateConfig, Stage
from pipeline.io import join
from pipeline.jobs import Histogram
from pipeline.llm_report import llm_plots
from pipeline.report import bar_chart, binned_histogram
from pipeline.session import dataset_name


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

    Each figure takes ~0.1 s of matplotlib layout and rendering, so with Ray up they are drawn by the
    driver and one task per further CPU at once (their inputs are the merged markers' counts); the LLM
    figures stay on the driver (`llm_plots` records its figures in `summary`)."""
    thresholds = thresholds or {}
    figs = figures(out_dir, summary, thresholds)
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    # cpus + 1 shares: the driver draws two, a task per further CPU one (its worker imports matplotlib
    # first, ~0.3 s: about three figures)
    shares = [figs[i::cpus + 1] for i in range(cpus + 1)]
    name = dataset_name("plots")
    refs = [draw_task.options(name=f"{name}:{i}").remote(share) for i, share in enumerate(shares[2:]) if share]
    llm_plots(out_dir, summary, thresholds, stages)  # per-domain LLM score histograms, decisions, rows/s
    draw(shares[0] + shares[1])
    ray.get(refs)


Figure = tuple[Callable, tuple]  # a pipeline/report.py drawing function and its arguments


def figures(out_dir: str, summary: dict, thresholds: dict[str, list[float]]) -> list[Figure]:
    """The report's figures (all but the LLM ones), from the merged markers' counts."""
    rdir = join(out_dir, "report")
    frac = {s: round(c.get("kept", 0) / c["input"], 3) for s, c in summary["sources"].items() if c.get("input")}
    out: list[Figure] = [
        (bar_chart, (summary["reasons"], join(rdir, "rejected_by_rule.png"), "curate: rows rejected per rule")),
        (bar_chart, (summary.get("review_reasons", {}), join(rdir, "review_by_rule.png"),
                     "curate: rows sent to review per rule")),
        (bar_chart, (frac, join(rdir, "kept_fraction_by_source.png"), "curate: kept fraction per source", "fraction")),
    ]
    for c, h in summary.get("histograms", {}).items():
        values, counts = Histogram(**h).values_and_counts()
        out.append((binned_histogram, (values, counts, join(rdir, f"hist_{c}.png"), f"{c} (all rows)",
                                       thresholds.get(c))))
    return out


def draw(figs: list[Figure]) -> None:
    for fn, args in figs:
        fn(*args)


@ray.remote(num_cpus=1)
def draw_task(figs: list[Figure]) -> None:
    draw(figs)
