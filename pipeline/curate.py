"""`ivl curate`: every input shard through the configured operators, every row routed to kept/,
rejected/ (with a reason) or review/; nothing moves a full row between workers.

One work unit per input shard (pipeline/jobs.py: its key, its row count read from the file). The job,
read top-down:
1. the row operators, unit by unit, as Ray tasks and actor pools (pipeline/curate_exec.py; the verdicts
   they fold: pipeline/verdicts.py). Without dedup the last segment routes and commits each unit
   (pipeline/routing.py); with dedup it writes the unit's verdicts and dedup key rows (id, hashes,
   signature: no content) to OUT/_verdicts/;
2. with dedup, the global dedup over the key rows only (pipeline/dedup_stage.py), its decisions written
   per input shard (OUT/_dedup/<key>.parquet), then every shard routed with its own verdicts and decisions;
3. the summary and plots from the merged markers (pipeline/curate_plots.py; with dedup, the score
   histograms are drawn from the verdicts markers on a driver thread while step 2 runs).
Every phase leaves markers, so a killed run resumes where it stopped and ends with the same files.
"""

from __future__ import annotations

import time

import ray

from pipeline.curate_config import CurateConfig, load_curate_config  # noqa: F401  (load_curate_config: the entry point's)
from pipeline.curate_exec import plan_segments, route_units, run_operators  # noqa: F401  (plan_segments: tests)
from pipeline.curate_plots import EarlyHistograms, stage_thresholds, write_plots
from pipeline.distill_stage import distilled_stages
from pipeline.io import (
    DEFAULT_ROWS_PER_SHARD,
    join,
    list_input_shards,
    read_marker,
    remove_tree,
    size_and_mtime,
    write_marker,
)
from pipeline.jobs import WorkUnit, check_accounting, merge, pending, plan_units, read_markers
from pipeline.report import write_summary
from pipeline.routing import DECISION_DIR, VERDICT_DIR, route_table  # noqa: F401  (route_table: tests)
from pipeline.verdicts import OperatorActor, apply_verdict, run_stateless  # noqa: F401  (apply_verdict: tests)


def add_stages(ds: ray.data.Dataset, cfg: CurateConfig) -> ray.data.Dataset:
    """The operators as row-carrying Ray Data stages (one operator inside Ray, in the tests; `run_curate`
    moves verdicts, not rows): model holders as actor pools, the others as task maps."""
    for stage in cfg.stages:
        if stage.needs_model:
            ds = ds.map_batches(OperatorActor, fn_constructor_kwargs={"stage": stage}, batch_size=cfg.batch_size,
                                batch_format="pyarrow", concurrency=cfg.actors or 1, num_gpus=stage.num_gpus or None)
        else:
            ds = ds.map_batches(run_stateless, fn_kwargs={"stage": stage}, batch_size=cfg.batch_size,
                                batch_format="pyarrow")
    return ds


def run_curate(in_dir: str, out_dir: str, cfg: CurateConfig, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
               fmt: str = "parquet") -> dict:
    t0 = time.time()
    files = list_input_shards(in_dir)
    units = plan_units(files)
    staged = cfg.dedup is not None
    dedup_done = lambda: read_marker(out_dir, "dedup") is not None  # noqa: E731

    def routed(k: str) -> bool:  # with dedup, units are routed only after its marker: without it a route marker is stale
        return read_marker(out_dir, k) is not None and (not staged or dedup_done())

    done = (lambda k: routed(k) or read_marker(out_dir, f"verdicts-{k}") is not None) if staged else routed
    todo = pending(out_dir, units, done)
    if cfg.distill is not None:  # LLM on a sample -> fastText; resumes from OUT/_distill/done.json
        cfg = cfg.model_copy(update={"stages": distilled_stages(cfg.stages, files, out_dir, cfg.distill)})
    job = dict(out_dir=out_dir, fmt=fmt, rows_per_shard=rows_per_shard, dedup=cfg.dedup, batch_size=cfg.batch_size)
    clock = PhaseClock()
    phase_bytes = {"operators": run_operators(todo, cfg, job) if todo else 0}
    clock.lap("operators")
    dedup_stats = None
    thresholds = stage_thresholds(cfg)
    early = EarlyHistograms(out_dir, [u.key for u in units], thresholds) if staged else None
    if staged:
        dedup_stats, phase_bytes["dedup"] = dedup_to_shards(out_dir, units, cfg)
        clock.lap("dedup")
        route_units([u for u in units if not routed(u.key)], job)
        phase_bytes["route"] = 0  # each routing task reads its inputs from storage and returns its key
        for sub in (VERDICT_DIR, DECISION_DIR):  # every unit is routed now
            remove_tree(join(out_dir, sub))
        clock.lap("route")
    markers = read_markers(out_dir, units)
    summary = merge(markers)
    check_accounting(summary, markers)
    summary.setdefault("operators", {})
    summary.update(shards=len(files), resumed_shards=len(files) - len(todo), seconds=round(time.time() - t0, 2),
                   input_bytes=sum(size_and_mtime(f)[0] for f in files), object_store_bytes=sum(phase_bytes.values()),
                   object_store_bytes_by_phase=phase_bytes)
    if dedup_stats:
        summary["dedup"] = dedup_stats
    clock.lap("accounting")
    write_plots(out_dir, summary, thresholds, cfg.stages, drawn=early.drawn() if early else None)
    clock.lap("plots")
    summary["phase_seconds"] = clock.laps
    write_summary(out_dir, summary)
    return summary


class PhaseClock:
    """Wall seconds per phase of the job, for the summary (where a run's time went)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = round(now - self.t, 3)
        self.t = now


def dedup_to_shards(out_dir: str, units: list[WorkUnit], cfg: CurateConfig) -> tuple[dict, int]:
    """The global dedup over the key rows only (never content); its decisions are written per input shard
    to OUT/_dedup/<key>.parquet, so each routing task reads its own. Returns its figures and the bytes
    its Ray Data executions put into the object store (0 when resumed from its marker)."""
    from pipeline.dedup_stage import StoreBytes, decisions_by_shard

    stats = read_marker(out_dir, "dedup")
    store = StoreBytes()  # what Ray Data's operators put into the object store, from its stats
    if stats is None:
        keys = [join(out_dir, VERDICT_DIR, f"{u.key}.keys.parquet") for u in units]
        stats = decisions_by_shard(keys, cfg.dedup, join(out_dir, DECISION_DIR), store)
        write_marker(out_dir, "dedup", stats)
    return stats, store.total
