"""`run_pack` end to end through a real local Ray (slow), on canonical rows written here; the\ntokenize/tile step without Ray (fast)."""

from __future__ import annotations

import glob
import io
import json
import os
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.tiling import count_tiles
from model.tokenizer import IGNORE_INDEX, load_tokenizer, render_sample
from pipeline.io import write_parquet_atomic
from pipeline.pack_job import run_pack, tokenize_table
from pipeline.schema import rows_to_table

MAX_TOKENS, MAX_TILES = 4000, 16


def image(w: int, h: int, fmt: str = "PNG", colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format=fmt)
    return buf.getvalue()


def turn(who: str, value: str) -> dict:
    return {"from": who, "value": value}


def canonical_rows() -> list[dict]:
    long_answer = " ".join(f"step {i}: add the next number and carry the remainder." for i in range(330))
    rows = [
        ("ok/0", [turn("human", "<image>\nDescribe the picture."), turn("gpt", "A red square.")], [image(800, 600)],
         {"data_augment": True}),
        ("ok/1", [turn("human", "What is 2+2?"), turn("gpt", "4")], [], {}),
        ("ok/2", [turn("human", "Compare <image> and <image>."), turn("gpt", "Both are red.")],
         [image(1000, 1000, "JPEG"), image(300, 900)], {"max_dynamic_patch": 6}),
        ("bad/undecodable", [turn("human", "<image>\nWhat?"), turn("gpt", "?")], [b"\x89PNG\r\n\x1a\nbroken"], {}),
        ("bad/placeholders", [turn("human", "<image> <image>"), turn("gpt", "x")], [image(64, 64)], {}),
        ("ok/long", [turn("human", "<image>\nSolve it step by step."), turn("gpt", long_answer)], [image(640, 480)],
         {"data_augment": True}),
        # 24 tiles + thumbnail: one image block over the 16-tile budget, no cut can help
        ("bad/too_big", [turn("human", "<image>\nRead the strip."), turn("gpt", "ok")], [image(5000, 200)],
         {"max_dynamic_patch": 24}),
        ("ok/3", [turn("system", "Answer in one word."), turn("human", "Colour of the sky?"), turn("gpt", "Blue")],
         [], {}),
    ]
    return [
        {"id": i, "source": i.split("/")[0], "category": "general", "conversations": c, "images": im,
         "meta": json.dumps(m)}
        for i, c, im, m in rows
    ]


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tok, ray_local):
    base = tmp_path_factory.mktemp("pack")
    rows = canonical_rows()
    for k in range(0, len(rows), 2):  # four input shards for two tokenize workers: order must still hold
        write_parquet_atomic(rows_to_table(rows[k : k + 2]), str(base / "in" / "kept" / f"part-{k:05d}.parquet"))
    # partition_bytes=1: one partition per input shard, so four partition tasks and a tail
    summary = run_pack(str(base / "in"), str(base / "out"), tok, max_tokens=MAX_TOKENS, max_tiles=MAX_TILES,
                       rows_per_shard=2, partition_bytes=1)
    return base, rows, summary


def read(folder) -> list[dict]:
    return [r for f in sorted(glob.glob(os.path.join(folder, "*.parquet"))) for r in pq.read_table(f).to_pylist()]


def test_tokenize_table_counts_tiles_and_rejects_without_ray(tok):
    table = tokenize_table(rows_to_table(canonical_rows()), tok, max_tokens=MAX_TOKENS, max_tiles=MAX_TILES)
    got = {r["id"]: r for r in table.to_pylist()}
    assert got["ok/0"]["tiles_per_image"] == [13]  # 800x600 is exactly 4:3 -> a 4x3 grid + thumbnail
    assert got["ok/0"]["image_augment"] == [True] and got["ok/0"]["image_max_tiles"] == [12]
    assert got["ok/2"]["tiles_per_image"] == [1, 4] and got["ok/2"]["image_max_tiles"] == [3, 3]  # 6 // 2 images
    assert got["ok/1"]["tiles_per_image"] == [] and got["ok/1"]["image_spans"] == []
    assert {i: r["reject_reason"] for i, r in got.items() if r["reject_reason"]} == {
        "bad/undecodable": "pack:image_undecodable",
        "bad/placeholders": "pack:image_placeholder_mismatch",
        "bad/too_big": "pack:image_over_budget",
    }
    truncated = rows_to_table([{**canonical_rows()[0], "id": "cut", "images": [image(800, 600)[:200]]}])
    assert tokenize_table(truncated, tok).column("reject_reason").to_pylist() == [""]  # header reads fine
    assert tokenize_table(truncated, tok, verify_images=True).column("reject_reason").to_pylist() == [
        "pack:image_undecodable"]
    a, b = got["ok/0"]["image_spans"]
    assert b - a == 256 * 13 + 2 and got["ok/0"]["input_ids"][a] == tok.convert_tokens_to_ids("<img>")


