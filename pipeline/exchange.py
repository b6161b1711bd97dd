"""Hash partitions through storage, run by plain Ray tasks: the shuffle of global dedup.

A `Parts` is a table in storage cut into `n` hash partitions. Every writer task writes one Parquet
file holding its non-empty partitions as row groups, in partition order, and returns its rows per
partition; the task for partition p reads that row group of every file. Rows go task -> storage ->
task, and only file names and counts go through Ray's object store (NeMo Curator's fuzzy dedup
shuffles its buckets the same way). Files are renamed into place (`write_part_file`) under names
derived from the stage and the writer, and a stage reads only the files its writers returned, so a
rerun overwrites and never reads a stale file.

`StoreBytes` counts what the job puts into the object store: Ray Data operators' output blocks (its
stats), plus the serialized arguments and returns of the tasks run here (`run_tasks`).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.cloudpickle
import xxhash

from pipeline.io import atomic_write_bytes, is_uri, open_input

Slices = list[tuple[str, int]]  # (file, row group): one partition's pieces, what a task reads


@dataclass(frozen=True)
class Parts:
    """A hash-partitioned table in storage: `files` = ((path, rows per partition), ...)."""

    n: int
    files: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __add__(self, other: Parts) -> Parts:
        """The union of two tables partitioned the same way (no data moves)."""
        assert self.n == other.n, (self.n, other.n)
        return Parts(self.n, self.files + other.files)

    def slices(self, p: int) -> Slices:
        """(file, row group) of every file's partition p: the row group index counts the non-empty ones before p."""
        return [(path, sum(1 for c in counts[:p] if c)) for path, counts in self.files if counts[p]]

    def rows(self) -> int:
        return sum(sum(counts) for _, counts in self.files)


def union(parts: list[Parts], n: int) -> Parts:
    out = Parts(n)
    for p in parts:
        out = out + p
    return out


def write_parts(table: pa.Table, part: np.ndarray, n: int, path: str) -> Parts:
    """Write `table` cut by `part` (partition index per row, < n) to `path`, one row group per
    non-empty partition; no rows, no file."""
    if table.num_rows == 0:
        return Parts(n)
    part = np.asarray(part, dtype=np.int64)
    order = np.argsort(part, kind="stable")
    table = table.take(pa.array(order))
    counts = np.bincount(part, minlength=n)
    sink = pa.BufferOutputStream()
    # no dictionary pages: key rows are near-unique (ids, hashes), so dictionaries only cost time (5x the
    # write of 180k band rows) and bytes
    with pq.ParquetWriter(sink, table.schema, compression="zstd", use_dictionary=False) as w:
        start = 0
        for c in counts.tolist():
            if c:
                w.write_table(table.slice(start, c), row_group_size=c)
                start += c
    write_part_file(path, sink.getvalue().to_pybytes())
    return Parts(n, ((path, tuple(counts.tolist())),))


def write_part_file(path: str, data: bytes) -> None:
    """A partition file, renamed into place (a retried task never leaves half of one) but not fsynced
    locally: only this run's later tasks read it, and a rerun removes the run's partitions first."""
    if is_uri(path):
        atomic_write_bytes(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_part(slices: Slices, schema: pa.Schema) -> pa.Table:
    """One partition from its `Parts.slices(p)` (all writers' rows of it), as `schema`. A task gets
    only its own slices, so what each task is sent does not grow with the number of partitions."""
    tables = []
    for path, rg in slices:
        with open_input(path) as f:
            tables.append(pq.ParquetFile(f).read_row_group(rg).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def str_part(col: pa.ChunkedArray | pa.Array, n: int) -> np.ndarray:
    """Partition of each string key: xxh3-64 of its UTF-8 bytes modulo n (the same on every machine)."""
    return np.fromiter((xxhash.xxh3_64_intdigest(s.encode("utf-8")) % n for s in col.to_pylist()),
                       dtype=np.int64, count=len(col))


@ray.remote
def _call(fn, args: tuple):
    return fn(*args)


@dataclass
class StoreBytes:
    """Bytes put into Ray's object store: every Ray Data operator's `output_size_bytes` sum in its
    stats (over each dataset added and the datasets it was built from; an operator reported under
    several datasets counts once), plus the pickled size of every argument tuple and return value of
    `run_tasks` (an upper bound: Ray keeps arguments and returns under 100 KiB in the caller's memory)."""

    seen: set[tuple] = field(default_factory=set)
    total: int = 0

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

    def add_bytes(self, n: int) -> int:
        self.total += n
        return self.total


def run_tasks(fn, calls: list[tuple], store: StoreBytes | None = None) -> list:
    """fn(*args) for every args in `calls` as Ray tasks (one CPU each), results in order; `store`
    counts the pickled arguments and returns."""
    refs = [_call.remote(fn, args) for args in calls]
    out = ray.get(refs)
    if store is not None:
        store.add_bytes(sum(len(ray.cloudpickle.dumps(a)) for a in calls) + sum(len(pickle.dumps(r)) for r in out))
    return out
