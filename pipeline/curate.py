"""`ivl curate`: the runner that takes every input shard through the configured operators and routes
every row to kept/, rejected/ (with a reason) or review/; nothing moves a full row between workers.

One work unit per input shard (pipeline/jobs.py: its key, its row count read from the file).
Phase 1 runs the operators unit by unit as Ray Data maps over the units, one map per *segment*
(`plan_segments`): stateless operators (and CPU-only model holders, by default) share task
segments that run on every CPU, GPU model holders get actor pools sized from what they declare.
Each segment re-reads its unit's shard from storage and passes on only the verdict state (decisions,
reasons, score columns), so no content goes through Ray's object store. Without dedup the last
segment routes the unit and commits its marker. With dedup it writes the unit's verdicts and dedup
key rows (id, hashes, signature: no content) to OUT/_verdicts/; phase 2 runs the global dedup over
the key rows only and writes its decisions per input shard (OUT/_dedup/<key>.parquet); phase 3
reads each shard again and routes it with its own verdicts and decisions. Every phase leaves
markers, so a killed run resumes where it stopped and ends with the same files.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from operators.base import KEEP, REJECT, REVIEW, Operator, build_operator
from pipeline.curate_config import (  # noqa: F401  (re-exported: pipeline.curate is the job's entry point)
    DEFAULT_CONFIG,
    CurateConfig,
    _one_line,
    _op_spec,
    _stage_name,
    load_curate_config,
    load_operators,
)
from pipeline.dedup_stage import StoreBytes
from pipeline.distill_stage import distilled_stages
from pipeline.io import (
    DEFAULT_ROWS_PER_SHARD,
    exists,
    list_input_shards,
    read_canonical,
    read_marker,
    relpath,
    remove_tree,
    size_and_mtime,
    write_marker,
    write_parquet_atomic,
    write_shards,
)
from pipeline.jobs import (
    Histogram,
    Marker,
    WorkUnit,
    check_accounting,
    commit,
    merge,
    pending,
    plan_units,
    read_markers,
)
from pipeline.llm_report import llm_plots
from pipeline.report import bar_chart, binned_histogram, write_summary
from pipeline.schema import CANONICAL

INTERNAL = ("_shard", "_row", "_decision")
REPEAT_SUFFIX = re.compile(r"#r\d+$")  # ids of repeat_time copies (pipeline/readers.py)


# ---- applying one operator to a batch -------------------------------------------------------------

def apply_verdict(table: pa.Table, name: str, op: Operator) -> pa.Table:
    """Run `op` on the rows not yet rejected and fold its verdict into the routing columns; adds
    `_sec_<name>`: the operator's seconds spread over the rows it saw (null on the others)."""
    t0 = time.perf_counter()
    n = table.num_rows
    decision = table.column("_decision").to_numpy(zero_copy_only=False).copy()
    active = np.flatnonzero(decision != REJECT)
    out = table
    if len(active):
        v = op(table if len(active) == n else table.take(active))
        if len(v.decision) != len(active):
            raise RuntimeError(f"operator {name} returned {len(v.decision)} decisions for {len(active)} rows")
        d = np.asarray(v.decision)
        hits = np.flatnonzero(d != KEEP)
        if len(hits):
            reject = table.column("reject_reason").to_pylist()
            review = table.column("review_reason").to_pylist()
            for j in hits.tolist():
                i = int(active[j])
                if d[j] == REJECT:
                    decision[i], reject[i] = REJECT, f"{name}:{v.rule[j]}"
                elif d[j] == REVIEW:
                    decision[i] = max(decision[i], REVIEW)
                    review[i] = f"{review[i]};{name}:{v.rule[j]}" if review[i] else f"{name}:{v.rule[j]}"
            out = _put(out, "reject_reason", pa.array(reject, pa.string()))
            out = _put(out, "review_reason", pa.array(review, pa.string()))
            out = _put(out, "_decision", pa.array(decision, pa.int8()))
        scatter = None if len(active) == n else _scatter_index(active, n)
        for col, values in v.columns.items():
            arr = values if isinstance(values, pa.Array) else pa.array(values.tolist() if isinstance(values, np.ndarray) and values.dtype == object else values)
            if pa.types.is_integer(arr.type) and col.startswith("score_"):
                arr = arr.cast(pa.float64())
            out = _put(out, col, arr if scatter is None else arr.take(scatter))
    per_row = (time.perf_counter() - t0) / max(1, len(active))
    secs = np.full(n, np.nan)
    secs[active] = per_row
    return out.append_column(f"_sec_{name}", pa.array(secs, pa.float64(), mask=np.isnan(secs)))


