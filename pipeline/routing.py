"""Routing one curate unit: its rows written to kept/, rejected/ (with `reject_reason`) or review/ (with
`review_reason`) under names built from the unit's key and row range, then its marker committed.

With global dedup the unit is judged first (`write_verdicts`: its routing state and dedup key rows, no
content, under OUT/_verdicts/) and routed after the dedup (`route_unit`), with the dedup's decisions
for this shard only.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators.base import KEEP, REJECT, REVIEW
from pipeline.curate_config import DedupConfig
from pipeline.io import (
    exists,
    join,
    read_bytes,
    read_marker,
    relpath,
    write_marker,
    write_parquet_atomic,
    write_shards,
)
from pipeline.jobs import Histogram, Marker, StageStat, commit
from pipeline.schema import CANONICAL
from pipeline.verdicts import (
    CORRUPT_SHARD,
    Reason,
    contract_reasons,
    load_unit,
    reasons_of,
    review_reasons_of,
)

if TYPE_CHECKING:  # (annotations only: dedup code is imported where a job uses it)
    from pipeline.dedup_stage import KeyMaker

INTERNAL = ("_shard", "_row", "_decision")
REPEAT_SUFFIX = re.compile(r"#r\d+$")  # ids of repeat_time copies (pipeline/readers.py)
VERDICT_DIR, DECISION_DIR = "_verdicts", "_dedup"
NO_DECISIONS = pa.schema([("_row", pa.int64()), ("dedup_rule", pa.string()), ("dup_of", pa.string())]).empty_table()


def score_histograms(table: pa.Table) -> dict[str, Histogram]:
    """One histogram per float score column, over all of the unit's rows (whatever their split)."""
    return {c: Histogram().add_array(table.column(c).to_numpy().astype(np.float64)) for c in table.column_names
            if c.startswith("score_") and pa.types.is_floating(table.schema.field(c).type)}


def route_table(table: pa.Table, out_dir: str, key: str, fmt: str, rows_per_shard: int,
                dedup: pa.Table | None = None, input_rows: int | None = None,
                stages: dict[str, StageStat] | None = None, histograms: dict[str, Histogram] | None = None) -> dict:
    """Write one unit's rows to kept/rejected/review and commit its marker; returns the marker (JSON).

    `dedup`: the unit's dedup decisions (_row, dedup_rule, dup_of); `input_rows`: the unit's input
    count from its file (jobs.count_rows; default: the table's rows), a corrupt shard's one row stands
    for all of them; `stages`: the operators' seconds and rows on this unit; `histograms`: its
    score_histograms when its verdicts marker holds them already."""
    table = table.sort_by("_row")
    decision = table.column("_decision").to_numpy(zero_copy_only=False).copy()
    reject = reasons_of(table.column("reject_reason"))
    review = review_reasons_of(table.column("review_reason"))
    dup_of = None
    if dedup is not None:
        dup_of = [""] * table.num_rows
        for row, rule, survivor in zip(*(dedup.column(c).to_pylist() for c in ("_row", "dedup_rule", "dup_of"))):
            if decision[row] != REJECT:
                decision[row], reject[row], dup_of[row] = REJECT, Reason("dedup", rule), survivor
    n_in = table.num_rows if input_rows is None else input_rows
    marker = Marker(key=key, input=n_in, stages=dict(stages or {}),
                    histograms=score_histograms(table) if histograms is None else histograms)
    table = contract_reasons(table, reject, review)
    if dup_of is not None:
        table = table.append_column("dup_of", pa.array(dup_of, pa.string()))
    drop = [c for c in table.column_names if c in INTERNAL]
    for split, code, extra_drop in (("kept", KEEP, ["reject_reason", "review_reason", "dup_of"]),
                                    ("rejected", REJECT, ["review_reason"]),
                                    ("review", REVIEW, ["reject_reason", "dup_of"])):
        idx = np.flatnonzero(decision == code)
        srcs = table.column("source").take(idx).to_pylist()
        why = ([reject[i] for i in idx] if code == REJECT else [review[i] for i in idx] if code == REVIEW else [])
        if code == REJECT and input_rows is not None and len(idx) == 1 and reject[idx[0]] == CORRUPT_SHARD:
            srcs, why = srcs * max(1, input_rows), why * max(1, input_rows)  # the file's rows, all lost
        marker.add_rows(split, srcs, [[str(r)] if isinstance(r, Reason) else [str(x) for x in r] for r in why])
        for r in why:
            for one in [r] if isinstance(r, Reason) else r:
                marker.add_operator(one.operator, split)
        part = table.take(idx)
        rows = part.column("_row").combine_chunks()
        part = part.drop_columns([c for c in drop + extra_drop if c in part.column_names])
        files = write_shards(part, join(out_dir, split), key, fmt, rows_per_shard, input_rows=rows)
        marker.files += [relpath(f, out_dir) for f in files]
    commit(out_dir, marker)
    return marker.to_json()


