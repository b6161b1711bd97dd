"""Issue 13 item 2, pack side: a piece with no supervised token is dropped and counted; no packed row
has 0 supervised tokens. Real Tux Paint stamps, the real SmolLM2 tokenizer, through a local Ray."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from model.tokenizer import IGNORE_INDEX
from pipeline.io import write_parquet_atomic
from pipeline.pack_job import run_pack, tokenize_table
from pipeline.schema import rows_to_table


def rows(sample_images) -> list[dict]:
    five = [open(p, "rb").read() for p in sample_images[:5]]
    meta = json.dumps({"max_dynamic_patch": 5})  # 5 images share 5 tiles: one tile each
    return [
        {"id": "five", "source": "t", "category": "", "images": five, "meta": meta, "conversations": [
            {"from": "human", "value": "<image>" * 5 + "\nWhich one is a stamp of an animal?"},
            {"from": "gpt", "value": "The third one."}]},
        {"id": "one", "source": "t", "category": "", "images": five[:1], "meta": meta, "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A stamp."}]},
        {"id": "silent", "source": "t", "category": "", "images": [], "meta": "{}", "conversations": [
            {"from": "human", "value": "No answer follows."}]},
    ]


def test_a_row_without_an_answer_is_rejected_at_tokenize(tok, sample_images):
    table = tokenize_table(rows_to_table(rows(sample_images)), tok, max_tokens=4096, max_tiles=4)
    assert table.column("reject_reason").to_pylist() == ["", "", "pack:no_answer"]
    assert table.column("tiles_per_image").to_pylist()[0] == [1] * 5


@pytest.mark.slow
def test_five_images_cut_at_four_tiles_drop_the_piece_without_an_answer(tok, sample_images, ray_local, tmp_path):
    write_parquet_atomic(rows_to_table(rows(sample_images)), str(tmp_path / "in" / "part-00000.parquet"))
    s = run_pack(str(tmp_path / "in"), str(tmp_path / "out"), tok, max_tokens=4096, max_tiles=4)
    # "five" is cut after its 4th image: that piece is prompt and images only, and is dropped
    assert s["pieces_without_answer"] == 1 and s["split_samples"] == 1
    assert s["input"] == 3 and s["kept"] == 2 and s["rejected"] == 1 and s["reasons"] == {"pack:no_answer": 1}
    packed = []
    for f in sorted(glob.glob(os.path.join(tmp_path, "out", "kept", "*.parquet"))):
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_row_groups == pf.metadata.num_rows  # one packed row per row group
        packed += [r for i in range(pf.num_row_groups) for r in pf.read_row_group(i).to_pylist()]
    for row in packed:
        assert (np.asarray(row["labels"]) != IGNORE_INDEX).sum() > 0, row["sample_ids"]
    assert sorted(sid for r in packed for sid in r["sample_ids"]) == ["five#1", "one"]
    images = [open(p, "rb").read() for p in sample_images[:5]]
    five = next(r for r in packed if "five#1" in r["sample_ids"])
    assert images[4] in five["images"]  # the answered piece keeps its image
    assert not any(images[k] in r["images"] for r in packed for k in (1, 2, 3))  # the dropped piece's are gone
