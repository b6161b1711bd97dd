"""`ivl curate`: the runner that chains operators onto a Ray Dataset and routes every row.

Phase 1 reads the input shards (one Ray task per shard, so rows carry `_shard`/`_row`), runs each
configured operator as its own `map_batches` stage (stateless ones as tasks, model-holding ones as an
actor pool), then groups rows back by input shard and writes them. Without dedup the groups go
straight to kept/rejected/review; with dedup they are staged in OUT/_stage/, a global dedup pass
decides over all surviving rows (OUT/_dedup/), and phase 3 routes the staged shards. Each phase
leaves markers, so a killed run resumes where it stopped and ends with the same files.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from operators.base import KEEP, REJECT, REVIEW, Operator, build_operator
from pipeline.distill_stage import DistillConfig, distilled_stages, llm_stage_index
from pipeline.io import (
    DEFAULT_ROWS_PER_SHARD,
    list_input_shards,
    read_canonical,
    read_marker,
    shard_key,
    write_marker,
    write_parquet_atomic,
    write_shards,
)
from pipeline.llm_report import llm_plots
from pipeline.report import SPLITS, bar_chart, check_accounting, histogram, merge_counts, write_summary
from pipeline.schema import CANONICAL

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "curate.yaml")
OPERATOR_MODULES = ("operators.text_rules", "operators.ngram_repetition", "operators.image_checks",
                    "operators.fasttext_ops", "operators.llm")
INTERNAL = ("_shard", "_row", "_decision")
REPEAT_SUFFIX = re.compile(r"#r\d+$")  # ids of repeat_time copies (pipeline/readers.py)


class CurateConfig(BaseModel):
    """A curate job: operator stages in order, then optional global dedup."""

    model_config = ConfigDict(extra="forbid")
    stages: list[dict[str, Any]] = Field(
        default_factory=list, description="[{op: name or module:Class, name?: label, ...params}]")
    dedup: dict[str, Any] | None = Field(None, description="global dedup settings (pipeline.dedup_stage.DedupConfig)")
    batch_size: int = Field(256, description="rows per map_batches call")
    actors: int = Field(1, description="actor pool size for operators that hold a model")
    distill: DistillConfig | None = Field(
        None, description="LLM on a sample + fastText on all rows instead of llm_quality on all rows")

    @model_validator(mode="after")
    def _distill_has_llm_stage(self) -> CurateConfig:
        if self.distill is not None:
            llm_stage_index(self.stages)
        return self


def load_operators() -> None:
    for mod in OPERATOR_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # the module exists but one of its imports does not
                raise


def load_curate_config(path: str | None) -> CurateConfig:
    """Read and validate the YAML; every stage is built once so a bad operator or threshold fails here."""
    path = path or DEFAULT_CONFIG
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        cfg = CurateConfig(**raw)
    except OSError as e:
        raise FileNotFoundError(f"config {path}: {e.strerror}") from None
    except (yaml.YAMLError, ValidationError, TypeError) as e:
        raise ValueError(f"config {path}: {_one_line(e)}") from None
    load_operators()
    names = set()
    for i, spec in enumerate(cfg.stages):
        try:
            build_operator(_op_spec(spec))
        except (ValidationError, ValueError, TypeError) as e:
            raise ValueError(f"config {path}: stage {i} ({spec.get('op')}): {_one_line(e)}") from None
        name = _stage_name(spec)
        if name in names:
            raise ValueError(f"config {path}: two stages are named {name!r}; give one a `name:`")
        names.add(name)
    if cfg.dedup:
        from pipeline.dedup_stage import DedupConfig

        try:
            DedupConfig(**cfg.dedup)
        except ValidationError as e:
            raise ValueError(f"config {path}: dedup: {_one_line(e)}") from None
    return cfg


def _one_line(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _op_spec(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "name"}


def _stage_name(spec: dict) -> str:
    return spec.get("name") or str(spec["op"]).rpartition(":")[2]


# ---- applying one operator to a batch -------------------------------------------------------------

def apply_verdict(table: pa.Table, name: str, op: Operator) -> pa.Table:
    """Run `op` on the rows not yet rejected and fold its verdict into the routing columns."""
    t0 = time.perf_counter()
    decision = table.column("_decision").to_numpy(zero_copy_only=False).copy()
    active = np.flatnonzero(decision != REJECT)
    reject = table.column("reject_reason").to_pylist()
    review = table.column("review_reason").to_pylist()
    added: dict[str, list] = {}
    if len(active):
        v = op(table.take(active))
        if len(v.decision) != len(active):
            raise RuntimeError(f"operator {name} returned {len(v.decision)} decisions for {len(active)} rows")
        for j, i in enumerate(active):
            d = int(v.decision[j])
            if d == REJECT:
                decision[i], reject[i] = REJECT, f"{name}:{v.rule[j]}"
            elif d == REVIEW:
                decision[i] = max(decision[i], REVIEW)
                review[i] = f"{review[i]};{name}:{v.rule[j]}" if review[i] else f"{name}:{v.rule[j]}"
        for col, values in v.columns.items():
            full = [None] * table.num_rows
            for j, i in enumerate(active):
                full[i] = _py(values[j])
            added[col] = full
    out = table.set_column(table.schema.get_field_index("_decision"), "_decision", pa.array(decision, pa.int8()))
    out = out.set_column(out.schema.get_field_index("reject_reason"), "reject_reason", pa.array(reject, pa.string()))
    out = out.set_column(out.schema.get_field_index("review_reason"), "review_reason", pa.array(review, pa.string()))
    for col, values in added.items():
        arr = pa.array(values)
        if pa.types.is_integer(arr.type) and col.startswith("score_"):
            arr = arr.cast(pa.float64())
        out = out.set_column(out.schema.get_field_index(col), col, arr) if col in out.column_names else out.append_column(col, arr)
    seconds = [0.0] * table.num_rows
    if seconds:
        seconds[0] = time.perf_counter() - t0
    return out.append_column(f"_sec_{name}", pa.array(seconds, pa.float64()))


def _py(x):
    return x.item() if isinstance(x, np.generic) else x


class _OperatorActor:
    """A Ray Data actor: builds the operator and loads its model once (setup), then serves batches."""

    def __init__(self, spec: dict):
        load_operators()
        self.name = _stage_name(spec)
        self.op = build_operator(_op_spec(spec))
        self.op.setup()

    def __call__(self, table: pa.Table) -> pa.Table:
        return apply_verdict(table, self.name, self.op)


_TASK_OPS: dict[str, Operator] = {}  # per worker process: stateless operators built once


def _run_stateless(table: pa.Table, spec: dict) -> pa.Table:
    key = json.dumps(spec, sort_keys=True)
    if key not in _TASK_OPS:
        load_operators()
        _TASK_OPS[key] = build_operator(_op_spec(spec))
        _TASK_OPS[key].setup()
    return apply_verdict(table, _stage_name(spec), _TASK_OPS[key])


def add_stages(ds: ray.data.Dataset, cfg: CurateConfig) -> ray.data.Dataset:
    load_operators()
    for spec in cfg.stages:
        op = build_operator(_op_spec(spec))  # cheap: models load in setup(), on the workers
        if op.needs_model:
            ds = ds.map_batches(_OperatorActor, fn_constructor_kwargs={"spec": spec}, batch_size=cfg.batch_size,
                                batch_format="pyarrow", concurrency=cfg.actors, num_gpus=op.num_gpus or None)
        else:
            ds = ds.map_batches(_run_stateless, fn_kwargs={"spec": spec}, batch_size=cfg.batch_size,
                                batch_format="pyarrow")
    return ds


# ---- reading and routing ------------------------------------------------------------------------

def _load_shard(batch: dict, keys: dict) -> pa.Table:
    """One input shard -> its rows with routing columns. A shard that cannot be read becomes one
    rejected row naming the file, so the job reports it and goes on with the rest."""
    path = str(batch["path"][0])
    key = keys[path]
    try:
        t = read_canonical(path)
        n = t.num_rows
        decision, reason = [KEEP] * n, [""] * n
    except Exception as e:  # pyarrow/tarfile raise many kinds for truncated or foreign files
        t = pa.Table.from_pylist([{"id": f"{key}/@0", "source": "", "category": "", "conversations": [], "images": [],
                                   "meta": json.dumps({"file": path, "error": str(e)[:2000]})}],
                                 schema=CANONICAL)
        n, decision, reason = 1, [REJECT], ["input:corrupt_shard"]
    return (t.append_column("_shard", pa.array([key] * n, pa.string()))
            .append_column("_row", pa.array(range(n), pa.int64()))
            .append_column("_decision", pa.array(decision, pa.int8()))
            .append_column("reject_reason", pa.array(reason, pa.string()))
            .append_column("review_reason", pa.array([""] * n, pa.string())))


def route_table(table: pa.Table, out_dir: str, key: str, fmt: str, rows_per_shard: int,
                dedup: dict[str, tuple[str, str]] | None = None) -> dict:
    """Write one shard's rows to kept/rejected/review and its marker; returns the marker."""
    table = table.sort_by("_row")
    if dedup:
        decision = table.column("_decision").to_numpy(zero_copy_only=False).copy()
        reject = table.column("reject_reason").to_pylist()
        dup_of = [""] * table.num_rows
        for i, rid in enumerate(table.column("id").to_pylist()):
            rid = REPEAT_SUFFIX.sub("", rid)
            if rid in dedup and decision[i] != REJECT:
                rule, survivor = dedup[rid]
                decision[i], reject[i], dup_of[i] = REJECT, f"dedup:{rule}", survivor
        table = (table.set_column(table.schema.get_field_index("_decision"), "_decision", pa.array(decision, pa.int8()))
                 .set_column(table.schema.get_field_index("reject_reason"), "reject_reason", pa.array(reject, pa.string()))
                 .append_column("dup_of", pa.array(dup_of, pa.string())))
    seconds = {c[5:]: float(pc.sum(table.column(c)).as_py() or 0) for c in table.column_names if c.startswith("_sec_")}
    drop = [c for c in table.column_names if c in INTERNAL or c.startswith("_sec_")]
    decision = table.column("_decision")
    marker: dict[str, Any] = {"key": key, "input": table.num_rows, "files": []}
    for split, code, extra_drop in (("kept", KEEP, ["reject_reason", "review_reason", "dup_of"]),
                                    ("rejected", REJECT, ["review_reason"]),
                                    ("review", REVIEW, ["reject_reason", "dup_of"])):
        part = table.filter(pc.equal(decision, code))
        marker[split] = part.num_rows
        part = part.drop_columns([c for c in drop + extra_drop if c in part.column_names])
        files = write_shards(part, os.path.join(out_dir, split), key, fmt, rows_per_shard)
        marker["files"] += [os.path.relpath(f, out_dir) for f in files]
    reasons = Counter(r for r, d in zip(table.column("reject_reason").to_pylist(), decision.to_pylist()) if d == REJECT)
    review = Counter(x for r, d in zip(table.column("review_reason").to_pylist(), decision.to_pylist())
                     if d == REVIEW for x in r.split(";"))
    sources: dict[str, Counter] = {}
    for src, d in zip(table.column("source").to_pylist(), decision.to_pylist()):
        c = sources.setdefault(src, Counter())
        c["input"] += 1
        c[SPLITS[[KEEP, REJECT, REVIEW].index(d)]] += 1
    marker.update(reasons=dict(reasons), review_reasons=dict(review), seconds=seconds,
                  sources={s: dict(c) for s, c in sources.items()})
    write_marker(out_dir, key, marker)
    return marker


