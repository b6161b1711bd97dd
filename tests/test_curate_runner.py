"""The curate runner: routing, accounting and resume, independent of any particular filter.

The operators here are test instruments that decide from row content we control; the real filters
have their own suites."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
from conftest import read_rows
from helpers import tree_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.base import REJECT, REVIEW, Operator, Verdict
from pipeline.curate import CurateConfig, apply_verdict, load_curate_config, route_table, run_curate
from pipeline.io import write_parquet_atomic
from pipeline.schema import CANONICAL
from pipeline.verdicts import with_routing


class MarkerRule(Operator):
    """Decides by a tag in the answer text: 'REJECT-x' rejects with rule x, 'REVIEW-x' reviews."""

    name = "marker_rule"  # used as `op: test_curate_runner:MarkerRule` (a plugin, not registered)

    def __init__(self, **params):
        self.params = params

    def __call__(self, table):
        v = Verdict.keep_all(table.num_rows)
        lengths = []
        for i, conv in enumerate(table.column("conversations").to_pylist()):
            text = conv[-1]["value"] if conv else ""
            lengths.append(len(text))
            for word in text.split():
                if word.startswith("REJECT-"):
                    v.flag(i, word[7:], REJECT)
                elif word.startswith("REVIEW-"):
                    v.flag(i, word[7:], REVIEW)
        v.columns["score_len"] = np.array(lengths, dtype=np.float64)
        return v


def make_table(answers, source="s", shard="k"):
    rows = [{"id": f"{source}/{i}", "source": source, "category": "", "meta": "{}", "images": [],
             "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": a}]} for i, a in enumerate(answers)]
    t = pa.Table.from_pylist(rows, schema=CANONICAL)
    return with_routing(t.append_column("_shard", pa.array([shard] * t.num_rows)))


TAGS = st.sampled_from(["fine answer", "REJECT-a", "REJECT-b", "REVIEW-c", "REVIEW-d REJECT-a", "REVIEW-c REVIEW-d"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(TAGS, min_size=0, max_size=40))
def test_every_row_lands_in_exactly_one_split(tmp_path_factory, answers):
    out = tmp_path_factory.mktemp("route")
    table = apply_verdict(make_table(answers), "first", MarkerRule())
    table = apply_verdict(table, "second", MarkerRule())
    m = route_table(table, str(out), "k", "parquet", 7)
    kept, rej, rev = (read_rows(out / s) if (out / s).exists() else [] for s in ("kept", "rejected", "review"))
    assert m["input"] == len(answers) == len(kept) + len(rej) + len(rev)
    assert sorted(r["id"] for r in kept + rej + rev) == sorted(f"s/{i}" for i in range(len(answers)))
    # a reject wins over a review, and the first operator to reject is the one named
    for r in rej:
        assert r["reject_reason"] in ("first:a", "first:b")
    for r in rev:
        assert "REJECT" not in r["conversations"][1]["value"]
        assert set(r["review_reason"].split(";")) <= {"first:c", "first:d", "second:c", "second:d"}
    assert all("score_len" in r and "reject_reason" not in r for r in kept)
    assert sum(m["reasons"].values()) == len(rej)


def test_bad_config_fails_at_start(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("stages:\n  - op: no_such_operator\n")
    with pytest.raises(ValueError, match="unknown operator 'no_such_operator'"):
        load_curate_config(str(bad))
    bad.write_text("stages: [}\n")
    with pytest.raises(ValueError, match="config"):
        load_curate_config(str(bad))
    bad.write_text("stagez: []\n")
    with pytest.raises(ValueError, match="stagez"):
        load_curate_config(str(bad))


def write_input(folder, n_shards=3, per=10):
    os.makedirs(folder / "kept")
    answers = ["fine answer", "REJECT-a", "REVIEW-c", "fine answer too"]
    for k in range(n_shards):
        t = make_table([answers[(i + k) % 4] + f" {k}-{i}" for i in range(per)], source=f"src{k % 2}")
        ids = pa.array([f"src{k % 2}/{k}-{i}" for i in range(per)])
        t = t.set_column(0, "id", ids).select(CANONICAL.names)
        write_parquet_atomic(t, str(folder / "kept" / f"shard-{k}.parquet"))


def test_curate_through_ray_routes_accounts_and_resumes(ray_local, tmp_path):
    write_input(tmp_path / "in")
    cfg = CurateConfig(stages=[{"op": "test_curate_runner:MarkerRule"}])
    s = run_curate(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    assert (s["input"], s["kept"], s["rejected"], s["review"]) == (30, 14, 8, 8)
    assert s["operators"] == {"MarkerRule": {"rejected": 8, "review": 8}}
    assert s["sources"]["src0"]["input"] == 20 and s["sources"]["src1"]["input"] == 10
    assert os.path.getsize(tmp_path / "out" / "report" / "rejected_by_rule.png") > 1000
    assert os.path.getsize(tmp_path / "out" / "report" / "hist_score_len.png") > 1000
    # a killed run: one shard's marker missing -> only that shard is redone, files identical
    before = tree_bytes(tmp_path / "out")
    os.remove(tmp_path / "out" / "_done" / "shard-1.json")
    s2 = run_curate(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    assert s2["resumed_shards"] == 2
    after = tree_bytes(tmp_path / "out")
    assert before.keys() == after.keys()
    data = [k for k in before if k.startswith(("kept/", "rejected/", "review/"))]  # markers/report hold timings
    assert data and all(before[k] == after[k] for k in data)


def test_with_dedup_the_histograms_drawn_early_are_the_summarys(ray_local, tmp_path):
    """With dedup the score histograms are drawn from the verdicts markers while the dedup runs: the very
    figures the routed markers (the summary) give."""
    from pipeline.curate_plots import draw_histograms, stage_thresholds
    from pipeline.io import read_marker
    from pipeline.jobs import Histogram

    write_input(tmp_path / "in")
    cfg = CurateConfig(stages=[{"op": "test_curate_runner:MarkerRule"}], dedup={"exact": True, "minhash": False})
    s = run_curate(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    assert s["histograms"]["score_len"]["bins"] and s["input"] == 30
    merged = Histogram()  # what the early drawing reads: the units' verdicts markers
    for k in range(3):
        merged.merge(Histogram(**read_marker(str(tmp_path / "out"), f"verdicts-shard-{k}")["histograms"]["score_len"]))
    assert vars(merged) == s["histograms"]["score_len"]
    draw_histograms(str(tmp_path / "again"), s["histograms"], stage_thresholds(cfg))
    early, again = (tmp_path / d / "report" / "hist_score_len.png" for d in ("out", "again"))
    assert early.read_bytes() == again.read_bytes()


def test_corrupt_input_shard_is_reported_and_the_rest_processed(ray_local, tmp_path):
    write_input(tmp_path / "in", n_shards=2)
    (tmp_path / "in" / "kept" / "shard-9.parquet").write_bytes(b"PAR1 this is not parquet")
    s = run_curate(str(tmp_path / "in"), str(tmp_path / "out"), CurateConfig(stages=[{"op": "test_curate_runner:MarkerRule"}]))
    assert s["reasons"]["input:corrupt_shard"] == 1 and s["input"] == 21
    bad = [r for r in read_rows(tmp_path / "out" / "rejected") if r["reject_reason"] == "input:corrupt_shard"]
    assert "shard-9.parquet" in json.loads(bad[0]["meta"])["file"]


def test_fail_fast_names_the_corrupt_shard_before_any_work(tmp_path):
    import subprocess
    import sys

    write_input(tmp_path / "in", n_shards=1)
    (tmp_path / "in" / "kept" / "shard-9.parquet").write_bytes(b"PAR1 this is not parquet")
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "curate", "--in", str(tmp_path / "in"), "--out",
                        str(tmp_path / "out"), "--fail-fast"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "shard-9.parquet" in p.stderr and p.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out" / "kept").exists()
