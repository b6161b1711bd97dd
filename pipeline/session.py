"""Ray session start-up: an embedded local Ray by default, or join a cluster with --address.

Names. Every driver carries its ivl job in Ray's job metadata (`job_name`, e.g. `ivl-curate`, plus
`ivl_out`), which the dashboard's job API and `ray.util.state.list_jobs()` show; a submitted job also carries
it in its submission metadata (jobs/submit.py). Ray Data datasets are named `<job>:<stage>` through
`name_dataset`, which is how the dashboard's Ray Data panel labels them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys

import ray

JOB_KEY = "ivl_job_name"  # this process's ivl job, kept on Ray Data's context by init_ray; names its datasets


def _data_context():
    import ray.data

    return ray.data.DataContext.get_current()


def job_name() -> str:
    """This driver's ivl job (`ivl-curate`, ...), `ivl` before init_ray named it."""
    return _data_context().get_config(JOB_KEY, "ivl")


def job_from_argv(argv: list[str] | None = None) -> tuple[str, str | None]:
    """(`ivl-<command>`, the --out value or None) from an `ivl <command> ...` command line."""
    argv = sys.argv if argv is None else argv
    if not argv or os.path.basename(argv[0]) != "ivl" or len(argv) < 2 or argv[1].startswith("-"):
        return "ivl", None
    out = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"), None)
    return f"ivl-{argv[1]}", out


def job_metadata(job_name: str, out: str | None) -> dict[str, str]:
    meta = {"tool": "ivl", "job_name": job_name}
    if out:
        meta["ivl_out"] = out.split("?", 1)[0]  # a URI's query may carry credentials
    return meta


def init_ray(address: str | None = None, num_cpus: int | None = None, job_name: str | None = None) -> None:
    """Start (or join) Ray once per process. Inside a submitted Ray job, RAY_ADDRESS is set and used.

    `job_name` (default: `ivl-<command>` from the command line) goes into the job's metadata."""
    argv_name, out = job_from_argv()
    ctx = _data_context()
    if ray.is_initialized():
        if job_name:  # a driver someone else started: its datasets still get our name
            ctx.set_config(JOB_KEY, job_name)
        return
    name = job_name or argv_name
    ctx.set_config(JOB_KEY, name)
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True, namespace="ivl",
                  job_config=ray.job_config.JobConfig(metadata=job_metadata(name, out)))
    if address:
        ray.init(address=address, **kwargs)
        return
    dashboard = importlib.util.find_spec("ray.dashboard") is not None  # present with ray[default]
    ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", **kwargs)
    ctx.enable_progress_bars = os.environ.get("IVL_PROGRESS", "1") != "0"


def dataset_name(stage: str) -> str:
    """`<ivl job>:<stage>`, e.g. `ivl-curate:operators`: a Ray Data dataset's name on the dashboard."""
    return f"{job_name()}:{stage}"


def name_dataset(ds: ray.data.Dataset, stage: str) -> ray.data.Dataset:
    """Name a Ray Data dataset after this job and one of its stages; returns it for chaining."""
    ds.set_name(dataset_name(stage))
    return ds


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, job_name: str | None = None):
    """Start Ray for one job and shut an embedded one down afterwards."""
    started = not ray.is_initialized()
    init_ray(address, num_cpus, job_name)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
