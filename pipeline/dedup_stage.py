"""Global dedup: exact, MinHash near-duplicate and (optional) image near-duplicate, over key files.

A row's decision is `dedup_rule` ("" | "exact" | "minhash" | "image") and `dup_of` (the id of the row
kept in its cluster; "" for kept rows). The stages nest: exact groups first, MinHash among one
representative per exact group, images among the text survivors; a row's rule is the first stage
that removed it and its `dup_of` is the final survivor of its cluster, so `dup_of` always names a
kept row. Results depend only on the rows, never on file or block layout or the number of workers.

Data plane (NeMo Curator's fuzzy dedup does the same): the key rows (`row_keys`: id, score, content
hash, MinHash signature, pHashes; no content) sit in per-shard key files in storage, and every step
is a plain Ray task that reads and writes hash partitions through storage (pipeline/exchange.py), so
only file names and counts go through Ray's object store. The steps, each one round of tasks:
1. key tasks (one per group of key files): exact rows by content hash, one row per LSH band by band
   key, location rows (orig, shard, row) by id, image band rows by pHash band;
2. per partition: exact groups' survivors; per band bucket, star edges to the bucket's smallest id
   among the exact representatives (the bucket holds every member of an exact group, so it finds
   the representative itself), with each end's location (key task, row);
3. verification by estimated Jaccard, reading each end's signature by location from the key files
   (edges grouped by the u end's key task, then the cross-group ones by the v end's);
4. connected components as large-star/small-star rounds (Kiveris et al., SoCC 2014), or one
   union-find when the edges are at most `local_components_max_edges`;
5. survivors, the nesting above (survivors mapped through later stages), then the decisions joined
   with the location rows and written per input shard: `<out>/<shard>.parquet` (_row, id, dedup_rule,
   dup_of), so routing reads only its own shard's.
`dedup_decisions` / `dedup_dataset` run the same steps for a Ray Dataset (one key file per block batch).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import xxhash

from operators.base import conversation_texts
from operators.dedup import components as cc
from operators.dedup.exact import content_hashes_of, content_hashes_of_tokens
from operators.dedup.image import band_values, hamming, near_pairs, phash
from operators.dedup.lsh import band_keys, estimated_jaccard, optimal_param
from operators.dedup.minhash import MinHasher, doc_pieces
from operators.images import ImageError
from pipeline.curate_config import DedupConfig
from pipeline.exchange import Parts, Slices, StoreBytes, read_part, run_tasks, str_part, union, write_parts
from pipeline.io import exists, join, list_files, open_input, remove_tree, write_parquet_atomic

__all__ = ["DedupConfig", "KeyMaker", "StoreBytes", "decisions_by_shard", "dedup_dataset", "dedup_decisions",
           "image_identity", "row_keys"]

log = logging.getLogger(__name__)

_S = pa.string()
DECISIONS = pa.schema([("id", _S), ("dedup_rule", _S), ("dup_of", _S)])
SHARD_DECISIONS = pa.schema([("_row", pa.int64()), ("id", _S), ("dedup_rule", _S), ("dup_of", _S)])
EDGES = pa.schema([("u", _S), ("v", _S)])  # also (id, survivor) maps: u removed, v its survivor
EXACT = pa.schema([("group", pa.binary(16)), ("id", _S), ("score", pa.float64())])
LOCS = pa.schema([("orig", _S), ("id", _S), ("_shard", _S), ("_row", pa.int64()), ("score", pa.float64())])
CANDIDATES = pa.schema([("u", _S), ("v", _S), ("loc_u", pa.int64()), ("loc_v", pa.int64())])
MEMBERS = pa.schema([("id", _S), ("group", _S)])
SCORED = pa.schema([("id", _S), ("group", _S), ("score", pa.float64())])
LOCATED = pa.schema([("_shard", _S), *SHARD_DECISIONS])
ROW_BITS = 32  # a location is (key task << 32) | row among the key task's originals


def key_schema(cfg: DedupConfig) -> pa.Schema:
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


def _band_schema(cfg: DedupConfig) -> pa.Schema:
    return pa.schema([("band", pa.int32()), ("key", pa.int64()), ("id", _S), ("loc", pa.int64()),
                      ("ehash", pa.binary(16)), ("score", pa.float64())])


IMAGE_ROWS = pa.schema([("key", pa.int64()), ("id", _S), ("phash", pa.list_(pa.uint64())),
                        ("ehash", pa.binary(16)), ("score", pa.float64())])


# ---------------------------------------------------------------------------------------------
# per-row keys

class KeyMaker:
    """Per row the dedup key columns (`key_schema`): all that global dedup reads, never the text or
    the images. Holds the MinHasher (and its tokeniser tables), so build one per task and reuse it."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.hasher = MinHasher(num_perm=cfg.num_perm, seed=cfg.seed, ngram=cfg.ngram, hash=cfg.hash)

    def __call__(self, batch: pa.Table) -> pa.Table:
        c, n = self.cfg, batch.num_rows
        cols: dict[str, pa.Array] = {"id": pc.cast(batch.column("id"), _S)}
        cols["score"] = (pc.cast(batch.column(c.score_column), pa.float64()) if c.keep == "highest_score"
                         else pa.nulls(n, pa.float64()))
        images = batch.column("images").to_pylist() if "images" in batch.column_names else [None] * n
        ehash, sig, ok = self._hashes(conversation_texts(batch, "all"), images)
        cols["ehash"] = pa.array(ehash, pa.binary(16)) if c.exact else pa.nulls(n, pa.binary(16))
        if c.minhash:
            cols["sig"], cols["has_sh"] = _sig_array(sig), pa.array(ok)
        else:
            cols["sig"], cols["has_sh"] = pa.nulls(n, pa.binary(4 * c.num_perm)), pa.nulls(n, pa.bool_())
        cols["phash"] = pa.array([_phashes(im) if c.image else [] for im in images], pa.list_(pa.uint64()))
        cols["img"] = pa.array([image_identity(im) for im in images], pa.uint64())
        return pa.table(cols, schema=key_schema(c))


    def _hashes(self, texts: list[str], images: list) -> tuple[list | None, np.ndarray | None, np.ndarray | None]:
        """(exact content hashes, MinHash signatures, has-a-shingle) of a batch; each document is tokenised once
        for both when MinHash hashes its shingles from the tokens (hash: fast)."""
        c = self.cfg
        if not (c.exact and c.minhash and c.hash == "fast"):
            ehash = content_hashes_of(texts, images, self.hasher.tokens) if c.exact else None
            sig, ok = self.hasher.signatures(texts) if c.minhash else (None, None)
            return ehash, sig, ok
        ehash, sigs, oks, start = [], [], [], 0
        for piece in doc_pieces(texts):
            th, lens = self.hasher.tokens.token_hashes(piece)
            ehash += content_hashes_of_tokens(th, lens, images[start : start + len(piece)])
            sig, ok = self.hasher.signatures_of_tokens(th, lens)
            sigs.append(sig)
            oks.append(ok)
            start += len(piece)
        if not sigs:
            return ehash, np.zeros((0, c.num_perm), dtype=np.uint32), np.zeros(0, dtype=bool)
        return ehash, np.concatenate(sigs), np.concatenate(oks)


