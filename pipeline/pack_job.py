"""`ivl pack`: canonical shards -> packed training sequences (InternVL 2.5 §4.2), on a pool of Ray actors.

Partitions. The input shards (sorted) are cut into partitions of consecutive shards: a partition
closes once it holds `partition_bytes` of input files (default 8 MiB; sizes come from a stat, so the
layout is a pure function of the inputs, never of the cluster). Then:

1. `ivl-pack:partition`, one call per partition on a pool of `PackWorker` Ray actors (one CPU each, as
   many as the cluster's free CPUs or the partitions; each keeps the job's tokenizer loaded), each partition
   going to the next idle actor. For each of its shards in
   order: read it once; tokenize it (or take its cached token columns, OUT/_tokens/<i>.parquet with
   the marker pack-tokens-<i>); rows that cannot be packed -> OUT/rejected/rejected-<p>-<k>.parquet
   with `reject_reason` (`pack:<rule>`); the rest -> Select -> Search -> Pack -> Maintain with the
   partition's own bounded buffers -> OUT/kept/pack-<p>-<k>.parquet. At the end the open buffers and
   the reserve are repacked (operators/packing/repack.py `pack_offline`: first-fit decreasing, a local
   search, and where nothing follows an exact search; a partition of at most 256 packs' worth is
   packed whole, `Packer`); the packs that reach 99% of a budget are written, the rest (a few per
   partition) go, as pieces, to OUT/_tail/<p>.parquet. Its marker pack-part-<p>, a pipeline/jobs.py
   `Marker` (input counted from its files' footers, kept, rejected with reasons, CPU seconds per
   stage, the files it wrote; in `extra` the fill histogram and the (tokens, tiles) histogram of its
   pieces), is written last.
2. `ivl-pack:tail`, one call: every partition's tail pieces, in partition order, repacked by
   `pack_offline` (exact search included) -> OUT/kept/pack-tail-<k>.parquet, marker pack-tail. So a small dataset ends as close
   to its lower bound as one whole-dataset repack would, and a large one pays at most a pack or two.
   (One call: at 10^4 partitions it holds ~10^4 sparse packs' pieces; a tree of tail merges is the
   next step past that.)
3. The driver lists and stats the inputs (row counts from the Parquet footers, `jobs.plan_units`),
   submits the calls and merges their markers (`jobs.merge`, `jobs.check_accounting`) into
   report/summary.json and report/pack_fill.png; the lower bound (operators/packing/bounds.py) comes
   from the merged size histograms. It holds no rows and reads no image bytes.

Select drops the pieces of a split sample that have no supervised token (InternVL's `check_valid`;
a pack of them gives a loss denominator of 0), counted as `pieces_without_answer`; a row with no
supervised token at all is rejected (`pack:no_answer`). Every input row is in a pack or rejected,
and summary.json says how many (input counted from the rows read, not from kept + rejected).

Packed shards have **one packed row per Parquet row group**, so training reads one packed row with
`pq.ParquetFile(path).read_row_group(i)` without its neighbours (a row is ~16k tokens x 3 int32
columns plus its images, 0.2-10 MB: large enough that per-group metadata is noise). Compression is
LZ4 without dictionaries or statistics: on the Tux Paint bench 0.7x the CPU of zstd-with-images-raw
at 0.6x its bytes (PNG stamps do compress). Files hold `rows_per_shard` packed rows each (the last one of a partition fewer).

Resume. Every file is written under a deterministic name (temp file + rename), data first, marker
last. A rerun with the same arguments skips the partitions whose marker exists (and within a rerun
partition, the shards whose tokens are cached), reruns the tail when any partition ran or its marker
is missing, and deletes any file in kept/ or
rejected/ that no marker names (a write cut short, an earlier, longer run), so it ends byte for byte
as an uninterrupted run would. The token cache depends on the tokenizer (hash of its saved files),
the system prompt, both budgets, `verify_images` and the input files (path, size, mtime); a change
in any of these logs one line naming them and tokenizes from scratch. The partition markers also
depend on the packing arguments (mode, seed, buffer size, rows per shard, partition layout): changed,
every pack is made again from the cached tokens, exactly as a clean run makes them.

Memory per partition call: its packer (buffer_size open packs + a reserve of small text-only
samples, or up to 256 packs' worth held while the partition may still be packed whole), one input
shard and at most 32 packed rows waiting to be written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.tiling import count_tiles, max_tiles_per_image
from model.tokenizer import IGNORE_INDEX, INTERNVL_SYSTEM_PROMPT, load_tokenizer, render_batch
from operators.images import ImageError, decode_draft, image_size
from operators.packing import (
    PACKED_SCHEMA,
    Pack,
    Packer,
    Piece,
    pack_offline,
    pack_stream,
    select_samples,
    split_tail,
    unpackable_reason,
)
from operators.packing.bounds import lower_bound, volume_bound
from operators.packing.format import packs_to_table
from operators.packing.repack import EXACT_NODES
from pipeline.io import (
    abspath,
    atomic_write_bytes,
    basename,
    exists,
    list_files,
    list_input_shards,
    local_dir,
    marker_path,
    read_canonical,
    read_marker,
    remove,
    remove_tree,
    size_and_mtime,
    staged_dir,
    write_marker,
    write_parquet_atomic,
)
from pipeline.jobs import (
    AccountingError,
    Marker,
    check_accounting,
    commit,
    merge,
    plan_units,
    read_unit_marker,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_DYNAMIC_PATCH = 12  # InternVL 2.5 default per dataset, overridable in its meta entry
DEFAULT_ROWS_PER_SHARD = 256  # packs per output file (~16k tokens each plus their images)
DEFAULT_PARTITION_BYTES = 8 << 20  # input bytes per partition: a few shards of images at least
TAIL_FILL = 0.99  # an end-of-partition pack short of 99% of both budgets goes to the tail repack
FILL_BINS = 50  # fixed bins of token fill per pack, merged across markers for the plot
PACKS_PER_WRITE = 32  # packed rows built into Arrow at a time (bounded memory)
TOKEN_COLUMNS = {
    "input_ids": pa.list_(pa.int32()),
    "labels": pa.list_(pa.int32()),
    "image_spans": pa.list_(pa.int32()),  # flattened [start, end) pairs
    "tiles_per_image": pa.list_(pa.int32()),
    "image_max_tiles": pa.list_(pa.int32()),
    "image_augment": pa.list_(pa.bool_()),
    "reject_reason": pa.string(),  # "" when the row can be packed
}
CACHE_VERSION = 2  # bump when tokenize_table's output changes: old caches are then tokenized again


# ---- tokenization and tile counting ----------------------------------------------------------------

def image_tiles(images: list[bytes], meta: dict, verify: bool = False) -> tuple[list[int], list[int]]:
    """(tiles, max_num) per image from the encoded bytes: size from the header, InternVL's geometry,
    the dataset's `max_dynamic_patch` divided among the sample's images. Raises on bytes PIL cannot
    identify (`ImageError`, operators/images.py: one policy, the pixel limit included); with `verify`,
    also on data that does not decode to the end (a full decode: ~5x slower,
    so off by default: curate's image checks are where broken pixels are meant to be caught)."""
    mdp = int(meta.get("max_dynamic_patch") or DEFAULT_MAX_DYNAMIC_PATCH)
    max_num = max_tiles_per_image(mdp, len(images))
    tiles = []
    for data in images:
        # JPEG decodes at 1/8 scale with `verify`, still reading the whole stream (operators/images.py)
        size = decode_draft(data, "RGB", 64)[0] if verify else image_size(data)
        tiles.append(count_tiles(*size, max_num=max_num))
    return tiles, [max_num] * len(images)


def tokenize_table(
    table: pa.Table,
    tokenizer,
    system_prompt: str | None = INTERNVL_SYSTEM_PROMPT,
    max_tokens: int = 16384,
    max_tiles: int = 48,
    verify_images: bool = False,
) -> pa.Table:
    """Add TOKEN_COLUMNS to canonical rows (all input columns kept, so rejected rows go out whole).

    A row is rejected here when an image does not decode, its `<image>` placeholders do not match its
    images, one image block alone is over a budget (no cut can make it fit), or it has no supervised
    token (no answer to learn: a pack of such rows has a loss denominator of 0)."""
    convs = table.column("conversations").to_pylist()
    images = table.column("images").to_pylist()
    metas = table.column("meta").to_pylist()
    n = table.num_rows
    tiles, max_nums, augment = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
    reasons = [""] * n
    for i in range(n):
        try:
            meta = json.loads(metas[i] or "{}")
        except ValueError:
            meta = {}
        try:
            tiles[i], max_nums[i] = image_tiles(images[i] or [], meta, verify_images)
            augment[i] = [bool(meta.get("data_augment", False))] * len(tiles[i])
        except (ImageError, TypeError, ValueError):  # or a meta max_dynamic_patch that is no number
            reasons[i] = "pack:image_undecodable"
    ok = [i for i in range(n) if not reasons[i]]
    rendered: dict[int, tuple] = {}
    try:
        for i, r in zip(ok, render_batch([convs[i] or [] for i in ok], [tiles[i] for i in ok], tokenizer, system_prompt)):
            rendered[i] = r
    except ValueError:  # find the bad rows one by one (rare), keep the rest
        for i in ok:
            try:
                rendered[i] = render_batch([convs[i] or []], [tiles[i]], tokenizer, system_prompt)[0]
            except ValueError as e:
                reasons[i] = "pack:image_placeholder_mismatch" if "placeholder" in str(e) else "pack:bad_conversation"
    empty = np.zeros(0, np.int32)
    cols = {"input_ids": [], "labels": [], "image_spans": []}
    for i in range(n):
        ids, labels, spans = rendered.get(i, (empty, empty, []))
        if not reasons[i] and (why := unpackable_reason(spans, tiles[i], max_tokens, max_tiles)):
            reasons[i] = f"pack:{why}"
        elif not reasons[i] and not np.any(labels != IGNORE_INDEX):
            reasons[i] = "pack:no_answer"
        cols["input_ids"].append(ids)
        cols["labels"].append(labels)
        cols["image_spans"].append([x for s in spans for x in s])
    cols.update(tiles_per_image=tiles, image_max_tiles=max_nums, image_augment=augment, reject_reason=reasons)
    arrays = {name: _int32_lists(cols[name]) if name in ("input_ids", "labels") else pa.array(cols[name], type=typ)
              for name, typ in TOKEN_COLUMNS.items()}
    return _with_token_columns(table, arrays)


def _int32_lists(rows: list[np.ndarray]) -> pa.Array:
    """list<int32> from numpy rows by one concatenate (pa.array over the rows costs ~10% of tokenizing)."""
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    values = np.concatenate(rows).astype(np.int32, copy=False) if rows else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _with_token_columns(table: pa.Table, columns) -> pa.Table:
    """`table` with TOKEN_COLUMNS (taken from a dict or a table) appended, replacing any of that name."""
    for name, typ in TOKEN_COLUMNS.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(pa.field(name, typ), columns[name])
    return table


# ---- names and markers ----------------------------------------------------------------------------

def tokens_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, "_tokens", f"{index:05d}.parquet")


