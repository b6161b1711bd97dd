"""InternVL's dynamic high-resolution tiling (InternVL 2.5 report, arXiv 2412.05271;
internvl_chat's `dynamic_preprocess`).

It follows the public `internvl_chat` code line by line, so a tile count computed here from an image's
size alone equals what training produces from its pixels, and what transformers'
`GotOcr2ImageProcessor(crop_to_patches=True)` produces (tests/test_tiling.py checks both).
"""

from __future__ import annotations

from PIL import Image

IMAGE_SIZE = 448  # InternViT input resolution, InternVL 2.5 §3.1
TOKENS_PER_TILE = 256  # 1024 patches, pixel unshuffle 0.5 -> 256 tokens per tile
RATIO_TABLE_MAX = 64  # grids for min_num 1 and max_num up to this are built once, at import


def _build_ratios(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    # internvl_chat builds a set and sorts it by area: the set's order decides exact ties, so it must be
    # the same set, built by the same first insertions (CPython's set order of small int tuples is fixed).
    # Its comprehension over n, i, j first meets (i, j) at n = max(min_num, i, j); the grids new at each n
    # are added here in that order, without its O(max_num^3) loop (tests/test_tiling.py compares both).
    ratios = set()
    for n in range(min_num, max_num + 1):
        new = [(i, j) for i in range(1, n + 1) for j in range(1, n + 1)] if n == min_num else \
            [*((i, n) for i in range(1, n)), *((n, j) for j in range(1, n + 1))]
        ratios.update(r for r in new if min_num <= r[0] * r[1] <= max_num)
    return tuple(sorted(ratios, key=lambda x: x[0] * x[1]))


RATIOS = tuple(_build_ratios(1, m) for m in range(RATIO_TABLE_MAX + 1))  # RATIOS[max_num], min_num 1


def _ratios(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    return RATIOS[max_num] if min_num == 1 and 0 <= max_num <= RATIO_TABLE_MAX else _build_ratios(min_num, max_num)


def target_ratios(min_num: int = 1, max_num: int = 12) -> list[tuple[int, int]]:
    """Candidate grids (columns, rows) with min_num <= columns*rows <= max_num, in InternVL's order."""
    return list(_ratios(min_num, max_num))


def find_closest_aspect_ratio(
    aspect_ratio: float, target_ratios: list[tuple[int, int]], width: int, height: int, image_size: int = IMAGE_SIZE
) -> tuple[int, int]:
    """The grid whose columns/rows is closest to width/height; on a tie the later (larger) grid wins
    when the image covers more than half of it (InternVL's `find_closest_aspect_ratio`)."""
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for ratio in target_ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def _grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    return find_closest_aspect_ratio(width / height, _ratios(min_num, max_num), width, height, image_size)


def count_tiles(
    width: int, height: int, max_num: int = 12, min_num: int = 1, use_thumbnail: bool = True, image_size: int = IMAGE_SIZE
) -> int:
    """Tiles `dynamic_preprocess` makes for a width x height image, thumbnail included."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is not positive")
    cols, rows = _grid(int(width), int(height), int(min_num), int(max_num), int(image_size))
    blocks = cols * rows
    return blocks + 1 if use_thumbnail and blocks != 1 else blocks


def dynamic_preprocess(
    image: Image.Image, max_num: int = 12, min_num: int = 1, image_size: int = IMAGE_SIZE, use_thumbnail: bool = True
) -> list[Image.Image]:
    """Resize to the chosen grid, cut row-major into image_size tiles, append a thumbnail if >1 tile."""
    width, height = image.size
    cols, rows = _grid(width, height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = []
    for i in range(cols * rows):
        c, r = i % cols, i // cols
        tiles.append(resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def max_tiles_per_image(max_dynamic_patch: int, n_images: int) -> int:
    """Per-image `max_num` for a multi-image sample: the sample's budget divided among its images."""
    return max(1, int(max_dynamic_patch) // max(1, int(n_images)))
