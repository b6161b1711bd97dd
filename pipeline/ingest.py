"""`ivl ingest`: raw sources -> canonical shards in OUT/kept, bad input in OUT/rejected, a report.

`plan_ingest` runs on the driver before Ray starts (bad sources, layouts and flags fail there, in one
line); `run_ingest` reads and writes in Ray tasks, one per work unit, each counting its input apart
from the reader and refusing to commit if a row went missing; the report is merged from the markers.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from pipeline.io import DEFAULT_ROWS_PER_SHARD, read_marker, write_shards
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
from pipeline.report import bar_chart, write_summary

SPLITS = ("kept", "rejected")
DUPLICATE_EXAMPLES = 5  # duplicate source ids named per unit in the report


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
    files = write_shards(k_table, os.path.join(out_dir, "kept"), task["key"], fmt, rows_per_shard)
    files += write_shards(r_table, os.path.join(out_dir, "rejected"), task["key"], fmt, rows_per_shard)
    m = Marker(key=task["key"], input=expected, files=[os.path.relpath(f, out_dir) for f in files])
    m.add_rows("kept", (r["source"] for r in kept))
    m.add_rows("rejected", (r["source"] for r in rejected), (r["reject_reason"] for r in rejected))
    m.extra = _unit_notes(task, kept + rejected)
    commit(out_dir, m)
    return {"key": task["key"], "input": expected}


def _unit_notes(task: dict, rows: list[dict]) -> dict:
    """Duplicate source ids (the dataset's own `id`) within the unit, and img2dataset's own count."""
    notes: dict = {}
    ids: Counter = Counter()
    for r in rows:
        orig = json.loads(r["meta"]).get("orig_id") if r["meta"] and '"orig_id"' in r["meta"] else None
        if orig is not None:
            ids[(r["source"], json.dumps(orig))] += 1
    dups = {k: n for k, n in ids.items() if n > 1}
    if dups:
        by_source: Counter = Counter()
        for (src, _orig), n in dups.items():
            by_source[src] += n - 1
        notes["duplicate_source_ids"] = dict(by_source)
        notes["duplicate_source_id_examples"] = [f"{s}: id {o} x{n}" for (s, o), n in list(dups.items())[:DUPLICATE_EXAMPLES]]
    expected = img2dataset_expected(task["entry"].get("stats"))
    if expected is not None:
        notes["img2dataset_successes"] = {task["entry"]["path"]: expected}
    return notes


def run_ingest(sources: list[str] | IngestPlan, out_dir: str, fmt: str = "parquet", image_root: str | None = None,
               rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, **plan_options) -> dict:
    """Plan on the driver (bad config fails here) unless given a plan, read and write in Ray tasks, then account
    from the markers alone."""
    import ray  # only here: planning and validation never start or import Ray

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
    summary.update(_merge_notes(markers, tasks))
    summary.update(format=fmt, shards=len(tasks), resumed_shards=len(tasks) - len(todo), skipped_files=plan.skipped,
                   seconds=round(time.time() - t0, 2))
    bar_chart(summary["reasons"], os.path.join(out_dir, "report", "rejected_by_reason.png"), "ingest: rejected rows by reason")
    write_summary(out_dir, summary)
    return summary


def _merge_notes(markers: list[Marker], tasks: list[dict]) -> dict:
    dup: Counter = Counter()
    examples: list[str] = []
    stats: dict[str, int] = {}
    for m in markers:
        dup.update(m.extra.get("duplicate_source_ids", {}))
        examples += m.extra.get("duplicate_source_id_examples", [])
        stats.update(m.extra.get("img2dataset_successes", {}))
    out: dict = {"duplicate_source_ids": dict(sorted(dup.items()))}
    if examples:
        out["duplicate_source_id_examples"] = examples[:20]
    by_key = {m.key: m for m in markers}
    mismatch = {}
    for t in tasks:
        path = t["entry"]["path"]
        if path in stats and stats[path] != by_key[t["key"]].input:
            mismatch[path] = {"stats_successes": stats[path], "tar_samples": by_key[t["key"]].input}
    if stats:
        out["img2dataset_stats_mismatch"] = mismatch
    return out
