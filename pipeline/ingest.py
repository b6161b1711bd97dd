"""`ivl ingest`: raw sources -> canonical shards in OUT/kept, bad input in OUT/rejected, a report.

`plan_ingest` runs on the driver before Ray starts (bad sources, layouts and flags fail there, in one
line); `run_ingest` reads and writes in Ray tasks, one per work unit, each counting its input apart
from the reader and refusing to commit if a row went missing; the report is merged from the markers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from pipeline.io import (
    DEFAULT_ROWS_PER_SHARD,
    exists,
    is_uri,
    join,
    open_input,
    read_marker,
    relpath,
    write_parquet_atomic,
    write_shards,
)
from pipeline.jobs import AccountingError, Marker, check_accounting, commit, merge
from pipeline.readers import (
    count_input,
    entries_from_sources,
    img2dataset_expected,
    plan_tasks,
    read_task,
    rows_to_tables,
)
from pipeline.records import DEFAULT_INSTRUCTION

SPLITS = ("kept", "rejected")


@dataclass
class IngestPlan:
    """What the driver decided before any work: the read tasks and the files it left out, with why."""

    tasks: list[dict]
    skipped: list[dict] = field(default_factory=list)


def plan_ingest(sources: list[str], image_root: str | None = None, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                input_format: str = "auto", encoding: str | None = None, instruction: str = DEFAULT_INSTRUCTION,
                remote_images: bool = False) -> IngestPlan:
    """Classify and plan every source (no Ray needed); raises ConfigError with one line."""
    skipped: list[dict] = []
    entries = entries_from_sources(sources, image_root, input_format=input_format, encoding=encoding,
                                   instruction=instruction, remote_images=remote_images, skipped=skipped)
    return IngestPlan(plan_tasks(entries, rows_per_shard), skipped)


def ingest_task(task: dict, out_dir: str, fmt: str, rows_per_shard: int) -> dict:
    """Read one task, check it against its independent input count, write its shards, then its marker."""
    expected = count_input(task)
    kept, rejected = read_task(task)
    if expected != len(kept) + len(rejected):
        # a reader lost (or invented) rows: fail before the commit, so nothing partial looks finished
        raise AccountingError(f"ingest unit {task['key']} ({task['entry']['path']}): {expected} input rows counted "
                              f"from the file but the reader returned {len(kept)} kept + {len(rejected)} rejected")
    k_table, r_table = rows_to_tables(kept, rejected)
    files = write_shards(k_table, join(out_dir, "kept"), task["key"], fmt, rows_per_shard)
    files += write_shards(r_table, join(out_dir, "rejected"), task["key"], fmt, rows_per_shard)
    m = Marker(key=task["key"], input=expected, files=[relpath(f, out_dir) for f in files])
    m.add_rows("kept", (r["source"] for r in kept))
    m.add_rows("rejected", (r["source"] for r in rejected), (r["reject_reason"] for r in rejected))
    m.extra = _unit_notes(task, kept + rejected, out_dir)
    commit(out_dir, m)
    return {"key": task["key"], "input": expected}


def _unit_notes(task: dict, rows: list[dict], out_dir: str) -> dict:
    """img2dataset's own count, and the source ids (the dataset's `id`) as 64-bit hashes in `_ids/<key>.parquet`,
    so duplicates across every unit of a source are found from key rows alone (`find_duplicate_ids`)."""
    notes: dict = {}
    sources, hashes = [], []
    for r in rows:
        orig = json.loads(r["meta"]).get("orig_id") if r["meta"] and '"orig_id"' in r["meta"] else None
        if orig is not None:
            sources.append(r["source"])
            hashes.append(xxhash.xxh64_intdigest(json.dumps(orig, sort_keys=True).encode()))
    if hashes:
        table = pa.table({"source": sources, "h": pa.array(hashes, pa.uint64())})
        write_parquet_atomic(table, join(out_dir, "_ids", f"{task['key']}.parquet"))
    expected = img2dataset_expected(task["entry"].get("stats"))
    if expected is not None:
        notes["img2dataset_successes"] = {task["entry"]["path"]: expected}
    return notes


def find_duplicate_ids(out_dir: str, keys: list[str]) -> dict[str, int]:
    """Rows per source whose source id another row of the same source already has, from the key rows only
    (source, 8-byte hash): pyarrow's hash group-by, a few MB for millions of rows."""
    files = [f for f in (join(out_dir, "_ids", f"{k}.parquet") for k in keys) if exists(f)]
    if not files:
        return {}
    ids = pa.concat_tables(pq.read_table(open_input(f)) for f in files)
    counts = ids.group_by(["source", "h"]).aggregate([("h", "count")])
    extra = pc.subtract(counts["h_count"], 1)
    per_source = pa.table({"source": counts["source"], "extra": extra}).group_by("source").aggregate([("extra", "sum")])
    return {s: n for s, n in zip(per_source["source"].to_pylist(), per_source["extra_sum"].to_pylist()) if n}


def run_ingest(sources: list[str] | IngestPlan, out_dir: str, fmt: str = "parquet", image_root: str | None = None,
               rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, **plan_options) -> dict:
    """Plan on the driver (bad config fails here) unless given a plan, read and write in Ray tasks, then account
    from the markers alone."""
    import ray  # only here: planning and validation never start or import Ray

    from pipeline.report import bar_chart, write_summary  # matplotlib: not on the validation path

    t0 = time.time()
    plan = sources if isinstance(sources, IngestPlan) else plan_ingest(sources, image_root, rows_per_shard, **plan_options)
    tasks = plan.tasks
    todo = [t for t in tasks if read_marker(out_dir, t["key"]) is None]
    if todo:
        from pipeline.session import name_dataset  # `ivl-ingest:read` on the dashboard

        ds = name_dataset(ray.data.from_items(todo, override_num_blocks=min(len(todo), 1000)), "read")
        ds.map(ingest_task, fn_kwargs=dict(out_dir=out_dir, fmt=fmt, rows_per_shard=rows_per_shard)).materialize()
    markers = []
    for t in tasks:
        d = read_marker(out_dir, t["key"])
        if d is None:
            raise AccountingError(f"ingest unit {t['key']} has no marker after the job")
        markers.append(Marker.from_json(d))
    summary = merge(markers)
    summary.pop("review", None)
    summary.pop("review_reasons", None)
    check_accounting(summary, markers, splits=SPLITS)
    summary.update(_merge_notes(out_dir, markers, tasks))
    summary.update(format=fmt, shards=len(tasks), resumed_shards=len(tasks) - len(todo), skipped_files=plan.skipped,
                   seconds=round(time.time() - t0, 2))
    if not is_uri(out_dir):  # report.py draws to local files only
        bar_chart(summary["reasons"], join(out_dir, "report", "rejected_by_reason.png"), "ingest: rejected rows by reason")
    write_summary(out_dir, summary)
    return summary


def _merge_notes(out_dir: str, markers: list[Marker], tasks: list[dict]) -> dict:
    stats: dict[str, int] = {}
    for m in markers:
        stats.update(m.extra.get("img2dataset_successes", {}))
    out: dict = {"duplicate_source_ids": dict(sorted(find_duplicate_ids(out_dir, [t["key"] for t in tasks]).items()))}
    by_key = {m.key: m for m in markers}
    mismatch = {}
    for t in tasks:
        path = t["entry"]["path"]
        if path in stats and stats[path] != by_key[t["key"]].input:
            mismatch[path] = {"stats_successes": stats[path], "tar_samples": by_key[t["key"]].input}
    if stats:
        out["img2dataset_stats_mismatch"] = mismatch
    return out
