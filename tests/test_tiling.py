"""Tile counts from image sizes must equal what InternVL / transformers' processor makes from pixels."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from model.tiling import (
    RATIO_TABLE_MAX,
    count_tiles,
    dynamic_preprocess,
    find_closest_aspect_ratio,
    max_tiles_per_image,
    target_ratios,
)

ROOT = Path(__file__).resolve().parent.parent


def _processor(max_patches: int = 12):
    """transformers' InternVL image processor with tiling on; the PIL variant when torchvision is absent."""
    try:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil as cls
    except ImportError:  # transformers 4.x: the slow class is the PIL one
        from transformers import GotOcr2ImageProcessor as cls
    return cls(crop_to_patches=True, size={"height": 448, "width": 448}, min_patches=1, max_patches=max_patches)


def _real_images(n: int) -> list[str]:
    """Real drawings and photos of many shapes: Openclipart, Tux Paint stamps, the bundled sample."""
    files = []
    for pattern in ("/usr/share/openclipart/png/**/*.png", "/usr/share/tuxpaint/stamps/**/*.png",
                    str(ROOT / "data/sample/**/*.png"), str(ROOT / "data/sample/**/*.jpg")):
        found = sorted(f for f in glob.glob(pattern, recursive=True) if "broken" not in f)
        step = max(1, len(found) // n)
        files += found[::step][:n]
    return files


def test_target_ratios_in_internvl_order():
    ratios = target_ratios(1, 12)
    assert len(ratios) == len(set(ratios)) and all(1 <= i * j <= 12 for i, j in ratios)
    assert [i * j for i, j in ratios] == sorted(i * j for i, j in ratios)
    assert (1, 1) == ratios[0] and {(12, 1), (1, 12), (3, 4), (4, 3), (2, 6), (6, 2)} <= set(ratios[-6:])
    assert sorted(target_ratios(4, 4)) == [(1, 4), (2, 2), (4, 1)]


def test_target_ratios_equal_internvl_chats_set_comprehension():
    """The table built at import and the direct build give internvl_chat's exact list, tie order included."""
    def internvl(min_num, max_num):  # internvl_chat's dynamic_preprocess, verbatim
        ratios = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                  if min_num <= i * j <= max_num}
        return sorted(ratios, key=lambda x: x[0] * x[1])

    pairs = [(1, m) for m in range(RATIO_TABLE_MAX + 3)] + [(a, b) for b in range(1, 30) for a in range(2, b + 2)]
    for min_num, max_num in pairs:
        assert target_ratios(min_num, max_num) == internvl(min_num, max_num), (min_num, max_num)


def test_hand_worked_grids():
    # Square images: (1,1), (2,2), (3,3) all match the ratio; the bigger grid wins only when the
    # image covers more than half of it (0.5 * 448^2 * i * j).
    assert find_closest_aspect_ratio(1.0, target_ratios(), 600, 600) == (1, 1)  # 360k < 401k
    assert find_closest_aspect_ratio(1.0, target_ratios(), 700, 700) == (2, 2)  # 490k > 401k, < 903k
    assert find_closest_aspect_ratio(1.0, target_ratios(), 1000, 1000) == (3, 3)  # 1M > 903k
    assert count_tiles(600, 600) == 1  # one tile: no thumbnail
    assert count_tiles(700, 700) == 5  # 4 + thumbnail
    assert count_tiles(1000, 1000) == 10
    assert count_tiles(2000, 500) == 5  # 4:1 -> (4, 1) + thumbnail
    assert count_tiles(1000, 1000, max_num=6) == 5  # (2,2) is the largest square grid under 6
    assert count_tiles(1000, 1000, use_thumbnail=False) == 9
    assert count_tiles(5000, 10, max_num=12) == 13  # a strip: (12, 1) + thumbnail
    assert count_tiles(640, 480, max_num=1) == 1


def test_multi_image_division():
    assert max_tiles_per_image(12, 1) == 12
    assert max_tiles_per_image(12, 2) == 6
    assert max_tiles_per_image(12, 5) == 2
    assert max_tiles_per_image(12, 13) == 1  # never below one tile
    assert max_tiles_per_image(6, 4) == 1


def _open_rgb(path: str) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            return im.convert("RGBA").convert("RGB")
    except OSError:  # a damaged file in the wild: not these tests' subject
        return None


def test_counts_match_transformers_on_real_image_sizes():
    files = _real_images(150)
    assert len(files) >= 100, "no real images installed (openclipart-png / tuxpaint-stamps-default)"
    shapes = set()
    for path in files:
        with Image.open(path) as im:  # the header only, as `ivl pack` reads it
            w, h = im.size
        shapes.add(round(w / h, 2))
        for max_num in (12, 6, 3):
            assert count_tiles(w, h, max_num=max_num) == _PROC.get_number_of_image_patches(
                h, w, {"max_patches": max_num}), (path, (w, h), max_num)
    assert len(shapes) >= 30, f"too few aspect ratios among the real images: {sorted(shapes)}"


def _check_pixels(files: list[str], max_nums=(12, 6)) -> int:
    checked = 0
    for max_num in max_nums:
        proc = _processor(max_num)
        for path in files:
            im = _open_rgb(path)
            if im is None:
                continue
            got = proc(images=[im], return_tensors=None)["num_patches"][0]
            assert count_tiles(im.width, im.height, max_num=max_num) == got, (path, im.size, max_num)
            tiles = dynamic_preprocess(im, max_num=max_num)
            assert len(tiles) == got and all(t.size == (448, 448) for t in tiles)
            checked += 1
    return checked


def test_counts_match_transformers_on_real_pixels():
    """The processor run on decoded pixels (a few real images of different shapes)."""
    files = _real_images(150)
    by_shape = {}
    for path in files:
        with Image.open(path) as im:
            by_shape.setdefault(round(im.width / im.height, 1), path)
    picks = [by_shape[k] for k in sorted(by_shape)][:: max(1, len(by_shape) // 6)]
    assert _check_pixels(picks, (12,)) >= 5


@pytest.mark.slow
def test_counts_match_transformers_on_many_real_pixels():
    assert _check_pixels(_real_images(30)) >= 60


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 6000), st.integers(1, 6000), st.integers(1, 24))
def test_counts_match_transformers_for_any_size(width, height, max_num):
    expected = _PROC.get_number_of_image_patches(height, width, {"max_patches": max_num})
    assert count_tiles(width, height, max_num=max_num) == expected


@pytest.mark.parametrize("size", [(30, 2000), (448, 448), (449, 449), (1344, 448), (897, 300), (3000, 2000)])
def test_dynamic_preprocess_row_major(size):
    im = Image.new("RGB", size)
    # Paint each future tile a distinct colour: tile k must come out with colour k (row-major order).
    cols, rows = find_closest_aspect_ratio(size[0] / size[1], target_ratios(), *size)
    big = Image.new("RGB", (448 * cols, 448 * rows))
    for k in range(cols * rows):
        c, r = k % cols, k // cols
        big.paste((k * 20, 0, 0), (c * 448, r * 448, (c + 1) * 448, (r + 1) * 448))
    big = big.resize(size, Image.NEAREST)
    tiles = dynamic_preprocess(big.resize(size, Image.NEAREST))
    assert len(tiles) == count_tiles(*size) == len(dynamic_preprocess(im))
    if cols * rows > 1 and min(size) >= 448:
        for k in range(cols * rows):
            assert abs(tiles[k].getpixel((224, 224))[0] - k * 20) <= 2


_PROC = _processor(12)
