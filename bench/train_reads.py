"""Training reads (issue 11 item 4): time per packed row, 40 shards vs 2 shards holding the same rows.

Writes the same packed rows (16,384 tokens, `--images` incompressible image blobs of `--image-kb` each, like
JPEG bytes) in four layouts under one temp dir, then reads `--reads` rows in the training plan's order
(`train.data.make_plan`, a global permutation) in this process:
  row_groups_2 / row_groups_40  - train.data.ShardReader.read_rows: one row per row group (what `ivl pack` writes),
                                  footers cached, only the row's group read;
  whole_file_2 / whole_file_40  - the old reader (before this change): `pq.read_table` of the whole shard
                                  behind an LRU cache of 2 files, shards written as one row group.
Prints ms per row for each, the 40/2 ratio of each reader, and old/new at 40 shards. Files are read warm
(in the page cache right after writing), which favours the old whole-file reader.

    .venv/bin/python bench/train_reads.py [--rows 160 --reads 160 --images 4 --image-kb 100]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators.packing import PACKED_SCHEMA
from train import data as D

TOKENS = 16_384


def packed_rows(n: int, images: int, image_kb: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    samples = 8
    cu = np.linspace(0, TOKENS, samples + 1).astype(np.int32)
    rows = []
    for i in range(n):
        ids = rng.integers(0, 151_000, TOKENS, dtype=np.int32)
        rows.append(
            {
                "input_ids": ids,
                "labels": np.where(rng.random(TOKENS) < 0.5, ids, -100).astype(np.int32),
                "position_ids": np.concatenate([np.arange(b - a, dtype=np.int32) for a, b in zip(cu, cu[1:])]),
                "cu_seqlens": cu,
                "sample_ids": [f"bench/{i}/{k}" for k in range(samples)],
                "images": [rng.bytes(image_kb * 1024) for _ in range(images)],
                "tiles_per_image": [1] * images,
                "image_max_tiles": [1] * images,
                "image_augment": [False] * images,
                "num_tokens": TOKENS,
                "num_tiles": images,
            }
        )
    return pa.Table.from_pylist(rows, schema=PACKED_SCHEMA)


def write_layout(table: pa.Table, folder: Path, shards: int, row_group_size: int | None) -> list[str]:
    """`shards` files of consecutive rows; `row_group_size=None` = one row group per file (the old layout)."""
    folder.mkdir(parents=True)
    bounds = np.linspace(0, table.num_rows, shards + 1).astype(int)
    files = []
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        f = folder / f"part-{k:05d}.parquet"
        part = table.slice(int(a), int(b - a))
        pq.write_table(part, f, row_group_size=row_group_size or max(1, part.num_rows), compression="lz4",
                       use_dictionary=False, write_statistics=False)
        files.append(str(f))
    return files


def old_reader():
    """The reader this change replaced, verbatim: whole shard, LRU of 2 files."""

    @lru_cache(maxsize=2)
    def read_shard(path: str) -> pa.Table:
        return pq.read_table(path, columns=list(D.PACK_COLUMNS))

    def read_rows(files, counts, rows):
        starts = np.cumsum([0, *counts])
        out = {k: [] for k in D.PACK_COLUMNS}
        for r in rows:
            f = int(np.searchsorted(starts, r, side="right")) - 1
            rec = read_shard(str(files[f])).slice(int(r - starts[f]), 1).to_pylist()[0]
            for k in D.PACK_COLUMNS:
                out[k].append(rec[k])
        return out

    return read_rows


def new_reader():
    """train.data.ShardReader.read_rows of a new reader (a fresh data actor: no footer or row group kept)."""
    return D.ShardReader().read_rows


def time_reads(read_rows, files: list[str], order: list[int]) -> tuple[float, float, list[str]]:
    """(wall s per row, CPU s per row of this process, first sample id of each row read)."""
    counts = D.shard_row_counts([Path(f) for f in files])
    t0, c0 = time.perf_counter(), time.process_time()
    ids = []
    for r in order:  # one row per call, as a training step asks for it
        ids.append(read_rows(files, counts, [r])["sample_ids"][0][0])
    return (time.perf_counter() - t0) / len(order), (time.process_time() - c0) / len(order), ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=160)
    ap.add_argument("--reads", type=int, default=160, help="rows read in plan order per layout")
    ap.add_argument("--images", type=int, default=4, help="image blobs per packed row")
    ap.add_argument("--image-kb", type=int, default=100)
    ap.add_argument("--many", type=int, default=40, help="shard count of the many-shard layout")
    ap.add_argument("--few", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="passes over every layout; the best is kept")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ivl_bench_reads_"))
    try:
        table = packed_rows(args.rows, args.images, args.image_kb)
        order = D.make_plan(args.rows, 1, 1, args.reads, seed=0)[0].tolist()
        layouts = {
            f"row_groups_{args.few}": (write_layout(table, tmp / "rg_few", args.few, 1), new_reader),
            f"row_groups_{args.many}": (write_layout(table, tmp / "rg_many", args.many, 1), new_reader),
            f"whole_file_{args.few}": (write_layout(table, tmp / "wf_few", args.few, None), old_reader),
            f"whole_file_{args.many}": (write_layout(table, tmp / "wf_many", args.many, None), old_reader),
        }
        res: dict = {
            "rows": args.rows,
            "reads": len(order),
            "row_mb": round(sum(f.stat().st_size for f in (tmp / "rg_few").iterdir()) / args.rows / 2**20, 3),
        }
        seen, best = None, {"wall": {}, "cpu": {}}
        for _ in range(args.repeat):  # interleaved repeats, best of each: a shared machine's noise only adds
            for name, (files, make_reader) in layouts.items():
                wall, cpu, ids = time_reads(make_reader(), files, order)  # fresh caches every pass
                assert seen is None or ids == seen, f"{name} read other rows"  # same rows, same order
                seen = ids
                best["wall"][name] = min(best["wall"].get(name, float("inf")), wall)
                best["cpu"][name] = min(best["cpu"].get(name, float("inf")), cpu)
        many, few = args.many, args.few
        for kind, ms in best.items():
            res[f"{kind}_ms_per_row"] = {k: round(v * 1e3, 3) for k, v in ms.items()}
            res[f"{kind}_ratios"] = {
                f"row_groups_{many}_over_{few}": round(ms[f"row_groups_{many}"] / ms[f"row_groups_{few}"], 3),
                f"whole_file_{many}_over_{few}": round(ms[f"whole_file_{many}"] / ms[f"whole_file_{few}"], 3),
                f"old_over_new_at_{many}": round(ms[f"whole_file_{many}"] / ms[f"row_groups_{many}"], 2),
            }
        print(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