def row_keys(batch: pa.Table, cfg: DedupConfig) -> pa.Table:
    """`KeyMaker(cfg)(batch)` (a KeyMaker built for one call)."""
    return KeyMaker(cfg)(batch)


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
    except ImageError:  # an image that does not decode takes its row out of image dedup, never the job down
        return []


def image_identity(images: list[bytes] | None) -> int:
    """64-bit identity of a row's image bytes, in order (0: no images); part of the MinHash band keys."""
    if not images:
        return 0
    h = xxhash.xxh3_64()
    for b in images:
        h.update(xxhash.xxh3_128_digest(b))
    return h.intdigest() or 1


# ---------------------------------------------------------------------------------------------
# the plan every task of one run shares

@dataclass(frozen=True)
class Plan:
    cfg: DedupConfig
    work: str  # folder for the partitions (removed at the end)
    n_groups: int  # key tasks; a location's high bits name one
    parts: int  # partitions keyed by id or content hash
    bparts: int  # MinHash band partitions
    iparts: int  # image band partitions
    bands: int
    rows: int

    def path(self, stage: str, i: int) -> str:
        return join(self.work, stage, f"{i:05d}.parquet")


def _plan(key_files: list[str], cfg: DedupConfig, work: str) -> tuple[Plan, list[tuple[str, ...]]]:
    """The plan and the key files of each key task."""
    sizes = []
    for f in key_files:  # footers only: the row counts that size the partitions
        with open_input(f) as fh:
            sizes.append(pq.ParquetFile(fh).metadata.num_rows)
    n = sum(sizes)
    # at least one partition per CPU so every step runs in parallel
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_groups = min(len(key_files), max(cpus, math.ceil(n / cfg.rows_per_partition))) or 1
    per, groups, cur, acc = n / n_groups, [], [], 0
    for f, s in zip(key_files, sizes):  # consecutive files, about n / n_groups rows each
        cur.append(f)
        acc += s
        if acc >= per * (len(groups) + 1) and len(groups) < n_groups - 1:
            groups.append(tuple(cur))
            cur = []
    groups.append(tuple(cur))
    bands, rows = (optimal_param(cfg.threshold, cfg.num_perm, cfg.false_positive_weight, cfg.false_negative_weight)
                   if cfg.minhash else (0, 0))
    groups = [g for g in groups if g]
    return Plan(cfg=cfg, work=work, n_groups=len(groups), parts=max(cpus, math.ceil(n / cfg.rows_per_partition)),
                bparts=max(cpus, math.ceil(n * max(bands, 1) / cfg.rows_per_partition)),
                iparts=max(cpus, math.ceil(n * (cfg.image_max_hamming + 1) / cfg.rows_per_partition)), bands=bands, rows=rows), groups


