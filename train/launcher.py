"""`ivl train`: one stage on packed shards, as a Ray Train `TorchTrainer` (or in-process without Ray).

The driver counts the packed rows, fixes the data plan (train.data.make_plan), finds the checkpoint to
resume from, and gives each rank a Ray Dataset of its own plan from that point on; Ray Data's
`map_batches` does the image work on CPU workers and the GPUs only train (plain PyTorch in the worker
loop; ARCHITECTURE.md). Outputs: OUT/checkpoints/step_N/, OUT/ (final HF model = next stage's --model),
OUT/metrics.jsonl, OUT/report/{summary.json,loss.png,throughput.png}.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

from train.checkpoint import latest_checkpoint, load_trainer_state
from train.data import (
    FetchAndPrepare,
    data_fingerprint,
    fingerprint_change,
    list_shards,
    make_plan,
    plan_items,
    shard_row_counts,
)
from train.loop import TrainJob, job_dict, run_local, train_worker
from train.stages import load_stage_config


def plan_job(
    stage: str,
    data: str | Path,
    model: str | Path,
    out: str | Path,
    resume: bool = False,
    workers: int = 1,
    use_gpu: bool = False,
    config: str | Path | dict | None = None,
    max_steps: int | None = None,
    stop_at_step: int | None = None,
    overrides: dict | None = None,
) -> TrainJob:
    """Resolve config, data, plan and resume point into a `TrainJob`. `overrides` (CLI flags) win over
    the config file, which wins over the stage preset."""
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(config, dict):
        cfg = load_stage_config(
            stage, None, **{**config, **flags, "max_steps": max_steps or config.get("max_steps")}
        )
    else:
        cfg = load_stage_config(stage, config, max_steps=max_steps, **flags)
    files = list_shards(data)
    counts = shard_row_counts(files)
    fingerprint = data_fingerprint(files, counts)
    rows = sum(counts)
    per_step = workers * cfg.grad_accum
    total = cfg.max_steps or max(1, math.floor(cfg.epochs * rows / per_step))
    resume_from = latest_checkpoint(Path(out)) if resume else None
    start = 0
    if resume_from:
        state = load_trainer_state(resume_from)
        start, pos = int(state["step"]), state["data_position"]
        if (
            pos.get("world_size", workers) != workers
            or pos["micro_batches_per_rank"] != start * cfg.grad_accum
        ):
            raise ValueError(
                f"{resume_from} was written with {pos.get('world_size')} workers and "
                f"{pos['micro_batches_per_rank'] // max(1, start)} micro-batches per step; resume with the same "
                "workers and grad_accum to keep the data order"
            )
        change = fingerprint_change(pos.get("fingerprint"), fingerprint)
        if change:  # the plan is a permutation of row ids: other shards would silently mean other rows
            raise ValueError(f"cannot resume {resume_from}: the packed data in {data} changed ({change})")
    if resume_from and start >= total:
        raise ValueError(f"{resume_from} is already at step {start} of {total}: nothing to resume")
    return TrainJob(
        stage=cfg.model_dump(),
        model=str(model),
        data=str(data),
        out=str(Path(out).resolve()),
        files=[str(Path(f).resolve()) for f in files],
        counts=counts,
        plan=make_plan(rows, workers, cfg.grad_accum, total, cfg.seed).tolist(),
        total_steps=total,
        start_step=start,
        resume_from=str(resume_from) if resume_from else None,
        use_gpu=use_gpu,
        stop_at_step=stop_at_step,
        fingerprint=fingerprint,
        planned_at=time.time(),
    )


def run_train(
    stage: str,
    data: str | Path,
    model: str | Path,
    out: str | Path,
    use_ray: bool = True,
    address: str | None = None,
    cpus_per_worker: float = 1.0,
    max_failures: int = 3,
    **plan,
) -> dict:
    """Train one stage; returns the summary written to OUT/report/summary.json. `plan` holds `plan_job`'s
    options (resume, workers, use_gpu, config, max_steps, stop_at_step, overrides)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    job = plan_job(stage, data, model, out, **plan)
    workers = len(job.plan)
    if not use_ray:
        if workers != 1:
            raise ValueError("without Ray the loop runs one worker")
        return run_local(job)
    return _run_ray(job, workers, job.use_gpu, address, cpus_per_worker, max_failures)


DATA_CPUS_PER_RANK = 1  # the CPU each rank's data actor holds (FetchAndPrepare: read, decode, tile)
# Ray Train's documented timeouts (docs.ray.io, train/user-guides/debugging.html, "Debugging environment
# variables"); read from the driver's environment when `fit` starts the controller, and passed on to it. On a
# loaded 2-core node a worker that imports torch and transformers can take minutes to start: the default 60 s
# start timeout restarts the whole group, which only adds load.
RAY_TRAIN_TIMEOUTS = (("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600"), ("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", "600"))


@contextlib.contextmanager
def env_defaults(pairs) -> Iterator[None]:
    """Set the variables the environment does not already set, for the duration of the block only."""
    added = [k for k, _ in pairs if k not in os.environ]
    os.environ.update({k: v for k, v in pairs if k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _ordered():
    from ray.train import DataConfig

    opts = DataConfig.default_ingest_options()
    opts.preserve_order = True  # map tasks may finish out of order; the plan order is the data order
    return opts


def _run_ray(
    job: TrainJob, workers: int, use_gpu: bool, address: str | None, cpus_per_worker: float, max_failures: int
) -> dict:
    import ray
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.session import init_ray

    # an embedded Ray needs a CPU slot per worker and one per rank's data actor (decode, tiling)
    cpus = None if address else max(os.cpu_count() or 1, math.ceil(workers * (cpus_per_worker + DATA_CPUS_PER_RANK)))
    init_ray(address, num_cpus=cpus, job_name=f"ivl-train-stage{job.stage['stage']}")
    seed = job.stage["seed"]
    start_micro = job.start_step * job.stage["grad_accum"]
    # Ray Data's bars would print a line per prepared row from every rank: the loop logs progress instead
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = {}
    for r in range(workers):
        items = plan_items(job.plan[r], start_micro, rank=r, world_size=workers)
        # one data actor per rank: its ShardReader keeps every footer it reads (train/data.py)
        datasets[f"rank{r}"] = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            FetchAndPrepare,
            fn_constructor_kwargs={"files": job.files, "counts": job.counts, "seed": seed},
            batch_size=1,
            batch_format="numpy",
            concurrency=1,
            num_cpus=DATA_CPUS_PER_RANK,
        )
    out = Path(job.out)
    trainer = TorchTrainer(
        train_loop_per_worker=train_worker,
        train_loop_config=job_dict(job),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"ivl-train-stage{job.stage['stage']}",
            storage_path=str(out / "ray"),
            # a worker that dies (OOM-killed on a loaded node, a lost node) fails Ray Train's health
            # check ("A worker health check failed"): restart the group from the newest checkpoint
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        datasets=datasets,
        # no split: every rank reads only its own `rank<r>` plan, in plan order, so it is exact and resumable
        dataset_config=DataConfig(datasets_to_split=[], execution_options=_ordered()),
    )
    with env_defaults(RAY_TRAIN_TIMEOUTS):
        result = trainer.fit()
    if getattr(result, "error", None):
        raise result.error
    summary_path = out / "report" / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    ckpt = latest_checkpoint(out)
    return {
        "stage": job.stage["stage"],
        "finished": False,
        "checkpoint": str(ckpt) if ckpt else None,
        "out": str(out),
    }
