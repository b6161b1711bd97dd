"""Global dedup stage on Ray Data: exact, MinHash near-duplicate and (optional) image near-duplicate.

`dedup_dataset(ds, cfg)` returns the same rows with two string columns added: `dedup_rule`
("" | "exact" | "minhash" | "image") and `dup_of` (the id of the row kept in its cluster; "" for
kept rows). The stages nest: exact groups first, MinHash among one representative per exact group,
images among the text survivors; a row's rule is the first stage that removed it and its `dup_of`
is the final survivor of its cluster, so `dup_of` always names a kept row.

Bounded memory: per-row work (hashes, signatures) runs in `map_batches`; every global step is a
shuffle into `P` partitions (`groupby("_part", num_partitions=P).map_groups` on a hashed partition
column), P = max(cluster CPUs, rows / `rows_per_partition`), and works on one partition at a time with the
vectorised pyarrow functions of operators/dedup/components.py. No step holds all signatures or all
edges: candidate pairs come from band buckets (star edges to the bucket's smallest id), are verified
by estimated Jaccard through two shuffle joins with the signatures, and connected components run as
distributed large-star/small-star rounds (or one union-find when the edge count is under
`local_components_max_edges`). Results depend only on the rows, never on block layout, so they
are the same with any number of workers and any input order.

Shuffles use Ray Data's task-based sort shuffle (set on private copies of the dataset context; the
caller's dataset and the global DataContext are not changed); datasets derived from the returned
one inherit that setting. `Dataset.join` is not used: it needs polars and starts actor pools, so
joins are reduce-side joins over the same partitioned groupby (`_join`).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from functools import lru_cache
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import xxhash
from ray.data.context import ShuffleStrategy

from operators.base import conversation_texts
from operators.dedup import components as cc
from operators.dedup.exact import content_hashes
from operators.dedup.image import band_values, hamming, near_pairs, phash
from operators.dedup.lsh import band_keys, estimated_jaccard, optimal_param
from operators.dedup.minhash import MinHasher
from pipeline.curate_config import DedupConfig  # noqa: F401  (the dedup stage's settings)
from pipeline.io import write_parquet_atomic

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# per-row keys (map_batches) and the schemas of the intermediate datasets

_S = pa.string()
EDGES = pa.schema([("u", _S), ("v", _S)])
SURVIVORS = pa.schema([("id", _S), ("survivor", _S)])
MEMBERS = pa.schema([("id", _S), ("group", _S)])
SCORES = pa.schema([("id", _S), ("score", pa.float64())])
LATER = pa.schema([("lid", _S), ("final", _S)])
GONE = pa.schema([("rid", _S), ("gone", pa.bool_())])
DECISIONS = pa.schema([("id", _S), ("dedup_rule", _S), ("dup_of", _S)])


def _key_schema(cfg: DedupConfig) -> pa.Schema:
    return pa.schema(
        [
            ("id", _S),
            ("score", pa.float64()),
            ("ehash", pa.binary(16)),
            ("sig", pa.binary(4 * cfg.num_perm)),
            ("has_sh", pa.bool_()),
            ("phash", pa.list_(pa.uint64())),
            ("img", pa.uint64()),
        ]
    )


@lru_cache(maxsize=4)
def _hasher(num_perm: int, seed: int, ngram: int, hash: str) -> MinHasher:
    return MinHasher(num_perm=num_perm, seed=seed, ngram=ngram, hash=hash)


def _sig_array(sig: np.ndarray) -> pa.Array:
    n, k = sig.shape
    buf = pa.py_buffer(np.ascontiguousarray(sig, dtype=np.uint32).tobytes())
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * k), n, [None, buf])


def _sig_matrix(col: pa.ChunkedArray | pa.Array, num_perm: int) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, num_perm), dtype=np.uint32)
    arr = arr.cast(pa.binary(4 * num_perm))
    raw = np.frombuffer(arr.buffers()[1], dtype=np.uint32)
    return raw[arr.offset * num_perm : (arr.offset + len(arr)) * num_perm].reshape(len(arr), num_perm)


def _phashes(images: list[bytes] | None) -> list[int]:
    try:
        return [phash(b) for b in images or []]
    except Exception:  # an image PIL cannot decode takes its row out of image dedup, never the job down
        return []


def image_identity(images: list[bytes] | None) -> int:
    """64-bit identity of a row's image bytes, in order (0: no images); part of the MinHash band keys."""
    if not images:
        return 0
    h = xxhash.xxh3_64()
    for b in images:
        h.update(xxhash.xxh3_128_digest(b))
    return h.intdigest() or 1