def _read_group(files: tuple[str, ...], columns: list[str]) -> pa.Table:
    tables = []
    for f in files:
        with open_input(f) as fh:
            tables.append(pq.read_table(fh, columns=columns))
    return pa.concat_tables(tables, promote_options="permissive")


def _originals(t: pa.Table) -> pa.Table:
    return t.filter(pc.equal(t.column("orig"), t.column("id")))


# ---------------------------------------------------------------------------------------------
# step 1: key tasks

def key_task(plan: Plan, files: tuple[str, ...], g: int) -> dict:
    """One group of key files -> exact rows, band rows, location rows and image rows, partitioned."""
    cfg = plan.cfg
    t = _read_group(files, [*key_schema(cfg).names, "orig", "_shard", "_row"])
    locs = pa.table({"orig": t.column("orig"), "id": t.column("id"), "_shard": t.column("_shard"),
                     "_row": t.column("_row"), "score": t.column("score")}).cast(LOCS)
    out = {"locs": write_parts(locs, str_part(locs.column("orig"), plan.parts), plan.parts, plan.path("locs", g))}
    o = _originals(t)  # a repeat_time copy follows its original's fate instead of taking part
    loc = pa.array((np.int64(g) << ROW_BITS) + np.arange(o.num_rows, dtype=np.int64))
    o = o.append_column("loc", loc)
    out["exact"] = Parts(plan.parts)
    if cfg.exact:
        # a text that normalises to nothing has no hash (content_hashes_of): never an exact duplicate
        e = o.filter(pc.is_valid(o.column("ehash")))
        rows = pa.table({"group": e.column("ehash"), "id": e.column("id"), "score": e.column("score")}).cast(EXACT)
        out["exact"] = write_parts(rows, _hash_part(e.column("ehash"), plan.parts), plan.parts, plan.path("exact", g))
    out["bands"] = Parts(plan.bparts)
    if cfg.minhash:
        m = o.filter(pc.fill_null(o.column("has_sh"), False))
        rows = _band_rows(m, plan)
        part = (rows.column("key").to_numpy().view(np.uint64) % np.uint64(plan.bparts)).astype(np.int64)
        out["bands"] = write_parts(rows, part, plan.bparts, plan.path("bands", g))
    out["images"] = Parts(plan.iparts)
    if cfg.image:
        i = o.filter(pc.greater(pc.list_value_length(o.column("phash")), 0))
        rows = _image_band_rows(i, cfg.image_max_hamming)
        part = (rows.column("key").to_numpy().view(np.uint64) % np.uint64(plan.iparts)).astype(np.int64)
        out["images"] = write_parts(rows, part, plan.iparts, plan.path("images", g))
    return out


def _hash_part(col: pa.ChunkedArray | pa.Array, parts: int) -> np.ndarray:
    """Partition by content hash: its first 8 bytes (already uniform, read little-endian) modulo `parts`."""
    arr = (col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col).cast(pa.binary(16))
    if len(arr) == 0:
        return np.zeros(0, dtype=np.int64)
    words = np.frombuffer(arr.buffers()[1], dtype="<u8")[2 * arr.offset : 2 * (arr.offset + len(arr)) : 2]
    return (words % np.uint64(parts)).astype(np.int64)


def _band_rows(t: pa.Table, plan: Plan) -> pa.Table:
    bands = plan.bands
    keys = band_keys(_sig_matrix(t.column("sig"), plan.cfg.num_perm), bands, plan.rows)
    n = t.num_rows
    if not plan.cfg.text_only:  # rows share a bucket only with rows of the same image bytes (text-only rows: unchanged)
        img = t.column("img").to_numpy(zero_copy_only=False).astype(np.uint64)[:, None]
        with np.errstate(over="ignore"):
            mixed = (keys.view(np.uint64) ^ img) * np.uint64(0x9E3779B97F4A7C15) + img
        keys = np.where(img == 0, keys.view(np.uint64), mixed).view(np.int64)
    rep = pa.array(np.repeat(np.arange(n), bands))
    return pa.table({"band": pa.array(np.tile(np.arange(bands, dtype=np.int32), n)), "key": pa.array(keys.ravel()),
                     **{c: pc.take(t.column(c), rep) for c in ("id", "loc", "ehash", "score")}}).cast(_band_schema(plan.cfg))


