"""Ray execution of a curate job's row operators: every input shard (a work unit) through the plan's
segments, as plain Ray tasks and actors.

`plan_segments` cuts the configured stages (pipeline/curate_config.py:Stage, resolved when the config
loads) into *segments*: stateless operators (and CPU-only model holders, by default) share task
segments that run as Ray tasks on every CPU, each worker process building and loading an operator once
per job (on the `StageOperators` object the job's task function holds, `segment_task_for`); GPU model
holders get an actor pool sized from the resources they declare, each actor building its operators in
its constructor. A unit's task reads its shard, runs the segment's operators on the rows still alive
and hands on only its routing state (decisions, reasons, scores; never content) to the next segment,
which reads the shard's content again from storage. The last segment routes and commits the unit (or,
with dedup, writes its verdicts).

Why plain tasks rather than Ray Data maps: a unit is already a whole shard, so Ray Data's block
splitting, fusion rules and streaming executor add nothing here, while its executor thread runs on the
driver and every worker imports `ray.data` (docs/benchmarks.md, "curate data plane vs bbfa868").
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass

import pyarrow as pa
import ray

from pipeline.curate_config import CurateConfig, Stage
from pipeline.io import read_canonical
from pipeline.jobs import StageStat, WorkUnit
from pipeline.routing import route_table, route_unit, write_verdicts
from pipeline.schema import CANONICAL
from pipeline.session import dataset_name
from pipeline.verdicts import StageOperators, apply_batched, corrupt_row, load_unit

UNIT_MEMORY = 512 << 20  # bytes a worker asks Ray for: one shard (<= 256 MiB of rows) and its verdicts
TASKS_PER_CPU = 2  # units in flight per CPU of a task segment: the next unit's task is queued when one ends


@dataclass
class Segment:
    """Consecutive stages run by one kind of worker: `task` (any worker, every CPU) or `actor` (a pool
    that loads its operator's model once per actor)."""

    kind: str
    stages: list[Stage]
    num_gpus: float = 0.0
    num_cpus: float = 1.0


def plan_segments(cfg: CurateConfig) -> list[Segment]:
    """Stateless operators, and CPU model holders when `cpu_models: tasks`, join task segments (a
    worker process builds and loads each once per job); every other model holder is its own actor segment."""
    out: list[Segment] = []
    for stage in cfg.stages:
        in_task = not stage.needs_model or (not stage.num_gpus and cfg.cpu_models == "tasks")
        if in_task and out and out[-1].kind == "task":
            out[-1].stages.append(stage)
        elif in_task:
            out.append(Segment("task", [stage]))
        else:
            out.append(Segment("actor", [stage], stage.num_gpus, stage.num_cpus))
    return out or [Segment("task", [])]


def pool_size(seg: Segment, cfg: CurateConfig, units: int) -> int:
    """cfg.actors when set; else as many actors as the cluster's GPUs hold, or for a CPU-only model holder
    half the CPUs (actors hold theirs for the whole phase: the task segments keep the rest); at most one
    actor per unit."""
    if cfg.actors:
        return cfg.actors
    res = ray.cluster_resources()
    if seg.num_gpus:
        n = int(res.get("GPU", 0) // seg.num_gpus)
    else:
        n = int(res.get("CPU", 1) // 2 // max(seg.num_cpus, 1e-3))
    return max(1, min(n, units))


# ---- one unit through one segment (on a worker) ------------------------------------------------------

def _state_bytes(t: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue().to_pybytes()


def run_segment(unit: dict, state: bytes | None, stages: list[Stage], last: bool, job: dict,
                operators: StageOperators) -> tuple[dict, bytes | None]:
    """One unit through one segment: its shard's content read from storage, joined to the routing state
    the previous segment left (none: fresh), this segment's operators run on the rows still alive.
    Returns the unit record (with the operators' seconds so far) and the state for the next segment;
    the last segment commits the unit instead."""
    seconds = {k: StageStat(**v) for k, v in unit["stages"].items()}
    if state is None:
        table, error = load_unit(unit["path"], unit["key"])
    else:
        error = unit["error"]
        content = corrupt_row(unit["key"], unit["path"], error) if error else read_canonical(unit["path"])
        routing = pa.ipc.open_stream(state).read_all()
        table = pa.Table.from_arrays([content.column(c) for c in CANONICAL.names] + routing.columns,
                                     names=list(CANONICAL.names) + routing.column_names)
    if error is None:
        for stage in stages:
            table = apply_batched(table, stage, operators.get(stage), job["batch_size"], seconds)
    record = {**unit, "error": error, "stages": {k: vars(v) for k, v in seconds.items()}}
    if not last:
        state = _state_bytes(table.drop_columns(list(CANONICAL.names)))
        return {**record, "state_bytes": len(state)}, state
    if job["dedup"] is not None:
        write_verdicts(table, unit["key"], job["out_dir"], job["dedup"], seconds, operators.key_maker(job["dedup"]))
    else:
        route_table(table, job["out_dir"], unit["key"], job["fmt"], job["rows_per_shard"],
                    input_rows=unit["rows"], stages=seconds)
    return record, None


def segment_task_for(segments: dict[int, list[Stage]]) -> ray.remote_function.RemoteFunction:
    """This job's remote function for its task segments. Its operators live on the StageOperators object it
    closes over: Ray loads a remote function once per worker process and keeps it, so each worker builds
    and loads an operator once per job (on its first unit), and nothing lives at module level. Plain
    tasks rather than an actor pool: actors start their own processes, and after the pool the dedup
    and routing tasks would start theirs again, where tasks reuse the warm workers (measured here: 1.2-1.9 s
    from creating two actors to their first reply, 2.0 s to the first tasks after killing them)."""
    operators = StageOperators()

    @ray.remote(num_returns=2, num_cpus=1, memory=UNIT_MEMORY)
    def segment_task(unit: dict, state: bytes | None, segment: int, last: bool, job: dict):
        return run_segment(unit, state, segments[segment], last, job, operators)

    return segment_task


@ray.remote(max_restarts=3, max_task_retries=3)
class SegmentActor:
    """An actor segment's worker: its operators (and models) are built once, here; a killed actor is
    restarted (its operators rebuilt) and its call retried."""

    def __init__(self, segments: dict[int, list[Stage]]):
        self.segments = segments
        self.operators = StageOperators(tuple(s for stages in segments.values() for s in stages))

    @ray.method(num_returns=2)
    def run(self, unit: dict, state: bytes | None, segment: int, last: bool, job: dict):
        return run_segment(unit, state, self.segments[segment], last, job, self.operators)


@ray.remote(num_cpus=1, memory=UNIT_MEMORY)
def route_task(unit: dict, job: dict) -> str:
    return route_unit(unit, job)


# ---- the driver's loop --------------------------------------------------------------------------------

def run_operators(units: list[WorkUnit], cfg: CurateConfig, job: dict) -> int:
    """Every unit through every segment, units streaming from one segment to the next; returns the bytes
    of routing state passed between segments (what this phase puts into Ray's object store). The
    driver holds unit records and object refs only."""
    segments = plan_segments(cfg)
    name = dataset_name("operators")  # the tasks' names on the dashboard: `ivl-curate:operators[<segment>]:<unit>`
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = segment_task_for({i: s.stages for i, s in enumerate(segments) if s.kind == "task"})
    idle = [[] if s.kind == "task" else
            [SegmentActor.options(num_gpus=s.num_gpus or None, num_cpus=s.num_cpus).remote({i: s.stages})
             for _ in range(pool_size(s, cfg, len(units)))] for i, s in enumerate(segments)]
    cap = [TASKS_PER_CPU * cpus if s.kind == "task" else len(idle[i]) for i, s in enumerate(segments)]
    queues = [deque() for _ in segments]
    queues[0].extend(({"key": u.key, "path": u.path, "rows": u.rows, "error": None, "stages": {}}, None) for u in units)
    running: dict[ray.ObjectRef, tuple[int, ray.ObjectRef, object]] = {}
    busy = [0] * len(segments)
    passed = 0
    while running or any(queues):
        for i, seg in enumerate(segments):
            while queues[i] and busy[i] < cap[i]:
                unit, state = queues[i].popleft()
                args = (unit, state, i, i == len(segments) - 1, job)
                actor = idle[i].pop() if seg.kind == "actor" else None
                if actor is not None:
                    record, out_state = actor.run.remote(*args)
                else:
                    record, out_state = task.options(name=f"{name}[{i}]:{unit['key']}").remote(*args)
                running[record] = (i, out_state, actor)
                busy[i] += 1
        (done,), _ = ray.wait(list(running), num_returns=1)
        i, out_state, actor = running.pop(done)
        busy[i] -= 1
        if actor is not None:
            idle[i].append(actor)
        record = ray.get(done)  # a unit record: key, path, rows, error, seconds, state size (no rows)
        if i + 1 < len(segments):
            passed += record.pop("state_bytes") + len(json.dumps(record))
            queues[i + 1].append((record, out_state))
    return passed


def route_units(units: list[WorkUnit], job: dict) -> None:
    """After the dedup: every unit routed by its own task (its shard, verdicts and dedup decisions)."""
    name = dataset_name("route")
    ray.get([route_task.options(name=f"{name}:{u.key}").remote({"key": u.key, "path": u.path, "rows": u.rows}, job)
             for u in units])
