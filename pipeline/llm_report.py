"""The LLM part of the curate report (issue 5 item 6, issue 14 item 6): score and score-token
mass histograms per domain with the thresholds drawn, rows per decision of each LLM operator, and
its throughput.

Scores come from the routed shards (kept/ rejected/ review/). When the quality score was
distilled (pipeline/distill_stage.py), `llm_quality` ran on the sample only, so its histograms and
decisions come from OUT/_distill/sample_scores.parquet and its rows/s from report/distill.json.
Stages are keyed by their label (the stage's `name:`, else its operator's name), as the runner keys
their seconds, reasons and per-operator counts; `stages` (the config's resolved stages) says which
label runs which operator.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections import Counter

import pyarrow.parquet as pq

from operators.base import KEEP, REGISTRY, REJECT, REVIEW
from pipeline.curate_config import Stage, load_operators
from pipeline.report import SPLITS, bar_chart, histogram

DOMAIN = "llm_quality_domain"
NO_DOMAIN = "other"
MASS_BINS = [i / 40 for i in range(41)]  # probability on the score tokens, 0..1
SCORE_BINS = [i / 4 for i in range(41)]  # fixed 0..10 axis, so the threshold line is always in view


def llm_tasks() -> dict[str, str]:
    """{operator name: score task} of every registered operator that declares one (the LLM judges)."""
    load_operators()
    return {name: cls.task for name, cls in sorted(REGISTRY.items()) if cls.task}


def llm_stage_labels(stages: list[Stage] | None) -> dict[str, str]:
    """{stage label: score task} of the judge stages in `stages`; without stages, labels are the operator names."""
    if stages is None:
        return llm_tasks()
    return {s.label: s.cls.task for s in stages if s.cls.task}


def label_counts(summary: dict, label: str) -> dict[str, int]:
    """{rejected, review} rows the runner attributes to stage `label`: the per-operator counts its markers
    carry (summary `operators`, pipeline/jobs.py:Marker.add_operator)."""
    return summary.get("operators", {}).get(label, {})


def read_llm_columns(paths: list[str]) -> dict[str, list]:
    """The LLM score, domain and error columns of these Parquet files, concatenated (missing -> None)."""
    wanted = [DOMAIN, "_decision"] + [c for t in sorted(set(llm_tasks().values()))
                                      for c in (f"score_{t}", f"llm_{t}_error", f"llm_{t}_mass")]
    out: dict[str, list] = {c: [] for c in wanted}
    for path in paths:
        names = set(pq.read_schema(path).names)
        t = pq.read_table(path, columns=[c for c in wanted if c in names])
        for c in wanted:
            out[c].extend(t.column(c).to_pylist() if c in names else [None] * t.num_rows)
    return out


def _routed_files(out_dir: str) -> list[str]:
    return sorted(f for s in SPLITS for f in glob.glob(os.path.join(out_dir, s, "**", "*.parquet"), recursive=True))


def _is_num(v) -> bool:
    return v is not None and not math.isnan(v)


def operator_figures(cols: dict[str, list], task: str, op_counts: dict, seconds: float | None) -> dict | None:
    """{rows, scored, rows_per_s, kept, review, rejected} of one LLM operator over the routed rows.

    rows: rows that reached the operator (a score, an error, or NaN: older runs marked skipped rows
    so; they are null now); scored: rows sent to the model (a score or an error). rejected/review: the rows the runner attributes to
    the operator (a row it sent to review that a later operator rejected counts as that one's)."""
    score, error = cols[f"score_{task}"], cols[f"llm_{task}_error"]
    rows = sum(v is not None or e is not None for v, e in zip(score, error))
    if rows == 0:
        return None
    scored = sum(_is_num(v) or e is not None for v, e in zip(score, error))
    rejected, review = op_counts.get("rejected", 0), op_counts.get("review", 0)
    return {"rows": rows, "scored": scored, "kept": rows - rejected - review, "review": review,
            "rejected": rejected, "seconds": round(seconds, 3) if seconds else None,
            "rows_per_s": round(scored / seconds, 3) if seconds else None}


def _distilled_quality(out_dir: str) -> tuple[dict[str, list], dict] | None:
    """The LLM's scores and decisions on the distillation sample, with the distill report."""
    sample = os.path.join(out_dir, "_distill", "sample_scores.parquet")
    report = os.path.join(out_dir, "report", "distill.json")
    if not (os.path.exists(sample) and os.path.exists(report)):
        return None
    with open(report) as f:
        info = json.load(f)
    return read_llm_columns([sample]), info


def llm_plots(out_dir: str, summary: dict, thresholds: dict[str, list[float]] | None = None,
              stages: list[Stage] | None = None) -> dict:
    """Draw OUT/report/llm_*.png and set `summary["llm"] = {label: {rows, rows_per_s, kept, review,
    rejected, ...}}` (left out when no LLM operator ran). Returns that dict."""
    thresholds = thresholds or {}
    rdir = os.path.join(out_dir, "report")
    seconds = summary.get("stage_seconds", {})
    labels = llm_stage_labels(stages)
    ran = any(label in seconds for label in labels)  # curate runs without LLM stages read nothing
    files = _routed_files(out_dir) if ran else []
    routed = read_llm_columns(files) if files else None
    figures: dict[str, dict] = {}
    sources: dict[str, dict[str, list]] = {}  # task -> the columns its histograms come from
    for label, task in labels.items():
        fig = operator_figures(routed, task, label_counts(summary, label), seconds.get(label)) if routed else None
        if fig:
            figures[label], sources[task] = fig, routed
    distilled = _distilled_quality(out_dir)
    if distilled and "quality" not in sources:
        cols, info = distilled
        decisions = Counter(cols["_decision"])
        figures["llm_quality"] = {
            "rows": len(cols["_decision"]), "scored": info["sampled"], "kept": decisions[KEEP],
            "review": decisions[REVIEW], "rejected": decisions[REJECT], "seconds": info["llm_seconds"],
            "rows_per_s": info["llm_rows_per_s"], "distilled": True, "agreement": info["agreement"],
            "decision_agreement": info["decision_agreement"]}
        sources["quality"] = cols
        thresholds = {**thresholds, "score_quality": thresholds.get("score_quality") or [info["llm_threshold"]]}
    for task, cols in sources.items():
        for col, name, bins in ((f"score_{task}", f"score_{task}", SCORE_BINS),
                                (f"llm_{task}_mass", f"mass_{task}", MASS_BINS)):
            by_domain: dict[str, list[float]] = {}
            for v, d in zip(cols.get(col) or [], cols[DOMAIN]):
                if _is_num(v):
                    by_domain.setdefault(d or NO_DOMAIN, []).append(v)
            for domain, vals in sorted(by_domain.items()):
                histogram(vals, os.path.join(rdir, f"llm_{name}_{domain}.png"),
                          f"{col}, domain {domain} ({len(vals)} rows)", thresholds.get(col), bins=bins)
    if not figures:
        return {}
    bar_chart({f"{op}:{d}": f[d] for op, f in figures.items() for d in ("kept", "review", "rejected")},
              os.path.join(rdir, "llm_decisions.png"), "LLM operators: rows per decision")
    bar_chart({op: f["rows_per_s"] for op, f in figures.items() if f["rows_per_s"]},
              os.path.join(rdir, "llm_throughput.png"), "LLM operators: rows scored per second", "rows/s")
    summary["llm"] = figures
    return figures