def row_keys(batch: pa.Table, c: DedupConfig) -> pa.Table:
    """Per row the dedup key columns (id, score, ehash, sig, has_sh, phash, img): all that the global
    dedup moves between workers; never the text or the images."""
    cols: dict[str, pa.Array] = {"id": pc.cast(batch.column("id"), pa.string())}
    cols["score"] = (
        pc.cast(batch.column(c.score_column), pa.float64())
        if c.keep == "highest_score"
        else pa.nulls(batch.num_rows, pa.float64())
    )
    cols["ehash"] = pa.array(content_hashes(batch), pa.binary(16)) if c.exact else pa.nulls(batch.num_rows, pa.binary(16))
    if c.minhash:
        sig, ok = _hasher(c.num_perm, c.seed, c.ngram, c.hash).signatures(conversation_texts(batch, "all"))
        cols["sig"], cols["has_sh"] = _sig_array(sig), pa.array(ok)
    else:
        cols["sig"], cols["has_sh"] = pa.nulls(batch.num_rows, pa.binary(4 * c.num_perm)), pa.nulls(batch.num_rows, pa.bool_())
    images = batch.column("images").to_pylist() if "images" in batch.column_names else [None] * batch.num_rows
    if c.image:
        cols["phash"] = pa.array([_phashes(im) for im in images], pa.list_(pa.uint64()))
    else:
        cols["phash"] = pa.array([[]] * batch.num_rows, pa.list_(pa.uint64()))
    cols["img"] = pa.array([image_identity(im) for im in images], pa.uint64())
    return pa.table(cols, schema=_key_schema(c))


def _row_keys(batch: pa.Table, cfg: dict) -> pa.Table:
    return row_keys(batch, DedupConfig(**cfg))


# ---------------------------------------------------------------------------------------------
# shuffles

def _str_part(col: pa.ChunkedArray | pa.Array, parts: int) -> pa.Array:
    """Partition of each string key: xxh3-64 of its UTF-8 bytes modulo `parts` (stable everywhere)."""
    return pa.array([xxhash.xxh3_64_intdigest(s.encode("utf-8")) % parts for s in col.to_pylist()], pa.int64())


def _ehash_part(col: pa.ChunkedArray | pa.Array, parts: int) -> pa.Array:
    """Partition by content hash: its first 8 bytes (already uniform) modulo `parts`; null -> 0."""
    return pa.array([0 if h is None else int.from_bytes(h[:8], "little") % parts for h in col.to_pylist()], pa.int64())


def _with_part(t: pa.Table, part: pa.Array) -> pa.Table:
    if "_part" in t.column_names:
        t = t.drop_columns(["_part"])
    return t.append_column("_part", part)


def _shuffle(ds: ray.data.Dataset, fn, parts: int, **kwargs) -> ray.data.Dataset:
    """Run fn(partition table, **kwargs) on each of `parts` hash partitions of ds (column `_part`)."""

    def call(t: pa.Table) -> pa.Table:
        return fn(t.drop_columns(["_part"]), **kwargs)

    # Task-based sort shuffle: on few coarse partitions it starts in ~0.1 s where the hash shuffle
    # spins up aggregator actors (~2 s) per call. Derived datasets share their parent's context
    # object, so this dataset gets its own copy: the caller's dataset and the global context keep theirs.
    ctx = ds.context.copy()
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ds._context = ctx
    return ds.groupby("_part", num_partitions=parts).map_groups(call, batch_format="pyarrow")


