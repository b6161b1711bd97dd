"""Packed shards -> training tensors (the format of operators/packing/format.py; InternVL 2.5's
dynamic high-resolution tiling and random JPEG compression, arXiv 2412.05271).

The CPU work (image decode, InternVL tiling, random JPEG per tile where `image_augment`, ImageNet
normalisation) is `prepare_batch`, a plain function over a numpy batch: Ray Data runs it in `map_batches`
on CPU workers, and the one-process path calls it directly. Data order is a deterministic *plan*:
epoch permutations of the packed rows laid end to end; optimizer step s, micro-batch m, rank r reads slot
(s * accum + m) * world + r. A step number is therefore a complete data position for `--resume`, and the
JPEG draws are seeded by the slot, so a resumed run also sees the same pixels.

Reads: a plan slot reads its one packed row by Parquet row group (`ivl pack` writes one row per row group),
with each shard's footer kept by its reader (`ShardReader`, one per Ray Data actor), so a row costs the same
whatever the number of shards and never reads its neighbours. Chosen over a shard-local order with a shuffle buffer because the plan stays a global
permutation: any step is an exact resume point with no buffer state to checkpoint, and the mix is not
limited to what a buffer holds. Measured by `bench/train_reads.py` (docs/bench_train.md): 40 shards vs 2
shards holding the same rows, and the old whole-file read side by side.
"""

from __future__ import annotations

import io
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from model.tiling import IMAGE_SIZE, dynamic_preprocess
from operators.images import decode_rgb
from operators.packing.format import PACKED_SCHEMA
from pipeline.io import basename, isdir, join, list_files, size_and_mtime

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)  # InternVL build_transform normalisation
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
JPEG_QUALITY = (75, 100)  # inclusive range, InternVL 2.5 data_augment (internvl_chat `qualities`)
PACK_COLUMNS = tuple(PACKED_SCHEMA.names)  # what `ivl pack` writes, one definition


