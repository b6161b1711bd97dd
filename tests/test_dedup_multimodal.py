"""Multimodal dedup (issue 12 item 6): templated VQA rows over different real images are not
duplicates unless `text_only: true`; texts that normalise to nothing never make an exact group."""

from __future__ import annotations

import glob

import pyarrow as pa
import pytest
from conftest import SAMPLE

from operators.dedup.exact import content_hash, content_hashes
from pipeline.dedup_stage import DedupConfig, dedup_decisions, image_identity
from pipeline.schema import rows_to_table

QUESTION = "<image>\nWhat does this Tux Paint stamp show? Describe it in one sentence for a child."
ANSWER = ("This is a colourful Tux Paint stamp drawn with bold black outlines and flat bright colours, the kind of "
          "picture a child can place anywhere on the canvas with one click, and it shows {}.")


def _images() -> list[bytes]:
    paths = sorted(p for p in glob.glob(str(SAMPLE / "images" / "**" / "*.png"), recursive=True) if "broken" not in p)
    out = {}
    for p in paths:
        data = open(p, "rb").read()
        out.setdefault(data, p)
    return list(out)[:8]


def _row(rid: str, answer: str, images: list[bytes]) -> dict:
    return {"id": rid, "source": "vqa", "category": "general", "meta": "{}", "images": images,
            "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": answer}]}


@pytest.fixture(scope="module")
def vqa_rows() -> list[dict]:
    """6 templated rows on 6 different real images (3 identical answers, 3 near-identical ones), and
    a control: a second row on image 0 with a near-identical answer (a real duplicate)."""
    imgs = _images()
    assert len(imgs) >= 6
    rows = [_row(f"vqa/{i}", ANSWER.format("a friendly animal"), [imgs[i]]) for i in range(3)]
    rows += [_row(f"vqa/{i}", ANSWER.format(f"a friendly animal number {i}"), [imgs[i]]) for i in range(3, 6)]
    rows.append(_row("vqa/9-copy-of-0", ANSWER.format("a friendly animal, really"), [imgs[0]]))
    return rows


def test_image_identity_is_of_the_bytes_in_order():
    a, b = b"\x89PNG-a", b"\x89PNG-b"
    assert image_identity([]) == image_identity(None) == 0
    assert image_identity([a]) == image_identity([bytes(a)]) != image_identity([b])
    assert image_identity([a, b]) != image_identity([b, a])


def test_templated_vqa_on_different_images_is_kept_unless_text_only(ray_local, vqa_rows):
    ds = ray_local.data.from_items(vqa_rows)
    default = {r["id"]: (r["dedup_rule"], r["dup_of"]) for r in dedup_decisions(ds, DedupConfig()).take_all()}
    assert default == {"vqa/9-copy-of-0": ("minhash", "vqa/0")}  # only the row on the same image
    text_only = {r["id"]: r["dup_of"] for r in dedup_decisions(ds, DedupConfig(text_only=True)).take_all()}
    # images ignored: every templated row is a near-duplicate of the lowest id
    assert text_only == {r["id"]: "vqa/0" for r in vqa_rows if r["id"] != "vqa/0"}


def test_texts_that_normalise_to_nothing_are_never_exact_duplicates(ray_local):
    assert content_hash("!!! ... ???") is None and content_hash("") is None
    assert content_hash("Hello, world") == content_hash("hello world")
    empty = [{"id": f"e/{i}", "source": "e", "category": "", "meta": "{}", "images": [],
              "conversations": [{"from": "human", "value": v}]} for i, v in enumerate(["", "...", "!!!", " \n "])]
    both = empty + [{**empty[0], "id": "e/9", "conversations": [{"from": "human", "value": "Real words here"}]},
                    {**empty[0], "id": "e/8", "conversations": [{"from": "human", "value": "real WORDS, here!"}]}]
    assert content_hashes(rows_to_table(both))[:4] == [None] * 4
    got = {r["id"]: (r["dedup_rule"], r["dup_of"]) for r in
           dedup_decisions(ray_local.data.from_arrow(rows_to_table(both)), DedupConfig(minhash=False)).take_all()}
    assert got == {"e/9": ("exact", "e/8")}


def test_text_only_is_a_config_setting():
    assert DedupConfig().text_only is False
    assert DedupConfig(text_only=True).text_only is True
    with pytest.raises(Exception, match="text_only"):
        DedupConfig(text_only="sometimes")
    assert pa.types.is_uint64(pa.array([image_identity([b"x"])], pa.uint64()).type)