def _image_band_rows(t: pa.Table, max_hamming: int) -> pa.Table:
    first = np.array([h[0] for h in t.column("phash").to_pylist()], dtype=np.uint64)
    vals = band_values(first, max_hamming)  # (n, bands)
    n, nb = vals.shape
    # the bucket key mixes band index and bits, so one column partitions and groups
    with np.errstate(over="ignore"):
        key = (vals.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.arange(nb, dtype=np.uint64)).ravel()
    idx = pa.array(np.repeat(np.arange(n), nb))
    return pa.table({"key": pa.array(key.view(np.int64)),
                     **{c: pc.take(t.column(c), idx) for c in ("id", "phash", "ehash", "score")}}).cast(IMAGE_ROWS)


# ---------------------------------------------------------------------------------------------
# step 2: exact survivors, band buckets

def exact_task(plan: Plan, src: Slices, p: int) -> Parts:
    """Per content hash its survivor: decisions (id, "exact", survivor) of the removed rows, by survivor."""
    t = read_part(src, EXACT)
    s = cc.pick_survivors(t, "score" if plan.cfg.keep == "highest_score" else None)
    s = s.filter(pc.not_equal(s.column("id"), s.column("survivor")))
    d = pa.table({"id": s.column("id"), "dedup_rule": pa.array(["exact"] * s.num_rows, _S), "dup_of": s.column("survivor")})
    return write_parts(d, str_part(d.column("dup_of"), plan.parts), plan.parts, plan.path("exact_dups", p))