def _join(
    left: ray.data.Dataset,
    right: ray.data.Dataset,
    left_on: str,
    right_on: str,
    how: Literal["inner", "left outer"],
    parts: int,
    ls: pa.Schema,
    rs: pa.Schema,
) -> ray.data.Dataset:
    """Reduce-side join: both sides hash-partitioned on the key in one shuffle, joined per partition.

    `right` must have unique keys. Rows are joined through index columns and `take`, so payload
    columns of any type (lists, structs, binaries) pass through. Right columns keep their names.
    The schemas are given, not read from the data, so empty sides (no duplicates at all) work."""
    rcols = [f for f in rs if f.name != right_on]
    common = pa.schema([*ls, *[pa.field("_r_" + f.name, f.type) for f in rs], ("_side", pa.int8())])

    def tag(t: pa.Table, side: int) -> pa.Table:
        key = t.column(left_on if side == 0 else right_on)
        out = {}
        for f in common:
            if f.name == "_side":
                out[f.name] = pa.array(np.full(t.num_rows, side, dtype=np.int8))
            elif side == 0 and not f.name.startswith("_r_"):
                out[f.name] = t.column(f.name).cast(f.type)
            elif side == 1 and f.name.startswith("_r_"):
                out[f.name] = t.column(f.name[3:]).cast(f.type)
            else:
                out[f.name] = pa.nulls(t.num_rows, f.type)
        return _with_part(pa.table(out, schema=common), _str_part(key, parts))

    def join_part(t: pa.Table) -> pa.Table:
        side = t.column("_side").to_numpy()
        lt = t.filter(pa.array(side == 0)).select([f.name for f in ls])
        rt = t.filter(pa.array(side == 1)).select(["_r_" + f.name for f in rs])
        rt = rt.rename_columns([f.name for f in rs])
        li = pa.table({"k": pc.cast(lt.column(left_on), pa.string()), "_li": pa.array(np.arange(lt.num_rows))})
        ri = pa.table({"k": pc.cast(rt.column(right_on), pa.string()), "_ri": pa.array(np.arange(rt.num_rows))})
        j = li.join(ri, "k", join_type=how)
        out = lt.take(j.column("_li"))
        rtake = rt.take(j.column("_ri"))
        for f in rcols:
            out = out.append_column(f.name, rtake.column(f.name))
        return out

    tagged = left.map_batches(tag, fn_args=(0,), batch_format="pyarrow").union(
        right.map_batches(tag, fn_args=(1,), batch_format="pyarrow")
    )
    return _shuffle(tagged, join_part, parts)


# ---------------------------------------------------------------------------------------------
# stages


def _exact_part(t: pa.Table, score: str | None) -> pa.Table:
    """Per content hash: the survivor (erep) of its exact group, on every row."""
    s = cc.pick_survivors(pa.table({"group": t.column("ehash"), "id": t.column("id"), "score": t.column("score")}), score)
    return t.take(s.column("row")).append_column("erep", s.column("survivor"))


def _exact_dups(t: pa.Table) -> pa.Table:
    t = t.filter(pc.not_equal(t.column("erep"), t.column("id")))
    return pa.table({"id": t.column("id"), "survivor": t.column("erep")}, schema=SURVIVORS)


def _exact_reps(t: pa.Table) -> pa.Table:
    return t.filter(pc.equal(t.column("erep"), t.column("id"))).drop_columns(["erep"])


def _band_rows(t: pa.Table, bands: int, rows: int, num_perm: int, parts: int, text_only: bool = True) -> pa.Table:
    keys = band_keys(_sig_matrix(t.column("sig"), num_perm), bands, rows)
    n = t.num_rows
    if not text_only:  # rows share a bucket only with rows of the same image bytes (text-only rows: unchanged)
        img = t.column("img").to_numpy(zero_copy_only=False).astype(np.uint64)[:, None]
        with np.errstate(over="ignore"):
            mixed = (keys.view(np.uint64) ^ img) * np.uint64(0x9E3779B97F4A7C15) + img
        keys = np.where(img == 0, keys.view(np.uint64), mixed).view(np.int64)
    key = keys.ravel()
    out = pa.table(
        {
            "band": pa.array(np.tile(np.arange(bands, dtype=np.int32), n)),
            "key": pa.array(key),
            "id": pc.take(t.column("id"), pa.array(np.repeat(np.arange(n), bands))),
        }
    )
    return _with_part(out, pa.array((key.view(np.uint64) % np.uint64(parts)).astype(np.int64)))


def _verify(t: pa.Table, threshold: float, num_perm: int) -> pa.Table:
    a, b = _sig_matrix(t.column("sig_u"), num_perm), _sig_matrix(t.column("sig_v"), num_perm)
    keep = estimated_jaccard(a, b) >= threshold
    return t.select(["u", "v"]).filter(pa.array(keep))


