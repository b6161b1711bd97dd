"""image_checks and structure operators on real images (the bundled Tux Paint stamps) and crafted bad ones."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from operators.base import KEEP, REJECT, REVIEW, build_operator
from operators.image_checks import ImageChecks, Structure
from pipeline.schema import rows_to_table


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def noise(h: int, w: int, seed: int = 0) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(
        b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def row(images: list[bytes], text: str | None = None, turns=None) -> dict:
    text = text if text is not None else "<image>\n" * len(images) + "What is shown?"
    conv = turns if turns is not None else [{"from": "human", "value": text}, {"from": "gpt", "value": "A drawing."}]
    return {"id": f"s/{abs(hash((tuple(images), str(conv))))}", "source": "s", "category": "",
            "conversations": conv, "images": images, "meta": "{}"}


def check(rows, **params):
    return build_operator({"op": "image_checks", **params})(rows_to_table(rows))


def test_operators_are_registered():
    assert isinstance(build_operator({"op": "image_checks"}), ImageChecks)
    assert isinstance(build_operator({"op": "structure"}), Structure)


def test_real_images_pass(sample_images):
    imgs = [open(p, "rb").read() for p in sample_images[:6]]
    v = check([row([b]) for b in imgs])
    assert list(v.decision) == [KEEP] * len(imgs), v.rule
    assert (v.columns["score_min_pixel_std"] > 2).all()


def test_undecodable_truncated_and_bomb_images_are_rejected(sample_images):
    real = open(sample_images[0], "rb").read()
    bad = [b"not an image at all", real[: len(real) // 2], bomb_png(100_000, 100_000), bomb_png(20_000, 10_000)]
    v = check([row([b]) for b in bad])
    assert list(v.decision) == [REJECT] * 4
    assert set(v.rule) == {"undecodable_image"}


def test_small_extreme_blank_and_duplicate_images():
    ok = noise(64, 64)
    v = check([row([noise(8, 64)]), row([noise(20, 600, 1)]), row([png(np.full((64, 64, 3), 200, np.uint8))]),
               row([ok, ok]), row([ok, noise(64, 64, 2)])])
    assert v.rule == ["small_image", "extreme_aspect_ratio", "blank_image", "duplicate_image", ""]
    assert v.columns["score_min_pixel_std"][2] == 0.0


def test_checks_switch_off_and_review_action():
    blank = png(np.full((64, 64, 3), 10, np.uint8))
    assert check([row([blank])], min_pixel_std=None).decision[0] == KEEP
    assert check([row([blank])], action="review").decision[0] == REVIEW


# ---------------------------------------------------------------- structure
def structure(rows, **params):
    return build_operator({"op": "structure", **params})(rows_to_table(rows))


def test_structure_rules_hit_and_miss():
    img = noise(32, 32)
    h, g, s = "human", "gpt", "system"
    rows = [
        row([img]),                                                      # fine
        row([img], text="What is shown?"),                               # one image, no placeholder: prepended
        row([img, noise(32, 32, 3)], text="<image>\nCompare."),          # 1 placeholder, 2 images
        row([], turns=[{"from": g, "value": "Hi"}, {"from": h, "value": "Hello"}]),  # starts with gpt
        row([], turns=[{"from": h, "value": "a"}, {"from": h, "value": "b"}]),       # no alternation
        row([], turns=[{"from": s, "value": "Be brief."}, {"from": h, "value": "Hi"}, {"from": g, "value": "Hello"}]),
        row([], turns=[{"from": h, "value": "Hi"}, {"from": g, "value": "   "}]),    # empty answer
        row([], turns=[]),
        row([], turns=[{"from": h, "value": "你好"}, {"from": g, "value": "你好！" * 50}]),
    ]
    v = structure(rows)
    # row 1 is kept: InternVL prepends `<image>` to a single-image sample (internvl_chat_finetune.py,
    # multi_modal_get_item), and so do ingest and the tokenizer (operators/conversation.py)
    assert v.rule == ["", "", "placeholder_mismatch", "bad_roles", "bad_roles", "",
                      "empty_answer", "no_turns", ""]
    assert (v.decision[[2, 3, 4, 6, 7]] == REJECT).all()
    answer_tag = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "An <image> tag."}]
    assert structure([row([img], turns=answer_tag)]).rule == ["placeholder_mismatch"]  # gpt turns never hold images


def test_over_long_by_chars_and_by_tokens(tmp_path):
    long_text = "word " * 5000
    v = structure([row([], turns=[{"from": "human", "value": "Q"}, {"from": "gpt", "value": long_text}])],
                  max_chars=10_000, long_action="review")
    assert v.rule == ["too_many_chars"] and v.decision[0] == REVIEW
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "word": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    v = structure([row([], turns=[{"from": "human", "value": "Q"}, {"from": "gpt", "value": long_text}])],
                  max_chars=None, max_tokens=1000, tokenizer=path)
    assert v.rule == ["too_many_tokens"] and v.columns["score_num_tokens"][0] == 5001
    with pytest.raises(ValueError):
        build_operator({"op": "structure", "max_tokens": 10})


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 3), st.integers(0, 3))
def test_placeholder_count_must_equal_image_count(n_placeholders, n_images):
    imgs = [noise(16, 16, k) for k in range(n_images)]
    v = structure([row(imgs, text="<image>" * n_placeholders + " Describe.")])
    prepended = n_images == 1 and n_placeholders == 0  # InternVL's single-image rule
    assert (v.rule[0] == "placeholder_mismatch") == (n_placeholders != n_images and not prepended)


# ---------------------------------------------------------------- operators/images.py: one probing policy
def test_image_probe_problems_are_typed(sample_images):
    from operators.images import ImageError, ImageProblem, decode_draft, decode_image, image_size

    real = open(sample_images[0], "rb").read()
    assert image_size(real) == decode_image(real).size == decode_draft(real, "L", 16)[0]
    cases = {b"": ImageProblem.NOT_AN_IMAGE, b"not an image": ImageProblem.NOT_AN_IMAGE,
             bomb_png(100_000, 100_000): ImageProblem.TOO_MANY_PIXELS, real[: len(real) - 40]: ImageProblem.BROKEN_DATA}
    for data, problem in cases.items():
        with pytest.raises(ImageError) as err:
            decode_image(data)
        assert err.value.problem is problem
    assert image_size(bomb_png(9_000, 9_000)) == (9_000, 9_000)  # the header alone reads: no pixel is decoded
    with pytest.raises(ImageError) as err:
        image_size(bomb_png(9_000, 9_000), max_pixels=1_000_000)
    assert err.value.problem is ImageProblem.TOO_MANY_PIXELS
