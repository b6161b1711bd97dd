"""Random JPEG compression at train time (InternVL 2.5, arXiv 2412.05271: quality 75-100) and the pixel path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest_train import real_images
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from model.tiling import count_tiles, dynamic_preprocess
from train.data import JPEG_QUALITY, image_tiles, jpeg_degrade, normalize, prepare_pack


@pytest.fixture(scope="module")
def photo() -> bytes:
    """A real image wide enough to give several tiles plus the thumbnail."""
    img = Image.open(io.BytesIO(real_images(1)[0])).convert("RGB").resize((900, 450))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _plain_tiles(data: bytes, max_tiles: int) -> list[Image.Image]:
    return dynamic_preprocess(Image.open(io.BytesIO(data)).convert("RGB"), max_num=max_tiles)


def test_off_means_exact_pixels(photo):
    tiles, q = image_tiles(photo, 4, count_tiles(900, 450, max_num=4), False, np.random.default_rng(0))
    assert q == []
    expected = np.stack([normalize(t) for t in _plain_tiles(photo, 4)])
    np.testing.assert_array_equal(tiles, expected)
    # ImageNet normalisation: a white pixel maps to (1 - mean) / std
    white = normalize(Image.new("RGB", (2, 2), (255, 255, 255)))[:, 0, 0]
    np.testing.assert_allclose(
        white, (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-6
    )


def test_on_means_each_tile_jpeg_at_a_quality_in_range(photo):
    n = count_tiles(900, 450, max_num=4)
    tiles, qualities = image_tiles(photo, 4, n, True, np.random.default_rng(1))
    plain = _plain_tiles(photo, 4)
    assert len(qualities) == n == len(plain) > 1  # thumbnail included
    for tile, q, src in zip(tiles, qualities, plain):
        assert JPEG_QUALITY[0] <= q <= JPEG_QUALITY[1]
        np.testing.assert_array_equal(tile, normalize(jpeg_degrade(src, q)))
        assert not np.array_equal(tile, normalize(src))  # JPEG really changed the pixels
        # the change is what quality q does: no more than the lowest allowed quality would do
        worst = np.abs(normalize(jpeg_degrade(src, JPEG_QUALITY[0])) - normalize(src)).mean()
        assert np.abs(tile - normalize(src)).mean() <= worst * 1.05


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_quality_draws_stay_in_range(seed):
    tile = Image.new("RGB", (448, 448), (seed % 255, 40, 200))
    buf = io.BytesIO()
    tile.save(buf, format="PNG")
    _, q = image_tiles(buf.getvalue(), 1, 1, True, np.random.default_rng(seed))
    assert JPEG_QUALITY[0] <= q[0] <= JPEG_QUALITY[1]


def test_draws_cover_the_whole_range():
    draws = np.random.default_rng(0).integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, size=5000)
    assert draws.min() == 75 and draws.max() == 100  # inclusive of 100, like InternVL's qualities list


def test_only_images_with_augment_on_change(photo):
    other = real_images(2)[1]
    w, h = Image.open(io.BytesIO(other)).size
    n1, n2 = count_tiles(900, 450, max_num=2), count_tiles(w, h, max_num=2)
    row = {
        "input_ids": [1, 2],
        "labels": [-100, 2],
        "position_ids": [0, 1],
        "cu_seqlens": [0, 2],
        "sample_ids": ["a"],
        "images": [photo, other],
        "tiles_per_image": [n1, n2],
        "image_max_tiles": [2, 2],
        "image_augment": [False, True],
    }
    out = prepare_pack(row, np.random.default_rng(3))
    pix = out["pixel_values"]
    assert pix.shape == (n1 + n2, 3, 448, 448) and out["has_image"]
    np.testing.assert_array_equal(pix[:n1], np.stack([normalize(t) for t in _plain_tiles(photo, 2)]))
    plain2 = np.stack([normalize(t) for t in _plain_tiles(other, 2)])
    assert all(not np.array_equal(a, b) for a, b in zip(pix[n1:], plain2))


def test_tile_count_mismatch_is_refused(photo):
    with pytest.raises(ValueError, match="re-tiles"):
        image_tiles(photo, 4, 2, False, np.random.default_rng(0))


def test_pure_text_pack_gets_one_zero_dummy_tile():
    row = {
        "input_ids": [1, 2, 3],
        "labels": [-100, 2, 3],
        "position_ids": [0, 1, 2],
        "cu_seqlens": [0, 3],
        "sample_ids": ["t"],
        "images": [],
        "tiles_per_image": [],
        "image_max_tiles": [],
        "image_augment": [],
    }
    out = prepare_pack(row, np.random.default_rng(0))
    assert out["pixel_values"].shape == (1, 3, 448, 448) and not out["pixel_values"].any()
    assert not out["has_image"] and out["num_tiles"] == 0