# ---------------------------------------------------------------- pixels
def jpeg_degrade(tile: Image.Image, quality: int) -> Image.Image:
    """Encode as JPEG at `quality` and decode again (InternVL's jpeg_degrade_functions)."""
    buf = io.BytesIO()
    tile.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def normalize(tile: Image.Image) -> np.ndarray:
    """(3, H, W) float32 with ImageNet mean/std, as torchvision ToTensor + Normalize."""
    arr = np.asarray(tile.convert("RGB"), dtype=np.float32) / 255.0
    return ((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def image_tiles(
    data: bytes, max_tiles: int, expected_tiles: int, augment: bool, rng: np.random.Generator
) -> tuple[np.ndarray, list[int]]:
    """Decode, tile (thumbnail included), random-JPEG each tile when `augment`, normalise.

    Returns (tiles (n, 3, 448, 448) float32, JPEG qualities used; empty when augment is off)."""
    image = decode_rgb(data)  # the one decode and error policy (operators/images.py); raises ImageError
    tiles = dynamic_preprocess(image, max_num=int(max_tiles), image_size=IMAGE_SIZE, use_thumbnail=True)
    if len(tiles) != int(expected_tiles):
        raise ValueError(f"image re-tiles to {len(tiles)} tiles but the pack reserved {expected_tiles}")
    qualities = []
    if augment:
        qualities = [int(q) for q in rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, size=len(tiles))]
        tiles = [jpeg_degrade(t, q) for t, q in zip(tiles, qualities)]
    return np.stack([normalize(t) for t in tiles]), qualities


def prepare_pack(row: dict, rng: np.random.Generator) -> dict:
    """One packed row (PACKED_SCHEMA columns) -> arrays the training step consumes."""
    images = list(row["images"] if row["images"] is not None else [])
    if images:
        pixel = np.concatenate(
            [
                image_tiles(img, m, n, bool(a), rng)[0]
                for img, m, n, a in zip(
                    images, row["image_max_tiles"], row["tiles_per_image"], row["image_augment"]
                )
            ]
        )
    else:  # pure-text pack: one dummy tile, contributes with weight 0 (InternVL)
        pixel = np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    n_tiles = int(sum(row["tiles_per_image"])) if images else 0
    if pixel.shape[0] != max(n_tiles, 1):
        raise ValueError(f"row has {pixel.shape[0]} tiles, num_tiles says {n_tiles}")
    return {
        "input_ids": np.asarray(row["input_ids"], dtype=np.int64),
        "labels": np.asarray(row["labels"], dtype=np.int64),
        "position_ids": np.asarray(row["position_ids"], dtype=np.int64),
        "cu_seqlens": np.asarray(row["cu_seqlens"], dtype=np.int32),
        "pixel_values": pixel,
        "has_image": bool(images),
        "num_tiles": n_tiles,
        "sample_ids": "\n".join(row["sample_ids"]),
    }


def prepare_batch(batch: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """`map_batches` function (batch_format="numpy"): packed rows -> tensors; `plan_index` seeds the JPEG draws."""
    n = len(batch["input_ids"])
    slots = batch.get("plan_index", np.arange(n))
    out = [
        prepare_pack({k: batch[k][i] for k in PACK_COLUMNS}, np.random.default_rng((seed, int(slots[i]))))
        for i in range(n)
    ]
    result = {k: _column([o[k] for o in out]) for k in out[0]}
    result["plan_index"] = np.asarray(slots, dtype=np.int64)
    return result


def _column(values: list) -> np.ndarray:
    if isinstance(values[0], np.ndarray):
        col = np.empty(len(values), dtype=object)
        col[:] = values
        return col
    return np.asarray(values)


# ---------------------------------------------------------------- shards and the data plan
def list_shards(data_dir: str | Path) -> list[str]:
    """Packed Parquet files of `ivl pack --out DIR` (DIR/kept/) or of a plain folder of shards."""
    kept = join(data_dir, "kept")
    folder = kept if isdir(kept) else str(data_dir)
    files = list_files(folder, ".parquet", recursive=False)
    if not files:
        raise FileNotFoundError(f"no packed shards (*.parquet) in {folder}")
    return files


def shard_row_counts(files: list[Path]) -> list[int]:
    return [pq.ParquetFile(f).metadata.num_rows for f in files]


def data_fingerprint(files: list[Path], counts: list[int]) -> list[list]:
    """[file name, bytes, rows] per shard in plan order: what a data position (a plan row id) depends on."""
    return [[basename(f), size_and_mtime(f)[0], int(n)] for f, n in zip(files, counts)]


def fingerprint_change(old: list | None, new: list[list]) -> str:
    """"" when the data set is the one `old` describes (or `old` predates fingerprints), else what changed."""
    if old is None:
        return ""
    old, new = [list(x) for x in old], [list(x) for x in new]
    if old == new:
        return ""
    if [x[0] for x in old] != [x[0] for x in new]:
        gone = sorted({x[0] for x in old} - {x[0] for x in new})
        added = sorted({x[0] for x in new} - {x[0] for x in old})
        return f"shards removed: {gone[:3]}, added: {added[:3]}" if gone or added else "shard order changed"
    f, a, b = next((o[0], o, n) for o, n in zip(old, new) if o != n)
    return f"{f}: {a[1]} bytes / {a[2]} rows at the checkpoint, now {b[1]} bytes / {b[2]} rows"


def make_plan(num_rows: int, world_size: int, accum: int, total_steps: int, seed: int) -> np.ndarray:
    """Global row ids, shape (world_size, total_steps * accum): epoch permutations laid end to end."""
    if num_rows <= 0:
        raise ValueError("no packed rows to train on")
    slots = total_steps * accum * world_size
    epochs = -(-slots // num_rows)
    order = np.concatenate([np.random.default_rng((seed, e)).permutation(num_rows) for e in range(epochs)])[
        :slots
    ]
    return order.reshape(total_steps * accum, world_size).T.copy()


def _lru(cache: OrderedDict, key, make, limit: int):
    """cache[key], made by `make()` on a miss; the least recently used entry goes past `limit`."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = make()
    if len(cache) > limit:
        cache.popitem(last=False)
    return value


class ShardReader:
    """Packed rows by Parquet row group, keeping each shard's footer (keyed by mtime and size, so a rewritten
    shard is never read with a stale footer) and the last `groups` row groups read. One per reading process
    (a Ray Data actor of `FetchAndPrepare`, the one-process loop): every footer is read once there."""

    def __init__(self, footers: int = 4096, groups: int = 2):
        # 2 groups: shards written before one-row groups (a whole file per group) still read each file once
        # per run of consecutive rows, as the old whole-file cache did
        self.footers: OrderedDict = OrderedDict()
        self.groups: OrderedDict = OrderedDict()
        self.max_footers, self.max_groups = footers, groups

    def footer(self, path: str, version: tuple[int, int]) -> tuple[pq.FileMetaData, np.ndarray]:
        """A shard's Parquet footer and the first row of each row group."""
        def read():
            meta = pq.read_metadata(path)
            return meta, np.cumsum([0, *(meta.row_group(i).num_rows for i in range(meta.num_row_groups))])

        return _lru(self.footers, (path, *version), read, self.max_footers)

    def read_row(self, path: str, index: int) -> dict:
        """Row `index` of one shard, reading only the row group that holds it."""
        size, mtime_ns = size_and_mtime(path)  # local or any pyarrow.fs URI
        version = (mtime_ns, size)
        meta, starts = self.footer(path, version)
        g = int(np.searchsorted(starts, index, side="right")) - 1

        def read():
            return pq.ParquetFile(path, metadata=meta).read_row_group(g, columns=list(PACK_COLUMNS))

        group = _lru(self.groups, (path, *version, g), read, self.max_groups)
        return group.slice(int(index - starts[g]), 1).to_pylist()[0]

    def read_rows(self, files: list[str], counts: list[int], rows: list[int]) -> dict[str, list]:
        """Packed rows by global index (shards concatenated in `files` order), as python lists per column."""
        starts = np.cumsum([0, *counts])
        out: dict[str, list] = {k: [] for k in PACK_COLUMNS}
        for r in rows:
            f = int(np.searchsorted(starts, r, side="right")) - 1
            rec = self.read_row(str(files[f]), int(r - starts[f]))
            for k in PACK_COLUMNS:
                out[k].append(rec[k])
        return out


class FetchAndPrepare:
    """`map_batches` over a plan dataset (columns plan_index, row): read the rows, then `prepare_batch`.
    A callable class, so Ray Data keeps one per actor and its `ShardReader` serves every row it prepares."""

    def __init__(self, files: list[str], counts: list[int], seed: int):
        self.files, self.counts, self.seed = files, counts, seed
        self.reader = ShardReader()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        rows = self.reader.read_rows(self.files, self.counts, [int(r) for r in batch["row"]])
        rows["plan_index"] = batch["plan_index"]
        return prepare_batch(rows, self.seed)


def plan_items(plan_rank: np.ndarray, start: int = 0, rank: int = 0, world_size: int = 1) -> list[dict]:
    """Rows of one rank's plan dataset from micro-batch `start` on; plan_index = global slot."""
    return [
        {"plan_index": int(i * world_size + rank), "row": int(r)}
        for i, r in enumerate(plan_rank)
        if i >= start
    ]


def iterate_local(
    files: list[str], counts: list[int], items: list[dict], seed: int, prefetch: int = 2
) -> Iterator[dict]:
    """The one-process path: the same `FetchAndPrepare`, one row at a time, no Ray; a background thread
    prepares the next `prefetch` rows while the current one trains (PIL decode/resize release the GIL)."""
    fetch = FetchAndPrepare(files, counts, seed)  # one thread at a time uses it: the pool has one worker

    def one(item: dict) -> dict:
        batch = {"plan_index": np.array([item["plan_index"]]), "row": np.array([item["row"]])}
        return {k: v[0] for k, v in fetch(batch).items()}

    if prefetch <= 0:
        yield from map(one, items)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = deque(pool.submit(one, it) for it in items[:prefetch])
        for nxt in items[prefetch:]:
            yield pending.popleft().result()
            pending.append(pool.submit(one, nxt))
        while pending:
            yield pending.popleft().result()


def to_device(item: dict, device: torch.device) -> dict:
    """One prepared row (numpy, from either path) -> tensors on `device`."""
    out = {}
    for k in ("input_ids", "labels", "position_ids", "cu_seqlens", "pixel_values"):
        out[k] = torch.as_tensor(np.asarray(item[k])).to(device, non_blocking=True)
    out["has_image"] = bool(item["has_image"])
    out["num_tiles"] = int(item["num_tiles"])
    out["plan_index"] = int(item["plan_index"])
    sid = item["sample_ids"]
    out["sample_ids"] = (sid.decode() if isinstance(sid, bytes) else str(sid)).split("\n")
    return out