def _image_band_rows(t: pa.Table, max_hamming: int, parts: int) -> pa.Table:
    first = np.array([h[0] for h in t.column("phash").to_pylist()], dtype=np.uint64)
    vals = band_values(first, max_hamming)  # (n, bands)
    n, nb = vals.shape
    # the bucket key mixes band index and bits, so one column partitions and groups
    key = (vals.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.arange(nb, dtype=np.uint64)).ravel()
    idx = pa.array(np.repeat(np.arange(n), nb))
    out = pa.table({"key": pa.array(key.view(np.int64)), "id": pc.take(t.column("id"), idx), "phash": pc.take(t.column("phash"), idx)})
    return _with_part(out, pa.array((key % np.uint64(parts)).astype(np.int64)))


def _image_edges(t: pa.Table, max_hamming: int) -> pa.Table:
    """Per bucket, every pair whose images are all within max_hamming bits (same count, same order)."""
    if t.num_rows == 0:
        return cc.EDGE_SCHEMA.empty_table()
    t = t.take(pc.sort_indices(t, sort_keys=[("key", "ascending"), ("id", "ascending")]))
    keys = t.column("key").to_numpy()
    ids = t.column("id").to_pylist()
    ph = t.column("phash").to_pylist()
    first = np.array([h[0] for h in ph], dtype=np.uint64)
    bounds = np.flatnonzero(np.diff(keys)) + 1
    us, vs = [], []
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(keys)]])):
        if hi - lo < 2:
            continue
        i, j = near_pairs(first[lo:hi], max_hamming)
        for a, b in zip(i + lo, j + lo):
            if ids[a] == ids[b] or len(ph[a]) != len(ph[b]):
                continue
            if len(ph[a]) > 1 and hamming(np.array(ph[a][1:]), np.array(ph[b][1:])).max() > max_hamming:
                continue
            us.append(max(ids[a], ids[b]))
            vs.append(min(ids[a], ids[b]))
    return cc._edges(pa.array(us, pa.string()), pa.array(vs, pa.string()))


def _components(edges: ray.data.Dataset, cfg: DedupConfig, parts: int) -> ray.data.Dataset:
    """Verified edges (u, v) -> (u=node, v=smallest node of its component) for non-minimum nodes."""
    edges = edges.materialize()
    n_edges = edges.count()
    if n_edges == 0:
        return ray.data.from_arrow(cc.EDGE_SCHEMA.empty_table())
    if n_edges <= cfg.local_components_max_edges:  # bounded by the setting, not by the data
        t = pa.concat_tables([b for b in edges.iter_batches(batch_format="pyarrow", batch_size=None)])
        labels = cc.union_find(t.column("u").to_pylist(), t.column("v").to_pylist())
        pairs = [(x, r) for x, r in labels.items() if x != r]
        return ray.data.from_arrow(
            pa.table({"u": pa.array([p[0] for p in pairs], pa.string()), "v": pa.array([p[1] for p in pairs], pa.string())})
        )

    def both(t: pa.Table) -> pa.Table:
        b = cc.both_directions(t.select(["u", "v"]))
        return _with_part(b, _str_part(b.column("u"), parts))

    def down(t: pa.Table) -> pa.Table:
        d = cc.orient_down(t.select(["u", "v"]))
        return _with_part(d, _str_part(d.column("u"), parts))

    def star_check(t: pa.Table) -> pa.Table:  # one row per partition: is it already a star forest?
        return pa.table({"bad": [0 if cc.is_star_forest(t) else 1]})

    cur = edges
    for rounds in range(cfg.max_rounds):
        bi = cur.map_batches(both, batch_format="pyarrow").materialize()
        if sum(r["bad"] for r in _shuffle(bi, star_check, parts).take_all()) == 0:
            log.info("dedup: %d edges, components after %d large/small-star rounds", n_edges, rounds)
            return cur.map_batches(lambda t: cc.orient_down(t.select(["u", "v"])), batch_format="pyarrow")
        large = _shuffle(bi, cc.large_star, parts)
        cur = _shuffle(large.map_batches(down, batch_format="pyarrow"), cc.small_star, parts).materialize()
    raise RuntimeError(f"dedup: connected components did not converge in {cfg.max_rounds} rounds")


