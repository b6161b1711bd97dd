"""`ivl curate` with `distill:` (LLM on a sample -> fastText on every row) and the LLM report."""

from __future__ import annotations

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE, read_rows
from llm_samples import conversation, needs_smollm2, real_texts

from operators.base import KEEP, REJECT, REVIEW
from pipeline.curate import CurateConfig, load_curate_config, run_curate
from pipeline.curate_config import bundled_config
from pipeline.distill_stage import DistillConfig, draw_sample, row_hash, smallest_in_shard
from pipeline.io import write_parquet_atomic
from pipeline.llm_report import llm_plots
from pipeline.report import SPLITS
from pipeline.schema import rows_to_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLM = {"op": "llm_quality", "domains": {"docs": "programming", "tang_poems": "disciplinary"},
       "backend": {"kind": "transformers", "device": "cpu", "max_prompt_tokens": 256, "batch_size": 8}}


def text_rows() -> list[dict]:
    """42 real text rows: the bundled fortunes and Tang poems plus standard-library docstrings."""
    rows = []
    for source in ("fortunes_text", "tang_poems"):
        with open(SAMPLE / f"{source}.jsonl") as f:
            for line in f:
                r = json.loads(line)
                rows.append({"id": f"{source}/{r['id']}", "source": source, "category": "general",
                             "conversations": r["conversations"], "images": [], "meta": "{}"})
    rows += [{"id": f"docs/{i}", "source": "docs", "category": "", "images": [], "meta": "{}",
              "conversations": conversation("Explain this to me.", t)} for i, t in enumerate(real_texts())]
    return rows


def write_input(folder, rows, n_shards=3) -> list[str]:
    paths = []
    for k in range(n_shards):
        path = os.path.join(str(folder), f"part-{k}.parquet")
        write_parquet_atomic(rows_to_table(rows[k::n_shards]), path)
        paths.append(path)
    return paths


# ---- configuration ------------------------------------------------------------------------------

def test_example_config_loads_and_distill_settings_are_checked(tmp_path):
    cfg = load_curate_config(bundled_config("curate_distill.yaml"))
    assert cfg.distill is not None and cfg.distill.sample_size > 0
    for bad, message in (({"stages": [{"op": "text_rules"}], "distill": {}}, "exactly one llm_quality"),
                         ({"stages": [LLM], "distill": {"sample_sizes": 3}}, "sample_sizes"),
                         ({"stages": [LLM], "distill": {"edges": [5], "quantiles": [0.5]}}, "not both")):
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            load_curate_config(str(path))


def test_shard_sample_is_its_text_rows_with_the_smallest_hashes(tmp_path):
    rows = text_rows()[:10]
    rows[3] = dict(rows[3], images=[b"\x89PNG"])  # a multimodal row is never sampled
    path = write_input(tmp_path, rows, 1)[0]
    got = smallest_in_shard({"path": [path]}, 4, seed=7)
    want = sorted((row_hash(7, r["id"]), r["id"]) for r in rows if not r["images"])[:4]
    assert got.column("id").to_pylist() == [i for _, i in want]
    assert row_hash(7, "a") == row_hash(7, "a") != row_hash(8, "a")


# ---- the LLM report (fast: a hand-made curate OUT) ------------------------------------------------

def _routed(domain, quality, repetition, q_err=None, reject="", review=""):
    return {"id": f"x/{quality}-{repetition}", "score_quality": quality, "llm_quality_domain": domain,
            "llm_quality_error": q_err, "score_repetition": repetition, "llm_repetition_error": None,
            "reject_reason": reject, "review_reason": review}


def test_llm_plots_counts_decisions_throughput_and_draws_per_domain(tmp_path):
    out = tmp_path / "out"
    kept = [_routed("general", 8.2, 9.0), _routed("programming", 7.9, 8.0), _routed(None, math.nan, 7.0)]
    review = [_routed("general", 6.8, 8.5, review="llm_quality:near_threshold"),
              _routed("general", math.nan, 8.0, q_err="RuntimeError: boom", review="llm_quality:error")]
    rejected = [_routed("programming", 3.0, None, reject="llm_quality:low_quality"),
                _routed("general", 9.0, 1.0, reject="llm_repetition:repetitive"),
                _routed(None, None, None, reject="text_rules:long_zero_run")]  # never reached the LLM
    for split, rows in (("kept", kept), ("review", review), ("rejected", rejected)):
        write_parquet_atomic(pa.Table.from_pylist(rows), str(out / split / "s.parquet"))
    summary = {"stage_seconds": {"llm_quality": 2.0, "llm_repetition": 4.0, "text_rules": 0.1},
               "operators": {"llm_quality": {"rejected": 1, "review": 2}, "llm_repetition": {"rejected": 1},
                             "text_rules": {"rejected": 1}}}
    figures = llm_plots(str(out), summary, {"score_quality": [7.0], "score_repetition": [3.0]})

    assert summary["llm"] is figures
    q, r = figures["llm_quality"], figures["llm_repetition"]
    # quality: 7 rows reached it (the multimodal one is NaN = skipped), 6 went to the model (5 scores, 1 error)
    assert (q["rows"], q["scored"], q["kept"], q["review"], q["rejected"]) == (7, 6, 4, 2, 1)
    assert q["rows_per_s"] == pytest.approx(6 / 2.0)
    # repetition: the row llm_quality rejected never reached it
    assert (r["rows"], r["scored"], r["kept"], r["review"], r["rejected"]) == (6, 6, 5, 0, 1)
    assert r["rows_per_s"] == pytest.approx(6 / 4.0)
    report = out / "report"
    for name in ("llm_score_quality_general", "llm_score_quality_programming", "llm_score_repetition_general",
                 "llm_score_repetition_programming", "llm_score_repetition_other", "llm_decisions",
                 "llm_throughput"):
        assert (report / f"{name}.png").stat().st_size > 1000, name
    assert not (report / "llm_score_quality_other.png").exists()  # no quality score without a domain


