"""Readers on real files written by the tests: InternVL meta+JSONL, bare JSONL, WebDataset, Parquet."""

from __future__ import annotations

import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import add_member, conv, read_bytes, write_jsonl, write_tar

from pipeline.readers import ConfigError, entries_from_sources, plan_tasks, read_task
from pipeline.schema import CANONICAL, validate_table


def read_all(sources, image_root=None, rows_per_shard=1000):
    kept, rejected = [], []
    for task in plan_tasks(entries_from_sources(sources, image_root), rows_per_shard):
        k, r = read_task(task)
        kept += k
        rejected += r
    return kept, rejected


@pytest.fixture
def dataset(tmp_path, sample_images):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, src in enumerate(sample_images[:3]):
        (img_dir / f"{i}.png").write_bytes(read_bytes(src))
    lines = [
        {"id": "a", "image": "0.png", "width": 1, "conversations": conv()},
        {"id": "b", "image": ["1.png", "2.png"], "conversations": conv("<image>\n<image>\nCompare them.", "Both are drawings.")},
        {"id": "c", "conversations": conv("Name a prime.", "Seven is prime.")},
        {"id": "d", "image": "1.png", "conversations": conv("What is it?", "A drawing.")},  # no <image>: prepended
    ]
    write_jsonl(tmp_path / "ann.jsonl", lines)
    return tmp_path


def test_meta_json_relative_root_and_settings(dataset):
    meta = {"set": {"root": "imgs", "annotation": "ann.jsonl", "data_augment": True, "max_dynamic_patch": 6,
                    "repeat_time": 1, "category": "captioning"}}
    (dataset / "meta.json").write_text(json.dumps(meta))
    kept, rejected = read_all([str(dataset / "meta.json")])
    assert rejected == []
    assert [r["id"] for r in kept] == ["set/0", "set/1", "set/2", "set/3"]
    assert [len(r["images"]) for r in kept] == [1, 2, 0, 1]
    m = json.loads(kept[0]["meta"])
    assert m["data_augment"] is True and m["max_dynamic_patch"] == 6 and m["orig_id"] == "a" and m["width"] == 1
    assert len(m["image_sizes"]) == 1 and all(v > 0 for v in m["image_sizes"][0])
    assert kept[0]["category"] == "captioning"
    assert kept[3]["conversations"][0]["value"].startswith("<image>\n")  # InternVL's single-image rule
    assert kept[0]["images"][0] == read_bytes(dataset / "imgs" / "0.png")  # bytes exactly as read
    assert validate_table(pa.Table.from_pylist(kept, schema=CANONICAL)) == []


def test_meta_json_absolute_root(dataset, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    meta = {"abs": {"root": str(dataset / "imgs"), "annotation": str(dataset / "ann.jsonl")}}
    (other / "meta.json").write_text(json.dumps(meta))
    kept, rejected = read_all([str(other / "meta.json")])
    assert len(kept) == 4 and rejected == []


def test_repeat_time_below_one_keeps_first_lines(dataset):
    (dataset / "meta.json").write_text(json.dumps({"s": {"root": "imgs", "annotation": "ann.jsonl", "repeat_time": 0.5}}))
    kept, _ = read_all([str(dataset / "meta.json")])
    assert [r["id"] for r in kept] == ["s/0", "s/1"]  # int(4 * 0.5) first lines


def test_repeat_time_above_one_repeats_with_unique_ids(dataset):
    (dataset / "meta.json").write_text(json.dumps({"s": {"root": "imgs", "annotation": "ann.jsonl", "repeat_time": 3}}))
    kept, _ = read_all([str(dataset / "meta.json")], rows_per_shard=3)
    ids = [r["id"] for r in kept]
    assert len(ids) == 12 and len(set(ids)) == 12
    assert {"s/0", "s/0#r1", "s/0#r2"} <= set(ids)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "x"])
