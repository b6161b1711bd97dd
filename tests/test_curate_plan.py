"""The curate runner's data plane: where operators run, what moves through Ray's object store, and
accounting from the input files (pipeline/curate.py over pipeline/jobs.py)."""

from __future__ import annotations

import os

import pytest
from helpers import tree_bytes

from pipeline.curate import CurateConfig, load_curate_config, plan_segments, route_table, run_curate
from pipeline.io import list_input_shards, read_canonical
from pipeline.jobs import AccountingError, WorkUnit, check_accounting, merge, read_markers


def data_files(folder) -> dict[str, bytes]:
    return {k: v for k, v in tree_bytes(folder).items() if k.startswith(("kept/", "rejected/", "review/"))}


def test_default_config_runs_in_one_task_segment_or_with_an_actor_pool_for_language_id():
    cfg = load_curate_config(None)
    names = [s.op for s in cfg.stages]
    segs = plan_segments(cfg)
    assert [(s.kind, [x.op for x in s.stages]) for s in segs] == [("task", names)]
    segs = plan_segments(cfg.model_copy(update={"cpu_models": "actors"}))
    assert [x.op for s in segs for x in s.stages] == names  # the configured order, cut into segments
    assert [[x.op for x in s.stages] for s in segs if s.kind == "actor"] == [["language_id"]]
    assert all(a.kind != b.kind for a, b in zip(segs, segs[1:]))  # task runs are maximal


def test_a_lost_row_fails_the_accounting(tmp_path):
    from test_curate_runner import make_table

    t = make_table(["fine", "REJECT-x", "fine"])
    route_table(t, str(tmp_path), "k", "parquet", 10, input_rows=4)  # the file said 4 rows, 3 arrived
    markers = read_markers(str(tmp_path), [WorkUnit("k", "k.parquet", 4)])
    with pytest.raises(AccountingError, match="unit k: 4 rows in the input but 3 routed"):
        check_accounting(merge(markers), markers)


@pytest.fixture(scope="module")
def sample_shards(ray_local, sample_meta, tmp_path_factory):
    from pipeline.ingest import run_ingest

    out = tmp_path_factory.mktemp("ingest-plan")
    run_ingest([sample_meta], str(out), rows_per_shard=10)
    return out


@pytest.mark.slow
def test_no_content_goes_through_the_object_store_and_actor_pools_decide_alike(ray_local, sample_shards, tmp_path):
    """Default config (its operators + exact/MinHash dedup, text-only so the sample's templated
    captions are removed) over the sample with its real images: the operator and routing phases put
    only unit rows into Ray's object store (no content), dedup only key rows (a bound per row that
    does not grow with the images); language ID in an actor pool decides exactly as in tasks."""
    cfg = load_curate_config(None)
    cfg = cfg.model_copy(update={"dedup": cfg.dedup.model_copy(update={"text_only": True})})
    s = run_curate(str(sample_shards), str(tmp_path / "tasks"), cfg)
    arrow = sum(read_canonical(f).nbytes for f in list_input_shards(str(sample_shards)))
    phases = s["object_store_bytes_by_phase"]
    assert phases["operators"] + phases["route"] < 0.01 * arrow, (phases, arrow)
    key_rows = s["input"] - s["rejected"] + s["dedup"]["removed"]  # the rows dedup saw
    # dedup's key rows go task -> storage -> task: only file names and counts pass the object store
    assert 0 < phases["dedup"] < 20_000 * key_rows, (phases, key_rows)
    assert s["dedup"]["removed"] > 0 and s["input"] == s["kept"] + s["rejected"] + s["review"]
    assert not os.path.exists(tmp_path / "tasks" / "_verdicts") and not os.path.exists(tmp_path / "tasks" / "_stage")
    assert "score_lang" in s["histograms"]
    assert os.path.getsize(tmp_path / "tasks" / "report" / "hist_score_lang.png") > 1000
    s2 = run_curate(str(sample_shards), str(tmp_path / "actors"), cfg.model_copy(update={"cpu_models": "actors"}))
    assert s2["stage_rows"] == s["stage_rows"]
    assert data_files(tmp_path / "tasks") == data_files(tmp_path / "actors")


def test_config_rejects_an_unknown_cpu_models_value():
    with pytest.raises(Exception, match="cpu_models"):
        CurateConfig(cpu_models="gpus")


def test_stages_are_resolved_once_into_typed_picklable_hashable_values():
    import pickle

    from operators.text_rules import TextRuleParams
    from pipeline.curate_config import DedupConfig, resolve_stage

    cfg = load_curate_config(None)
    for stage in cfg.stages:
        again = pickle.loads(pickle.dumps(stage))  # what a worker receives
        assert again == stage and hash(again) == hash(stage) and isinstance(stage.params, stage.cls.Params)
        assert resolve_stage(stage.spec()) == stage  # the YAML form round-trips
        assert stage.build().params is stage.params  # built from the resolved settings, not validated again
    assert resolve_stage({"op": "text_rules"}) == resolve_stage({"op": "text_rules", "min_words": TextRuleParams().min_words})
    named = CurateConfig(stages=[{"op": "text_rules", "name": "rules2", "min_words": 10}]).stages[0]
    assert (named.label, named.params.min_words, named.spec()) == ("rules2", 10, {"op": "text_rules", "name": "rules2", "min_words": 10})
    plugin = resolve_stage({"op": "test_curate_runner:MarkerRule"})  # no Params: its own keyword arguments
    assert plugin.label == "MarkerRule" and plugin.params is None and plugin.build().params == {}
    assert isinstance(cfg.dedup, DedupConfig) and CurateConfig(dedup={}).dedup is None  # `dedup: {}`: none
