"""The curate report's LLM part: per-domain score and score-token mass histograms, null scores."""

from __future__ import annotations

import pyarrow as pa

from pipeline.curate_config import resolve_stages
from pipeline.io import write_parquet_atomic
from pipeline.llm_report import llm_plots


def test_per_domain_score_and_mass_histograms_from_null_scored_rows(tmp_path):
    def row(domain, score, mass, error=None, review=""):
        return {"id": f"x/{domain}-{score}-{mass}", "score_quality": score, "llm_quality_domain": domain,
                "llm_quality_mass": mass, "llm_quality_error": error, "review_reason": review}

    kept = [row("general", 8.0, 0.6), row("general", 7.8, 0.3), row("mathematics", 9.1, 0.5),
            row(None, None, None)]  # an image row the quality operator skipped: null, not NaN
    review = [row("general", None, None, "ServerError: down", "llm_quality:error"),
              row("mathematics", 8.0, 0.01, review="llm_quality:low_mass")]
    for split, rows in (("kept", kept), ("review", review)):
        write_parquet_atomic(pa.Table.from_pylist(rows), str(tmp_path / split / "s.parquet"))
    summary = {"stage_seconds": {"llm_quality": 1.0}, "operators": {"llm_quality": {"review": 2}}}
    fig = llm_plots(str(tmp_path), summary, {"score_quality": [7.0], "llm_quality_mass": [0.05]})["llm_quality"]
    assert (fig["rows"], fig["scored"], fig["kept"], fig["review"]) == (5, 5, 3, 2)
    for name in ("llm_score_quality_general", "llm_score_quality_mathematics",
                 "llm_mass_quality_general", "llm_mass_quality_mathematics"):
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 1000, name
    assert not (tmp_path / "report" / "llm_mass_quality_other.png").exists()


def test_a_named_llm_stage_is_found_by_its_label_and_counted_from_its_markers(tmp_path):
    """The runner keys seconds, reasons and per-operator counts by the stage's label (`name:`), not by the
    operator's name; the counts come from the markers' `operators`, never from the reason strings."""
    rows = [{"id": f"x/{i}", "score_repetition": s, "llm_repetition_mass": 0.5, "llm_repetition_error": None,
             "llm_quality_domain": None} for i, s in enumerate([9.0, 2.0, 3.2])]
    write_parquet_atomic(pa.Table.from_pylist(rows[:1]), str(tmp_path / "kept" / "s.parquet"))
    write_parquet_atomic(pa.Table.from_pylist(rows[1:2]), str(tmp_path / "rejected" / "s.parquet"))
    write_parquet_atomic(pa.Table.from_pylist(rows[2:]), str(tmp_path / "review" / "s.parquet"))
    summary = {"stage_seconds": {"rep_check": 2.0}, "reasons": {"rep_check:repetitive": 1, "text_rules:x": 4},
               "review_reasons": {"rep_check:near_threshold": 1},
               "operators": {"rep_check": {"rejected": 1, "review": 1}, "text_rules": {"rejected": 4}}}
    stages = resolve_stages([{"op": "text_rules"}, {"op": "llm_repetition", "name": "rep_check"}])
    figures = llm_plots(str(tmp_path), summary, {"score_repetition": [3.0]}, stages)
    assert set(figures) == {"rep_check"}
    assert {k: figures["rep_check"][k] for k in ("rows", "kept", "review", "rejected", "rows_per_s")} == {
        "rows": 3, "kept": 1, "review": 1, "rejected": 1, "rows_per_s": 1.5}
    assert (tmp_path / "report" / "llm_score_repetition_other.png").exists()
    assert llm_plots(str(tmp_path), summary, {}, resolve_stages([{"op": "llm_repetition"}])) == {}  # no stage of that label ran