def tokens_key(index: int) -> str:
    return f"pack-tokens-{index:05d}"


def part_key(index: int) -> str:
    return f"pack-part-{index:05d}"


def tail_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, "_tail", f"{index:05d}.parquet")


TAIL_KEY, PLAN_KEY = "pack-tail", "pack-plan"


def empty_tokens() -> pa.Table:
    return pa.schema([("id", pa.string()), *TOKEN_COLUMNS.items()]).empty_table()


def plan_partitions(sizes: list[int], partition_bytes: int = DEFAULT_PARTITION_BYTES) -> list[list[int]]:
    """Input shard indices grouped into partitions of consecutive shards, each closed once it holds
    `partition_bytes` (a function of the file sizes only, so every rerun and cluster gets the same)."""
    parts, current, total = [], [], 0
    for i, size in enumerate(sizes):
        current.append(i)
        total += size
        if total >= partition_bytes:
            parts.append(current)
            current, total = [], 0
    if current:
        parts.append(current)
    return parts


# ---- writing shards -------------------------------------------------------------------------------

def write_parquet_fast(table: pa.Table, path: str) -> None:
    """Job-internal files (token cache, tail pieces): LZ4, no dictionaries or statistics (3x less CPU
    than zstd with dictionaries on token columns, bench/packing.py --e2e)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, use_dictionary=False, write_statistics=False, compression="lz4")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def write_packed(table: pa.Table, path: str) -> None:
    """A packed shard: one packed row per row group (see the module docstring), LZ4."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=1, use_dictionary=False, write_statistics=False, compression="lz4")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