def write_verdicts(table: pa.Table, key: str, out_dir: str, cfg: DedupConfig, stages: dict[str, StageStat],
                   key_maker: KeyMaker | None = None) -> None:
    """With dedup: the unit's routing state and dedup key rows (no content) to OUT/_verdicts/<key>*.parquet,
    then its `verdicts-<key>` marker (the operators' seconds, the score histograms: the report draws them
    while the dedup runs); routing happens after the dedup."""
    from pipeline.dedup_stage import KeyMaker

    # key rows of the rows still alive; repeat_time copies (`<id>#r<k>`) are deliberate upsampling, so
    # they carry `orig` and follow their original's fate instead of taking part
    alive = np.flatnonzero(table.column("_decision").to_numpy(zero_copy_only=False) != REJECT)
    alive_t = table.take(alive)
    keys = (key_maker or KeyMaker(cfg))(alive_t)
    keys = (keys.append_column("orig", pa.array([REPEAT_SUFFIX.sub("", i) for i in keys.column("id").to_pylist()], pa.string()))
            .append_column("_shard", pa.array([key] * len(alive), pa.string()))
            .append_column("_row", alive_t.column("_row")))
    write_parquet_atomic(table.drop_columns(list(CANONICAL.names)), join(out_dir, VERDICT_DIR, f"{key}.parquet"))
    write_parquet_atomic(keys, join(out_dir, VERDICT_DIR, f"{key}.keys.parquet"))
    write_marker(out_dir, f"verdicts-{key}", {"key": key, "rows": table.num_rows,
                                              "stages": {k: vars(v) for k, v in stages.items()},
                                              "histograms": {k: h.to_json() for k, h in score_histograms(table).items()}})


def route_unit(u: dict, job: dict) -> str:
    """After the dedup, one unit: its shard read again, its verdicts and dedup decisions applied, committed."""
    out_dir = job["out_dir"]
    table, error = load_unit(u["path"], u["key"])
    if error is None:
        state = read_parquet(join(out_dir, VERDICT_DIR, f"{u['key']}.parquet"))
        if state.num_rows != table.num_rows:
            raise RuntimeError(f"input shard {u['path']} changed during the job "
                               f"({table.num_rows} rows now, {state.num_rows} judged)")
        table = pa.Table.from_arrays([table.column(c) for c in CANONICAL.names] + state.columns,
                                     names=list(CANONICAL.names) + state.column_names)
    dpath = join(out_dir, DECISION_DIR, f"{u['key']}.parquet")
    dedup = read_parquet(dpath) if exists(dpath) else NO_DECISIONS  # no duplicates in this unit
    judged = read_marker(out_dir, f"verdicts-{u['key']}") or {}
    stages = {k: StageStat(**v) for k, v in judged.get("stages", {}).items()}
    hists = {k: Histogram(**v) for k, v in judged["histograms"].items()} if "histograms" in judged else None
    route_table(table, out_dir, u["key"], job["fmt"], job["rows_per_shard"], dedup=dedup, input_rows=u["rows"],
                stages=stages, histograms=hists if error is None else None)
    return u["key"]


def read_parquet(path: str) -> pa.Table:
    """A small job file (verdicts, decisions) from any storage `pipeline.io` reaches."""
    return pq.read_table(pa.BufferReader(read_bytes(path)))
