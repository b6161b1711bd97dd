"""`ivl pack` resumes (issue 8 item 2, issue 11 item 3): killed and rerun with the same arguments it
skips the partitions it committed and the input shards it already tokenized, and ends with the same
kept/ and rejected/ bytes and counts as a clean run; changed arguments never reuse stale tokens."""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import pipeline.pack_job as pack_job
from pipeline.ingest import run_ingest
from pipeline.io import read_marker, write_parquet_atomic
from pipeline.pack_job import (
    TAIL_KEY,
    PackWorkers,
    cache_args,
    part_key,
    plan_partitions,
    resume_state,
    run_pack,
    tokens_key,
    tokens_path,
)

ROOT = Path(__file__).resolve().parent.parent
# Small budgets and files: on the bundled sample (4 rows per shard), several partitions of a few
# shards each, rejected rows (images over 6 tiles), a sample split in two.
BUDGETS = {"max_tokens": 3000, "max_tiles": 6, "rows_per_shard": 3, "partition_bytes": 150_000}
# what may differ between a resumed run and a clean one: timings, paths and the resume counters
VOLATILE = {"seconds", "samples_per_s", "report", "tokenizer", "resumed_shards", "tokenized_rows",
            "resumed_partitions", "task_cpu_s"}


def outputs(out_dir) -> dict[str, bytes]:
    """Every kept/ and rejected/ Parquet file by relative name, as bytes."""
    files = glob.glob(os.path.join(str(out_dir), "kept", "*.parquet"))
    files += glob.glob(os.path.join(str(out_dir), "rejected", "*.parquet"))
    return {os.path.relpath(f, out_dir): Path(f).read_bytes() for f in sorted(files)}


def counts(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def ingested(ray_local, sample_meta, tmp_path_factory):
    """The bundled sample as many small canonical shards (4 rows each)."""
    out = tmp_path_factory.mktemp("ingest")
    run_ingest([sample_meta], str(out), rows_per_shard=4)
    return out


@pytest.fixture(scope="module")
def workers(ray_local):
    """One pool of pack actors for this module's runs (a new actor starts a process and loads the tokenizer)."""
    with PackWorkers(2) as pool:
        yield pool


@pytest.fixture(scope="module")
def clean(ingested, tok, workers, tmp_path_factory):
    """Uninterrupted runs into fresh folders, one per set of arguments, made once."""
    runs: dict[tuple, tuple[Path, dict]] = {}

    def get(**overrides):
        args = {**BUDGETS, **overrides}
        key = tuple(sorted(args.items()))
        if key not in runs:
            out = tmp_path_factory.mktemp("clean")
            runs[key] = out, run_pack(str(ingested), str(out), tok, workers=workers, **args)
        return runs[key]

    return get


# ---- the resume state alone (no Ray) ---------------------------------------------------------------

def test_resume_state_keeps_matching_shards_and_drops_a_stale_cache(tmp_path, caplog):
    out = str(tmp_path)
    args = {"version": 1, "tokenizer": "abc", "max_tokens": 4000, "inputs": [["a.parquet", 10, 1]]}
    fp, done = resume_state(out, args, 3)
    assert done == [] and read_marker(out, "pack-args")["args"] == args
    for i in (0, 2):  # shards 0 and 2 were tokenized; 1 has a cache file but no marker (killed in between)
        write_parquet_atomic(pack_job.empty_tokens(), tokens_path(out, i))
    pack_job.write_marker(out, tokens_key(0), {"rows": 0, "fingerprint": fp})
    pack_job.write_marker(out, tokens_key(2), {"rows": 0, "fingerprint": fp})
    assert resume_state(out, args, 3) == (fp, [0, 2])
    os.remove(tokens_path(out, 2))  # a marker without its cache file is not done either
    assert resume_state(out, args, 3) == (fp, [0])

    with caplog.at_level(logging.WARNING, logger="pipeline.pack_job"):
        fp2, done = resume_state(out, {**args, "max_tokens": 3000}, 3)
    assert fp2 != fp and done == []
    assert [r.getMessage() for r in caplog.records] == [
        f"ivl pack: max_tokens changed since the last run in {out}; tokenizing every shard again"]
    assert not os.path.exists(tokens_path(out, 0)) and read_marker(out, tokens_key(0)) is None
    assert read_marker(out, "pack-args")["fingerprint"] == fp2


def test_cache_args_change_with_the_inputs_and_the_tokenizer(tmp_path, tok):
    tok_dir = str(tmp_path / "tok")
    tok.save_pretrained(tok_dir)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_parquet_atomic(pack_job.empty_tokens(), str(a))
    write_parquet_atomic(pack_job.empty_tokens(), str(b))
    base = cache_args([str(a)], tok_dir, None, 4000, 16, False)
    assert base == cache_args([str(a)], tok_dir, None, 4000, 16, False)  # stable
    assert cache_args([str(a), str(b)], tok_dir, None, 4000, 16, False)["inputs"] != base["inputs"]
    os.utime(a, ns=(1, 1))  # the same file rewritten
    assert cache_args([str(a)], tok_dir, None, 4000, 16, False)["inputs"] != base["inputs"]
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "a") as f:
        f.write(" ")
    assert cache_args([str(a)], tok_dir, None, 4000, 16, False)["tokenizer"] != base["tokenizer"]


