"""Step 1, Select (InternVL 2.5 §4.2): one stream of samples from several sources mixed by weight,
with over-budget samples cut into pieces that fit."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence

from operators.packing.sample import Piece, Record, Unpackable, split_sample


def select_samples(
    sources: Sequence[Iterable[Piece | Record]],
    weights: Sequence[float] | None = None,
    seed: int = 0,
    max_tokens: int = 16384,
    max_tiles: int = 48,
    on_reject: Callable[[Piece | Record, str], None] | None = None,
) -> Iterator[Piece | Record]:
    """Yield samples (or pieces of samples) that each fit both budgets.

    At every step a source is drawn with probability proportional to its weight among the sources
    not yet exhausted (a seeded `random.Random`, so the stream is the same for the same seed and
    inputs). A sample over a budget is split by `split_sample`; one that cannot be split (a single
    image block over a budget, or a light Record, which has no token boundaries) goes to
    `on_reject(sample, reason)`, or raises `Unpackable` when no callback is given."""
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
        if sample.tokens <= max_tokens and sample.tiles <= max_tiles:
            yield sample
            continue
        try:
            if not isinstance(sample, Piece):
                raise Unpackable("over_budget", f"{sample.tokens} tokens, {sample.tiles} tiles")
            yield from split_sample(sample, max_tokens, max_tiles)
        except Unpackable as e:
            if on_reject is None:
                raise
            on_reject(sample, e.reason)
