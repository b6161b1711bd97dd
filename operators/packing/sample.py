"""What the packer moves around: light records, tokenized pieces, and packs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np


class Record(NamedTuple):
    """The packer's unit: its cost under the two budgets and an opaque payload carried along."""

    tokens: int
    tiles: int
    payload: Any = None


class Pack(NamedTuple):
    """One packed sequence: its totals and the records in the order they were packed."""

    tokens: int
    tiles: int
    records: list[Record]


class Unpackable(ValueError):
    """A sample that no cut can make fit (one image block over a budget); `reason` names the rule."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(slots=True)
class Piece:
    """A tokenized sample, or one piece of a sample cut to fit the budgets."""

    sample_id: str  # the canonical id, or "<id>#<k>" for piece k of a split sample
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, -100 where not learned
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each <img>..</img>
    tiles_per_image: list[int] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    image_max_tiles: list[int] = field(default_factory=list)  # max_num used for each image's tiling
    image_augment: list[bool] = field(default_factory=list)
    part: int = -1  # k for piece k of a split sample, -1 for a whole sample
    last: bool = True  # False for every piece of a split sample except its last one

    @property
    def tokens(self) -> int:
        return len(self.input_ids)

    @property
    def tiles(self) -> int:
        return sum(self.tiles_per_image)

    def record(self) -> Record:
        return Record(self.tokens, self.tiles, self)


def unpackable_reason(
    image_spans: list[tuple[int, int]], tiles_per_image: list[int], max_tokens: int, max_tiles: int
) -> str:
    """"image_over_budget" when one image block alone exceeds a budget (no cut can help), else ""."""
    for (s, e), t in zip(image_spans, tiles_per_image):
        if e - s > max_tokens or t > max_tiles:
            return "image_over_budget"
    return ""


def split_sample(sample: Piece, max_tokens: int, max_tiles: int) -> list[Piece]:
    """Cut an over-budget sample into pieces that fit both budgets, never inside `<img>..</img>`.

    Greedy: each piece takes as many tokens as fit, stopping before the first image block that
    would cross the token budget or the tile budget, so every piece but the last is as full as the
    image blocks allow. Each piece keeps its slice of the labels (InternVL 2.5 §4.2, Select)."""
    if sample.tokens <= max_tokens and sample.tiles <= max_tiles:
        return [sample]
    spans, tpi, n = sample.image_spans, sample.tiles_per_image, sample.tokens
    cuts = []  # (start, end, first image, end image)
    start = img = 0
    while start < n:
        end, tiles, j = min(start + max_tokens, n), 0, img
        while j < len(spans) and spans[j][0] < end:
            s, e = spans[j]
            if e > end or tiles + tpi[j] > max_tiles:
                end = s
                break
            tiles += tpi[j]
            j += 1
        if end <= start:
            s, e = spans[j]
            raise Unpackable(
                "image_over_budget", f"image {j} of {sample.sample_id}: {e - s} tokens, {tpi[j]} tiles"
            )
        cuts.append((start, end, img, j))
        start, img = end, j
    pieces = []
    for k, (s, e, i, j) in enumerate(cuts):
        pieces.append(
            Piece(
                sample_id=f"{sample.sample_id}#{k}",
                input_ids=sample.input_ids[s:e],
                labels=sample.labels[s:e],
                image_spans=[(a - s, b - s) for a, b in spans[i:j]],
                tiles_per_image=tpi[i:j],
                images=sample.images[i:j],
                image_max_tiles=sample.image_max_tiles[i:j],
                image_augment=sample.image_augment[i:j],
                part=k,
                last=k == len(cuts) - 1,
            )
        )
    return pieces
