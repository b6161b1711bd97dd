"""The end of a stream: repack what is left, first-fit decreasing under both budgets.

A streaming packer ends with its open buffers and its reserve of small samples; flushed as they are,
the last buffers leave half full (issue 11: 1,500 real samples at 8,192 tokens / 24 tiles ended at
1.042x the lower bound). Repacking those records from scratch, largest first into the first pack
where both budgets hold, fills all but the last one or two packs. It runs once per partition over
at most `buffer_size` packs plus the reserve, so its O(records x packs) scan costs nothing next to
tokenizing them.
"""

from __future__ import annotations

from collections.abc import Iterable

from operators.packing.sample import Pack, Record


def first_fit_decreasing(records: Iterable[Record], max_tokens: int, max_tiles: int) -> list[Pack]:
    """Packs of `records` (each within both budgets): by decreasing size, each into the first pack
    that holds it under both budgets, else a new one. Two budgets make "size" ambiguous, so three
    orders are tried (the larger share of a budget, the sum of both shares, tokens) and the one with
    the fewest packs wins, the first on a tie: over whole small sets of the bench's length workload
    no one order is always best (300 samples, seed 1: 42/41 packs by max share/sum; 1,000 seed 1:
    138/136). Ties inside an order keep the input order, so the result is a pure function of the input."""
    recs = list(records)
    for r in recs:
        if r[0] > max_tokens or r[1] > max_tiles or r[0] <= 0 or r[1] < 0:
            raise ValueError(f"record ({r[0]} tokens, {r[1]} tiles) is outside the budgets")
    keys = (
        lambda r: (-max(r[0] * max_tiles, r[1] * max_tokens), -r[0], -r[1]),  # exact integer shares
        lambda r: (-(r[0] * max_tiles + r[1] * max_tokens), -r[0]),
        lambda r: (-r[0], -r[1]),
    )
    best = None
    for key in keys:
        packs = _first_fit(recs, sorted(range(len(recs)), key=lambda i: (*key(recs[i]), i)), max_tokens, max_tiles)
        if best is None or len(packs) < len(best):
            best = packs
    return best


def _first_fit(recs: list[Record], order: list[int], max_tokens: int, max_tiles: int) -> list[Pack]:
    packs: list[list] = []  # [tokens, tiles, records]
    for i in order:
        rec = recs[i]
        tokens, tiles = rec[0], rec[1]
        for p in packs:
            if p[0] + tokens <= max_tokens and p[1] + tiles <= max_tiles:
                p[0] += tokens
                p[1] += tiles
                p[2].append(rec)
                break
        else:
            packs.append([tokens, tiles, [rec]])
    return [Pack(*p) for p in packs]


def is_nearly_full(pack: Pack, max_tokens: int, max_tiles: int, fill: float = 0.99) -> bool:
    """Whether a pack reaches `fill` of either budget (the one that binds it); packs short of that
    are worth repacking with other partitions' leftovers."""
    return pack.tokens >= fill * max_tokens or pack.tiles >= fill * max_tiles


def split_tail(packs: list[Pack], max_tokens: int, max_tiles: int, fill: float = 0.99) -> tuple[list[Pack], list[Pack]]:
    """(packs to write now, packs whose records go to the tail repack): the end of a partition."""
    full = [p for p in packs if is_nearly_full(p, max_tokens, max_tiles, fill)]
    return full, [p for p in packs if not is_nearly_full(p, max_tokens, max_tiles, fill)]


def pack_partitioned(
    partitions: list[list[Record]], max_tokens: int, max_tiles: int, fill: float = 0.99, **packer_kw
) -> list[Pack]:
    """The `ivl pack` plan over light records, in one process: each partition streamed through its own
    `Packer` and finished first-fit decreasing, its packs short of `fill` repacked with every other
    partition's in one tail (pipeline/pack_job.py runs the same steps as Ray tasks). For the benchmark
    and the property tests."""
    from operators.packing.packer import Packer

    out, tail = [], []
    for recs in partitions:
        packer = Packer(max_tokens, max_tiles, **packer_kw)
        out += packer.add_many(recs)
        full, sparse = split_tail(packer.finish(), max_tokens, max_tiles, fill)
        out += full
        tail += [r for p in sparse for r in p.records]
    return out + first_fit_decreasing(tail, max_tokens, max_tiles)