class _ShardWriter:
    """Numbered Parquet files `<folder>/<prefix>-00000.parquet` of exactly `rows` rows (the last one
    fewer), written atomically: where a file ends never depends on how the rows arrived."""

    def __init__(self, folder: str, prefix: str, rows: int, write=None):
        self.folder, self.prefix, self.rows = folder, prefix, rows
        self.write_file = write or write_parquet_atomic
        self.pending: list[pa.Table] = []
        self.count = self.written = 0
        self.names: list[str] = []

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.count += table.num_rows
        while self.count >= self.rows:
            self.write(self.rows)

    def write(self, rows: int | None = None) -> None:
        """Write the first `rows` pending rows (all of them by default) as the next file."""
        if self.pending:
            table = pa.concat_tables(self.pending, promote_options="permissive")
            rows = table.num_rows if rows is None else rows
            name = f"{self.prefix}-{len(self.names):05d}.parquet"
            self.write_file(table.slice(0, rows), os.path.join(self.folder, name))
            self.names.append(name)
            self.written += rows
            rest = table.slice(rows)
            self.pending, self.count = ([rest] if rest.num_rows else []), rest.num_rows


class _PackStats:
    """What a partition or the tail reports about the packs it wrote."""

    def __init__(self, max_tokens: int, max_tiles: int):
        self.max_tokens, self.max_tiles = max_tokens, max_tiles
        self.c: Counter = Counter()
        self.fill = np.zeros(FILL_BINS, np.int64)
        self.sizes: Counter = Counter()  # (tokens, tiles) of every piece packed: the lower bound's input

    def add(self, pack: Pack) -> None:
        c = self.c
        c["packs"] += 1
        c["tokens"] += pack.tokens
        c["tiles"] += pack.tiles
        c["pieces"] += len(pack.records)
        c["samples"] += sum(rec.payload.last for rec in pack.records)  # a split sample counts once, at its last piece
        self.sizes.update((rec.tokens, rec.tiles) for rec in pack.records)
        self.fill[min(FILL_BINS - 1, pack.tokens * FILL_BINS // self.max_tokens)] += 1

    def marker(self) -> dict:
        return {**{k: int(self.c[k]) for k in ("packs", "tokens", "tiles", "pieces", "samples")},
                "fill_hist": self.fill.tolist(), "sizes": [[t, k, n] for (t, k), n in sorted(self.sizes.items())]}


# ---- one partition (a call on a PackWorker actor) --------------------------------------------------

class JobTokenizer:
    """The job's saved tokenizer (OUT/tokenizer, model/tokenizer.py's loader), loaded on first use and kept
    by its digest: loading takes ~0.2-0.5 s, a partition's tokenizing ~0.15 CPU-s (bench/packing.py)."""

    def __init__(self):
        self.digest, self.tok = None, None

    def get(self, tok_dir: str, digest: str):
        if digest != self.digest:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one worker = one core
            self.tok, self.digest = load_tokenizer(local_dir(tok_dir)), digest  # one at a time: the last job's
        return self.tok


@contextlib.contextmanager
def _cpu(counts: Counter, stage: str):
    """Add this block's CPU milliseconds (of this process: one worker = one core) to `cpu_ms:<stage>`."""
    t = time.process_time()
    try:
        yield
    finally:
        counts[f"cpu_ms:{stage}"] += round(1000 * (time.process_time() - t))


def _tokenized_shard(spec: dict, index: int, path: str, counts: Counter, tokenizer: JobTokenizer) -> pa.Table:
    """Input shard `index` (images and all) with its token columns: from the cache when its marker
    matches, else tokenized now and cached (data, then marker)."""
    out, fp = spec["out_dir"], spec["token_fingerprint"]
    with _cpu(counts, "read"):
        table = read_canonical(path)
        m = read_marker(out, tokens_key(index))
        if m is not None and m.get("fingerprint") == fp and exists(tokens_path(out, index)):
            tokens = pq.read_table(tokens_path(out, index))
            if not tokens.column("id").equals(table.column("id")):
                raise RuntimeError(f"{path} no longer matches its tokens in {tokens_path(out, index)}; "
                                   "delete that folder's _tokens/ and _done/ and rerun")
            return _with_token_columns(table, tokens)
    with _cpu(counts, "tokenize"):
        tok = tokenizer.get(spec["tok_dir"], spec["tok_digest"])
        b = spec["batch_size"]
        parts = [tokenize_table(table.slice(k, b), tok, **spec["tokenize"]) for k in range(0, table.num_rows, b)]
        joined = pa.concat_tables(parts) if parts else _with_token_columns(table, empty_tokens())
    with _cpu(counts, "cache"):
        cache = joined.select(["id", *TOKEN_COLUMNS])
        write_parquet_fast(cache, tokens_path(out, index))
        write_marker(out, tokens_key(index), {"file": path, "rows": cache.num_rows, "fingerprint": fp})
    counts["tokenized_rows"] += cache.num_rows
    return joined


def _list_values(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, offsets): each row is a zero-copy slice of the values."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = np.asarray(arr.offsets)
    values = arr.values.to_numpy(zero_copy_only=False)
    return values[offsets[0] :], offsets - offsets[0]


def _pieces(tables: Iterator[pa.Table], rejected: _ShardWriter, counts: Counter) -> Iterator[Piece]:
    """Rows of tokenized shards as Pieces; rows that cannot be packed go out whole (token columns dropped)."""
    drop = [c for c in TOKEN_COLUMNS if c != "reject_reason"]
    for batch in tables:
        counts["input"] += batch.num_rows
        reasons = batch.column("reject_reason").to_pylist()
        bad = [i for i, r in enumerate(reasons) if r]
        if bad:
            rejected.add(batch.take(bad).drop_columns(drop))
            counts.update(f"reason:{reasons[i]}" for i in bad)
        ids, id_off = _list_values(batch.column("input_ids"))
        labels, _ = _list_values(batch.column("labels"))
        spans = batch.column("image_spans").to_pylist()
        tiles = batch.column("tiles_per_image").to_pylist()
        max_tiles = batch.column("image_max_tiles").to_pylist()
        augment = batch.column("image_augment").to_pylist()
        sample_ids = batch.column("id").to_pylist()
        images = batch.column("images").to_pylist()
        for i, reason in enumerate(reasons):
            if reason:
                continue
            a, b = id_off[i], id_off[i + 1]
            s = spans[i]
            yield Piece(sample_ids[i], ids[a:b], labels[a:b], list(zip(s[::2], s[1::2])), tiles[i],
                        images[i] or [], max_tiles[i], augment[i])


def _count_splits(stream: Iterator[Piece], counts: Counter) -> Iterator[Piece]:
    last = None
    for piece in stream:
        if piece.part >= 0 and (base := piece.sample_id.rsplit("#", 1)[0]) != last:
            counts["split_samples"] += 1
            last = base
        yield piece


TAIL_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("image_spans", pa.list_(pa.int32())), ("tiles_per_image", pa.list_(pa.int32())),
    ("images", pa.list_(pa.binary())), ("image_max_tiles", pa.list_(pa.int32())),
    ("image_augment", pa.list_(pa.bool_())), ("part", pa.int32()), ("last", pa.bool_()),
])


