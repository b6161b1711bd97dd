"""`ivl export`: ingest -> export -> ingest gives the same conversations and image bytes, and the InternVL
layout is what InternVL's own loader (internvl_chat's LazySupervisedDataset / build_datasets) reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import read_rows

from pipeline.export import run_export
from pipeline.ingest import run_ingest


def by_source(rows):
    out = {}
    for r in rows:
        out.setdefault(r["source"], []).append((r["conversations"], r["images"]))
    return out


def internvl_loader_view(meta_path: str, cwd: str) -> dict:
    """What internvl_chat's loader does with a meta file: open each `annotation` (from its working directory),
    readlines, cut or repeat by `repeat_time`, join `root` with each `image`; `data_augment` is required."""
    out = {}
    for name, d in json.load(open(meta_path)).items():
        d["data_augment"], d["repeat_time"]  # noqa: B018  (KeyError in InternVL when missing)
        lines = open(os.path.join(cwd, d["annotation"])).readlines()
        assert len(lines) == d["length"]
        r = d["repeat_time"]
        lines = lines[: int(len(lines) * r)] if r < 1 else lines * int(r)
        items = []
        for line in lines:
            item = json.loads(line)
            paths = item.get("image") or []
            paths = [paths] if isinstance(paths, str) else paths
            images = [open(os.path.join(cwd, d["root"], p), "rb").read() for p in paths]
            if len(paths) == 1:
                assert (item["width"], item["height"]) != (0, 0)
            items.append((item["conversations"], images))
        out[name] = items
    return out


@pytest.mark.slow
def test_ingest_export_ingest_round_trip(ray_local, sample_meta, tmp_path):
    first = tmp_path / "in1"
    run_ingest([sample_meta], str(first), rows_per_shard=16)
    original = by_source(read_rows(first / "kept"))
    s = run_export(str(first), str(tmp_path / "ivl"), "internvl")
    assert s["input"] == s["exported"] + s["repeat_copies"] and s["repeat_copies"] == 15  # tuxpaint_caption_zh x2
    meta = json.load(open(tmp_path / "ivl" / "meta.json"))
    assert meta["tuxpaint_caption_zh"]["repeat_time"] == 2 and meta["tuxpaint_compare"]["max_dynamic_patch"] == 6
    assert meta["tuxpaint_caption"]["data_augment"] is True and meta["tang_poems"]["repeat_time"] == 1
    assert internvl_loader_view(str(tmp_path / "ivl" / "meta.json"), str(tmp_path / "ivl")) == original
    second = tmp_path / "in2"
    s2 = run_ingest([str(tmp_path / "ivl" / "meta.json")], str(second))
    assert s2["rejected"] == 0
    assert by_source(read_rows(second / "kept")) == original  # same conversations, same image bytes
    run_export(str(first), str(tmp_path / "llava"), "llava")
    run_export(str(first), str(tmp_path / "pq"), "parquet")
    llava = run_ingest([str(tmp_path / "llava" / f"{n}.json") for n in sorted(original)], str(tmp_path / "in3"))
    assert llava["rejected"] == 0
    got = by_source(read_rows(tmp_path / "in3" / "kept"))
    # a LLaVA file has no repeat_time: each sample once
    assert got["tuxpaint_caption_zh"] == original["tuxpaint_caption_zh"][:15]
    assert got["tuxpaint_caption"] == original["tuxpaint_caption"]
    run_ingest([str(tmp_path / "pq")], str(tmp_path / "in4"))
    rows = read_rows(tmp_path / "in4" / "kept")
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in read_rows(first / "kept") if "#r" not in r["id"])
    assert by_source(rows)["tuxpaint_compare"] == original["tuxpaint_compare"]
    datasets = pytest.importorskip("datasets")  # HF datasets reads the Parquet export's images as Image features
    ds = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (tmp_path / "pq" / "tuxpaint_compare").glob("*.parquet")),
                               split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["images"].feature, datasets.Image) and len(ds) == len(original["tuxpaint_compare"])
    assert ds[0]["images"][0].size[0] > 0  # decodes
    raw = ds.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
    assert [[im["bytes"] for im in r["images"]] for r in raw] == [imgs for _c, imgs in original["tuxpaint_compare"]]


def test_cli_export_bad_format_and_missing_input_one_line(tmp_path):
    for args, said in ((["--in", str(tmp_path / "nope"), "--format", "internvl"], "does not exist"),):
        p = subprocess.run([sys.executable, "-m", "jobs.cli", "export", *args, "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and said in p.stderr