def _survivors(
    labels: ray.data.Dataset, nodes: ray.data.Dataset, cfg: DedupConfig, parts: int
) -> ray.data.Dataset:
    """Component labels (u=node, v=component min) -> (id, survivor) for the removed nodes."""
    if cfg.keep == "lowest_id":  # the component minimum is the lowest id
        return labels.map_batches(
            lambda t: pa.table({"id": t.column("u"), "survivor": t.column("v")}), batch_format="pyarrow"
        )
    members = labels.map_batches(
        lambda t: pa.table(
            {
                "id": pa.concat_arrays([t.column("u").combine_chunks(), t.column("v").combine_chunks()]),
                "group": pa.concat_arrays([t.column("v").combine_chunks(), t.column("v").combine_chunks()]),
            }
        ),
        batch_format="pyarrow",
    )
    scores = nodes.select_columns(["id", "score"])
    scored = _join(members, scores, "id", "id", "inner", parts, MEMBERS, SCORES)

    def pick(t: pa.Table) -> pa.Table:
        t = t.group_by(["id", "group"]).aggregate([("score", "max")]).rename_columns(["id", "group", "score"])
        s = cc.pick_survivors(t, "score")
        s = s.filter(pc.not_equal(s.column("id"), s.column("survivor")))
        return s.select(["id", "survivor"])

    return _shuffle(
        scored.map_batches(lambda t: _with_part(t, _str_part(t.column("group"), parts)), batch_format="pyarrow"),
        pick,
        parts,
    )


def _removed(
    ids_surv: ray.data.Dataset, rule: str, later: ray.data.Dataset | None, parts: int
) -> ray.data.Dataset:
    """(id, survivor) -> (id, dedup_rule, dup_of) with the survivor mapped through a later stage."""
    out = ids_surv
    if later is not None:
        later_map = later.select_columns(["id", "dup_of"]).map_batches(
            lambda t: pa.table({"lid": t.column("id"), "final": t.column("dup_of")}), batch_format="pyarrow"
        )
        out = _join(out, later_map, "survivor", "lid", "left outer", parts, SURVIVORS, LATER)
        out = out.map_batches(
            lambda t: t.set_column(t.schema.get_field_index("survivor"), "survivor", pc.coalesce(t.column("final"), t.column("survivor"))).drop_columns(["final"]),
            batch_format="pyarrow",
        )
    return out.map_batches(
        lambda t: pa.table(
            {"id": t.column("id"), "dedup_rule": pa.array([rule] * t.num_rows, pa.string()), "dup_of": t.column("survivor")}
        ),
        batch_format="pyarrow",
    )


def dedup_dataset(ds: ray.data.Dataset, cfg: DedupConfig | None = None) -> ray.data.Dataset:
    """The rows of ds with `dedup_rule` and `dup_of` added (see the module docstring)."""
    cfg = cfg or DedupConfig()
    decisions, n = _decisions(ds, cfg)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    jparts = max(cpus, math.ceil(n / cfg.join_rows_per_partition))
    joined = _join(ds, decisions, "id", "id", "left outer", jparts, ds.schema().base_schema, DECISIONS)

    def fill(t: pa.Table) -> pa.Table:
        for name in ("dedup_rule", "dup_of"):
            i = t.schema.get_field_index(name)
            t = t.set_column(i, name, pc.fill_null(pc.cast(t.column(name), pa.string()), ""))
        return t

    return joined.map_batches(fill, batch_format="pyarrow")


def dedup_decisions(ds: ray.data.Dataset, cfg: DedupConfig | None = None) -> ray.data.Dataset:
    """Only the removed rows, materialized: (id, dedup_rule, dup_of). Cheaper than `dedup_dataset`
    when the caller routes rows itself (no shuffle of the full rows)."""
    return _decisions(ds, cfg or DedupConfig())[0]


def _decisions(ds: ray.data.Dataset, cfg: DedupConfig) -> tuple[ray.data.Dataset, int]:
    if cfg.keep == "highest_score" and cfg.score_column not in ds.schema().names:
        raise ValueError(f"dedup: keep=highest_score but the rows have no column {cfg.score_column!r}")
    keys = ds.map_batches(_row_keys, fn_kwargs={"cfg": cfg.model_dump()}, batch_format="pyarrow")
    return decisions_from_keys(keys, cfg)