def _put(t: pa.Table, col: str, arr: pa.Array) -> pa.Table:
    i = t.schema.get_field_index(col)
    return t.set_column(i, col, arr) if i >= 0 else t.append_column(col, arr)


def _scatter_index(active: np.ndarray, n: int) -> pa.Array:
    """Take-index that puts value j at row active[j] and null elsewhere."""
    pos = np.full(n, -1, dtype=np.int64)
    pos[active] = np.arange(len(active))
    return pa.array(pos, mask=pos < 0)


class OperatorActor:
    """A Ray Data actor: builds the operator and loads its model once (setup), then serves batches."""

    def __init__(self, spec: dict):
        load_operators()
        self.name = _stage_name(spec)
        self.op = build_operator(_op_spec(spec))
        self.op.setup()

    def __call__(self, table: pa.Table) -> pa.Table:
        return apply_verdict(table, self.name, self.op)


def _run_stateless(table: pa.Table, spec: dict) -> pa.Table:
    return apply_verdict(table, _stage_name(spec), _operator(spec))


def add_stages(ds: ray.data.Dataset, cfg: CurateConfig) -> ray.data.Dataset:
    """The operators as row-carrying Ray Data stages over a dataset that has the routing columns
    (used to test one operator inside Ray; `run_curate` moves verdicts, not rows)."""
    load_operators()
    for spec in cfg.stages:
        op = build_operator(_op_spec(spec))  # cheap: models load in setup(), on the workers
        if op.needs_model:
            ds = ds.map_batches(OperatorActor, fn_constructor_kwargs={"spec": spec}, batch_size=cfg.batch_size,
                                batch_format="pyarrow", concurrency=cfg.actors or 1, num_gpus=op.num_gpus or None)
        else:
            ds = ds.map_batches(_run_stateless, fn_kwargs={"spec": spec}, batch_size=cfg.batch_size,
                                batch_format="pyarrow")
    return ds


def apply_batched(table: pa.Table, spec: dict, batch_size: int) -> pa.Table:
    """`apply_verdict` over slices of at most batch_size rows (what an operator gets per call)."""
    name, op = _stage_name(spec), _operator(spec)
    if table.num_rows <= batch_size:
        return apply_verdict(table, name, op)
    parts = [apply_verdict(table.slice(i, batch_size), name, op) for i in range(0, table.num_rows, batch_size)]
    return pa.concat_tables(parts, promote_options="default")  # a slice may hold a null-typed column


# ---- the plan: which operators run where ----------------------------------------------------------

@dataclass
class Segment:
    """Consecutive stages run by one Ray Data map: `task` (any worker, every CPU) or `actor` (a pool
    that loads its operator's model once per actor)."""

    kind: str
    specs: list[dict]
    num_gpus: float = 0.0
    num_cpus: float = 1.0


def plan_segments(cfg: CurateConfig) -> list[Segment]:
    """Stateless operators, and CPU model holders when `cpu_models: tasks`, join task segments (a
    worker process builds and loads each once); every other model holder is its own actor segment."""
    load_operators()
    out: list[Segment] = []
    for spec in cfg.stages:
        op = build_operator(_op_spec(spec))  # cheap: models load in setup(), on the workers
        in_task = not op.needs_model or (not op.num_gpus and cfg.cpu_models == "tasks")
        if in_task and out and out[-1].kind == "task":
            out[-1].specs.append(spec)
        elif in_task:
            out.append(Segment("task", [spec]))
        else:
            out.append(Segment("actor", [spec], float(op.num_gpus or 0), float(getattr(op, "num_cpus", 1.0))))
    return out or [Segment("task", [])]