def test_llm_plots_adds_nothing_without_llm_stages(tmp_path):
    write_parquet_atomic(pa.Table.from_pylist([{"id": "a", "score_quality": 5.0}]), str(tmp_path / "kept" / "s.parquet"))
    summary = {"stage_seconds": {"text_rules": 0.1}, "operators": {}}
    assert llm_plots(str(tmp_path), summary, {}) == {}
    assert "llm" not in summary and not (tmp_path / "report").exists()


# ---- end to end through Ray with SmolLM2 --------------------------------------------------------

@pytest.mark.slow
def test_sample_does_not_depend_on_how_rows_are_sharded(ray_local, tmp_path):
    rows = text_rows()
    a = draw_sample(write_input(tmp_path / "a", rows, 3), 9, seed=3)
    b = draw_sample(write_input(tmp_path / "b", rows[::-1], 5), 9, seed=3)
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    want = sorted(rows, key=lambda r: row_hash(3, r["id"]))[:9]
    assert a.column("id").to_pylist() == [r["id"] for r in want]


@pytest.mark.slow
@needs_smollm2
def test_curate_with_distill_scores_a_sample_and_classifies_every_row(ray_local, tmp_path):
    rows = text_rows()
    write_input(tmp_path / "in", rows)
    out = str(tmp_path / "out")
    # 12 LLM-scored rows; bucket edge at the sample's median so both buckets exist whatever SmolLM2 says
    distill = DistillConfig(sample_size=12, holdout_fraction=0.25, quantiles=[0.5], threshold=0.5,
                            action="review", batch_size=6, seed=1, bucket=10_000)
    cfg = CurateConfig(stages=[LLM], distill=distill, batch_size=16)
    s = run_curate(str(tmp_path / "in"), out, cfg)

    assert s["input"] == len(rows) == s["kept"] + s["rejected"] + s["review"]
    model = os.path.join(out, "_distill", "quality.bin")
    assert 0 < os.path.getsize(model) < 10 << 20  # (words + 10k buckets) x 64 dims x 4 bytes
    with open(os.path.join(out, "report", "distill.json")) as f:
        d = json.load(f)
    assert d["sampled"] == 12 and d["train"] + d["holdout"] == d["scored"] and d["holdout"] >= 1
    assert 0.0 <= d["agreement"] <= 1.0 and 0.0 <= d["decision_agreement"] <= 1.0
    assert sum(d["bucket_counts"].values()) == d["scored"] and set(d["bucket_counts"]) == {"low", "high"}
    assert d["stage"]["op"] == "fasttext_quality" and d["stage"]["model_path"] == model

    # the classifier, not the LLM, ran over every row; its flags went to review as configured
    routed = {split: read_rows(os.path.join(out, split)) for split in SPLITS}
    every = [r for split in SPLITS for r in routed[split]]
    assert sorted(r["id"] for r in every) == sorted(r["id"] for r in rows)
    assert all(0.0 <= r["score_fasttext_quality"] <= 1.0 for r in every)
    assert all("score_quality" not in r for r in every)
    assert not routed["rejected"]
    for r in routed["review"]:
        assert r["score_fasttext_quality"] < 0.5 and r["review_reason"] == "llm_quality_distilled:low_quality"
    assert all(r["score_fasttext_quality"] >= 0.5 for r in routed["kept"])

    # report: the LLM's own figures on the sample, and one histogram per domain it scored
    q = s["llm"]["llm_quality"]
    assert q["distilled"] and q["rows"] == 12 and q["kept"] + q["review"] + q["rejected"] == 12
    sample = pq.read_table(os.path.join(out, "_distill", "sample_scores.parquet")).to_pylist()
    assert decision_counts(sample) == (q["kept"], q["review"], q["rejected"])
    for domain in {r["llm_quality_domain"] for r in sample}:
        assert os.path.getsize(os.path.join(out, "report", f"llm_score_quality_{domain}.png")) > 1000
    with open(os.path.join(out, "report", "summary.json")) as f:
        assert json.load(f)["llm"]["llm_quality"]["rows"] == 12

    # resume: the model is reused (not retrained), the result is the same; other settings are refused
    mtime = os.path.getmtime(model)
    s2 = run_curate(str(tmp_path / "in"), out, cfg)
    assert os.path.getmtime(model) == mtime and s2["resumed_shards"] == s2["shards"]
    assert (s2["kept"], s2["review"]) == (s["kept"], s["review"])
    with pytest.raises(ValueError, match="other settings"):
        run_curate(str(tmp_path / "in"), out, cfg.model_copy(update={"distill": distill.model_copy(update={"seed": 2})}))


def decision_counts(sample: list[dict]) -> tuple[int, int, int]:
    ds = [r["_decision"] for r in sample]
    return ds.count(KEEP), ds.count(REVIEW), ds.count(REJECT)