def _write_group(table: pa.Table, out_dir: str, fmt: str, rows_per_shard: int, staged: bool) -> pa.Table:
    key = table.column("_shard")[0].as_py()
    if staged:  # keep everything (routing columns included) for the dedup pass
        write_parquet_atomic(table.sort_by("_row"), os.path.join(out_dir, "_stage", f"{key}.parquet"))
        write_marker(out_dir, f"stage-{key}", {"key": key, "rows": table.num_rows})
    else:
        route_table(table, out_dir, key, fmt, rows_per_shard)
    return pa.table({"key": [key]})


# ---- the job ------------------------------------------------------------------------------------

def run_curate(in_dir: str, out_dir: str, cfg: CurateConfig, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
               fmt: str = "parquet") -> dict:
    t0 = time.time()
    files = list_input_shards(in_dir)
    keys = _unique_keys(files)
    staged = bool(cfg.dedup)
    done = (lambda k: read_marker(out_dir, f"stage-{k}") or read_marker(out_dir, k)) if staged else \
        (lambda k: read_marker(out_dir, k))
    todo = [f for f in files if done(keys[f]) is None]
    if cfg.distill is not None:  # LLM on a sample -> fastText; resumes from OUT/_distill/done.json
        cfg = cfg.model_copy(update={"stages": distilled_stages(cfg.stages, files, out_dir, cfg.distill)})
    if todo:  # phase 1: per-row operators, grouped back per input shard
        ds = ray.data.from_items([{"path": f} for f in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(_load_shard, fn_kwargs={"keys": keys}, batch_size=1, batch_format="pyarrow")
        ds = add_stages(ds, cfg)
        # one hash partition per input shard (at most 200): each group is written by one task
        ds.groupby("_shard", num_partitions=min(len(todo), 200)).map_groups(
            _write_group, fn_kwargs=dict(out_dir=out_dir, fmt=fmt, rows_per_shard=rows_per_shard, staged=staged),
            batch_format="pyarrow").materialize()
    dedup_stats = _dedup_and_route(out_dir, [keys[f] for f in files], cfg, fmt, rows_per_shard) if staged else None
    markers = [read_marker(out_dir, keys[f]) for f in files]
    summary = merge_counts(markers, SPLITS)
    check_accounting(summary, SPLITS)
    review = Counter()
    seconds = Counter()
    for m in markers:
        review.update(m.get("review_reasons", {}))
        seconds.update(m.get("seconds", {}))
    operators: dict[str, Counter] = {}
    for split, counts in (("rejected", summary["reasons"]), ("review", review)):
        for reason, n in counts.items():
            operators.setdefault(reason.split(":")[0], Counter())[split] += n
    summary.update(review_reasons=dict(sorted(review.items())), operators={k: dict(v) for k, v in operators.items()},
                   stage_seconds={k: round(v, 3) for k, v in seconds.items()}, shards=len(files),
                   resumed_shards=len(files) - len(todo), seconds=round(time.time() - t0, 2))
    if dedup_stats:
        summary["dedup"] = dedup_stats
    write_plots(out_dir, summary, stage_thresholds(cfg))
    write_summary(out_dir, summary)
    return summary


def _unique_keys(files: list[str]) -> dict[str, str]:
    keys = {f: shard_key(f) for f in files}
    if len(set(keys.values())) != len(files):  # same file name in different folders
        keys = {f: f"{i:05d}-{shard_key(f)}" for i, f in enumerate(files)}
    return keys


def _dedup_and_route(out_dir: str, keys: list[str], cfg: CurateConfig, fmt: str, rows_per_shard: int) -> dict:
    """Phase 2: one global dedup over every staged row not yet rejected; phase 3: route each shard."""
    from pipeline.dedup_stage import DedupConfig, dedup_decisions

    decisions_path = os.path.join(out_dir, "_dedup", "decisions.parquet")
    stats = read_marker(out_dir, "dedup")
    if stats is None:
        staged = [os.path.join(out_dir, "_stage", f"{k}.parquet") for k in keys]
        # repeat_time copies (`<id>#r<k>`) are deliberate upsampling: they are not duplicates of their
        # original, so only originals take part and each copy follows its original's fate when routed
        ds = ray.data.read_parquet(staged).filter(expr=f"_decision != {REJECT}").filter(
            lambda r: REPEAT_SUFFIX.search(r["id"]) is None)
        drop = [c for c in ds.columns() if c.startswith("_sec_") or c in ("reject_reason", "review_reason")]
        removed = dedup_decisions(ds.drop_columns(drop), DedupConfig(**cfg.dedup))
        blocks = list(removed.iter_batches(batch_format="pyarrow", batch_size=None))
        table = pa.concat_tables(blocks).select(["id", "dedup_rule", "dup_of"]) if blocks else pa.table(
            {c: pa.array([], pa.string()) for c in ("id", "dedup_rule", "dup_of")})
        table = table.sort_by("id")  # the same file whatever order the shuffle produced
        write_parquet_atomic(table, decisions_path)
        stats = {"removed": table.num_rows, "by_rule": dict(Counter(table.column("dedup_rule").to_pylist()))}
        write_marker(out_dir, "dedup", stats)
    dec = pq.read_table(decisions_path).to_pydict()
    lookup = {i: (r, s) for i, r, s in zip(dec["id"], dec["dedup_rule"], dec["dup_of"])}
    todo = [k for k in keys if read_marker(out_dir, k) is None]
    if todo:
        ray.data.from_items([{"key": k} for k in todo], override_num_blocks=len(todo)).map(
            _route_staged, fn_kwargs=dict(out_dir=out_dir, fmt=fmt, rows_per_shard=rows_per_shard,
                                          lookup=ray.put(lookup))).materialize()
    shutil.rmtree(os.path.join(out_dir, "_stage"), ignore_errors=True)  # every shard is routed now
    return stats


def _route_staged(row: dict, out_dir: str, fmt: str, rows_per_shard: int, lookup) -> dict:
    table = pq.read_table(os.path.join(out_dir, "_stage", f"{row['key']}.parquet"))
    lookup = ray.get(lookup) if isinstance(lookup, ray.ObjectRef) else lookup
    route_table(table, out_dir, row["key"], fmt, rows_per_shard, dedup=lookup)
    return {"key": row["key"]}


def stage_thresholds(cfg: CurateConfig) -> dict[str, list[float]]:
    """Score column -> thresholds the configured operators cut at (drawn on the histograms)."""
    load_operators()
    out: dict[str, list[float]] = {}
    for spec in cfg.stages:
        for col, ts in build_operator(_op_spec(spec)).thresholds().items():
            out.setdefault(col, []).extend(ts)
    return out


def write_plots(out_dir: str, summary: dict, thresholds: dict[str, list[float]] | None = None) -> None:
    thresholds = thresholds or {}
    rdir = os.path.join(out_dir, "report")
    bar_chart(summary["reasons"], os.path.join(rdir, "rejected_by_rule.png"), "curate: rows rejected per rule")
    bar_chart(summary.get("review_reasons", {}), os.path.join(rdir, "review_by_rule.png"),
              "curate: rows sent to review per rule")
    frac = {s: round(c.get("kept", 0) / c["input"], 3) for s, c in summary["sources"].items() if c.get("input")}
    bar_chart(frac, os.path.join(rdir, "kept_fraction_by_source.png"), "curate: kept fraction per source", "fraction")
    llm_plots(out_dir, summary, thresholds)  # per-domain LLM score histograms, decisions, rows/s
    kept_dir = os.path.join(out_dir, "kept")
    if not os.path.isdir(kept_dir):
        return
    scores: dict[str, list] = {}
    for split in SPLITS:
        d = os.path.join(out_dir, split)
        for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if f.endswith(".parquet"):
                path = os.path.join(d, f)
                wanted = [c for c in pq.read_schema(path).names if c.startswith("score_")]
                t = pq.read_table(path, columns=wanted)
                for c in t.column_names:
                    if c.startswith("score_") and pa.types.is_floating(t.schema.field(c).type):
                        scores.setdefault(c, []).extend(t.column(c).to_pylist())
    for c, vals in scores.items():
        histogram(vals, os.path.join(rdir, f"hist_{c}.png"), f"{c} (all rows)", thresholds.get(c))
