"""`ivl pack`: canonical shards -> packed training sequences (InternVL 2.5 §4.2), as a Ray Data job.

    read shards (one task per file) -> tokenize + count tiles (map_batches, an actor pool: the
    tokenizer loads once per worker) -> Select -> Search -> Pack -> Maintain on the driver, streaming
    through `iter_batches` in input order -> OUT/kept/pack-00000.parquet ... (PACKED_SCHEMA)

Memory on the driver is bounded by the packer (buffer_size open packs + a reserve of small text-only
samples) plus one output shard. Rows that cannot be packed go to OUT/rejected/ with `reject_reason`
(`pack:<rule>`); every input row is either in a pack or rejected, and summary.json says how many.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
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
from pipeline.io import list_input_shards, read_canonical, write_parquet_atomic
from pipeline.report import check_accounting, histogram, write_summary

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


# ---- tokenization and tile counting (runs in Ray workers) ----------------------------------------

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
    for name, typ in TOKEN_COLUMNS.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(pa.field(name, typ), pa.array(cols[name], type=typ))
    return table


class _Tokenize:
    """Ray Data actor: loads the saved tokenizer once, then tokenizes batches."""

    def __init__(self, tokenizer_dir: str, system_prompt: str | None, max_tokens: int, max_tiles: int,
                 verify_images: bool):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one Ray worker = one core
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.kwargs = {"system_prompt": system_prompt, "max_tokens": max_tokens, "max_tiles": max_tiles,
                       "verify_images": verify_images}

    def __call__(self, batch: pa.Table) -> pa.Table:
        return tokenize_table(batch, self.tok, **self.kwargs)


def _read_files(batch: pa.Table) -> pa.Table:
    tables = [read_canonical(p) for p in batch.column("path").to_pylist()]
    return pa.concat_tables(tables, promote_options="permissive")


# ---- packing on the driver -----------------------------------------------------------------------

def _list_values(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, offsets): each row is a zero-copy slice of the values."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = np.asarray(arr.offsets)
    values = arr.values.to_numpy(zero_copy_only=False)
    return values[offsets[0] :], offsets - offsets[0]


class _ShardWriter:
    """Numbered Parquet files `<folder>/<prefix>-00000.parquet`, written atomically every `rows` rows."""

    def __init__(self, folder: str, prefix: str, rows: int):
        self.folder, self.prefix, self.rows = folder, prefix, rows
        self.pending: list[pa.Table] = []
        self.count = self.files = self.written = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.count += table.num_rows
        if self.count >= self.rows:
            self.write()

    def write(self) -> None:
        if self.pending:
            table = pa.concat_tables(self.pending, promote_options="permissive")
            write_parquet_atomic(table, os.path.join(self.folder, f"{self.prefix}-{self.files:05d}.parquet"))
            self.files, self.written = self.files + 1, self.written + table.num_rows
        self.pending, self.count = [], 0

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


def _tokenized_dataset(files, tok_dir, workers, system_prompt, max_tokens, max_tiles, verify_images, batch_size):
    """Read shards (one task per file) -> tokenize + count tiles in an actor pool (tokenizer loaded once)."""
    import ray

    return (
        ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
        .map_batches(_read_files, batch_size=1, batch_format="pyarrow")
        .map_batches(
            _Tokenize,
            fn_constructor_kwargs={
                "tokenizer_dir": tok_dir,
                "system_prompt": system_prompt,
                "max_tokens": max_tokens,
                "max_tiles": max_tiles,
                "verify_images": verify_images,
            },
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
        )
    )


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
    Ray must be initialised by the caller (the CLI's `ray_session`); a local one is started otherwise."""
    import ray

    t0 = time.perf_counter()
    files = list_input_shards(in_dir)
    packer = Packer(max_tokens, max_tiles, buffer_size=buffer_size, mode=mode)  # validates mode first
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer
    tok_dir = os.path.join(out_dir, "tokenizer")
    tok.save_pretrained(tok_dir)
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    workers = max(1, min(len(files), int(ray.available_resources().get("CPU", 1))))
    # Same input, same packs: keep the input order. A Dataset takes a deep copy of the current
    # context when it is created, so the caller's context is restored right after.
    ctx = ray.data.DataContext.get_current()
    keep_order, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        ds = _tokenized_dataset(files, tok_dir, workers, system_prompt, max_tokens, max_tiles, verify_images, batch_size)
    finally:
        ctx.execution_options.preserve_order = keep_order

    counts: Counter = Counter()
    split_ids: set[str] = set()
    kept = _ShardWriter(os.path.join(out_dir, "kept"), "pack", rows_per_shard)
    rejected = _ShardWriter(os.path.join(out_dir, "rejected"), "rejected", rows_per_shard)
    batches = ds.iter_batches(batch_format="pyarrow", batch_size=batch_size, prefetch_batches=2)
    # tokenize_table rejected every row that no cut can fit, so on_reject stays unset: a miss raises.
    stream = select_samples([_pieces(batches, rejected, counts)], seed=seed, max_tokens=max_tokens, max_tiles=max_tiles)
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


__all__ = ["run_pack", "tokenize_table", "image_tiles", "PACKED_SCHEMA"]
