"""`ivl pack`: canonical shards -> packed training sequences (InternVL 2.5 §4.2), as a Ray Data job.

    1. tokenize: input shard i (one Ray actor call per file; the tokenizer loads once per worker)
       -> token columns + tile counts + reject_reason -> OUT/_tokens/<i>.parquet, then the marker
       OUT/_done/pack-tokens-<i>.json. Only the token columns are cached, never the image bytes.
    2. pack on the driver: for each input shard in order, its rows (re-read, images included) joined
       with its cached token columns -> Select -> Search -> Pack -> Maintain
       -> OUT/kept/pack-00000.parquet ... (PACKED_SCHEMA), OUT/rejected/rejected-00000.parquet ...

Resume. A killed job rerun with the same arguments skips every input shard whose marker exists
and tokenizes the rest; step 2 always runs in full from the cache. The cache is the only state
kept between runs, and step 2 is a pure function of it (the same rows in the same order, a seeded
selection, a deterministic packer, output files cut every `rows_per_shard` rows whatever the read
batching), so the rerun rewrites kept/ and rejected/ byte for byte as an uninterrupted run would,
and deletes higher-numbered files left by an earlier, longer run. Why not checkpoint the packer at
each output shard instead: its state (open buffers, the reserve, buffer ids, a split sample's
pending pieces, the rejected rows not yet written, the fill histogram) is large and intricate, and
tokenizing is the slow part (image headers + the chat template), while the packer runs at ~1M samples/s
(docs/bench_packing.md).
The cache depends on the tokenizer (hash of its saved files), the system prompt, both budgets
(they decide what is rejected), `verify_images` and the input files (path, size, mtime); a rerun
where any of these changed logs one line naming them and tokenizes from scratch. The packing
arguments (mode, seed, buffer size, rows per shard) are not in it: step 2 reruns with whatever
they are now, so a changed seed reuses the tokens and gives exactly a clean run's packs.

Memory on the driver is bounded by the packer (buffer_size open packs + a reserve of small text-only
samples), one output shard and two input shards (one read ahead). Rows that cannot be packed go to
OUT/rejected/ with `reject_reason` (`pack:<rule>`); every input row is either in a pack or rejected,
and summary.json says how many.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from model.tiling import count_tiles, max_tiles_per_image
from model.tokenizer import INTERNVL_SYSTEM_PROMPT, load_tokenizer, render_batch
from operators.packing import (
    PACKED_SCHEMA,
    Pack,
    Packer,
    Piece,
    pack_stream,
    select_samples,
    unpackable_reason,
)
from operators.packing.format import packs_to_table
from pipeline.io import (
    list_input_shards,
    marker_path,
    read_canonical,
    read_marker,
    write_marker,
    write_parquet_atomic,
)
from pipeline.report import check_accounting, histogram, write_summary

log = logging.getLogger(__name__)

DEFAULT_MAX_DYNAMIC_PATCH = 12  # InternVL 2.5 default per dataset, overridable in its meta entry
DEFAULT_ROWS_PER_SHARD = 256  # packs per output file (~16k tokens each plus their images)
TOKEN_COLUMNS = {
    "input_ids": pa.list_(pa.int32()),
    "labels": pa.list_(pa.int32()),
    "image_spans": pa.list_(pa.int32()),  # flattened [start, end) pairs
    "tiles_per_image": pa.list_(pa.int32()),
    "image_max_tiles": pa.list_(pa.int32()),
    "image_augment": pa.list_(pa.bool_()),
    "reject_reason": pa.string(),  # "" when the row can be packed
}
CACHE_VERSION = 1  # bump when tokenize_table's output changes: old caches are then tokenized again


# ---- tokenization and tile counting ----------------------------------------------------------------

def image_tiles(images: list[bytes], meta: dict, verify: bool = False) -> tuple[list[int], list[int]]:
    """(tiles, max_num) per image from the encoded bytes: size from the header, InternVL's geometry,
    the dataset's `max_dynamic_patch` divided among the sample's images. Raises on bytes PIL cannot
    identify; with `verify`, also on data that does not decode to the end (a full decode: ~5x slower,
    so off by default: curate's image checks are where broken pixels are meant to be caught)."""
    mdp = int(meta.get("max_dynamic_patch") or DEFAULT_MAX_DYNAMIC_PATCH)
    max_num = max_tiles_per_image(mdp, len(images))
    tiles = []
    for data in images:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if verify:
                im.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale; still reads the whole stream
                im.load()
        tiles.append(count_tiles(w, h, max_num=max_num))
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
    images, or one image block alone is over a budget (no cut can make it fit)."""
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
        except Exception:  # PIL raises many kinds for bad bytes
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
        cols["input_ids"].append(ids)
        cols["labels"].append(labels)
        cols["image_spans"].append([x for s in spans for x in s])
    cols.update(tiles_per_image=tiles, image_max_tiles=max_nums, image_augment=augment, reject_reason=reasons)
    return _with_token_columns(table, {name: pa.array(cols[name], type=typ) for name, typ in TOKEN_COLUMNS.items()})


def _with_token_columns(table: pa.Table, columns) -> pa.Table:
    """`table` with TOKEN_COLUMNS (taken from a dict or a table) appended, replacing any of that name."""
    for name, typ in TOKEN_COLUMNS.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(pa.field(name, typ), columns[name])
    return table


# ---- step 1: tokenize each input shard once, durably (runs in Ray workers) -------------------------

def tokens_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, "_tokens", f"{index:05d}.parquet")


def tokens_key(index: int) -> str:
    return f"pack-tokens-{index:05d}"


class _TokenizeShards:
    """Ray Data actor: loads the saved tokenizer once, then tokenizes whole input shards, writing
    each one's token columns and then its marker (the marker is the commit: a file without one is
    tokenized again)."""

    def __init__(self, tokenizer_dir: str, out_dir: str, fingerprint: str, batch_size: int, **kwargs):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one Ray worker = one core
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.out_dir, self.fingerprint, self.batch_size, self.kwargs = out_dir, fingerprint, batch_size, kwargs

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for index, path in zip(batch.column("index").to_pylist(), batch.column("path").to_pylist()):
            table = read_canonical(path)
            parts = [
                tokenize_table(table.slice(k, self.batch_size), self.tok, **self.kwargs).select(["id", *TOKEN_COLUMNS])
                for k in range(0, table.num_rows, self.batch_size)
            ]
            tokens = pa.concat_tables(parts) if parts else _empty_tokens()
            write_parquet_atomic(tokens, tokens_path(self.out_dir, index))
            write_marker(self.out_dir, tokens_key(index),
                         {"file": path, "rows": tokens.num_rows, "fingerprint": self.fingerprint})
            rows.append({"index": index, "rows": tokens.num_rows})
        return pa.Table.from_pylist(rows, schema=pa.schema([("index", pa.int64()), ("rows", pa.int64())]))


def _empty_tokens() -> pa.Table:
    return pa.schema([("id", pa.string()), *TOKEN_COLUMNS.items()]).empty_table()


def _tokenize_shards(todo: list[tuple[int, str]], out_dir: str, tok_dir: str, fingerprint: str, batch_size: int,
                     **kwargs) -> int:
    """Tokenize the input shards `todo` [(index, path)] in an actor pool; returns the rows tokenized."""
    import ray

    workers = max(1, min(len(todo), int(ray.available_resources().get("CPU", 1))))
    ds = ray.data.from_items([{"index": i, "path": f} for i, f in todo], override_num_blocks=len(todo)).map_batches(
        _TokenizeShards,
        fn_constructor_kwargs={"tokenizer_dir": tok_dir, "out_dir": out_dir, "fingerprint": fingerprint,
                               "batch_size": batch_size, **kwargs},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
    )
    return sum(sum(b.column("rows").to_pylist()) for b in ds.iter_batches(batch_format="pyarrow", batch_size=None))


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
        shutil.rmtree(os.path.join(out_dir, "_tokens"), ignore_errors=True)
        done_dir = os.path.dirname(marker_path(out_dir, "x"))
        for name in os.listdir(done_dir):
            if name.startswith("pack-tokens-"):
                os.remove(os.path.join(done_dir, name))
    if old is None or old.get("fingerprint") != fingerprint:
        write_marker(out_dir, "pack-args", {"fingerprint": fingerprint, "args": args})
    done = [
        i for i in range(n_files)
        if (m := read_marker(out_dir, tokens_key(i))) and m.get("fingerprint") == fingerprint
        and os.path.exists(tokens_path(out_dir, i))
    ]
    return fingerprint, done


def _cache_args(files: list[str], tok_dir: str, system_prompt, max_tokens, max_tiles, verify_images) -> dict:
    """Everything the token cache depends on (see the module docstring)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(tok_dir)):
        with open(os.path.join(tok_dir, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    inputs = [[os.path.abspath(f), (st := os.stat(f)).st_size, st.st_mtime_ns] for f in files]
    return {"version": CACHE_VERSION, "tokenizer": digest.hexdigest()[:16], "system_prompt": system_prompt,
            "max_tokens": max_tokens, "max_tiles": max_tiles, "verify_images": verify_images, "inputs": inputs}


# ---- packing on the driver -----------------------------------------------------------------------

def _list_values(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, offsets): each row is a zero-copy slice of the values."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = np.asarray(arr.offsets)
    values = arr.values.to_numpy(zero_copy_only=False)
    return values[offsets[0] :], offsets - offsets[0]


def _load_tokenized(out_dir: str, index: int, path: str) -> pa.Table:
    """Input shard `index` (images and all) joined with its cached token columns."""
    table = read_canonical(path)
    tokens = pq.read_table(tokens_path(out_dir, index))
    if tokens.column("id").to_pylist() != table.column("id").to_pylist():
        raise RuntimeError(f"{path} no longer matches its tokens in {tokens_path(out_dir, index)}; "
                           "delete that folder's _tokens/ and _done/ and rerun")
    return _with_token_columns(table, tokens)


def _tokenized_tables(out_dir: str, files: list[str]) -> Iterator[pa.Table]:
    """Every input shard in order, joined with its tokens; the next one is read in a thread meanwhile."""
    with ThreadPoolExecutor(1) as pool:
        ahead = [pool.submit(_load_tokenized, out_dir, i, f) for i, f in enumerate(files[:1])]
        for i in range(len(files)):
            current = ahead.pop().result()
            if i + 1 < len(files):
                ahead.append(pool.submit(_load_tokenized, out_dir, i + 1, files[i + 1]))
            yield current


class _ShardWriter:
    """Numbered Parquet files `<folder>/<prefix>-00000.parquet` of exactly `rows` rows (the last one
    fewer), written atomically: where a file ends never depends on how the rows arrived."""

    def __init__(self, folder: str, prefix: str, rows: int):
        self.folder, self.prefix, self.rows = folder, prefix, rows
        self.pending: list[pa.Table] = []
        self.count = self.files = self.written = 0

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
            write_parquet_atomic(table.slice(0, rows), os.path.join(self.folder, f"{self.prefix}-{self.files:05d}.parquet"))
            self.files, self.written = self.files + 1, self.written + rows
            rest = table.slice(rows)
            self.pending, self.count = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        """Write the rest and delete files left by an earlier, longer run under the same names."""
        self.write()
        if not os.path.isdir(self.folder):
            return
        for name in os.listdir(self.folder):
            stem = name[len(self.prefix) + 1 : -len(".parquet")]
            if name.startswith(self.prefix + "-") and name.endswith(".parquet") and stem.isdigit():
                if int(stem) >= self.files:
                    os.remove(os.path.join(self.folder, name))
            elif name.startswith(".tmp-"):  # a write cut short by a kill (pipeline.io.atomic_write_bytes)
                os.remove(os.path.join(self.folder, name))


def _pieces(batches: Iterator[pa.Table], rejected: _ShardWriter, counts: Counter) -> Iterator[Piece]:
    """Kept rows of the tokenized stream as Pieces; rejected rows go out whole (token columns dropped)."""
    drop = [c for c in TOKEN_COLUMNS if c != "reject_reason"]
    for batch in batches:
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
        images = batch.column("images")
        for i, reason in enumerate(reasons):
            if reason:
                continue
            a, b = id_off[i], id_off[i + 1]
            s = spans[i]
            yield Piece(
                sample_id=sample_ids[i],
                input_ids=ids[a:b],
                labels=labels[a:b],
                image_spans=list(zip(s[::2], s[1::2])),
                tiles_per_image=tiles[i],
                images=images[i].as_py() or [],
                image_max_tiles=max_tiles[i],
                image_augment=augment[i],
            )


def _account(pack: Pack, stats: Counter, fills: list, split_ids: set, max_tokens: int) -> None:
    stats["packs"] += 1
    stats["tokens"] += pack.tokens
    stats["tiles"] += pack.tiles
    fills.append(pack.tokens / max_tokens)
    for rec in pack.records:
        piece: Piece = rec.payload
        stats["pieces"] += 1
        stats["samples"] += piece.last  # a split sample counts once, with its last piece
        if piece.part >= 0:
            split_ids.add(piece.sample_id.rsplit("#", 1)[0])


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
    batch_size: int = 64,
    verify_images: bool = False,
) -> dict:
    """Pack the canonical shards of `in_dir` (its kept/ if present) into `out_dir`; returns the summary.

    `tokenizer` is a loaded tokenizer or a path / hub name / .gguf file for `load_tokenizer`.
    `verify_images` fully decodes every image (rejecting truncated ones) instead of reading headers.
    Rerun into the same `out_dir`, it resumes: input shards tokenized before are not tokenized again
    (summary `resumed_shards`). Ray must be initialised by the caller (the CLI's `ray_session`); a
    local one is started otherwise."""
    import ray

    t0 = time.perf_counter()
    files = list_input_shards(in_dir)
    packer = Packer(max_tokens, max_tiles, buffer_size=buffer_size, mode=mode)  # validates mode first
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer
    tok_dir = os.path.join(out_dir, "tokenizer")
    tok.save_pretrained(tok_dir)

    # Step 1: tokenize the input shards not tokenized yet under the same arguments.
    args = _cache_args(files, tok_dir, system_prompt, max_tokens, max_tiles, verify_images)
    fingerprint, done = resume_state(out_dir, args, len(files))
    skip = set(done)
    todo = [(i, f) for i, f in enumerate(files) if i not in skip]
    tokenized_rows = 0
    if todo:
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)
        tokenized_rows = _tokenize_shards(todo, out_dir, tok_dir, fingerprint, batch_size, system_prompt=system_prompt,
                                          max_tokens=max_tokens, max_tiles=max_tiles, verify_images=verify_images)

    # Step 2: pack every shard from the cache, in input order.
    counts: Counter = Counter()
    split_ids: set[str] = set()
    kept = _ShardWriter(os.path.join(out_dir, "kept"), "pack", rows_per_shard)
    rejected = _ShardWriter(os.path.join(out_dir, "rejected"), "rejected", rows_per_shard)
    # tokenize_table rejected every row that no cut can fit, so on_reject stays unset: a miss raises.
    pieces = _pieces(_tokenized_tables(out_dir, files), rejected, counts)
    stream = select_samples([pieces], seed=seed, max_tokens=max_tokens, max_tiles=max_tiles)
    fills, stats, group = [], Counter(), []
    for pack in pack_stream(stream, packer):
        _account(pack, stats, fills, split_ids, max_tokens)
        group.append(pack)
        if len(group) >= 32:  # build Arrow in small groups: memory stays bounded
            kept.add(packs_to_table(group))
            group = []
    if group or not (kept.files or kept.count):  # an empty input still gets one (empty) pack file
        kept.add(packs_to_table(group))
    kept.close()
    rejected.close()

    packs = stats["packs"]
    lower = max(math.ceil(stats["tokens"] / max_tokens), math.ceil(stats["tiles"] / max_tiles))
    seconds = time.perf_counter() - t0
    summary = {
        "input": counts["input"],
        "kept": stats["samples"],
        "rejected": rejected.written,
        "reasons": dict(sorted((k.split(":", 1)[1], v) for k, v in counts.items() if k.startswith("reason:"))),
        "samples": stats["samples"],
        "pieces": stats["pieces"],
        "split_samples": len(split_ids),
        "packs": packs,
        "shards": kept.files,
        "input_shards": len(files),
        "resumed_shards": len(done),
        "tokenized_rows": tokenized_rows,
        "total_tokens": stats["tokens"],
        "total_tiles": stats["tiles"],
        "lower_bound_packs": lower,
        "packs_over_lower_bound": packs / lower if lower else None,
        "token_fill": stats["tokens"] / (packs * max_tokens) if packs else 0.0,
        "tile_fill": stats["tiles"] / (packs * max_tiles) if packs else 0.0,
        "samples_per_pack": stats["pieces"] / packs if packs else 0.0,
        "max_tokens": max_tokens,
        "max_tiles": max_tiles,
        "mode": mode,
        "buffer_size": packer.impl.buffers.capacity if mode == "ivl" else packer.impl.capacity,
        "seed": seed,
        "seconds": round(seconds, 3),
        "samples_per_s": round(counts["input"] / seconds, 1) if seconds else None,
        "tokenizer": tok_dir,
    }
    check_accounting(summary)
    histogram(fills, os.path.join(out_dir, "report", "pack_fill.png"), "token fill per pack", bins=50)
    summary["report"] = write_summary(out_dir, summary)
    return summary


__all__ = ["run_pack", "tokenize_table", "image_tiles", "resume_state", "PACKED_SCHEMA"]