def _pieces_to_table(pieces: list[Piece]) -> pa.Table:
    cols = {
        "sample_id": [p.sample_id for p in pieces], "input_ids": [p.input_ids for p in pieces],
        "labels": [p.labels for p in pieces], "image_spans": [[x for s in p.image_spans for x in s] for p in pieces],
        "tiles_per_image": [p.tiles_per_image for p in pieces], "images": [p.images for p in pieces],
        "image_max_tiles": [p.image_max_tiles for p in pieces], "image_augment": [p.image_augment for p in pieces],
        "part": [p.part for p in pieces], "last": [p.last for p in pieces],
    }
    return pa.table(cols, schema=TAIL_SCHEMA)


def _table_to_pieces(table: pa.Table) -> list[Piece]:
    ids, off = _list_values(table.column("input_ids"))
    labels, _ = _list_values(table.column("labels"))
    rows = table.drop_columns(["input_ids", "labels"]).to_pylist()
    return [Piece(r["sample_id"], ids[off[i] : off[i + 1]], labels[off[i] : off[i + 1]],
                  list(zip(r["image_spans"][::2], r["image_spans"][1::2])), r["tiles_per_image"], r["images"],
                  r["image_max_tiles"], r["image_augment"], r["part"], r["last"]) for i, r in enumerate(rows)]