def test_bad_repeat_time_fails_at_start(dataset, bad):
    (dataset / "meta.json").write_text(json.dumps({"s": {"root": "imgs", "annotation": "ann.jsonl", "repeat_time": bad}}))
    with pytest.raises(ConfigError, match="repeat_time"):
        entries_from_sources([str(dataset / "meta.json")])


def test_bad_config_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        entries_from_sources([str(tmp_path / "nope.json")])
    (tmp_path / "m.json").write_text('{"s": {"annotation": "missing.jsonl"}}')
    with pytest.raises(ConfigError, match="not found"):
        entries_from_sources([str(tmp_path / "m.json")])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        entries_from_sources([str(tmp_path / "broken.json")])


def test_bare_jsonl_with_image_root(dataset):
    kept, rejected = read_all([str(dataset / "ann.jsonl")], image_root=str(dataset / "imgs"))
    assert len(kept) == 4 and rejected == []
    assert kept[0]["source"] == "ann" and kept[0]["id"] == "ann/0"


def test_every_bad_input_kind_is_rejected_with_reason(dataset):
    (dataset / "imgs" / "broken.png").write_bytes(read_bytes(dataset / "imgs" / "0.png")[:200])
    lines = [
        '{"id": 1, "conversations": [',  # broken JSON
        '[1, 2, 3]',  # not an object
        {"image": "nope.png", "conversations": conv()},
        {"image": "broken.png", "conversations": conv()},
        {"image": ["0.png", "1.png"], "conversations": conv()},  # 1 placeholder, 2 images
        {"conversations": []},
        {"conversations": [{"from": "human", "value": "hi"}]},
        {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]},
        {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
        {"conversations": "not a list"},
    ]
    write_jsonl(dataset / "bad.jsonl", lines)
    kept, rejected = read_all([str(dataset / "bad.jsonl")], image_root=str(dataset / "imgs"))
    assert kept == []
    assert [r["reject_reason"] for r in rejected] == [
        "ingest:bad_json", "ingest:bad_record", "ingest:missing_image", "ingest:undecodable_image",
        "ingest:image_count_mismatch", "ingest:empty_conversation", "ingest:no_gpt_turn", "ingest:unknown_role",
        "ingest:malformed_conversation", "ingest:empty_conversation"]
    assert json.loads(rejected[0]["meta"])["raw"].startswith('{"id": 1')  # nothing disappears
    assert json.loads(rejected[3]["meta"])["image_problem"] == "broken_data"  # header reads, pixels cut
    assert len({r["id"] for r in rejected}) == len(rejected)


def test_decompression_bomb_is_rejected(tmp_path):
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 Mpx, a few KB on disk
    write_jsonl(tmp_path / "a.jsonl", [{"image": "bomb.png", "conversations": conv()}])
    _, rejected = read_all([str(tmp_path / "a.jsonl")])
    assert [r["reject_reason"] for r in rejected] == ["ingest:undecodable_image"]
    assert json.loads(rejected[0]["meta"])["image_problem"] == "too_many_pixels"  # operators/images.py's reason


def test_webdataset_tar_single_and_multi_image(tmp_path, sample_images):
    imgs = [read_bytes(p) for p in sample_images[:3]]
    write_tar(tmp_path / "shard-000.tar", [
        ("s1", {"conversations": conv(), "category": "ocr"}, [imgs[0]], "png"),
        ("s2", {"conversations": conv("<image>\n<image>\nBoth?", "Yes.")}, imgs[1:3], "png"),
        ("s3", {"conversations": conv("Text only?", "Yes, only text.")}, [], "png"),
    ])
    kept, rejected = read_all([str(tmp_path / "shard-000.tar")])
    assert rejected == []
    assert [r["id"] for r in kept] == ["shard-000/shard-000/s1", "shard-000/shard-000/s2", "shard-000/shard-000/s3"]
    assert kept[1]["images"] == imgs[1:3] and kept[0]["category"] == "ocr"


