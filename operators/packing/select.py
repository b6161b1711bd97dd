"""Step 1, Select (InternVL 2.5 §4.2): one stream of samples from several sources mixed by weight,
with over-budget samples cut into pieces that fit."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from operators.packing.sample import Piece, Record, Unpackable, split_sample

IGNORE_INDEX = -100  # labels not learned (model.tokenizer.IGNORE_INDEX)


def has_answer(piece: Piece) -> bool:
    """Whether a piece has a supervised token: a pack of pieces without one has a loss denominator of 0
    (NaN in every parameter after one step, issue 13), which InternVL's `check_valid` also refuses."""
    return bool(np.any(piece.labels != IGNORE_INDEX))


def answered_pieces(pieces: list[Piece], on_drop: Callable[[Piece], None] | None = None) -> list[Piece]:
    """The pieces of a split sample that have supervised tokens, the last of them marked `last`;
    each dropped one goes to `on_drop` (e.g. a 5-image sample cut at 4 tiles: its piece holding
    only the fifth image and no answer)."""
    kept = [p for p in pieces if has_answer(p)]
    if on_drop is not None:
        for p in pieces:
            if not has_answer(p):
                on_drop(p)
    if kept and not kept[-1].last:
        kept[-1].last = True
    return kept


def select_samples(
    sources: Sequence[Iterable[Piece | Record]],
    weights: Sequence[float] | None = None,
    seed: int = 0,
    max_tokens: int = 16384,
    max_tiles: int = 48,
    on_reject: Callable[[Piece | Record, str], None] | None = None,
    on_drop: Callable[[Piece], None] | None = None,
) -> Iterator[Piece | Record]:
    """Yield samples (or pieces of samples) that each fit both budgets.

    At every step a source is drawn with probability proportional to its weight among the sources
    not yet exhausted (a seeded `random.Random`, so the stream is the same for the same seed and
    inputs). A sample over a budget is split by `split_sample`; one that cannot be split (a single
    image block over a budget, or a light Record, which has no token boundaries) goes to
    `on_reject(sample, reason)`, or raises `Unpackable` when no callback is given; so does a Piece
    with no supervised token at all (reason "no_answer"). Of a split sample's pieces, those without
    a supervised token are dropped and passed to `on_drop` (`answered_pieces`)."""
    iters = [iter(s) for s in sources]
    w = [1.0] * len(iters) if weights is None else [float(x) for x in weights]
    if len(w) != len(iters) or any(x <= 0 for x in w):
        raise ValueError(f"need one positive weight per source, got {weights!r} for {len(iters)} sources")
    rng = random.Random(seed)
    active = list(range(len(iters)))
    while active:
        k = active[0] if len(active) == 1 else rng.choices(active, weights=[w[i] for i in active])[0]
        try:
            sample = next(iters[k])
        except StopIteration:
            active.remove(k)
            continue
        try:
            if isinstance(sample, Piece) and not has_answer(sample):
                raise Unpackable("no_answer", f"{sample.sample_id} has no supervised token")
            if sample.tokens <= max_tokens and sample.tiles <= max_tiles:
                yield sample
                continue
            if not isinstance(sample, Piece):
                raise Unpackable("over_budget", f"{sample.tokens} tokens, {sample.tiles} tiles")
            yield from answered_pieces(split_sample(sample, max_tokens, max_tiles), on_drop)
        except Unpackable as e:
            if on_reject is None:
                raise
            on_reject(sample, e.reason)