def _write_packs(packs: Iterator[Pack], kept: _ShardWriter, stats: _PackStats) -> None:
    group = []
    for pack in packs:
        stats.add(pack)
        group.append(pack)
        if len(group) >= PACKS_PER_WRITE:
            kept.add(packs_to_table(group))
            group = []
    if group:
        kept.add(packs_to_table(group))


def pack_partition(spec: dict, tokenizer: JobTokenizer | None = None) -> dict:
    """Partition `spec["index"]` start to finish (see the module docstring); returns its marker plus
    `tokenized_rows`. A plain function: a `PackWorker` actor runs it as `ivl-pack:partition` with the
    tokenizer it keeps loaded; without one the tokenizer is loaded here, once, if a shard needs it."""
    tokenizer = tokenizer or JobTokenizer()
    out, p = spec["out_dir"], spec["index"]
    max_tokens, max_tiles = spec["max_tokens"], spec["max_tiles"]
    counts: Counter = Counter()
    t0 = time.process_time()

    def timed(write):
        def run(table, path):
            with _cpu(counts, "write"):
                write(table, path)
        return run

    kept = _ShardWriter(os.path.join(out, "kept"), f"pack-{p:05d}", spec["rows_per_shard"], timed(write_packed))
    rejected = _ShardWriter(os.path.join(out, "rejected"), f"rejected-{p:05d}", spec["rows_per_shard"],
                            timed(write_parquet_atomic))
    tables = (_tokenized_shard(spec, i, path, counts, tokenizer) for i, path in spec["shards"])

    def dropped(_piece: Piece) -> None:
        counts["pieces_without_answer"] += 1

    # tokenize_table rejected every row no cut can fit, so on_reject stays unset: a miss raises.
    stream = select_samples([_pieces(tables, rejected, counts)], seed=spec["seed"], max_tokens=max_tokens,
                            max_tiles=max_tiles, on_drop=dropped)
    # the exact search only where nothing follows: one partition, or the tail (repack.py pack_partitioned)
    packer = Packer(max_tokens, max_tiles, buffer_size=spec["buffer_size"], mode=spec["mode"],
                    exact_nodes=EXACT_NODES if spec["partitions"] == 1 else 0)
    stats = _PackStats(max_tokens, max_tiles)
    _write_packs(pack_stream(_count_splits(stream, counts), packer, finish=False), kept, stats)
    last, tail = packer.finish(), []
    if spec["mode"] == "ivl":  # the public policy's mode has no repack: its flushed buffers go as they are
        last, tail = split_tail(last, max_tokens, max_tiles, TAIL_FILL)
    _write_packs(iter(last), kept, stats)
    kept.write()
    rejected.write()
    tail_pieces = [r.payload for q in tail for r in q.records]
    write_parquet_fast(_pieces_to_table(tail_pieces), tail_path(out, p))
    expected = spec["rows"]  # counted from the input files' footers (pipeline/jobs.py), not from the rows read
    if counts["input"] != expected:
        raise AccountingError(f"partition {p}: {counts['input']} rows read, {expected} in its input files")
    # A row is kept once it is not rejected: in this partition's packs or, as pieces, in the tail's.
    marker = Marker(key=part_key(p), input=expected, kept=stats.c["samples"] + sum(q.last for q in tail_pieces),
                    rejected=rejected.written,
                    reasons={k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("reason:")},
                    files=[f"kept/{n}" for n in kept.names] + [f"rejected/{n}" for n in rejected.names])
    cpu = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("cpu_ms:")}
    cpu["pack"] = round(1000 * (time.process_time() - t0)) - sum(cpu.values())  # Select..Maintain, rows -> Arrow
    for stage, ms in sorted(cpu.items()):
        marker.add_stage(stage, ms / 1000, expected)
    marker.extra = {"fingerprint": spec["pack_fingerprint"], "split_samples": counts["split_samples"],
                    "pieces_without_answer": counts["pieces_without_answer"], "tail_pieces": len(tail_pieces),
                    "kept_files": kept.names, "rejected_files": rejected.names, **stats.marker()}
    commit(out, marker)
    return {"marker": marker.to_json(), "tokenized_rows": counts["tokenized_rows"]}


