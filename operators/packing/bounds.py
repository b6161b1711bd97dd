"""Lower bounds on the number of packs, for two budgets (tokens, tiles): 2-D vector bin packing.

Every bound works on a histogram of sizes, `{(tokens, tiles): count}`, so partitions' histograms add
up and the driver never holds a row. `lower_bound` is the largest of:

- volume, per budget: ceil(sum / budget) (what summary.json called `lower_bound_packs` before);
- Martello & Toth's L2, per budget (Martello & Toth 1990, "Lower bounds and reduction procedures for
  the bin packing problem"): a 2-D packing projected on one budget is a valid 1-D packing, so any
  1-D bound of either projection bounds the 2-D problem;
- a conflict-clique bound, 2-D (the same argument as L2, with 2-D compatibility): take a set Q of
  records of which no two fit together under both budgets, so they sit in |Q| different packs. For a
  set S of other records, the records of S can only share a pack with the records of Q that at least
  one of them fits beside; so the packs of Q hold at most sum(budget - size) of S over those, and
  the rest of S needs ceil(rest / budget) packs with no record of Q in them:
      packs >= |Q| + max(0, ceil((size(S) - room of the compatible part of Q) / budget)), per budget.
  S is every record outside Q with a size >= alpha on one budget, for every alpha that occurs.

`tests/test_repack.py` checks each bound <= the exact optimum (brute force) on small random sets.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np

from operators.packing.sample import Record

Sizes = Mapping[tuple[int, int], int]


def size_histogram(records: Iterable[Record]) -> Counter:
    """{(tokens, tiles): count} of `records`: what the bounds read (histograms of parts add up)."""
    return Counter((r[0], r[1]) for r in records)


def volume_bound(sizes: Sizes, max_tokens: int, max_tiles: int) -> int:
    tokens = sum(t * n for (t, _), n in sizes.items())
    tiles = sum(k * n for (_, k), n in sizes.items())
    return max(math.ceil(tokens / max_tokens), math.ceil(tiles / max_tiles))


def l2_bound(values: np.ndarray, counts: np.ndarray, capacity: int) -> int:
    """Martello & Toth's L2 for one budget: max over alpha in {0} U {sizes <= C/2} of
    |J1| + |J2| + max(0, ceil((size(J3) - (|J2| C - size(J2))) / C)), J1 = sizes > C - alpha,
    J2 = sizes in (C/2, C - alpha], J3 = sizes in [alpha, C/2]."""
    order = np.argsort(values, kind="stable")
    v, c = values[order].astype(np.int64), counts[order].astype(np.int64)
    if not len(v):
        return 0
    n_le = np.concatenate([[0], np.cumsum(c)])  # items with index < i
    s_le = np.concatenate([[0], np.cumsum(v * c)])
    half = capacity // 2  # sizes <= half are "<= C/2" (integers)
    alphas = np.unique(np.concatenate([[0], v[v <= half]]))

    def below(x):  # index of the first size > x
        return np.searchsorted(v, x, side="right")

    i_half = below(half)
    i_hi = below(capacity - alphas)  # sizes <= C - alpha
    i_lo = np.searchsorted(v, alphas, side="left")  # sizes >= alpha start here
    j1 = n_le[-1] - n_le[i_hi]
    j2 = n_le[i_hi] - n_le[i_half]
    j2_size = s_le[i_hi] - s_le[i_half]
    j3_size = s_le[i_half] - s_le[np.minimum(i_lo, i_half)]
    extra = np.maximum(0, -((-(j3_size - (j2 * capacity - j2_size))) // capacity))
    return int(np.max(j1 + j2 + extra))


def _conflict_clique(big: list[tuple[int, int]], max_tokens: int, max_tiles: int) -> list[tuple[int, int]]:
    """Greedy: sizes (all over half a budget, so each conflicts with its own copies) taken in order
    while each conflicts with every size already taken (no two fit together under both budgets)."""
    qt, qk = np.zeros(0, np.int64), np.zeros(0, np.int64)
    clique = []
    for t, k in big:
        if np.all((qt + t > max_tokens) | (qk + k > max_tiles)):
            clique.append((t, k))
            qt, qk = np.append(qt, t), np.append(qk, k)
    return clique


def clique_bound(sizes: Sizes, max_tokens: int, max_tiles: int) -> int:
    """The conflict-clique bound (module docstring), for two greedy cliques: token-heavy records
    first, then tile-heavy ones, and the other way round."""
    big = [s for s in sizes if 2 * s[0] > max_tokens or 2 * s[1] > max_tiles]
    if not big:
        return 0
    by_tokens = sorted(big, key=lambda s: (-(2 * s[0] > max_tokens), -s[0], -s[1]))
    by_tiles = sorted(big, key=lambda s: (-(2 * s[1] > max_tiles), -s[1], -s[0]))
    return max(_clique_alpha_bound(sizes, _conflict_clique(order, max_tokens, max_tiles), max_tokens, max_tiles)
               for order in (by_tokens, by_tiles))


def _clique_alpha_bound(sizes: Sizes, clique: list[tuple[int, int]], max_tokens: int, max_tiles: int) -> int:
    in_q = set(clique)
    q_n = sum(sizes[s] for s in clique)
    others = [s for s in sizes if s not in in_q]
    if not others:
        return q_n
    # Non-clique tokens by tile count, sorted: "the largest (tokens|tiles) of a record that fits beside q"
    by_tiles: dict[int, list[int]] = {}
    for t, k in others:
        by_tiles.setdefault(k, []).append(t)
    for ts in by_tiles.values():
        ts.sort()
    best = q_n
    o_t = np.array([s[0] for s in others], np.int64)
    o_k = np.array([s[1] for s in others], np.int64)
    o_n = np.array([sizes[s] for s in others], np.int64)
    q_t = np.array([s[0] for s in clique], np.int64)
    q_k = np.array([s[1] for s in clique], np.int64)
    q_c = np.array([sizes[s] for s in clique], np.int64)
    for d in (0, 1):
        # m[q]: the largest size on budget d of a non-clique record that fits beside q (-1: none)
        m = np.full(len(clique), -1, np.int64)
        for i, (t, k) in enumerate(clique):
            room_t, room_k = max_tokens - t, max_tiles - k
            for kk, ts in by_tiles.items():
                if kk > room_k:
                    continue
                j = bisect_right(ts, room_t)
                if j:
                    m[i] = max(m[i], ts[j - 1] if d == 0 else kk)
        o_w = o_t if d == 0 else o_k
        alphas = np.unique(np.concatenate([[0], o_w]))
        extra = np.zeros(len(alphas), np.int64)
        so, sq = np.argsort(o_w, kind="stable"), np.argsort(m, kind="stable")
        for ow, qw, cap in ((o_t, q_t, max_tokens), (o_k, q_k, max_tiles)):
            s_size = _suffix_sums((ow * o_n)[so])[np.searchsorted(o_w[so], alphas, side="left")]
            q_room = _suffix_sums(((cap - qw) * q_c)[sq])[np.searchsorted(m[sq], alphas, side="left")]
            extra = np.maximum(extra, -((q_room - s_size) // cap))
        best = max(best, q_n + int(np.max(extra)))
    return best


def _suffix_sums(x: np.ndarray) -> np.ndarray:
    """out[i] = sum(x[i:]), with out[len(x)] = 0."""
    return np.concatenate([np.cumsum(x[::-1])[::-1], [0]])


def lower_bound(sizes: Sizes | Iterable[Record], max_tokens: int, max_tiles: int) -> int:
    """The largest of the volume, L2 (per budget) and conflict-clique bounds (module docstring)."""
    if not isinstance(sizes, Mapping):
        sizes = size_histogram(sizes)
    if not sizes:
        return 0
    keys = list(sizes)
    counts = np.array([sizes[s] for s in keys], np.int64)
    t = np.array([s[0] for s in keys], np.int64)
    k = np.array([s[1] for s in keys], np.int64)
    return max(volume_bound(sizes, max_tokens, max_tiles), l2_bound(t, counts, max_tokens),
               l2_bound(k, counts, max_tiles), clique_bound(sizes, max_tokens, max_tiles))