def _exact_reps(t: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Only the exact representatives among one partition's rows. Every member of an exact group has
    the same bucket rows, so the partition holds the whole group and picks its survivor alone."""
    if not cfg.exact or t.num_rows == 0:
        return t
    hashed = pc.is_valid(t.column("ehash"))
    h = t.filter(hashed)
    s = cc.pick_survivors(pa.table({"group": h.column("ehash"), "id": h.column("id"), "score": h.column("score")}),
                          "score" if cfg.keep == "highest_score" else None)
    reps = pc.unique(s.filter(pc.equal(s.column("id"), s.column("survivor"))).column("id"))
    return pa.concat_tables([h.filter(pc.is_in(h.column("id"), reps)), t.filter(pc.invert(hashed))])


def bucket_task(plan: Plan, src: Slices, q: int) -> Parts:
    """Band rows of one partition -> candidate edges (u, v=min id of its bucket) with both ends' locations,
    by the u end's key task."""
    t = _exact_reps(read_part(src, _band_schema(plan.cfg)), plan.cfg)
    edges = cc.bucket_star_edges(t)
    locs = t.group_by("id", use_threads=False).aggregate([("loc", "min")]).rename_columns(["id", "loc"])
    e = (edges.join(locs.rename_columns(["u", "loc_u"]), "u", join_type="inner", use_threads=False)
         .join(locs.rename_columns(["v", "loc_v"]), "v", join_type="inner", use_threads=False))
    e = e.select(CANDIDATES.names).cast(CANDIDATES)
    g = e.column("loc_u").to_numpy() >> ROW_BITS
    return write_parts(e, g, plan.n_groups, plan.path("candidates", q))


def image_bucket_task(plan: Plan, src: Slices, q: int) -> Parts:
    """Image band rows of one partition -> every pair of exact representatives whose images are all
    within image_max_hamming bits (same count, same order), by u."""
    t = _exact_reps(read_part(src, IMAGE_ROWS), plan.cfg)
    e = _image_edges(t, plan.cfg.image_max_hamming)
    return write_parts(e, str_part(e.column("u"), plan.parts), plan.parts, plan.path("image_edges", q))


def _image_edges(t: pa.Table, max_hamming: int) -> pa.Table:
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
    return cc.distinct_edges(pa.array(us, _S), pa.array(vs, _S))


# ---------------------------------------------------------------------------------------------
# step 3: verification by location

def _group_sigs(plan: Plan, files: tuple[str, ...]) -> np.ndarray:
    """The signatures of one key task's originals, in its row order (what its locations index)."""
    t = _originals(_read_group(files, ["id", "orig", "sig"]))
    return _sig_matrix(t.column("sig"), plan.cfg.num_perm)


def _both_by_u(plan: Plan, edges: pa.Table, stage: str, i: int) -> Parts:
    b = cc.both_directions(edges.select(["u", "v"]))
    return write_parts(b, str_part(b.column("u"), plan.parts), plan.parts, plan.path(stage, i))


CROSS_EXTRA = [("loc_v", pa.int64()), ("sig_u", pa.binary())]


def verify_task(plan: Plan, src: Slices, files: tuple[str, ...], g: int) -> tuple[Parts, Parts]:
    """Candidates whose u end is in key task g: those whose v end is too are verified here; the others
    go on with u's signature to v's key task. Returns (verified edges both ways by u, cross rows)."""
    c = read_part(src, CANDIDATES)
    c = c.group_by(CANDIDATES.names, use_threads=False).aggregate([])  # a pair found in several bands is checked once
    sigs = _group_sigs(plan, files) if c.num_rows else None
    mask = np.int64((1 << ROW_BITS) - 1)
    same = (c.column("loc_v").to_numpy() >> ROW_BITS) == g
    su = sigs[c.column("loc_u").to_numpy() & mask] if c.num_rows else None
    verified = c.filter(pa.array(same))
    if verified.num_rows:
        ok = estimated_jaccard(su[same], sigs[verified.column("loc_v").to_numpy() & mask]) >= plan.cfg.threshold
        verified = verified.filter(pa.array(ok))
    cross = c.filter(pa.array(~same))
    cross_rows = pa.table({"u": cross.column("u"), "v": cross.column("v"), "loc_v": cross.column("loc_v"),
                           "sig_u": pa.array([r.tobytes() for r in su[~same]] if cross.num_rows else [], pa.binary())})
    return (_both_by_u(plan, verified, "verified", g),
            write_parts(cross_rows, cross.column("loc_v").to_numpy() >> ROW_BITS, plan.n_groups, plan.path("cross", g)))


def cross_task(plan: Plan, src: Slices, files: tuple[str, ...], g: int) -> Parts:
    """Cross-group candidates whose v end is in key task g: verified with v's signature, both ways by u."""
    c = read_part(src, pa.schema([*EDGES, *CROSS_EXTRA]))
    if c.num_rows == 0:
        return Parts(plan.parts)
    sv = _group_sigs(plan, files)[c.column("loc_v").to_numpy() & np.int64((1 << ROW_BITS) - 1)]
    su = _sig_matrix(c.column("sig_u").cast(pa.binary(4 * plan.cfg.num_perm)), plan.cfg.num_perm)
    ok = estimated_jaccard(su, sv) >= plan.cfg.threshold
    return _both_by_u(plan, c.filter(pa.array(ok)), "verified_cross", g)


# ---------------------------------------------------------------------------------------------
# step 4: connected components, step 5: survivors

def star_task(plan: Plan, src: Slices, p: int, stage: str) -> tuple[bool, Parts, Parts]:
    """One partition of the edges (both ways, by u): is it a star forest; its labels if the whole graph
    is (the edges (u, v) with v < u); and the large-star step's edges (larger, smaller) by u."""
    t = read_part(src, EDGES)
    labels = t.filter(pc.greater(t.column("u"), t.column("v")))
    large = cc.orient_down(cc.large_star(t))
    return (cc.is_star_forest(t),
            write_parts(labels, np.full(labels.num_rows, p), plan.parts, plan.path(f"{stage}_labels", p)),
            write_parts(large, str_part(large.column("u"), plan.parts), plan.parts, plan.path(f"{stage}_large", p)))


def small_task(plan: Plan, src: Slices, p: int, stage: str) -> Parts:
    t = cc.small_star(read_part(src, EDGES))
    return _both_by_u(plan, t, f"{stage}_small", p)


def union_find_task(plan: Plan, src: Slices, stage: str) -> Parts:
    t = read_part(src, EDGES)
    labels = cc.union_find(t.column("u").to_pylist(), t.column("v").to_pylist())
    pairs = [(x, r) for x, r in labels.items() if x != r]
    lab = pa.table({"u": pa.array([p[0] for p in pairs], _S), "v": pa.array([p[1] for p in pairs], _S)})
    return write_parts(lab, str_part(lab.column("u"), plan.parts), plan.parts, plan.path(f"{stage}_labels", 0))


def components(plan: Plan, both: Parts, stage: str, store: StoreBytes) -> Parts:
    """Edges (both ways, by u) -> labels (u=node, v=smallest node of its component) of the non-minimum
    nodes, by u."""
    n_edges = both.rows() // 2
    if n_edges == 0:
        return Parts(plan.parts)
    if n_edges <= plan.cfg.local_components_max_edges:  # bounded by the setting, not by the data
        every = [x for p in range(both.n) for x in both.slices(p)]
        return run_tasks(union_find_task, [(plan, every, stage)], store)[0]
    for r in range(plan.cfg.max_rounds):
        out = run_tasks(star_task, [(plan, both.slices(p), p, f"{stage}{r}") for p in range(plan.parts)], store)
        if all(flag for flag, _, _ in out):
            log.info("dedup %s: %d edges, components after %d large/small-star rounds", stage, n_edges, r)
            return union([lab for _, lab, _ in out], plan.parts)
        large = union([lg for _, _, lg in out], plan.parts)
        both = union(run_tasks(small_task, [(plan, large.slices(p), p, f"{stage}{r}") for p in range(plan.parts)], store),
                     plan.parts)
    raise RuntimeError(f"dedup: connected components did not converge in {plan.cfg.max_rounds} rounds")


def members_task(plan: Plan, labels: Slices, p: int, stage: str) -> Parts:
    t = read_part(labels, EDGES)
    m = pa.table({"id": pa.concat_arrays([t.column("u").combine_chunks(), t.column("v").combine_chunks()]),
                  "group": pa.concat_arrays([t.column("v").combine_chunks(), t.column("v").combine_chunks()])})
    return write_parts(m, str_part(m.column("id"), plan.parts), plan.parts, plan.path(f"{stage}_members", p))


def scored_task(plan: Plan, members: Slices, locs: Slices, p: int, stage: str) -> Parts:
    m = read_part(members, MEMBERS).group_by(["id", "group"], use_threads=False).aggregate([])
    sc = _originals(read_part(locs, LOCS)).select(["id", "score"])
    t = m.join(sc, "id", join_type="inner", use_threads=False).select(SCORED.names).cast(SCORED)
    return write_parts(t, str_part(t.column("group"), plan.parts), plan.parts, plan.path(f"{stage}_scored", p))


def pick_task(plan: Plan, scored: Slices, p: int, stage: str) -> Parts:
    s = cc.pick_survivors(read_part(scored, SCORED), "score")
    s = s.filter(pc.not_equal(s.column("id"), s.column("survivor")))
    t = pa.table({"u": s.column("id"), "v": s.column("survivor")})
    return write_parts(t, str_part(t.column("u"), plan.parts), plan.parts, plan.path(f"{stage}_removed", p))


def survivors(plan: Plan, labels: Parts, locs: Parts, stage: str, store: StoreBytes) -> Parts:
    """Component labels -> (u=removed id, v=its survivor), by u."""
    if plan.cfg.keep == "lowest_id" or labels.rows() == 0:  # the component minimum is the lowest id
        return labels
    ps = range(plan.parts)
    members = union(run_tasks(members_task, [(plan, labels.slices(p), p, stage) for p in ps], store), plan.parts)
    scored = union(run_tasks(scored_task, [(plan, members.slices(p), locs.slices(p), p, stage) for p in ps], store),
                   plan.parts)
    return union(run_tasks(pick_task, [(plan, scored.slices(p), p, stage) for p in ps], store), plan.parts)


def alive_task(plan: Plan, edges: Slices, removed: Slices, p: int, end: str, stage: str) -> Parts:
    """Image edges (by `end`) whose `end` was not removed by text dedup: by v after u, both ways by u after v."""
    e = read_part(edges, EDGES)
    gone = read_part(removed, EDGES).column("u")
    e = e.filter(pc.invert(pc.is_in(e.column(end), gone)))
    if end == "v":
        return _both_by_u(plan, e, stage, p)
    return write_parts(e, str_part(e.column("v"), plan.parts), plan.parts, plan.path(stage, p))


def map_task(plan: Plan, dec: Slices, survivor: Slices, p: int, by: str, stage: str) -> Parts:
    """Decisions (by dup_of) with dup_of mapped through a later stage's (removed -> survivor), by `by`."""
    d = read_part(dec, DECISIONS)
    m = read_part(survivor, EDGES).combine_chunks()
    if m.num_rows and d.num_rows:
        idx = pc.index_in(d.column("dup_of"), value_set=m.column("u").chunk(0))
        d = d.set_column(2, "dup_of", pc.coalesce(pc.take(m.column("v"), idx), d.column("dup_of")))
    return write_parts(d, str_part(d.column(by), plan.parts), plan.parts, plan.path(stage, p))


def relabel_task(plan: Plan, removed: Slices, p: int, rule: str, by: str, stage: str) -> Parts:
    """(u removed, v survivor) -> decisions (id, rule, dup_of), by `by`."""
    t = read_part(removed, EDGES)
    d = pa.table({"id": t.column("u"), "dedup_rule": pa.array([rule] * t.num_rows, _S), "dup_of": t.column("v")})
    return write_parts(d, str_part(d.column(by), plan.parts), plan.parts, plan.path(stage, p))


def locate_task(plan: Plan, dec: Slices, locs: Slices, p: int) -> tuple[dict, Parts]:
    """Decisions of originals (by id) joined with every row they stand for (copies too), by shard;
    returns the rule counts of the originals."""
    d = read_part(dec, DECISIONS)
    loc = read_part(locs, LOCS).select(["orig", "id", "_shard", "_row"]).rename_columns(["orig", "rid", "_shard", "_row"])
    j = loc.join(d, keys="orig", right_keys="id", join_type="inner", use_threads=False)
    t = pa.table({"_shard": j.column("_shard"), "_row": j.column("_row"), "id": j.column("rid"),
                  "dedup_rule": j.column("dedup_rule"), "dup_of": j.column("dup_of")}).cast(LOCATED)
    counts = Counter(d.column("dedup_rule").to_pylist())
    return dict(counts), write_parts(t, str_part(t.column("_shard"), plan.parts), plan.parts, plan.path("located", p))


def write_task(plan: Plan, located: Slices, p: int, out_folder: str) -> int:
    """One partition of located decisions -> `out_folder/<shard>.parquet` per shard in it."""
    t = read_part(located, LOCATED)
    for shard in sorted(set(t.column("_shard").to_pylist())):
        part = t.filter(pc.equal(t.column("_shard"), shard)).select(SHARD_DECISIONS.names).sort_by("_row")
        write_parquet_atomic(part, join(out_folder, f"{shard}.parquet"))
    return t.num_rows


# ---------------------------------------------------------------------------------------------
# the driver

def decisions_by_shard(key_files: list[str], cfg: DedupConfig, out_folder: str, store: StoreBytes | None = None) -> dict:
    """Global dedup over the key rows in `key_files` (columns of `row_keys` plus `orig` = the id a
    repeat_time copy repeats, `_shard`, `_row`), its decisions written per shard to
    `out_folder/<shard>.parquet` (_row, id, dedup_rule, dup_of; no file: nothing removed there).
    Only originals (orig == id) take part; a copy follows its original's fate. The driver holds file
    names and counts only. Returns {removed, by_rule} (originals) and seconds; `store` counts the task
    arguments and returns (the object store's share of this step)."""
    store = store if store is not None else StoreBytes()
    t0 = time.perf_counter()
    work = join(out_folder, "_work")
    remove_tree(work)  # partitions of an interrupted run: never read, names reused
    stats = {"removed": 0, "by_rule": {}}
    if not key_files:
        return stats
    plan, groups = _plan(key_files, cfg, work)
    P = plan.parts
    ps, gs = range(P), range(plan.n_groups)
    keyed = run_tasks(key_task, [(plan, groups[g], g) for g in gs], store)
    locs = union([k["locs"] for k in keyed], P)
    exact_src, band_src = union([k["exact"] for k in keyed], P), union([k["bands"] for k in keyed], plan.bparts)
    image_src = union([k["images"] for k in keyed], plan.iparts)
    # exact survivors and band buckets in one round of tasks
    calls = [(exact_task, (plan, exact_src.slices(p), p)) for p in ps if cfg.exact]
    calls += [(bucket_task, (plan, band_src.slices(q), q)) for q in range(plan.bparts) if cfg.minhash]
    calls += [(image_bucket_task, (plan, image_src.slices(q), q)) for q in range(plan.iparts) if cfg.image]
    res = run_tasks(_apply, calls, store)
    exact_dups = union([r for (f, _), r in zip(calls, res) if f is exact_task], P)  # decisions by dup_of
    candidates = union([r for (f, _), r in zip(calls, res) if f is bucket_task], plan.n_groups)
    image_edges = union([r for (f, _), r in zip(calls, res) if f is image_bucket_task], P)

    text_removed = Parts(P)  # (u, v=survivor) by u
    if cfg.minhash and candidates.rows():
        out = run_tasks(verify_task, [(plan, candidates.slices(g), groups[g], g) for g in gs], store)
        both = union([v for v, _ in out], P)
        cross = union([c for _, c in out], plan.n_groups)
        if cross.rows():
            both = both + union(run_tasks(cross_task, [(plan, cross.slices(g), groups[g], g) for g in gs], store), P)
        text_removed = survivors(plan, components(plan, both, "text", store), locs, "text", store)

    image_removed = None
    if cfg.image:
        alive = union(run_tasks(alive_task, [(plan, image_edges.slices(p), text_removed.slices(p), p, "u", "alive_u")
                                          for p in ps], store), P)
        alive = union(run_tasks(alive_task, [(plan, alive.slices(p), text_removed.slices(p), p, "v", "alive_v")
                                          for p in ps], store), P)
        image_removed = survivors(plan, components(plan, alive, "image", store), locs, "image", store)

    # the nesting: exact survivors through text dedup, text survivors through image dedup
    text_by = "dup_of" if image_removed is not None else "id"
    # (each map and relabel pair reads different partitions, so they share one round of tasks)
    calls = [(map_task, (plan, exact_dups.slices(p), text_removed.slices(p), p, text_by, "exact_final")) for p in ps]
    calls += [(relabel_task, (plan, text_removed.slices(p), p, "minhash", text_by, "text_final")) for p in ps]
    dec = union(run_tasks(_apply, calls, store), P)
    if image_removed is not None:
        calls = [(map_task, (plan, dec.slices(p), image_removed.slices(p), p, "id", "image_mapped")) for p in ps]
        calls += [(relabel_task, (plan, image_removed.slices(p), p, "image", "id", "image_final")) for p in ps]
        dec = union(run_tasks(_apply, calls, store), P)
    if dec.rows():
        out = run_tasks(locate_task, [(plan, dec.slices(p), locs.slices(p), p) for p in ps], store)
        by_rule = Counter()
        for counts, _ in out:
            by_rule.update(counts)
        located = union([x for _, x in out], P)
        run_tasks(write_task, [(plan, located.slices(p), p, out_folder) for p in ps], store)
        stats = {"removed": sum(by_rule.values()), "by_rule": dict(sorted(by_rule.items()))}
    remove_tree(work)
    return {**stats, "seconds": round(time.perf_counter() - t0, 2)}


def _apply(fn, args: tuple):
    return fn(*args)


# ---------------------------------------------------------------------------------------------
# the same over a Ray Dataset (one key file per batch)

def dedup_decisions(ds: ray.data.Dataset, cfg: DedupConfig | None = None, work_dir: str | None = None) -> ray.data.Dataset:
    """Only the removed rows, materialized: (id, dedup_rule, dup_of). `work_dir` holds the key files
    and partitions while it runs (default: a local temp folder; on a cluster give shared storage)."""
    cfg = cfg or DedupConfig()
    work = work_dir or tempfile.mkdtemp(prefix="ivl-dedup-")
    try:
        _check_score(ds, cfg)
        ds.map_batches(_write_keys, fn_kwargs={"cfg": cfg, "folder": join(work, "keys")}, batch_format="pyarrow").materialize()
        folder = join(work, "decisions")
        decisions_by_shard(list_files(join(work, "keys"), ".parquet"), cfg, folder)
        files = list_files(folder, ".parquet", recursive=False) if exists(folder) else []
        if not files:
            return ray.data.from_arrow(DECISIONS.empty_table())
        return ray.data.read_parquet(files, columns=DECISIONS.names).materialize()
    finally:
        remove_tree(work)


def dedup_dataset(ds: ray.data.Dataset, cfg: DedupConfig | None = None, work_dir: str | None = None) -> ray.data.Dataset:
    """The rows of ds with `dedup_rule` and `dup_of` added (see the module docstring), materialized."""
    cfg = cfg or DedupConfig()
    work = work_dir or tempfile.mkdtemp(prefix="ivl-dedup-")
    try:
        _check_score(ds, cfg)
        tagged = ds.map_batches(_write_keys, fn_kwargs={"cfg": cfg, "folder": join(work, "keys"), "tag": True},
                                batch_format="pyarrow").materialize()
        folder = join(work, "decisions")
        decisions_by_shard(list_files(join(work, "keys"), ".parquet"), cfg, folder)
        return tagged.map_batches(_apply_decisions, fn_kwargs={"folder": folder}, batch_format="pyarrow").materialize()
    finally:
        remove_tree(work)


def _check_score(ds: ray.data.Dataset, cfg: DedupConfig) -> None:
    if cfg.keep == "highest_score" and cfg.score_column not in ds.schema().names:
        raise ValueError(f"dedup: keep=highest_score but the rows have no column {cfg.score_column!r}")


def _write_keys(batch: pa.Table, cfg: DedupConfig, folder: str, tag: bool = False) -> pa.Table:
    """A batch's key rows -> `folder/<digest of its ids>.parquet` (the digest names the batch as a
    shard); returns the batch tagged with (_kshard, _krow) when `tag`, else the shard name."""
    ids = pc.cast(batch.column("id"), _S)
    shard = xxhash.xxh3_128_hexdigest("\n".join(ids.to_pylist()).encode("utf-8"))
    rows = pa.array(np.arange(batch.num_rows, dtype=np.int64))
    if batch.num_rows:
        keys = (row_keys(batch, cfg).append_column("orig", ids)
                .append_column("_shard", pa.array([shard] * batch.num_rows, _S)).append_column("_row", rows))
        write_parquet_atomic(keys, join(folder, f"{shard}.parquet"))
    if tag:
        return batch.append_column("_kshard", pa.array([shard] * batch.num_rows, _S)).append_column("_krow", rows)
    return pa.table({"shard": [shard]})


def _apply_decisions(batch: pa.Table, folder: str) -> pa.Table:
    rule, dup_of = [""] * batch.num_rows, [""] * batch.num_rows
    shards = batch.column("_kshard").to_pylist()
    rows = batch.column("_krow").to_pylist()
    where = {(s, r): i for i, (s, r) in enumerate(zip(shards, rows))}
    for shard in set(shards):
        path = join(folder, f"{shard}.parquet")
        if exists(path):
            d = pq.read_table(path)
            for r, ru, du in zip(*(d.column(c).to_pylist() for c in ("_row", "dedup_rule", "dup_of"))):
                i = where[(shard, r)]
                rule[i], dup_of[i] = ru, du
    return (batch.drop_columns(["_kshard", "_krow"]).append_column("dedup_rule", pa.array(rule, _S))
            .append_column("dup_of", pa.array(dup_of, _S)))
