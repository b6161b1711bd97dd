"""`ivl ingest` as a Ray job: accounting, deterministic resumable output, WebDataset, bad config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
from conftest import read_rows
from helpers import conv, tree_bytes, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.ingest import ingest_task, run_ingest
from pipeline.io import read_canonical
from pipeline.jobs import check_accounting
from pipeline.readers import entries_from_sources, plan_tasks
from pipeline.report import merge_counts
from pipeline.schema import validate_table


def test_ingest_sample_accounts_for_every_line(ray_local, sample_meta, tmp_path):
    out = tmp_path / "out"
    s = run_ingest([sample_meta], str(out), rows_per_shard=16)
    kept, rejected = read_rows(out / "kept"), read_rows(out / "rejected")
    assert s["input"] == s["kept"] + s["rejected"] == len(kept) + len(rejected)
    assert s["rejected"] == 7 and all(r["reject_reason"].startswith("ingest:") for r in rejected)
    assert s["sources"]["tuxpaint_caption_zh"]["input"] == 30  # repeat_time 2
    assert s["sources"]["tang_poems"]["input"] == 6  # repeat_time 0.5
    assert validate_table(pa.Table.from_pylist(kept)) == []
    assert json.load(open(out / "report" / "summary.json"))["kept"] == len(kept)
    assert (out / "report" / "rejected_by_reason.png").stat().st_size > 1000


def test_killed_ingest_resumes_to_identical_files(ray_local, sample_meta, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_ingest([sample_meta], str(full), rows_per_shard=8)
    run_ingest([sample_meta], str(part), rows_per_shard=8)
    # simulate a kill: drop the markers of half the shards, and leave one half-written temp file
    done = sorted(os.listdir(part / "_done"))
    for name in done[::2]:
        os.remove(part / "_done" / name)
    (part / "kept" / ".tmp-123-x.parquet").write_bytes(b"partial")
    s = run_ingest([sample_meta], str(part), rows_per_shard=8)
    assert s["resumed_shards"] == len(done) - len(done[::2])
    os.remove(part / "kept" / ".tmp-123-x.parquet")
    a, b = tree_bytes(full), tree_bytes(part)
    a.pop("report/summary.json"), b.pop("report/summary.json")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_webdataset_output_round_trips(ray_local, sample_meta, tmp_path):
    pq_out, wds_out = tmp_path / "pq", tmp_path / "wds"
    run_ingest([sample_meta], str(pq_out))
    run_ingest([sample_meta], str(wds_out), fmt="webdataset")
    tars = sorted((wds_out / "kept").glob("*.tar"))
    assert tars
    rows = [r for t in tars for r in read_canonical(str(t)).to_pylist()]
    assert rows == read_rows(pq_out / "kept")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["good", "text", "bad_json", "missing", "mismatch", "empty", "role", "blank"]),
                min_size=0, max_size=30), st.integers(1, 7))
def test_accounting_invariant(tmp_path_factory, sample_images, kinds, rows_per_shard):
    d = tmp_path_factory.mktemp("acc")
    shutil.copy(sample_images[0], d / "a.png")
    make = {
        "good": {"image": "a.png", "conversations": conv()},
        "text": {"conversations": conv("Hello?", "Hello to you.")},
        "bad_json": '{"conversations": [',
        "missing": {"image": "zz.png", "conversations": conv()},
        "mismatch": {"image": ["a.png", "a.png"], "conversations": conv()},
        "empty": {"conversations": []},
        "role": {"conversations": [{"from": "bot", "value": "x"}]},
        "blank": "   ",
    }
    write_jsonl(d / "x.jsonl", [make[k] for k in kinds])
    out = d / "out"
    markers = [ingest_task(t, str(out), "parquet", rows_per_shard)
               for t in plan_tasks(entries_from_sources([str(d / "x.jsonl")]), rows_per_shard)]
    from pipeline.io import read_marker

    s = merge_counts([read_marker(str(out), m["key"]) for m in markers])
    check_accounting(s, splits=("kept", "rejected"))
    non_blank = [k for k in kinds if k != "blank"]
    assert s["input"] == len(non_blank)
    assert s["kept"] == sum(k in ("good", "text") for k in non_blank)
    kept = read_rows(out / "kept") if (out / "kept").exists() else []
    rejected = read_rows(out / "rejected") if (out / "rejected").exists() else []
    assert len(kept) + len(rejected) == s["input"]
    assert len({r["id"] for r in kept + rejected}) == s["input"]


def test_cli_bad_config_is_one_clear_line(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"s": {"annotation": "nope.jsonl"}}))
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "ingest", str(tmp_path / "m.json"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "annotation" in p.stderr and "not found" in p.stderr
    assert not (tmp_path / "o").exists()  # failed before any work


def test_a_reader_that_loses_a_row_fails_the_unit(tmp_path, sample_images, monkeypatch):
    """The input count comes from the file, not the reader: plant a reader bug that drops a row."""
    import pytest

    import pipeline.readers as readers
    from pipeline.jobs import AccountingError

    shutil.copy(sample_images[0], tmp_path / "a.png")
    write_jsonl(tmp_path / "x.jsonl", [{"image": "a.png", "conversations": conv()}] * 3)
    honest = readers.READERS["jsonl"]

    def drops_the_second(e, task):
        for i, item in enumerate(honest(e, task)):
            if i != 1:
                yield item

    monkeypatch.setitem(readers.READERS, "jsonl", drops_the_second)
    (task,) = plan_tasks(entries_from_sources([str(tmp_path / "x.jsonl")]), 10)
    with pytest.raises(AccountingError, match="3 input rows counted from the file but the reader returned 2 kept"):
        ingest_task(task, str(tmp_path / "out"), "parquet", 10)
    assert not (tmp_path / "out" / "_done").exists()  # nothing committed


def test_tar_and_parquet_counts_come_from_headers_and_footers(tmp_path, sample_images, monkeypatch):
    import pytest

    import pipeline.readers as readers
    from pipeline.jobs import AccountingError

    img = open(sample_images[0], "rb").read()
    pq_path = tmp_path / "hf.parquet"
    pa_table = pa.table({"image": [{"bytes": img, "path": "a.png"}] * 5, "conversations": [conv()] * 5})
    import pyarrow.parquet as pq

    pq.write_table(pa_table, pq_path, row_group_size=2)
    from helpers import write_tar

    write_tar(tmp_path / "s.tar", [(f"k{i}", {"conversations": conv()}, [img], "png") for i in range(4)])
    for kind, src in (("parquet", pq_path), ("tar", tmp_path / "s.tar")):
        (task,) = plan_tasks(entries_from_sources([str(src)]), 10)
        honest = readers.READERS[kind]
        monkeypatch.setitem(readers.READERS, kind, lambda e, t, h=honest: list(h(e, t))[:-1])
        with pytest.raises(AccountingError, match="counted from the file"):
            ingest_task(task, str(tmp_path / f"out-{kind}"), "parquet", 10)
        monkeypatch.setitem(readers.READERS, kind, honest)
        assert ingest_task(task, str(tmp_path / f"out-{kind}"), "parquet", 10)["input"] == (5 if kind == "parquet" else 4)


def test_mixed_layouts_job_accounts_and_flags_duplicate_source_ids(ray_local, tmp_path, sample_images):
    import webdataset as wds

    img = open(sample_images[0], "rb").read()
    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    shutil.copy(sample_images[0], d / "a.png")
    write_jsonl(d / "a.jsonl", [{"id": 7, "image": "a.png", "conversations": conv()}, {"id": 7, "conversations": []}])
    write_jsonl(d / "sub" / "a.jsonl", [{"id": 7, "conversations": conv("Hi?", "Hello.")}])
    (d / "arr.json").write_text(json.dumps([{"id": "x", "conversations": conv("Q?", "A.")}] * 3))
    with wds.TarWriter(str(d / "sub" / "w.tar.gz"), compress=True) as sink:
        for i in range(11):
            sink.write({"__key__": f"k{i:02d}", "png": img, "json": json.dumps({"conversations": conv()}).encode()})
    (d / "dataset_info.json").write_text("{}")
    from test_layouts import write_img2dataset

    write_img2dataset(d / "laion", [img] * 3, ["a hen", "a hen again", "a third hen"])
    (d / "laion" / "00000_stats.json").write_text(json.dumps({"successes": 4}))  # img2dataset says 4, the tar has 3
    s = run_ingest([str(d)], str(tmp_path / "out"), rows_per_shard=2)
    assert s["input"] == 2 + 1 + 3 + 11 + 3 == s["kept"] + s["rejected"] and s["rejected"] == 1
    assert s["sources"]["mixed/sub"]["input"] == 12 and s["sources"]["mixed"]["input"] == 5
    assert s["sources"]["mixed/laion"]["kept"] == 3
    assert list(s["img2dataset_stats_mismatch"].values()) == [{"stats_successes": 4, "tar_samples": 3}]
    assert s["duplicate_source_ids"] == {"mixed": 2}  # "x" three times in arr.json, across two units; id 7 once per source
    assert sorted(os.path.basename(f["file"]) for f in s["skipped_files"]) == ["00000.parquet", "dataset_info.json"]
    rows = read_rows(tmp_path / "out" / "kept") + read_rows(tmp_path / "out" / "rejected")
    assert len({r["id"] for r in rows}) == 20