@pytest.mark.slow
def test_summary_accounts_for_every_row(packed):
    base, rows, s = packed
    assert s["input"] == len(rows) == s["kept"] + s["rejected"]
    assert s["rejected"] == 3 and s["reasons"] == {
        "pack:image_over_budget": 1, "pack:image_placeholder_mismatch": 1, "pack:image_undecodable": 1}
    assert s["split_samples"] == 1 and s["samples"] == 5 and s["pieces"] >= 6
    assert s["lower_bound_packs"] <= s["packs"]
    assert s["token_fill"] == pytest.approx(s["total_tokens"] / (s["packs"] * MAX_TOKENS))
    assert s["tile_fill"] == pytest.approx(s["total_tiles"] / (s["packs"] * MAX_TILES))
    on_disk = json.load(open(base / "out" / "report" / "summary.json"))
    assert on_disk["packs"] == s["packs"] and os.path.getsize(base / "out" / "report" / "pack_fill.png") > 0
    names = sorted(os.listdir(base / "out" / "kept"))
    assert len(names) == s["shards"] and s["partitions"] == 4
    assert all(re.fullmatch(r"pack-(\d{5}|tail)-\d{5}\.parquet", n) for n in names), names
    for name in names:  # one packed row per row group: training reads a row without its neighbours
        meta = pq.ParquetFile(base / "out" / "kept" / name).metadata
        assert meta.num_row_groups == meta.num_rows <= 2


@pytest.mark.slow
def test_rejected_rows_keep_their_content(packed):
    base, rows, _ = packed
    rejected = {r["id"]: r for r in read(base / "out" / "rejected")}
    by_id = {r["id"]: r for r in rows}
    assert {i: r["reject_reason"] for i, r in rejected.items()} == {
        "bad/undecodable": "pack:image_undecodable",
        "bad/placeholders": "pack:image_placeholder_mismatch",
        "bad/too_big": "pack:image_over_budget",
    }
    for i, r in rejected.items():
        assert r["images"] == by_id[i]["images"] and r["conversations"] == by_id[i]["conversations"]


@pytest.mark.slow
def test_packs_hold_each_sample_once_with_its_exact_tokens(packed, tok):
    base, rows, _ = packed
    saved = load_tokenizer(str(base / "out" / "tokenizer"))
    assert saved.convert_tokens_to_ids("<IMG_CONTEXT>") == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    packs = read(base / "out" / "kept")
    pieces = {}
    for p in packs:
        cu = p["cu_seqlens"]
        assert p["num_tokens"] == len(p["input_ids"]) == len(p["labels"]) == cu[-1] <= MAX_TOKENS
        assert p["num_tiles"] == sum(p["tiles_per_image"]) <= MAX_TILES
        assert len(cu) == len(p["sample_ids"]) + 1
        img = 0
        for k, sid in enumerate(p["sample_ids"]):
            a, b = cu[k], cu[k + 1]
            assert p["position_ids"][a:b] == list(range(b - a))
            n_img = p["input_ids"][a:b].count(tok.convert_tokens_to_ids("<img>"))
            pieces[sid] = (p["input_ids"][a:b], p["labels"][a:b], p["images"][img : img + n_img],
                           p["tiles_per_image"][img : img + n_img], p["image_max_tiles"][img : img + n_img],
                           p["image_augment"][img : img + n_img])
            img += n_img
        assert img == len(p["images"])
    order = [sid for p in packs for sid in p["sample_ids"]]
    long_parts = [x for x in order if x.startswith("ok/long#")]
    assert len(long_parts) >= 2 and long_parts == [f"ok/long#{k}" for k in range(len(long_parts))]  # in order
    assert sorted(order) == sorted(["ok/0", "ok/1", "ok/2", "ok/3", *long_parts])  # each once
    for r in rows:
        if r["id"].startswith("bad/"):
            continue
        meta = json.loads(r["meta"])
        mdp = meta.get("max_dynamic_patch", 12) // max(1, len(r["images"]))
        tiles = [count_tiles(*Image.open(io.BytesIO(b)).size, max_num=mdp) for b in r["images"]]
        ids, labels, _ = render_sample(r["conversations"], tiles, tok)
        parts = [pieces[k] for k in sorted(pieces) if k == r["id"] or k.startswith(r["id"] + "#")]
        assert np.concatenate([p[0] for p in parts]).tolist() == ids.tolist()
        assert np.concatenate([p[1] for p in parts]).tolist() == labels.tolist()
        assert [b for p in parts for b in p[2]] == r["images"]
        assert [t for p in parts for t in p[3]] == tiles
        assert all(m == mdp for p in parts for m in p[4])
        assert all(a == meta.get("data_augment", False) for p in parts for a in p[5])
        learned = [t for p in parts for t, lab in zip(p[0], p[1]) if lab != IGNORE_INDEX]
        assert tok.decode(learned) == r["conversations"][-1]["value"] + "<|im_end|>"


