"""`ivl ingest`: raw sources -> canonical shards in OUT/kept, bad input in OUT/rejected, a report."""

from __future__ import annotations

import os
import time
from collections import Counter

import ray

from pipeline.io import DEFAULT_ROWS_PER_SHARD, read_marker, write_marker, write_shards
from pipeline.readers import entries_from_sources, plan_tasks, read_task, rows_to_tables
from pipeline.report import bar_chart, check_accounting, merge_counts, write_summary


def ingest_task(task: dict, out_dir: str, fmt: str, rows_per_shard: int) -> dict:
    """Read one task, write its kept and rejected shards atomically, then its marker."""
    kept, rejected = read_task(task)
    k_table, r_table = rows_to_tables(kept, rejected)
    files = write_shards(k_table, os.path.join(out_dir, "kept"), task["key"], fmt, rows_per_shard)
    files += write_shards(r_table, os.path.join(out_dir, "rejected"), task["key"], fmt, rows_per_shard)
    sources: dict[str, Counter] = {}
    for split, rows in (("kept", kept), ("rejected", rejected)):
        for r in rows:
            c = sources.setdefault(r["source"], Counter())
            c["input"] += 1
            c[split] += 1
    marker = {
        "key": task["key"], "input": len(kept) + len(rejected), "kept": len(kept), "rejected": len(rejected),
        "reasons": dict(Counter(r["reject_reason"] for r in rejected)),
        "sources": {s: dict(c) for s, c in sources.items()},
        "files": [os.path.relpath(f, out_dir) for f in files],
    }
    write_marker(out_dir, task["key"], marker)
    return {"key": task["key"], "input": marker["input"]}


def run_ingest(sources: list[str], out_dir: str, fmt: str = "parquet", image_root: str | None = None,
               rows_per_shard: int = DEFAULT_ROWS_PER_SHARD) -> dict:
    """Plan on the driver (bad config fails here), read and write in Ray tasks, then account."""
    t0 = time.time()
    entries = entries_from_sources(sources, image_root)
    tasks = plan_tasks(entries, rows_per_shard)
    todo = [t for t in tasks if read_marker(out_dir, t["key"]) is None]
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=min(len(todo), 1000))
        ds.map(ingest_task, fn_kwargs=dict(out_dir=out_dir, fmt=fmt, rows_per_shard=rows_per_shard)).materialize()
    summary = merge_counts([read_marker(out_dir, t["key"]) for t in tasks])
    check_accounting(summary)
    summary.update(format=fmt, shards=len(tasks), resumed_shards=len(tasks) - len(todo),
                   seconds=round(time.time() - t0, 2))
    bar_chart(summary["reasons"], os.path.join(out_dir, "report", "rejected_by_reason.png"), "ingest: rejected rows by reason")
    write_summary(out_dir, summary)
    return summary
