"""Ray session start-up: an embedded local Ray by default, or join a cluster with --address."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os

import ray


def init_ray(address: str | None = None, num_cpus: int | None = None, job_name: str = "ivl") -> None:
    """Start (or join) Ray once per process. Inside a submitted Ray job, RAY_ADDRESS is set and used."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True, namespace="ivl")
    if address:
        ray.init(address=address, **kwargs)
        return
    dashboard = importlib.util.find_spec("ray.dashboard") is not None  # present with ray[default]
    ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("IVL_PROGRESS", "1") != "0"


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Start Ray for one job and shut an embedded one down afterwards."""
    started = not ray.is_initialized()
    init_ray(address, num_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
