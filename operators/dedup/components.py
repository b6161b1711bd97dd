"""Graph steps of dedup over pyarrow tables: bucket star edges, connected components, survivors.

Every function works on one partition and is plain pyarrow/numpy, so it is unit-tested without Ray;
pipeline/dedup_stage.py runs them over hash partitions in storage (pipeline/exchange.py). Nodes are row ids (strings):
"lowest id" is pyarrow's string order (code-point order, same as Python's). Group-bys and joins run
single-threaded: each runs inside a one-CPU task, and threaded Acero plans failed in Ray workers
("thread index out of range", pyarrow's thread pool sized for another CPU count).

Connected components, distributed: the alternating large-star / small-star rounds of Kiveris et al.,
"Connected Components in MapReduce and Beyond" (SoCC 2014), as text-dedup's Spark MinHash uses them.
Each round groups edges by one endpoint only, so a partition holds the edges of its nodes, never all
edges; at the fixpoint every edge is (node, smallest node of its component). `union_find` is the
single-process equivalent, used for small edge sets and as the reference in tests.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EDGE_SCHEMA = pa.schema([("u", pa.string()), ("v", pa.string())])


def distinct_edges(u: pa.Array, v: pa.Array) -> pa.Table:
    """Distinct edges, self-loops dropped (they join nothing)."""
    t = pa.table({"u": pc.cast(u, pa.string()), "v": pc.cast(v, pa.string())})
    t = t.filter(pc.not_equal(t.column("u"), t.column("v")))
    return t.group_by(["u", "v"], use_threads=False).aggregate([]) if t.num_rows else EDGE_SCHEMA.empty_table()


def _min_per(table: pa.Table, key: str, value: str, name: str) -> pa.Table:
    """`table` with a column `name` = min(value) over the rows sharing `key`."""
    mins = table.group_by(key, use_threads=False).aggregate([(value, "min")]).rename_columns([key, name])
    return table.join(mins, key, use_threads=False)


def bucket_star_edges(table: pa.Table) -> pa.Table:
    """Rows (band, key, id) -> edges (u=id, v=min id of its bucket) for every id that is not the min.

    One edge per member instead of all pairs keeps a bucket's edges linear in its size; the pair is
    verified afterwards, so a bucket that mixes unrelated rows costs edges, not wrong merges."""
    if table.num_rows == 0:
        return EDGE_SCHEMA.empty_table()
    t = table.select(["band", "key", "id"])
    t = t.set_column(2, "id", pc.cast(t.column("id"), pa.string()))
    mins = t.group_by(["band", "key"], use_threads=False).aggregate([("id", "min"), ("id", "count")])
    mins = mins.filter(pc.greater(mins.column("id_count"), 1))
    t = t.join(mins.select(["band", "key", "id_min"]), ["band", "key"], use_threads=False)
    t = t.filter(pc.not_equal(t.column("id"), t.column("id_min")))
    return distinct_edges(t.column("id"), t.column("id_min"))


def both_directions(edges: pa.Table) -> pa.Table:
    """Each undirected edge as (u, v) and (v, u): the input of `large_star` grouped by u."""
    return pa.concat_tables(
        [edges.select(["u", "v"]), pa.table({"u": edges.column("v"), "v": edges.column("u")})]
    )


def large_star(edges: pa.Table) -> pa.Table:
    """For each u (all its edges, both directions, are in `edges`): link every larger neighbour
    to m(u) = min(u, neighbours). Output edges (v, m) with m < v."""
    if edges.num_rows == 0:
        return EDGE_SCHEMA.empty_table()
    t = _min_per(edges, "u", "v", "m")
    m = pc.min_element_wise(t.column("m"), t.column("u"))
    keep = pc.greater(t.column("v"), t.column("u"))
    return distinct_edges(pc.filter(t.column("v"), keep), pc.filter(m, keep))


def orient_down(edges: pa.Table) -> pa.Table:
    """Each edge as (larger, smaller): the input of `small_star` grouped by u."""
    if edges.num_rows == 0:
        return EDGE_SCHEMA.empty_table()
    hi = pc.max_element_wise(edges.column("u"), edges.column("v"))
    lo = pc.min_element_wise(edges.column("u"), edges.column("v"))
    return pa.table({"u": hi, "v": lo})


def small_star(edges: pa.Table) -> pa.Table:
    """For each u (all its edges to smaller nodes are in `edges`): link u and its smaller neighbours
    to m = their minimum. Output edges (x, m) with m < x."""
    if edges.num_rows == 0:
        return EDGE_SCHEMA.empty_table()
    t = _min_per(edges, "u", "v", "m")
    nodes = pa.concat_arrays([t.column("v").combine_chunks(), t.column("u").combine_chunks()])
    mins = pa.concat_arrays([t.column("m").combine_chunks(), t.column("m").combine_chunks()])
    keep = pc.not_equal(nodes, mins)
    return distinct_edges(pc.filter(nodes, keep), pc.filter(mins, keep))


def union_find(u: list[str], v: list[str]) -> dict[str, str]:
    """node -> smallest node of its component, for every node on an edge (path-halving union-find)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(u, v):
        ra, rb = find(a), find(b)
        if ra != rb:  # the smaller root wins, so a root is always its component's minimum
            if rb < ra:
                ra, rb = rb, ra
            parent[rb] = ra
    return {x: find(x) for x in list(parent)}


