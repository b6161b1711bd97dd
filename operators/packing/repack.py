"""The end of a stream: repack what is left, first-fit decreasing under both budgets, then search.

A streaming packer ends with its open buffers and its reserve of small samples; flushed as they are,
the last buffers leave half full (issue 11: 1,500 real samples at 8,192 tokens / 24 tiles ended at
1.042x the lower bound). Repacking those records from scratch, largest first into the first pack
where both budgets hold, fills all but the last one or two packs. It runs once per partition over
at most `buffer_size` packs plus the reserve, so its O(records x packs) scan costs nothing next to
tokenizing them.

`pack_offline` goes further when FFD ends above the lower bound (bounds.py) of what it packed: a local
search empties the emptiest packs into the others (moves, and swaps for a smaller record), then on a
small set an exact depth-first search for a packing at the bound (largest first, waste pruning,
a fixed node budget so the result never depends on the machine). On the bench's length workload
FFD over 100 samples (seed 2) makes 14 packs for a bound of 13; the search finds 13 in 582 nodes.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from operators.packing.bounds import lower_bound
from operators.packing.sample import Pack, Record

EXACT_NODES = 20_000  # exact search budget: ~0.3 CPU-s at 136 packs, found within it on every bench set it can
EXACT_RECORDS = 600  # and only over this many records (one recursion level per record)
SEARCH_TRIES = 8  # emptiest packs the local search tries to empty, per pack it removes
SEARCH_SWAPS = 2000  # swaps per try


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


def pack_offline(records: Iterable[Record], max_tokens: int, max_tiles: int, exact_nodes: int = EXACT_NODES) -> list[Pack]:
    """`first_fit_decreasing`, then, while above the lower bound of `records`, the local search and
    the exact search of the module docstring; a pure function of the input order."""
    recs = list(records)
    packs = first_fit_decreasing(recs, max_tokens, max_tiles)
    bound = lower_bound(recs, max_tokens, max_tiles)
    if len(packs) > bound:
        packs = empty_packs(packs, max_tokens, max_tiles, bound)
    if len(packs) > bound and len(recs) <= EXACT_RECORDS and exact_nodes > 0:
        found = exact_fit(recs, max_tokens, max_tiles, bound, exact_nodes)
        if found:
            packs = found
    return packs


def empty_packs(packs: list[Pack], max_tokens: int, max_tiles: int, bound: int = 0) -> list[Pack]:
    """Local search: take the emptiest pack's records out and place them in the others (best fit, else
    swapped for a smaller record of a pack, which is then placed in turn); on success that pack is
    gone. Tries the SEARCH_TRIES emptiest packs, again after each success, until `bound` is reached."""
    bins = [[p.tokens, p.tiles, list(p.records)] for p in packs]
    while len(bins) > bound:
        order = sorted(range(len(bins)), key=lambda i: (max(bins[i][0] * max_tiles, bins[i][1] * max_tokens), i))
        for i in order[:SEARCH_TRIES]:
            trial = [[b[0], b[1], list(b[2])] for j, b in enumerate(bins) if j != i]
            if _place(bins[i][2], trial, max_tokens, max_tiles):
                bins = trial
                break
        else:
            break
    return [Pack(*b) for b in bins]


def _place(recs: list[Record], bins: list[list], max_tokens: int, max_tiles: int) -> bool:
    """Place `recs` into `bins` (largest first, best fit; else swap one for a smaller record of a pack,
    that record placed next), at most SEARCH_SWAPS swaps; False if one cannot be placed."""
    T, K = max_tokens, max_tiles

    def size(r: Record) -> int:  # sum of both budgets' shares, in integers
        return r[0] * K + r[1] * T

    pool = [(-size(r), n, r) for n, r in enumerate(recs)]
    heapq.heapify(pool)
    n, swaps = len(recs), SEARCH_SWAPS
    while pool:
        x = heapq.heappop(pool)[2]
        t, k = x[0], x[1]
        best, best_room = None, 0
        for b in bins:
            if b[0] + t <= T and b[1] + k <= K:
                room = (T - b[0] - t) * K + (K - b[1] - k) * T
                if best is None or room < best_room:
                    best, best_room = b, room
        if best is not None:
            best[0], best[1] = best[0] + t, best[1] + k
            best[2].append(x)
            continue
        swaps -= 1
        if swaps < 0:
            return False
        sx, cand = size(x), None
        for b in bins:
            ft, fk = T - b[0] - t, K - b[1] - k  # negative: what a swapped-out record must free
            for j, y in enumerate(b[2]):
                if y[0] + ft >= 0 and y[1] + fk >= 0 and size(y) < sx:
                    room = (ft + y[0]) * K + (fk + y[1]) * T
                    if cand is None or room < cand[0]:
                        cand = (room, b, j)
        if cand is None:
            return False
        _, b, j = cand
        y, b[2][j] = b[2][j], x
        b[0], b[1] = b[0] + t - y[0], b[1] + k - y[1]
        n += 1
        heapq.heappush(pool, (-size(y), n, y))
    return True


def exact_fit(records: list[Record], max_tokens: int, max_tiles: int, n_packs: int,
              node_limit: int = EXACT_NODES) -> list[Pack] | bool | None:
    """Packs of `records` in at most `n_packs`, by depth-first search (largest tokens first, into each
    distinct open pack or one new one); False when none exists (the search was exhaustive), None
    when `node_limit` ran out first. Pruned by waste: token room that no remaining record fits."""
    T, K = max_tokens, max_tiles
    order = sorted(range(len(records)), key=lambda i: (-records[i][0], -records[i][1], i))
    its = [records[i] for i in order]
    n = len(its)
    suf_t, suf_k, min_t = [0] * (n + 1), [0] * (n + 1), [T + 1] * (n + 1)
    for i in range(n - 1, -1, -1):
        suf_t[i], suf_k[i] = suf_t[i + 1] + its[i][0], suf_k[i + 1] + its[i][1]
        min_t[i] = min(min_t[i + 1], its[i][0])
    load_t, load_k, where = [0] * n_packs, [0] * n_packs, [0] * n
    nodes = 0

    def dfs(i: int, used: int) -> bool:
        nonlocal nodes
        if i == n:
            return True
        nodes += 1
        if nodes > node_limit:
            raise _OutOfNodes
        t, k, m = its[i][0], its[i][1], min_t[i]
        room = sum(T - lt for lt in load_t[:used] if T - lt >= m)  # waste excluded
        room_k = used * K - sum(load_k[:used])
        free = n_packs - used
        if suf_t[i] > room + free * T or suf_k[i] > room_k + free * K:
            return False
        seen = set()
        for b in range(used):
            lt, lk = load_t[b], load_k[b]
            if lt + t <= T and lk + k <= K and (lt, lk) not in seen:
                seen.add((lt, lk))  # packs with equal loads are interchangeable
                load_t[b], load_k[b], where[i] = lt + t, lk + k, b
                if dfs(i + 1, used):
                    return True
                load_t[b], load_k[b] = lt, lk
        if used < n_packs:
            load_t[used], load_k[used], where[i] = t, k, used
            if dfs(i + 1, used + 1):
                return True
            load_t[used] = load_k[used] = 0
        return False

    try:
        if not dfs(0, 0):
            return False
    except _OutOfNodes:
        return None
    bins: list[list[Record]] = [[] for _ in range(n_packs)]
    for i in range(n):
        bins[where[i]].append(its[i])
    return [Pack(sum(r[0] for r in b), sum(r[1] for r in b), b) for b in bins if b]


class _OutOfNodes(Exception):
    pass


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
    `Packer` and finished by `pack_offline`, its packs short of `fill` repacked with every other
    partition's in one tail (pipeline/pack_job.py runs the same steps as Ray tasks). The exact search
    runs in the tail, and in a partition only when it is the only one (it sees the whole set; with a
    tail after it, the tail gets the partition's sparse packs a second time). For the benchmark and the
    property tests."""
    from operators.packing.packer import Packer

    out, tail = [], []
    for recs in partitions:
        packer = Packer(max_tokens, max_tiles, exact_nodes=EXACT_NODES if len(partitions) == 1 else 0, **packer_kw)
        out += packer.add_many(recs)
        full, sparse = split_tail(packer.finish(), max_tokens, max_tiles, fill)
        out += full
        tail += [r for p in sparse for r in p.records]
    return out + pack_offline(tail, max_tokens, max_tiles)
