"""Faults survived: a Ray worker killed mid-curate, the driver killed mid-curate then rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tree_bytes

from pipeline.curate import CurateConfig, run_curate
from pipeline.ingest import run_ingest

ROOT = Path(__file__).resolve().parent.parent


def data_files(folder) -> dict[str, bytes]:
    return {k: v for k, v in tree_bytes(folder).items() if k.startswith(("kept/", "rejected/", "review/"))}


@pytest.fixture(scope="module")
def ingested(ray_local, sample_meta, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest")
    run_ingest([sample_meta], str(out), rows_per_shard=10)
    return out


@pytest.mark.slow
def test_worker_killed_mid_curate_job_succeeds_with_identical_outputs(ray_local, ingested, tmp_path):
    clean = tmp_path / "clean"
    run_curate(str(ingested), str(clean), CurateConfig(stages=[{"op": "text_rules"}]))
    flag = tmp_path / "crash.flag"
    flag.write_text("1")
    faulted = tmp_path / "faulted"
    cfg = CurateConfig(stages=[{"op": "fault_ops:CrashOnce", "flag": str(flag)}, {"op": "text_rules"}])
    s = run_curate(str(ingested), str(faulted), cfg)
    assert not flag.exists()  # a worker really died
    assert s["input"] == s["kept"] + s["rejected"] + s["review"]
    assert data_files(clean) == data_files(faulted)


@pytest.mark.slow
def test_driver_killed_mid_curate_rerun_resumes_to_identical_outputs(ingested, tmp_path):
    import yaml

    cfg = tmp_path / "slow.yaml"
    cfg.write_text(yaml.safe_dump({"stages": [{"op": "fault_ops:SlowKeep", "seconds": 0.6}, {"op": "text_rules"}],
                                   "batch_size": 8}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "IVL_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "jobs.cli", "curate", "--in", str(ingested), "--config", str(cfg), "--num-cpus", "2"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(cmd + ["--out", str(clean)], env=env, check=True, capture_output=True, timeout=600)
    p = subprocess.Popen(cmd + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((killed / "_done").glob("*.json")):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-job
    p.wait()
    n_done = len(list((killed / "_done").glob("*.json")))  # committed markers, not a half-written temp file
    n_shards = len(os.listdir(ingested / "kept"))
    assert 0 < n_done < n_shards, "the kill should land mid-job"
    r = subprocess.run(cmd + ["--out", str(killed)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    s = json.load(open(killed / "report" / "summary.json"))
    assert s["resumed_shards"] >= n_done
    assert data_files(clean) == data_files(killed)