def pick_survivors(table: pa.Table, score_column: str | None = None) -> pa.Table:
    """Rows (group, id[, score]) -> (id, survivor, row): per group the highest score, then the
    lowest id; `row` is the input row of each output row. Missing or NaN scores rank last."""
    if table.num_rows == 0:
        return pa.table(
            {"id": pa.array([], pa.string()), "survivor": pa.array([], pa.string()), "row": pa.array([], pa.int64())}
        )
    ids = pc.cast(table.column("id"), pa.string())
    cols = {"group": table.column("group"), "id": ids, "row": pa.array(np.arange(table.num_rows))}
    keys = [("group", "ascending")]
    if score_column:
        score = pc.cast(table.column(score_column), pa.float64())
        score = pc.fill_null(pc.if_else(pc.is_nan(score), None, score), -np.inf)
        cols["score"] = score
        keys.append(("score", "descending"))
    keys.append(("id", "ascending"))
    t = pa.table(cols)
    t = t.take(pc.sort_indices(t, sort_keys=keys))
    g = t.column("group").combine_chunks()
    first = np.ones(t.num_rows, dtype=bool)
    if t.num_rows > 1:
        first[1:] = pc.not_equal(g[1:], g[:-1]).to_numpy(zero_copy_only=False)
    run = np.cumsum(first) - 1  # index of the group's run
    survivor = t.column("id").combine_chunks().take(pa.array(np.flatnonzero(first)[run]))
    return pa.table({"id": t.column("id"), "survivor": survivor, "row": t.column("row")})


def is_star_forest(both: pa.Table) -> bool:
    """True when the edges (given in both directions) form stars whose centre is their smallest node:
    every node has no smaller neighbour, or exactly one and no larger one. Then large_star changes
    nothing and each star is a component."""
    if both.num_rows == 0:
        return True
    smaller = pc.less(both.column("v"), both.column("u"))
    t = pa.table({"u": both.column("u"), "s": pc.cast(smaller, pa.int64()), "g": pc.cast(pc.invert(smaller), pa.int64())})
    agg = t.group_by("u", use_threads=False).aggregate([("s", "sum"), ("g", "sum")])
    s, g = agg.column("s_sum").to_numpy(), agg.column("g_sum").to_numpy()
    return bool(np.all((s == 0) | ((s == 1) & (g == 0))))


def components_by_stars(edges: pa.Table, max_rounds: int = 100) -> pa.Table:
    """Single-process driver of the large-star/small-star rounds (what the Ray stage does per
    partition): edges (u, v) -> (u=node, v=smallest node of its component) for non-minimum nodes."""
    cur = distinct_edges(edges.column("u"), edges.column("v"))
    for _ in range(max_rounds):
        both = both_directions(cur)
        if is_star_forest(both):
            return orient_down(cur)
        cur = small_star(orient_down(large_star(both)))
    raise RuntimeError(f"components did not converge in {max_rounds} rounds")