@pytest.mark.slow
def test_rerun_gives_identical_packs(packed, tok):
    import ray

    base, _, s = packed
    assert ray.data.DataContext.get_current().execution_options.preserve_order is False  # caller's, restored
    again = run_pack(str(base / "in"), str(base / "out2"), tok, max_tokens=MAX_TOKENS, max_tiles=MAX_TILES,
                     rows_per_shard=2, partition_bytes=1)
    assert {k: again[k] for k in ("packs", "total_tokens", "kept")} == {k: s[k] for k in ("packs", "total_tokens", "kept")}
    assert read(base / "out" / "kept") == read(base / "out2" / "kept")


def partition_spec(tmp_path, tok, files: list[str], rows: int) -> dict:
    """What run_pack hands one partition call (one partition, so its exact search runs)."""
    tok_dir = str(tmp_path / "tok")
    tok.save_pretrained(tok_dir)
    return {"out_dir": str(tmp_path / "out"), "index": 0, "shards": list(enumerate(files)), "rows": rows,
            "partitions": 1, "tok_dir": tok_dir, "tok_digest": "test", "token_fingerprint": "t", "pack_fingerprint": "p",
            "batch_size": 256, "max_tokens": MAX_TOKENS, "max_tiles": MAX_TILES, "mode": "ivl", "seed": 0,
            "buffer_size": None, "rows_per_shard": 2,
            "tokenize": {"system_prompt": None, "max_tokens": MAX_TOKENS, "max_tiles": MAX_TILES, "verify_images": False}}


def test_a_partition_commits_a_job_marker_counted_from_its_input_without_ray(tmp_path, tok):
    from operators.packing import lower_bound
    from pipeline.jobs import AccountingError, Marker, read_unit_marker
    from pipeline.pack_job import pack_partition, part_key

    rows = canonical_rows()
    path = str(tmp_path / "in" / "part-00000.parquet")
    write_parquet_atomic(rows_to_table(rows), path)
    done = pack_partition(partition_spec(tmp_path, tok, [path], len(rows)))
    m = read_unit_marker(str(tmp_path / "out"), part_key(0))
    assert m == Marker.from_json(done["marker"]) and m.input == len(rows) == m.kept + m.rejected
    assert m.reasons == {"pack:image_over_budget": 1, "pack:image_placeholder_mismatch": 1, "pack:image_undecodable": 1}
    assert set(m.stages) >= {"tokenize", "write", "pack"} and all(s.rows == len(rows) for s in m.stages.values())
    sizes = {(t, k): n for t, k, n in m.extra["sizes"]}
    assert sum(sizes.values()) == m.extra["pieces"] and m.extra["packs"] >= lower_bound(sizes, MAX_TOKENS, MAX_TILES)
    # a reader that lost a row: the footer says one more than was read
    with pytest.raises(AccountingError, match="rows read"):
        pack_partition(partition_spec(tmp_path / "again", tok, [path], len(rows) + 1))