def pack_tail(spec: dict, partitions: int, packs_before: int) -> dict:
    """Every partition's tail pieces repacked (operators/packing/repack.py) into kept/pack-tail-*; its
    marker (its rows are counted by the partitions). With no pack anywhere else it still writes one
    (empty) file, so an empty input has a kept/ file."""
    out = spec["out_dir"]
    t0 = time.process_time()
    pieces = [q for p in range(partitions) for q in _table_to_pieces(pq.read_table(tail_path(out, p)))]
    packs = pack_offline((q.record() for q in pieces), spec["max_tokens"], spec["max_tiles"])
    kept = _ShardWriter(os.path.join(out, "kept"), "pack-tail", spec["rows_per_shard"], write_packed)
    stats = _PackStats(spec["max_tokens"], spec["max_tiles"])
    _write_packs(iter(packs), kept, stats)
    if not kept.count and not kept.names and not packs_before:
        kept.add(packs_to_table([]))
    kept.write()
    marker = Marker(key=TAIL_KEY, input=0, files=[f"kept/{n}" for n in kept.names],
                    extra={"fingerprint": spec["pack_fingerprint"], "kept_files": kept.names, **stats.marker()})
    marker.add_stage("tail", time.process_time() - t0, len(pieces))
    commit(out, marker)
    return marker.to_json()


# ---- the driver -----------------------------------------------------------------------------------

def resume_state(out_dir: str, args: dict, n_files: int) -> tuple[str, list[int]]:
    """(fingerprint of `args`, indices of input shards already tokenized under it).

    A cache made under other `args` is deleted first, with one log line naming what changed; the
    new arguments are recorded before any shard is tokenized under them."""
    fingerprint = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    old = read_marker(out_dir, "pack-args")
    if old is not None and old.get("fingerprint") != fingerprint:
        before = old.get("args", {})
        changed = sorted(k for k in {*args, *before} if args.get(k) != before.get(k))
        log.warning("ivl pack: %s changed since the last run in %s; tokenizing every shard again",
                    ", ".join(changed), out_dir)
        remove_tree(os.path.join(out_dir, "_tokens"))
        _remove_markers(out_dir, "pack-tokens-")
    if old is None or old.get("fingerprint") != fingerprint:
        write_marker(out_dir, "pack-args", {"fingerprint": fingerprint, "args": args})
    done = [
        i for i in range(n_files)
        if (m := read_marker(out_dir, tokens_key(i))) and m.get("fingerprint") == fingerprint
        and exists(tokens_path(out_dir, i))
    ]
    return fingerprint, done


def _remove_markers(out_dir: str, prefix: str) -> None:
    done_dir = os.path.dirname(marker_path(out_dir, "x"))
    for f in list_files(done_dir, ".json", recursive=False):
        if basename(f).startswith(prefix):
            remove(f)


def _pack_plan(out_dir: str, plan: dict) -> str:
    """The fingerprint of the packing plan; made under another plan, every pack and partition marker
    is deleted first (the tokens stay: they do not depend on it)."""
    fingerprint = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    old = read_marker(out_dir, PLAN_KEY)
    if old is None or old.get("fingerprint") != fingerprint:
        for prefix in ("pack-part-", TAIL_KEY):
            _remove_markers(out_dir, prefix)
        for sub in ("kept", "rejected", "_tail"):
            remove_tree(os.path.join(out_dir, sub))
        write_marker(out_dir, PLAN_KEY, {"fingerprint": fingerprint})
    return fingerprint


def _remove_unnamed(folder: str, names: set[str]) -> None:
    """Delete every file in `folder` that no marker names (cut-short writes, an older, longer run)."""
    for f in list_files(folder, "", recursive=False, hidden=True):
        if basename(f) not in names:
            remove(f)


