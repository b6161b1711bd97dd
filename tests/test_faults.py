"""Faults survived: a Ray worker killed mid-curate, the driver killed mid-curate (during the operators
or during routing, with global dedup on) then rerun, a corrupt input shard. Each ends with the same
files as a clean run and with input rows (counted from the input files) == rows in kept+rejected+review."""

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


DEDUP = {"exact": True, "minhash": True, "text_only": True}  # text-only: the sample's templated captions go


def data_files(folder) -> dict[str, bytes]:
    return {k: v for k, v in tree_bytes(folder).items() if k.startswith(("kept/", "rejected/", "review/"))}


def assert_independent_counts(inp, out) -> None:
    """Rows counted in the input files (Parquet footers) == rows found in the output files, and the
    summary says the same; a corrupt input file counts as the rows it stands for (one if unreadable)."""
    import glob
    import json

    import pyarrow.parquet as pq

    from pipeline.io import list_input_shards
    from pipeline.jobs import count_rows

    counted = sum(count_rows(f) or 1 for f in list_input_shards(str(inp)))
    found = 0
    for f in glob.glob(f"{out}/*/*.parquet"):
        if f.split("/")[-2] in ("kept", "rejected", "review"):
            t = pq.read_table(f)
            found += t.num_rows
            if "reject_reason" in t.column_names:  # the one row of a corrupt file stands for all its rows
                for r, m in zip(t.column("reject_reason").to_pylist(), t.column("meta").to_pylist()):
                    found += (json.loads(m).get("rows") or 1) - 1 if r == "input:corrupt_shard" else 0
    s = json.load(open(f"{out}/report/summary.json"))
    assert counted == found == s["input"] == s["kept"] + s["rejected"] + s["review"]


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
    assert_independent_counts(ingested, faulted)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["operators", "route"])
def test_driver_killed_mid_curate_rerun_resumes_to_identical_outputs(ingested, tmp_path, phase):
    """Killed once phase 1 committed a unit's verdicts, or once routing committed a unit (dedup on)."""
    import yaml

    cfg = tmp_path / "slow.yaml"
    stages = [{"op": "fault_ops:SlowKeep", "seconds": 0.6}, {"op": "text_rules"}]
    cfg.write_text(yaml.safe_dump({"stages": stages, "batch_size": 8, "dedup": DEDUP}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "IVL_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "jobs.cli", "curate", "--in", str(ingested), "--config", str(cfg), "--num-cpus", "2"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(cmd + ["--out", str(clean)], env=env, check=True, capture_output=True, timeout=600)
    p = subprocess.Popen(cmd + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    n_shards = len(os.listdir(ingested / "kept"))
    routed = lambda: [f for f in (killed / "_done").glob("*.json")  # noqa: E731
                      if not f.name.startswith("verdicts-") and f.name != "dedup.json"]
    verdicts = lambda: list((killed / "_done").glob("verdicts-*.json"))  # noqa: E731
    dedup_done = lambda: [f for f in [killed / "_done" / "dedup.json"] if f.exists()]  # noqa: E731
    deadline = time.time() + 500
    while time.time() < deadline and not (verdicts() if phase == "operators" else dedup_done()):
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-job
    p.wait()
    if phase == "operators":  # committed markers, not a half-written temp file
        n_done = len(verdicts())
        assert 0 < n_done < n_shards, "the kill should land mid-job"
    else:  # dedup committed, routing killed before it finished
        n_done = len(routed())
        assert dedup_done() and n_done < n_shards, "the kill should land before routing ends"
    r = subprocess.run(cmd + ["--out", str(killed)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    s = json.load(open(killed / "report" / "summary.json"))
    assert s["resumed_shards"] >= n_done
    assert s["dedup"]["removed"] > 0  # the sample holds duplicates, so the dedup path really ran
    assert data_files(clean) == data_files(killed)
    assert_independent_counts(ingested, killed)


def test_corrupt_shard_with_dedup_resumes_identically_and_counts_from_the_inputs(ray_local, ingested, tmp_path):
    import shutil

    inp = tmp_path / "in"
    shutil.copytree(ingested / "kept", inp / "kept")
    (inp / "kept" / "zz-truncated.parquet").write_bytes((inp / "kept" / sorted(os.listdir(inp / "kept"))[0]).read_bytes()[:300])
    cfg = CurateConfig(stages=[{"op": "text_rules"}], dedup=DEDUP)
    s = run_curate(str(inp), str(tmp_path / "out"), cfg)
    assert s["reasons"]["input:corrupt_shard"] == 1
    before = data_files(tmp_path / "out")
    for m in (tmp_path / "out" / "_done").glob("*.json"):  # a run that died before committing anything
        if m.name != "zz-truncated.json":
            m.unlink()
    run_curate(str(inp), str(tmp_path / "out"), cfg)
    assert data_files(tmp_path / "out") == before
    assert_independent_counts(inp, tmp_path / "out")