def _pool_size(seg: Segment, cfg: CurateConfig) -> int | tuple[int, int]:
    """cfg.actors when set; else as many actors as the cluster's GPUs (or CPUs) can hold, autoscaled from 1."""
    if cfg.actors:
        return cfg.actors
    res = ray.cluster_resources()
    n = int(res.get("GPU", 0) // seg.num_gpus) if seg.num_gpus else int(res.get("CPU", 1) // max(seg.num_cpus, 1e-3))
    return (1, max(1, n))


# ---- one unit through one segment ------------------------------------------------------------------

_OPS: dict[str, Operator] = {}  # per worker process: operators built (and models loaded) once


def _operator(spec: dict) -> Operator:
    key = json.dumps(spec, sort_keys=True)
    if key not in _OPS:
        load_operators()
        _OPS[key] = build_operator(_op_spec(spec))
        _OPS[key].setup()
    return _OPS[key]


def _corrupt_row(key: str, path: str, error: str) -> pa.Table:
    return pa.Table.from_pylist([{"id": f"{key}/@0", "source": "", "category": "", "conversations": [], "images": [],
                                  "meta": json.dumps({"file": path, "error": error[:2000]})}], schema=CANONICAL)


def load_unit(path: str, key: str) -> tuple[pa.Table, str | None]:
    """A unit's rows with fresh routing columns; a shard that cannot be read becomes one rejected row
    naming the file (and the error), so the job reports it and goes on with the rest."""
    try:
        t, error = read_canonical(path), None
        decision, reason = [KEEP] * t.num_rows, [""] * t.num_rows
    except Exception as e:  # pyarrow/tarfile raise many kinds for truncated or foreign files
        error = str(e) or type(e).__name__
        t, decision, reason = _corrupt_row(key, path, error), [REJECT], ["input:corrupt_shard"]
    n = t.num_rows
    return (t.append_column("_row", pa.array(range(n), pa.int64()))
            .append_column("_decision", pa.array(decision, pa.int8()))
            .append_column("reject_reason", pa.array(reason, pa.string()))
            .append_column("review_reason", pa.array([""] * n, pa.string()))), error


def _state_bytes(t: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue().to_pybytes()


def _state_table(b: bytes) -> pa.Table:
    return pa.ipc.open_stream(b).read_all()


def run_segment(batch: pa.Table, specs: list[dict], last: bool, job: dict) -> pa.Table:
    """One Ray Data call: each unit row of `batch` (key, path, rows, state) re-reads its shard's content
    from storage, runs this segment's operators on the rows still alive and passes on only the verdict
    state (decisions, reasons, scores: never the content). The last segment commits the unit."""
    out = []
    for u in batch.to_pylist():
        if u["state"] is None:
            table, error = load_unit(u["path"], u["key"])
        else:
            state = _state_table(u["state"])
            error = u["error"]
            content = _corrupt_row(u["key"], u["path"], error) if error else read_canonical(u["path"])
            table = pa.Table.from_arrays(
                [content.column(c) for c in CANONICAL.names] + [state.column(c) for c in state.column_names],
                names=list(CANONICAL.names) + state.column_names)
        if error is None:
            for spec in specs:
                table = apply_batched(table, spec, job["batch_size"])
        if last:
            finish_unit(table, u, job)
            out.append({**u, "state": None, "error": error})
        else:
            out.append({**u, "state": _state_bytes(table.drop_columns(list(CANONICAL.names))), "error": error})
    return pa.Table.from_pylist(out, schema=UNIT_SCHEMA)


UNIT_SCHEMA = pa.schema([("key", pa.string()), ("path", pa.string()), ("rows", pa.int64()),
                         ("state", pa.binary()), ("error", pa.string())])
VERDICT_DIR, DECISION_DIR = "_verdicts", "_dedup"
UNIT_MEMORY = 512 << 20  # bytes a task segment asks Ray for: one shard (<= 256 MiB of rows) and its verdicts


def finish_unit(table: pa.Table, unit: dict, job: dict) -> None:
    """Without dedup: route and commit. With dedup: write the unit's verdicts and dedup key rows (no
    content) to OUT/_verdicts/<key>.parquet and mark them done; routing happens after dedup."""
    out_dir = job["out_dir"]
    if not job["dedup"]:
        route_table(table, out_dir, unit["key"], job["fmt"], job["rows_per_shard"], input_rows=unit["rows"])
        return
    from pipeline.dedup_stage import DedupConfig, row_keys

    cfg = DedupConfig(**job["dedup"])
    # key rows of the rows still alive; repeat_time copies (`<id>#r<k>`) are deliberate upsampling, so
    # they carry `orig` and follow their original's fate instead of taking part
    alive = np.flatnonzero(table.column("_decision").to_numpy(zero_copy_only=False) != REJECT)
    alive_t = table.take(alive)
    keys = row_keys(alive_t, cfg)
    keys = (keys.append_column("orig", pa.array([REPEAT_SUFFIX.sub("", i) for i in keys.column("id").to_pylist()], pa.string()))
            .append_column("_shard", pa.array([unit["key"]] * len(alive), pa.string()))
            .append_column("_row", alive_t.column("_row")))
    state = table.drop_columns(list(CANONICAL.names))
    write_parquet_atomic(state, os.path.join(out_dir, VERDICT_DIR, f"{unit['key']}.parquet"))
    write_parquet_atomic(keys, os.path.join(out_dir, VERDICT_DIR, f"{unit['key']}.keys.parquet"))
    write_marker(out_dir, f"verdicts-{unit['key']}", {"key": unit["key"], "rows": table.num_rows})


def route_table(table: pa.Table, out_dir: str, key: str, fmt: str, rows_per_shard: int,
                dedup: pa.Table | None = None, input_rows: int | None = None) -> dict:
    """Write one unit's rows to kept/rejected/review and commit its marker; returns the marker (JSON).

    `dedup`: the unit's dedup decisions (_row, dedup_rule, dup_of); `input_rows`: the unit's input
    count from its file (jobs.count_rows; default: the table's rows); a corrupt shard's one row stands
    for all of them."""
    table = table.sort_by("_row")
    decision = table.column("_decision").to_numpy(zero_copy_only=False).copy()
    if dedup is not None:
        reject = table.column("reject_reason").to_pylist()
        dup_of = [""] * table.num_rows
        for row, rule, survivor in zip(*(dedup.column(c).to_pylist() for c in ("_row", "dedup_rule", "dup_of"))):
            if decision[row] != REJECT:
                decision[row], reject[row], dup_of[row] = REJECT, f"dedup:{rule}", survivor
        table = (table.set_column(table.schema.get_field_index("_decision"), "_decision", pa.array(decision, pa.int8()))
                 .set_column(table.schema.get_field_index("reject_reason"), "reject_reason", pa.array(reject, pa.string()))
                 .append_column("dup_of", pa.array(dup_of, pa.string())))
    n_in = table.num_rows if input_rows is None else input_rows
    marker = Marker(key=key, input=n_in)
    for c in table.column_names:
        if c.startswith("_sec_"):
            secs = table.column(c).to_numpy(zero_copy_only=False)
            marker.add_stage(c[5:], float(np.nansum(secs)), int(np.count_nonzero(secs >= 0)))
    for c in table.column_names:
        if c.startswith("score_") and pa.types.is_floating(table.schema.field(c).type):
            marker.add_scores(c, table.column(c).to_pylist())
    drop = [c for c in table.column_names if c in INTERNAL or c.startswith("_sec_")]
    reasons = table.column("reject_reason").to_pylist()
    for split, code, extra_drop in (("kept", KEEP, ["reject_reason", "review_reason", "dup_of"]),
                                    ("rejected", REJECT, ["review_reason"]),
                                    ("review", REVIEW, ["reject_reason", "dup_of"])):
        idx = np.flatnonzero(decision == code)
        part = table.take(idx)
        srcs = part.column("source").to_pylist()
        why = part.column("review_reason" if code == REVIEW else "reject_reason").to_pylist() if code != KEEP else []
        if code == REJECT and input_rows is not None and len(idx) == 1 and reasons[idx[0]] == "input:corrupt_shard":
            srcs, why = srcs * max(1, input_rows), why * max(1, input_rows)  # the file's rows, all lost
        marker.add_rows(split, srcs, why)
        part = part.drop_columns([c for c in drop + extra_drop if c in part.column_names])
        files = write_shards(part, os.path.join(out_dir, split), key, fmt, rows_per_shard)
        marker.files += [relpath(f, out_dir) for f in files]
    commit(out_dir, marker)
    return marker.to_json()


# ---- the job ------------------------------------------------------------------------------------

def run_curate(in_dir: str, out_dir: str, cfg: CurateConfig, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
               fmt: str = "parquet") -> dict:
    t0 = time.time()
    files = list_input_shards(in_dir)
    units = plan_units(files)
    staged = bool(cfg.dedup)
    dedup_done = lambda: read_marker(out_dir, "dedup") is not None  # noqa: E731

    def routed(k: str) -> bool:  # with dedup, units are routed only after its marker: without it a route marker is stale
        return read_marker(out_dir, k) is not None and (not staged or dedup_done())

    done = (lambda k: routed(k) or read_marker(out_dir, f"verdicts-{k}") is not None) if staged else routed
    todo = pending(out_dir, units, done)
    if cfg.distill is not None:  # LLM on a sample -> fastText; resumes from OUT/_distill/done.json
        cfg = cfg.model_copy(update={"stages": distilled_stages(cfg.stages, files, out_dir, cfg.distill)})
    job = dict(out_dir=out_dir, fmt=fmt, rows_per_shard=rows_per_shard, dedup=cfg.dedup, batch_size=cfg.batch_size)
    store = StoreBytes()  # what Ray Data's operators put into the object store, from its stats
    if todo:  # phase 1: every row operator, unit by unit (only verdicts pass between segments)
        ds = ray.data.from_arrow(pa.Table.from_pylist(
            [{"key": u.key, "path": u.path, "rows": u.rows, "state": None, "error": None} for u in todo],
            schema=UNIT_SCHEMA), override_num_blocks=len(todo))
        segments = plan_segments(cfg)
        for i, seg in enumerate(segments):
            kw = dict(fn_kwargs={"specs": seg.specs, "last": i == len(segments) - 1, "job": job},
                      batch_size=1, batch_format="pyarrow")
            if seg.kind == "task":
                # a unit's shard and verdicts fit in UNIT_MEMORY; the request also keeps Ray Data from
                # fusing these tasks into a following actor pool (remote args differ: no fusion)
                ds = ds.map_batches(run_segment, memory=UNIT_MEMORY, **kw)
            else:
                ds = ds.map_batches(_SegmentActor, fn_constructor_kwargs={"specs": seg.specs},
                                    concurrency=_pool_size(seg, cfg), num_gpus=seg.num_gpus or None, **kw)
        ds.set_name("ivl-curate:operators")
        ds = ds.materialize()
        store.add(ds)
    phase_bytes = {"operators": store.total}
    dedup_stats = None
    if staged:
        dedup_stats = _dedup_to_shards(out_dir, units, cfg, store)
        phase_bytes["dedup"] = store.total - phase_bytes["operators"]
        todo_route = [u for u in units if not routed(u.key)]
        if todo_route:
            ds = ray.data.from_items([{"key": u.key, "path": u.path, "rows": u.rows} for u in todo_route],
                                     override_num_blocks=len(todo_route))
            ds = ds.map(_route_unit, fn_kwargs={"job": job})
            ds.set_name("ivl-curate:route")
            ds = ds.materialize()
            store.add(ds)
        phase_bytes["route"] = store.total - phase_bytes["operators"] - phase_bytes["dedup"]
        for sub in (VERDICT_DIR, DECISION_DIR):  # every unit is routed now
            remove_tree(os.path.join(out_dir, sub))
    markers = read_markers(out_dir, units)
    summary = merge(markers)
    check_accounting(summary, markers)
    operators: dict[str, Counter] = {}
    for split, counts in (("rejected", summary["reasons"]), ("review", summary["review_reasons"])):
        for reason, n in counts.items():
            operators.setdefault(reason.split(":")[0], Counter())[split] += n
    summary.update(operators={k: dict(v) for k, v in operators.items()}, shards=len(files),
                   resumed_shards=len(files) - len(todo), seconds=round(time.time() - t0, 2),
                   input_bytes=sum(size_and_mtime(f)[0] for f in files), object_store_bytes=store.total,
                   object_store_bytes_by_phase=phase_bytes)
    if dedup_stats:
        summary["dedup"] = dedup_stats
    write_plots(out_dir, summary, stage_thresholds(cfg))
    write_summary(out_dir, summary)
    return summary


class _SegmentActor:
    """An actor segment: its operators (and models) are built once per actor."""

    def __init__(self, specs: list[dict]):
        for spec in specs:
            _operator(spec)

    def __call__(self, batch: pa.Table, specs: list[dict], last: bool, job: dict) -> pa.Table:
        return run_segment(batch, specs, last, job)


def _dedup_to_shards(out_dir: str, units: list[WorkUnit], cfg: CurateConfig, store: StoreBytes) -> dict:
    """Phase 2: one global dedup over the key rows only (never content); its decisions are written
    per input shard to OUT/_dedup/<key>.parquet, so each routing task reads its own."""
    from pipeline.dedup_stage import DedupConfig, decisions_by_shard

    stats = read_marker(out_dir, "dedup")
    if stats is None:
        keys = [os.path.join(out_dir, VERDICT_DIR, f"{u.key}.keys.parquet") for u in units]
        stats = decisions_by_shard(keys, DedupConfig(**cfg.dedup), os.path.join(out_dir, DECISION_DIR), store)
        write_marker(out_dir, "dedup", stats)
    return stats


def _route_unit(u: dict, job: dict) -> dict:
    """Phase 3, one unit: its shard read again, its verdicts and dedup decisions applied, committed."""
    out_dir = job["out_dir"]
    table, error = load_unit(u["path"], u["key"])
    if error is None:
        state = pq.read_table(os.path.join(out_dir, VERDICT_DIR, f"{u['key']}.parquet"))
        if state.num_rows != table.num_rows:
            raise RuntimeError(f"input shard {u['path']} changed during the job "
                               f"({table.num_rows} rows now, {state.num_rows} judged)")
        table = pa.Table.from_arrays([table.column(c) for c in CANONICAL.names] + state.columns,
                                     names=list(CANONICAL.names) + state.column_names)
    dpath = os.path.join(out_dir, DECISION_DIR, f"{u['key']}.parquet")
    dedup = pq.read_table(dpath) if exists(dpath) else _NO_DECISIONS  # no duplicates in this unit
    route_table(table, out_dir, u["key"], job["fmt"], job["rows_per_shard"], dedup=dedup, input_rows=u["rows"])
    return {"key": u["key"]}


_NO_DECISIONS = pa.table({"_row": pa.array([], pa.int64()), "dedup_rule": pa.array([], pa.string()),
                          "dup_of": pa.array([], pa.string())})


def stage_thresholds(cfg: CurateConfig) -> dict[str, list[float]]:
    """Score column -> thresholds the configured operators cut at (drawn on the histograms)."""
    load_operators()
    out: dict[str, list[float]] = {}
    for spec in cfg.stages:
        for col, ts in build_operator(_op_spec(spec)).thresholds().items():
            out.setdefault(col, []).extend(ts)
    return out


def write_plots(out_dir: str, summary: dict, thresholds: dict[str, list[float]] | None = None) -> None:
    """The report's PNGs, from the merged markers only (no output shard is read for them)."""
    thresholds = thresholds or {}
    rdir = os.path.join(out_dir, "report")
    bar_chart(summary["reasons"], os.path.join(rdir, "rejected_by_rule.png"), "curate: rows rejected per rule")
    bar_chart(summary.get("review_reasons", {}), os.path.join(rdir, "review_by_rule.png"),
              "curate: rows sent to review per rule")
    frac = {s: round(c.get("kept", 0) / c["input"], 3) for s, c in summary["sources"].items() if c.get("input")}
    bar_chart(frac, os.path.join(rdir, "kept_fraction_by_source.png"), "curate: kept fraction per source", "fraction")
    llm_plots(out_dir, summary, thresholds)  # per-domain LLM score histograms, decisions, rows/s
    for c, h in summary.get("histograms", {}).items():
        values, counts = Histogram(**h).values_and_counts()
        binned_histogram(values, counts, os.path.join(rdir, f"hist_{c}.png"), f"{c} (all rows)", thresholds.get(c))