def cache_args(files: list[str], tok_dir: str, system_prompt, max_tokens, max_tiles, verify_images) -> dict:
    """Everything the token cache depends on (see the module docstring)."""
    digest = hashlib.sha256()
    tok_dir = local_dir(tok_dir)  # a saved tokenizer on any storage, read as local files
    for name in sorted(os.listdir(tok_dir)):
        with open(os.path.join(tok_dir, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    inputs = [[abspath(f), *size_and_mtime(f)] for f in files]
    return {"version": CACHE_VERSION, "tokenizer": digest.hexdigest()[:16], "system_prompt": system_prompt,
            "max_tokens": max_tokens, "max_tiles": max_tiles, "verify_images": verify_images, "inputs": inputs}


def free_cpus() -> int:
    """The CPUs of the Ray cluster not held now (at least 1)."""
    import ray

    return max(1, int(ray.available_resources().get("CPU", 0)))


class PackWorker:
    """One `ivl pack` worker (a Ray actor on one CPU): runs partitions and the tail; the tokenizer it
    loads for its first partition serves every later one (and the next job's, if its digest is the same)."""

    def __init__(self):
        self.tokenizer = JobTokenizer()

    def partition(self, spec: dict) -> dict:
        return pack_partition(spec, self.tokenizer)

    def tail(self, spec: dict, partitions: int, packs_before: int) -> dict:
        return pack_tail(spec, partitions, packs_before)


class PackWorkers:
    """A pool of `PackWorker` actors, owned by whoever makes it: `run_pack(..., workers=pool)` for several
    jobs keeps their processes and tokenizers warm; `run_pack` makes one for itself (and ends it) without.
    Ray must be initialised. `size` defaults to the CPUs free now (an actor waiting for a CPU would hold its
    partition until one frees)."""

    def __init__(self, size: int | None = None):
        import ray

        size = size or free_cpus()
        # an actor killed mid-partition (OOM, a lost node) is restarted and the call run again: every
        # file a partition writes is atomic and its marker last, so a rerun ends as one clean run
        actor = ray.remote(num_cpus=1, max_restarts=3, max_task_retries=3)(PackWorker)
        self.actors = [actor.remote() for _ in range(size)]

    def run(self, method: str, calls: list[tuple]) -> Iterator[tuple[int, object]]:
        """(index, result) of each call of `method`, as they finish; each goes to the next idle actor."""
        import ray

        idle, running, queue = list(self.actors), {}, list(enumerate(calls))[::-1]
        while queue or running:
            while idle and queue:
                i, args = queue.pop()
                actor = idle.pop()
                running[getattr(actor, method).options(name=f"ivl-pack:{method}").remote(*args)] = i, actor
            ready, _ = ray.wait(list(running), num_returns=1)
            i, actor = running.pop(ready[0])
            idle.append(actor)
            yield i, ray.get(ready[0])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> PackWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_pack(
    in_dir: str,
    out_dir: str,
    tokenizer,
    max_tokens: int = 16384,
    max_tiles: int = 48,
    buffer_size: int | None = None,
    mode: str = "ivl",
    seed: int = 0,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    system_prompt: str | None = INTERNVL_SYSTEM_PROMPT,
    batch_size: int = 256,
    verify_images: bool = False,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    workers: PackWorkers | None = None,
) -> dict:
    """Pack the canonical shards of `in_dir` (its kept/ if present) into `out_dir`; returns the summary.

    `tokenizer` is a loaded tokenizer or a path / hub name / .gguf file for `load_tokenizer`.
    `verify_images` fully decodes every image (rejecting truncated ones) instead of reading headers.
    Rerun into the same `out_dir`, it resumes (summary `resumed_shards`, `resumed_partitions`). Ray
    must be initialised by the caller (the CLI's `ray_session`); a local one is started otherwise.
    `workers` (a `PackWorkers` the caller owns) runs the calls; without it a pool is made for this job."""
    import ray

    t0 = time.perf_counter()
    files = list_input_shards(in_dir)
    packer = Packer(max_tokens, max_tiles, buffer_size=buffer_size, mode=mode)  # validates mode first
    if rows_per_shard < 1 or partition_bytes < 1:
        raise ValueError("rows_per_shard and partition_bytes must be >= 1")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer
    tok_dir = os.path.join(out_dir, "tokenizer")
    with staged_dir(tok_dir) as d:  # HF writes local files; they are committed to OUT/tokenizer
        tok.save_pretrained(d)

    args = cache_args(files, tok_dir, system_prompt, max_tokens, max_tiles, verify_images)
    token_fp, done = resume_state(out_dir, args, len(files))
    parts = plan_partitions([size for _, size, _ in args["inputs"]], partition_bytes)
    plan = {"tokens": token_fp, "mode": mode, "seed": seed, "buffer_size": buffer_size, "rows_per_shard": rows_per_shard,
            "partitions": parts, "tail_fill": TAIL_FILL}
    spec = {"out_dir": out_dir, "tok_dir": tok_dir, "tok_digest": args["tokenizer"], "token_fingerprint": token_fp,
            "pack_fingerprint": _pack_plan(out_dir, plan), "batch_size": batch_size, "max_tokens": max_tokens,
            "max_tiles": max_tiles, "mode": mode, "seed": seed, "buffer_size": buffer_size,
            "rows_per_shard": rows_per_shard,
            "tokenize": {"system_prompt": system_prompt, "max_tokens": max_tokens, "max_tiles": max_tiles,
                         "verify_images": verify_images}}
    units = plan_units(files)  # rows counted from the input files, never from what the workers read
    if any(u.rows is None for u in units):
        raise ValueError(f"unreadable input shard: {next(u.path for u in units if u.rows is None)}")

    def committed(key: str) -> Marker | None:
        m = read_unit_marker(out_dir, key)
        return m if m is not None and m.extra.get("fingerprint") == spec["pack_fingerprint"] else None

    markers = {p: m for p in range(len(parts)) if (m := committed(part_key(p)))}
    todo = [p for p in range(len(parts)) if p not in markers]
    tokenized_rows = 0
    tail = committed(TAIL_KEY)
    if todo or tail is None:
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)
        with contextlib.ExitStack() as own:
            pool = workers or own.enter_context(PackWorkers(max(1, min(len(todo), free_cpus()))))
            calls = [({**spec, "index": p, "shards": [(i, files[i]) for i in parts[p]],
                       "rows": sum(units[i].rows for i in parts[p]), "partitions": len(parts)},) for p in todo]
            for k, done_p in pool.run("partition", calls):
                markers[todo[k]] = Marker.from_json(done_p["marker"])
                tokenized_rows += done_p["tokenized_rows"]
            packs_before = sum(m.extra["packs"] for m in markers.values())
            tail = Marker.from_json(next(pool.run("tail", [(spec, len(parts), packs_before)]))[1])
    ordered = [markers[p] for p in range(len(parts))]
    _remove_unnamed(os.path.join(out_dir, "kept"), {n for m in [*ordered, tail] for n in m.extra["kept_files"]})
    _remove_unnamed(os.path.join(out_dir, "rejected"), {n for m in ordered for n in m.extra["rejected_files"]})
    return _summarise(out_dir, ordered, tail, t0, files=files, resumed=len(done), tokenized_rows=tokenized_rows,
                      max_tokens=max_tokens, max_tiles=max_tiles, mode=mode, seed=seed, tok_dir=tok_dir,
                      buffer_size=packer.impl.buffers.capacity if mode == "ivl" else packer.impl.capacity,
                      resumed_partitions=len(parts) - len(todo))


def _summarise(out_dir: str, parts: list[Marker], tail: Marker, t0: float, **run) -> dict:
    """summary.json and the fill plot, from the markers alone (pipeline/jobs.py `merge`)."""
    from pipeline.report import histogram, write_summary  # matplotlib: ~0.4 s the pack actors need not import

    markers = [*parts, tail]
    merged = merge(markers)

    def total(key: str, among=markers) -> int:
        return sum(m.extra.get(key, 0) for m in among)

    sizes: Counter = Counter()
    for m in markers:
        sizes.update({(t, k): n for t, k, n in m.extra["sizes"]})
    packs, tokens, tiles = total("packs"), total("tokens"), total("tiles")
    max_tokens, max_tiles = run["max_tokens"], run["max_tiles"]
    lower = lower_bound(sizes, max_tokens, max_tiles)
    if total("samples") != merged["kept"]:  # every kept row is in exactly one written pack
        raise AccountingError(f"{merged['kept']} rows kept but {total('samples')} samples in the packs")
    fill = np.sum([m.extra["fill_hist"] for m in markers], axis=0)
    summary = {
        "input": merged["input"],
        "kept": merged["kept"],
        "rejected": merged["rejected"],
        "reasons": merged["reasons"],
        "samples": total("samples"),
        "pieces": total("pieces"),
        "pieces_without_answer": total("pieces_without_answer", parts),
        "split_samples": total("split_samples", parts),
        "packs": packs,
        "tail_packs": tail.extra["packs"],
        "shards": sum(len(m.extra["kept_files"]) for m in markers),
        "input_shards": len(run["files"]),
        "partitions": len(parts),
        "resumed_partitions": run["resumed_partitions"],
        "resumed_shards": run["resumed"],
        "tokenized_rows": run["tokenized_rows"],
        "total_tokens": tokens,
        "total_tiles": tiles,
        # volume, Martello-Toth L2 per budget and a conflict-clique bound (operators/packing/bounds.py)
        "lower_bound_packs": lower,
        "packs_over_lower_bound": packs / lower if lower else None,
        "lower_bound_packs_volume": volume_bound(sizes, max_tokens, max_tiles),  # the volume bound alone
        "token_fill": tokens / (packs * max_tokens) if packs else 0.0,
        "tile_fill": tiles / (packs * max_tiles) if packs else 0.0,
        "samples_per_pack": total("pieces") / packs if packs else 0.0,
        "rows_per_row_group": 1,
        "task_cpu_s": dict(sorted(merged["stage_seconds"].items())),  # per stage, all workers (one run)
        "max_tokens": max_tokens,
        "max_tiles": max_tiles,
        "mode": run["mode"],
        "buffer_size": run["buffer_size"],
        "seed": run["seed"],
        "tokenizer": run["tok_dir"],
    }
    check_accounting(summary, parts, splits=("kept", "rejected"))
    centres = (np.arange(FILL_BINS) + 0.5) / FILL_BINS
    histogram(np.repeat(centres, fill).tolist(), os.path.join(out_dir, "report", "pack_fill.png"),
              "token fill per pack", bins=FILL_BINS)
    seconds = time.perf_counter() - t0
    summary["seconds"] = round(seconds, 3)
    summary["samples_per_s"] = round(summary["input"] / seconds, 1) if seconds else None
    summary["report"] = write_summary(out_dir, summary)
    return summary


__all__ = ["run_pack", "PackWorkers", "tokenize_table", "image_tiles", "resume_state", "plan_partitions",
           "pack_partition", "pack_tail", "write_packed", "PACKED_SCHEMA"]
