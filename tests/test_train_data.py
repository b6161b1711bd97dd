"""Training reads (train/data.py `ShardReader`): the row asked for, each footer read once per reader, a
rewritten shard never read with its old footer."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators.packing import PACKED_SCHEMA
from train.data import ShardReader


def packed_table(n: int, first: int = 0):
    rows = [{"input_ids": [first + i] * 4, "labels": [-100, 1, 2, 3], "position_ids": [0, 1, 2, 3],
             "cu_seqlens": [0, 4], "sample_ids": [f"s/{first + i}"], "images": [], "tiles_per_image": [],
             "image_max_tiles": [], "image_augment": [], "num_tokens": 4, "num_tiles": 0} for i in range(n)]
    return pa.Table.from_pylist(rows, schema=PACKED_SCHEMA)


def test_reader_reads_each_row_and_each_footer_once_and_sees_a_rewritten_shard(tmp_path):
    files, counts = [], [3, 5, 1]
    for k, n in enumerate(counts):
        files.append(str(tmp_path / f"part-{k:05d}.parquet"))
        pq.write_table(packed_table(n, first=10 * k), files[-1], row_group_size=1)
    reader = ShardReader()
    order = np.random.default_rng(0).permutation(sum(counts)).tolist()
    got = reader.read_rows(files, counts, order)["sample_ids"]
    every = [sid for k, n in enumerate(counts) for sid in ([f"s/{10 * k + i}"] for i in range(n))]
    assert got == [every[r] for r in order]
    assert len(reader.footers) == len(files) and len(reader.groups) == reader.max_groups  # the last two groups

    pq.write_table(packed_table(4, first=100), files[0], row_group_size=2)  # rewritten: other rows and groups
    os.utime(files[0], ns=(1, 1))  # even where the clock did not move, size and mtime differ
    assert [reader.read_row(files[0], i)["sample_ids"] for i in range(4)] == [[f"s/{100 + i}"] for i in range(4)]