# ---- whole runs through the local Ray --------------------------------------------------------------

def partitions_of(ingested) -> list[list[int]]:
    files = pack_job.list_input_shards(str(ingested))
    return plan_partitions([os.path.getsize(f) for f in files], BUDGETS["partition_bytes"])


@pytest.mark.slow
def test_killed_mid_partition_rerun_redoes_only_that_partition(ingested, tok, workers, clean, tmp_path):
    ref, ref_summary = clean()
    assert ref_summary["partitions"] == len(partitions_of(ingested)) >= 3
    assert ref_summary["rejected"] > 0 and ref_summary["split_samples"] and ref_summary["tail_packs"]
    out = tmp_path / "out"
    run_pack(str(ingested), str(out), tok, workers=workers, **BUDGETS)
    # The state a kill inside partition 1 leaves: neither its marker nor the tail's written, its first
    # pack file written and the next cut short, plus a file of an older, longer run under its prefix.
    os.remove(pack_job.marker_path(str(out), part_key(1)))
    os.remove(pack_job.marker_path(str(out), TAIL_KEY))
    for f in sorted(glob.glob(str(out / "kept" / "pack-00001-*.parquet")))[1:]:
        os.remove(f)
    (out / "kept" / ".tmp-123-pack-00001-00001.parquet").write_bytes(b"PAR1 cut short")
    (out / "kept" / "pack-00001-09999.parquet").write_bytes(b"from an older, longer run")

    s = run_pack(str(ingested), str(out), tok, workers=workers, **BUDGETS)
    assert s["resumed_partitions"] == s["partitions"] - 1 and s["tokenized_rows"] == 0  # its tokens were cached
    assert counts(s) == counts(ref_summary)
    assert outputs(out) == outputs(ref)
    assert sorted(os.listdir(out / "kept")) == sorted(os.listdir(ref / "kept"))  # no leftovers