def decisions_from_keys(keys: ray.data.Dataset, cfg: DedupConfig) -> tuple[ray.data.Dataset, int]:
    """The removed rows (id, dedup_rule, dup_of), materialized, from key rows (`row_keys`), and the key rows' count."""
    keys = keys.materialize()
    n = keys.count()
    if n == 0:
        return ray.data.from_arrow(DECISIONS.empty_table()), 0
    # at least one partition per CPU so every shuffle's reduce side runs in parallel
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    parts = max(cpus, math.ceil(n / cfg.rows_per_partition))
    score = "score" if cfg.keep == "highest_score" else None
    empty = pa.table({"id": pa.array([], pa.string()), "survivor": pa.array([], pa.string())})

    # exact: one representative (survivor) per content hash; only representatives go on
    if cfg.exact:
        # a text that normalises to nothing has no hash (content_hashes_of): never an exact duplicate
        hashed = keys.map_batches(lambda t: t.filter(pc.is_valid(t.column("ehash"))), batch_format="pyarrow")
        unhashed = keys.map_batches(lambda t: t.filter(pc.is_null(t.column("ehash"))), batch_format="pyarrow")
        keyed = _shuffle(
            hashed.map_batches(lambda t: _with_part(t, _ehash_part(t.column("ehash"), parts)), batch_format="pyarrow"),
            _exact_part,
            parts,
            score=score,
        ).materialize()
        exact_dups = keyed.map_batches(_exact_dups, batch_format="pyarrow")
        reps = keyed.map_batches(_exact_reps, batch_format="pyarrow").union(unhashed).materialize()
    else:
        exact_dups, reps = ray.data.from_arrow(empty), keys

    # MinHash LSH among the representatives
    text_dups = ray.data.from_arrow(empty)
    if cfg.minhash:
        bands, rows = optimal_param(cfg.threshold, cfg.num_perm, cfg.false_positive_weight, cfg.false_negative_weight)
        with_sh = reps.map_batches(lambda t: t.filter(t.column("has_sh")), batch_format="pyarrow")
        bparts = max(cpus, math.ceil(n * bands / cfg.rows_per_partition))
        band_rows = with_sh.map_batches(
            _band_rows, fn_args=(bands, rows, cfg.num_perm, bparts, cfg.text_only), batch_format="pyarrow"
        )
        candidates = _shuffle(band_rows, cc.bucket_star_edges, bparts)
        sigs = with_sh.select_columns(["id", "sig"])
        sig_t = pa.binary(4 * cfg.num_perm)
        j1 = _join(candidates, sigs, "u", "id", "inner", parts, EDGES, pa.schema([("id", pa.string()), ("sig", sig_t)]))
        j1 = j1.rename_columns({"sig": "sig_u"})
        j1_schema = pa.schema([*EDGES, ("sig_u", sig_t)])
        j2 = _join(j1, sigs, "v", "id", "inner", parts, j1_schema, pa.schema([("id", pa.string()), ("sig", sig_t)]))
        j2 = j2.rename_columns({"sig": "sig_v"})
        verified = j2.map_batches(_verify, fn_args=(cfg.threshold, cfg.num_perm), batch_format="pyarrow")
        labels = _components(verified, cfg, parts)
        text_dups = _survivors(labels, reps, cfg, parts).materialize()

    # images among the rows that survived text dedup
    image_dups = None
    if cfg.image:
        text_removed = text_dups.map_batches(
            lambda t: pa.table({"rid": t.column("id"), "gone": pa.array([True] * t.num_rows)}), batch_format="pyarrow"
        )
        alive = _join(reps, text_removed, "id", "rid", "left outer", parts, _key_schema(cfg), GONE)
        alive = alive.map_batches(
            lambda t: t.filter(pc.and_(pc.is_null(t.column("gone")), pc.greater(pc.list_value_length(t.column("phash")), 0))),
            batch_format="pyarrow",
        )
        iparts = max(cpus, math.ceil(n * (cfg.image_max_hamming + 1) / cfg.rows_per_partition))
        irows = alive.map_batches(_image_band_rows, fn_args=(cfg.image_max_hamming, iparts), batch_format="pyarrow")
        iedges = _shuffle(irows, _image_edges, iparts, max_hamming=cfg.image_max_hamming)
        image_dups = _removed(_survivors(_components(iedges, cfg, parts), reps, cfg, parts), "image", None, parts)
        image_dups = image_dups.materialize()

    text_removed_final = _removed(text_dups, "minhash", image_dups, parts).materialize()
    later = text_removed_final if image_dups is None else text_removed_final.union(image_dups)
    exact_final = _removed(exact_dups, "exact", later, parts)
    decisions = exact_final.union(text_removed_final)
    if image_dups is not None:
        decisions = decisions.union(image_dups)
    out = decisions.map_batches(lambda t: t.select(DECISIONS.names).cast(DECISIONS), batch_format="pyarrow")
    return out.materialize(), n