def test_tar_with_unsafe_members_and_truncation(tmp_path, sample_images):
    img = read_bytes(sample_images[0])
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        add_member(tar, "ok.json", json.dumps({"conversations": conv()}).encode())
        add_member(tar, "ok.png", img)
        add_member(tar, "../up.json", b"{}")
        link = tarfile.TarInfo("lnk.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    kept, rejected = read_all([str(path)])
    assert len(kept) == 1
    assert sorted(r["reject_reason"] for r in rejected) == ["ingest:unsafe_tar_member"] * 2
    data = read_bytes(path)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 512 + 512 + len(img) // 2])  # header+json, then half an image
    kept, rejected = read_all([str(cut)])
    assert [r["reject_reason"] for r in rejected][-1] == "ingest:corrupt_shard"
    assert str(cut) in rejected[-1]["meta"]  # the report names the file


def test_parquet_canonical_hf_and_truncated(tmp_path, sample_images):
    img = read_bytes(sample_images[0])
    canon = pa.Table.from_pylist([{"id": "x/1", "source": "x", "category": "c", "conversations": conv(), "images": [img],
                                   "meta": json.dumps({"max_dynamic_patch": 4})}], schema=CANONICAL)
    pq.write_table(canon, tmp_path / "canon.parquet")
    hf = pa.table({"image": [{"bytes": img, "path": "a.png"}, None],
                   "conversations": [conv(), conv("Hi?", "Hello there.")]})
    pq.write_table(hf, tmp_path / "hf.parquet")
    (tmp_path / "trunc.parquet").write_bytes(read_bytes(tmp_path / "canon.parquet")[:50])
    kept, rejected = read_all([str(tmp_path / n) for n in ("canon.parquet", "hf.parquet", "trunc.parquet")])
    assert [r["id"] for r in kept] == ["x/1", "hf/hf/0", "hf/hf/1"]
    assert json.loads(kept[0]["meta"])["max_dynamic_patch"] == 4 and kept[0]["images"] == [img]
    assert [r["reject_reason"] for r in rejected] == ["ingest:corrupt_shard"]


def test_foreign_parquet_fails_at_start_naming_file_and_columns(tmp_path):
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "foreign.parquet")
    with pytest.raises(ConfigError, match=r"foreign.parquet: unsupported layout \(columns \['text'\]\); supported"):
        entries_from_sources([str(tmp_path / "foreign.parquet")])


def test_image_path_with_a_nul_byte_is_rejected(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"image": "a\u0000.png", "conversations": conv()}])  # found by fuzzing
    _, rejected = read_all([str(tmp_path / "a.jsonl")])
    assert [r["reject_reason"] for r in rejected] == ["ingest:missing_image"]


def test_placeholder_rule_is_internvls():
    """operators/conversation.py: only human turns count; one image without `<image>` goes before the first
    human turn (after a system turn); a `<image>` in a gpt or system turn is a mismatch, never literal text."""
    from operators.conversation import ConversationProblem, check_conversation, count_placeholders

    sys_first = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What?"},
                 {"from": "gpt", "value": "A cat."}]
    turns, problem = check_conversation(sys_first, 1)
    assert problem is None and turns[1]["value"] == "<image>\nWhat?" and sys_first[1]["value"] == "What?"
    assert count_placeholders(turns) == 1
    later = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
             {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "A dog."}]
    assert check_conversation(later, 1) == (later, None)  # the author's place is kept, no second placeholder
    in_answer = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "An <image> tag."}]
    assert check_conversation(in_answer, 1)[1] is ConversationProblem.IMAGE_COUNT_MISMATCH
    two = [{"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Same."}]
    assert check_conversation(two, 2)[1] is ConversationProblem.IMAGE_COUNT_MISMATCH  # no prepend for 2 images
    assert check_conversation(two, 0) == (two, None)