@pytest.mark.slow
def test_interrupted_while_tokenizing_rerun_tokenizes_only_the_rest(ingested, tok, workers, clean, tmp_path):
    ref, ref_summary = clean()
    out = tmp_path / "out"
    run_pack(str(ingested), str(out), tok, workers=workers, **BUDGETS)
    # The state a kill while tokenizing leaves: the later partitions uncommitted, their shards' tokens
    # partly cached (one cache file without its marker), a half-written temp file, the tail uncommitted.
    parts = partitions_of(ingested)
    lost_parts = list(range(len(parts) // 2, len(parts)))
    lost = [i for p in lost_parts for i in parts[p]]
    for p in lost_parts:
        os.remove(pack_job.marker_path(str(out), part_key(p)))
    os.remove(pack_job.marker_path(str(out), TAIL_KEY))
    for i in lost:
        os.remove(pack_job.marker_path(str(out), tokens_key(i)))
        if i != lost[0]:
            os.remove(tokens_path(str(out), i))
    (out / "_tokens" / f".tmp-123-{lost[1]:05d}.parquet").write_bytes(b"PAR1 cut short")
    (out / "kept" / ".tmp-123-pack-00002.parquet").write_bytes(b"PAR1 cut short")
    (out / "kept" / "pack-09999.parquet").write_bytes(b"from an older, longer run")

    s = run_pack(str(ingested), str(out), tok, workers=workers, **BUDGETS)
    lost_rows = sum(pq.read_metadata(tokens_path(str(out), i)).num_rows for i in lost)
    n = ref_summary["input_shards"]
    assert s["resumed_shards"] == n - len(lost) and s["tokenized_rows"] == lost_rows < s["input"]
    assert s["resumed_partitions"] == len(parts) - len(lost_parts)
    assert counts(s) == counts(ref_summary)
    assert outputs(out) == outputs(ref)
    assert sorted(os.listdir(out / "kept")) == sorted(os.listdir(ref / "kept"))  # no leftovers


@pytest.mark.slow
def test_changed_arguments_never_reuse_stale_tokens(ingested, tok, workers, clean, tmp_path, caplog):
    out = tmp_path / "out"
    run_pack(str(ingested), str(out), tok, workers=workers, **BUDGETS)

    # A budget decides what is rejected and where samples are cut: the tokens are stale.
    smaller = {**BUDGETS, "max_tokens": 2500, "max_tiles": 8}
    ref, ref_summary = clean(max_tokens=2500, max_tiles=8)
    with caplog.at_level(logging.WARNING, logger="pipeline.pack_job"):
        s = run_pack(str(ingested), str(out), tok, workers=workers, **smaller)
    assert "max_tiles, max_tokens changed" in caplog.text
    assert s["resumed_shards"] == 0 and s["tokenized_rows"] == s["input"]
    assert counts(s) == counts(ref_summary) and outputs(out) == outputs(ref)

    # Packing arguments are not in the tokens: they are reused, and the packs are a clean run's.
    ref, ref_summary = clean(max_tokens=2500, max_tiles=8, mode="internvl", seed=7, rows_per_shard=2)
    caplog.clear()
    s = run_pack(str(ingested), str(out), tok, workers=workers, **{**smaller, "mode": "internvl", "seed": 7, "rows_per_shard": 2})
    assert "changed" not in caplog.text
    assert s["resumed_shards"] == s["input_shards"] and s["tokenized_rows"] == 0
    assert counts(s) == counts(ref_summary) and outputs(out) == outputs(ref)


@pytest.mark.slow
def test_driver_killed_mid_pack_rerun_resumes_to_identical_outputs(ingested, gguf, tok, clean, tmp_path):
    """The real thing: `ivl pack` SIGKILLed (driver and its embedded Ray) once its first input
    shard is committed, then the same command again."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IVL_PROGRESS": "0"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.cli", "pack", "--in", str(ingested), "--out", str(out), "--tokenizer", gguf,
           "--max-tokens", str(BUDGETS["max_tokens"]), "--max-tiles", str(BUDGETS["max_tiles"]), "--num-cpus", "2"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not glob.glob(str(out / "_done" / "pack-tokens-*")):
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-job
    p.wait()
    committed = len(glob.glob(str(out / "_done" / "pack-tokens-*")))
    assert committed > 0 and not (out / "report" / "summary.json").exists(), "the kill should land mid-job"

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "report" / "summary.json").read_text())
    # a Ray worker of the killed job may still finish the partition it was on (all its shards) before it
    # dies, hence >= and no lower bound on what the rerun tokenizes
    assert s["resumed_shards"] >= committed and s["tokenized_rows"] < s["input"], "killed while tokenizing"
    # the CLI writes the default rows_per_shard and partition size; the clean reference uses the same
    ref, ref_summary = clean(rows_per_shard=pack_job.DEFAULT_ROWS_PER_SHARD,
                             partition_bytes=pack_job.DEFAULT_PARTITION_BYTES)
    assert counts(s) == counts(ref_summary)
    assert outputs(out) == outputs(ref)