# ---------------------------------------------------------------------------------------------
# decisions partitioned by input shard (the curate runner's dedup phase)

LOCS = pa.schema([("orig", _S), ("_shard", _S), ("_row", pa.int64())])
SHARD_DECISIONS = pa.schema([("_row", pa.int64()), ("dedup_rule", _S), ("dup_of", _S)])


def decisions_by_shard(key_files: list[str], cfg: DedupConfig, out_folder: str, store: StoreBytes | None = None) -> dict:
    """Global dedup over the key rows in `key_files` (columns of `row_keys` plus `orig` = the id a
    repeat_time copy repeats, `_shard`, `_row`), its decisions written per shard to
    `out_folder/<shard>.parquet` (_row, dedup_rule, dup_of; no file: nothing removed there).
    Only originals (orig == id) take part; a copy follows its original's fate. Key rows only move:
    the driver gets per-block rule counts. Returns {removed, by_rule}; `store` counts the bytes moved."""
    store = store or StoreBytes()
    ds = ray.data.read_parquet(key_files)
    ds.set_name("ivl-curate:dedup_keys")
    originals = ds.map_batches(
        lambda t: t.filter(pc.equal(t.column("orig"), t.column("id"))).select(_key_schema(cfg).names),
        batch_format="pyarrow")
    decisions, n = decisions_from_keys(originals, cfg)
    counts = decisions.map_batches(_rule_counts, batch_format="pyarrow").take_all()
    by_rule = Counter()
    for r in counts:
        by_rule[r["rule"]] += r["n"]
    stats = {"removed": sum(by_rule.values()), "by_rule": dict(sorted(by_rule.items()))}
    store.add(decisions)
    if not by_rule:
        return stats
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    parts = max(cpus, math.ceil(n / cfg.rows_per_partition))
    locs = ds.map_batches(lambda t: t.select(LOCS.names).cast(LOCS), batch_format="pyarrow")
    located = _join(locs, decisions, "orig", "id", "inner", parts, LOCS, DECISIONS)

    def write(t: pa.Table) -> pa.Table:
        for shard in sorted(set(t.column("_shard").to_pylist())):
            part = t.filter(pc.equal(t.column("_shard"), shard)).select(SHARD_DECISIONS.names).cast(SHARD_DECISIONS)
            write_parquet_atomic(part.sort_by("_row"), os.path.join(out_folder, f"{shard}.parquet"))
        return pa.table({"rows": [t.num_rows]})

    keyed = located.map_batches(lambda t: _with_part(t, _str_part(t.column("_shard"), parts)), batch_format="pyarrow")
    written = _shuffle(keyed, write, parts)
    written.set_name("ivl-curate:dedup_decisions")
    store.add(written.materialize())
    return stats


def _rule_counts(t: pa.Table) -> pa.Table:
    c = Counter(t.column("dedup_rule").to_pylist())
    return pa.table({"rule": pa.array(list(c), _S), "n": pa.array(list(c.values()), pa.int64())})


class StoreBytes:
    """Bytes of the blocks that executed Ray Data operators put into Ray's object store (each
    operator's `output_size_bytes` sum in Ray Data's stats), over every dataset added and the
    datasets they were built from; an operator reported under several datasets counts once."""

    def __init__(self):
        self.seen: set[tuple] = set()
        self.total = 0

    def add(self, ds: ray.data.Dataset) -> int:
        stack = [ds.get_stats_summary()]
        while stack:
            summary = stack.pop()
            for op in summary.operators_stats:
                key = (op.operator_name, op.earliest_start_time, op.latest_end_time)
                if op.output_size_bytes and key not in self.seen:
                    self.seen.add(key)
                    self.total += int(op.output_size_bytes.sum)
            stack.extend(summary.parents)
        return self.total
