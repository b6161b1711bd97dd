#!/usr/bin/env python3
"""The whole default curate config (jobs/configs/curate.yaml: structure, image checks, text rules,
n-gram repetition, fastText language ID, exact + MinHash dedup) over the real text corpus through Ray,
against commit bbfa868 in the same process, twice, and the same runner on 1 core (CPU affinity {0}, Ray
num_cpus 1) against all cores. The two bbfa868 figures:
- bbfa868 as committed: its runner, its operators and its own default config (`git archive`, packages
  renamed `<package>_bbfa868`, commit_module): what issue 11's ">= 5x commit bbfa868" (~470 docs/s then)
  measures, the operators' speed-up included. Its rules differ from today's (issue 15 changed them), so
  its kept ids do too; the work per row is the same kind (the same five stages and dedup).
- bbfa868's runner with today's operators and config (`git show bbfa868:pipeline/curate.py` loaded as a
  module, baseline_module): the data plane alone, with the same kept ids.
Ray start-up is excluded from every figure (Ray is started and one task per core has run, then the job
is timed), and so is each runner's first job in the process: every runner runs once, untimed, on one
shard first (--no-warmup skips it), so the driver's lazy imports (dedup, matplotlib) do not land on
whichever run comes first; `summary.json: phase_seconds` says where the job's seconds went.
The corpus documents become one-turn samples (the document is the assistant turn), written as
canonical Parquet shards of 1,000 rows first (not timed).
Usage: .venv/bin/python bench/curate_corpus.py [--corpus /tmp/text-corpus/corpus.jsonl] [--limit N]
       [--no-baseline] [--no-runner-baseline] [--no-one-core] [--no-warmup] [--rounds N] [--cpu-models tasks|actors]"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BASELINE = "bbfa868"


def write_shards(corpus: str, out: str, limit: int | None, rows: int = 1000) -> int:
    from pipeline.io import write_parquet_atomic
    from pipeline.schema import rows_to_table

    batch, n, part = [], 0, 0
    with open(corpus) as f:
        for line in f:
            if limit and n >= limit:
                break
            d = json.loads(line)
            batch.append({"id": f"corpus/{d['id']}", "source": "corpus", "category": "general", "images": [],
                          "meta": "{}", "conversations": [{"from": "human", "value": "Write a document."},
                                                          {"from": "gpt", "value": d["text"]}]})
            n += 1
            if len(batch) == rows:
                write_parquet_atomic(rows_to_table(batch), f"{out}/kept/c-{part:05d}.parquet")
                batch, part = [], part + 1
    if batch:
        write_parquet_atomic(rows_to_table(batch), f"{out}/kept/c-{part:05d}.parquet")
    return n


def baseline_module():
    """pipeline/curate.py as of commit bbfa868, imported under another name (it uses today's helpers)."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{BASELINE}:pipeline/curate.py"], check=True,
                         capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="curate-baseline-"), f"curate_{BASELINE}.py")
    with open(path, "w") as f:
        src = src.replace('os.path.join(os.path.dirname(__file__), "..", "jobs"', f'os.path.join({ROOT!r}, "jobs"')
        # today's one accounting check lives in pipeline/jobs.py (its second positional argument is markers)
        src = src.replace("bar_chart, check_accounting, histogram, merge_counts, write_summary",
                          "bar_chart, histogram, merge_counts, write_summary\nfrom pipeline.jobs import check_accounting")
        src = src.replace("check_accounting(summary, SPLITS)", "check_accounting(summary, splits=SPLITS)")
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"curate_{BASELINE}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # pydantic resolves the config's annotations through sys.modules
    spec.loader.exec_module(mod)
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(mod)  # Ray's workers cannot import the temp module
    return mod


PACKAGES = ("pipeline", "operators", "jobs", "model", "train")
_IMPORT = re.compile(rf"\b(from|import)(\s+)({'|'.join(PACKAGES)})\b")
_MODULE_NAME = re.compile(rf"([\"'])({'|'.join(PACKAGES)})\.")


def commit_module(commit: str = BASELINE):
    """Commit `commit` as a whole (its runner, operators and bundled default config, `git archive`), its
    packages renamed `<package>_<commit>` so they load in this process beside today's: its imports and
    module-name strings are rewritten. Ray's workers import them through PYTHONPATH, set here before Ray
    starts. Returns its pipeline.curate module."""
    root = tempfile.mkdtemp(prefix=f"curate-{commit}-")
    src = os.path.join(root, "src")
    os.makedirs(src)
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit, *PACKAGES], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    for pkg in PACKAGES:
        shutil.move(os.path.join(src, pkg), os.path.join(root, f"{pkg}_{commit}"))
    for py in glob.glob(f"{root}/*_{commit}/**/*.py", recursive=True):
        with open(py) as f:
            text = f.read()
        text = _IMPORT.sub(rf"\1\2\3_{commit}", text)
        text = _MODULE_NAME.sub(rf"\1\2_{commit}.", text)
        text = text.replace('"..", "jobs"', f'"..", "jobs_{commit}"')  # its bundled config beside its packages
        with open(py, "w") as f:
            f.write(text)
    sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return importlib.import_module(f"pipeline_{commit}.curate")


def kept_ids(out: str) -> list[str]:
    import pyarrow.parquet as pq

    return sorted(i for f in glob.glob(f"{out}/kept/*.parquet") for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())


def worker_pid() -> int:
    return os.getpid()


def timed(run, cfg, inp: str, out: str, cores: int) -> tuple[float, dict]:
    import ray

    from pipeline.session import init_ray

    os.sched_setaffinity(0, set(range(cores)))  # Ray's raylet and workers inherit the driver's CPUs
    init_ray(num_cpus=cores)
    ray.get([ray.remote(worker_pid).remote() for _ in range(cores)])  # start-up: Ray's worker processes are up
    try:
        t = time.perf_counter()
        s = run(inp, out, cfg)
        return time.perf_counter() - t, s
    finally:
        ray.shutdown()
        os.sched_setaffinity(0, set(range(os.cpu_count())))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="/tmp/text-corpus/corpus.jsonl")
    ap.add_argument("--limit", type=int, default=20000)
    ap.add_argument("--no-baseline", action="store_true", help=f"skip both runs of commit {BASELINE}")
    ap.add_argument("--no-runner-baseline", action="store_true",
                    help=f"skip commit {BASELINE}'s runner with today's operators and config (the data plane alone)")
    ap.add_argument("--no-one-core", action="store_true", help="skip the run on one core")
    ap.add_argument("--baseline-first", action="store_true", help="run the baseline before this runner (load drifts)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip each runner's untimed warm-up job on one shard (the driver's one-time imports)")
    ap.add_argument("--rounds", type=int, default=1,
                    help=f"pairs of this runner and commit {BASELINE} as committed (after the first, alternating order)")
    ap.add_argument("--cpu-models", default=None, choices=["tasks", "actors"], help="override the config's cpu_models")
    a = ap.parse_args()
    os.environ["IVL_PROGRESS"] = "0"
    from pipeline.curate import load_curate_config, run_curate
    from pipeline.io import read_canonical

    tmp = tempfile.mkdtemp(prefix="bench-curate-")
    n = write_shards(a.corpus, f"{tmp}/in", a.limit)
    files = sorted(glob.glob(f"{tmp}/in/kept/*.parquet"))
    arrow_bytes = sum(read_canonical(f).nbytes for f in files)
    file_bytes = sum(os.path.getsize(f) for f in files)
    cores = os.cpu_count()
    cfg = load_curate_config(None)
    if a.cpu_models:
        cfg = cfg.model_copy(update={"cpu_models": a.cpu_models})
    print(f"docs: {n} in {len(files)} shards ({arrow_bytes / 1e6:.1f} MB as Arrow, {file_bytes / 1e6:.1f} MB "
          f"of Parquet), cores: {cores}, load average: {os.getloadavg()[0]:.1f}, cpu_models: {cfg.cpu_models}")
    commit = None if a.no_baseline else commit_module()  # before Ray starts: its workers need the PYTHONPATH
    commit_cfg = None if commit is None else commit.load_curate_config(None)  # its own default config
    old = None if a.no_baseline or a.no_runner_baseline else baseline_module()
    # the same stages for both runners, read once (the YAML may change while the bench runs)
    old_cfg = None if old is None else old.CurateConfig(  # bbfa868's config takes the YAML mappings
        stages=[s.spec() for s in cfg.stages], dedup=cfg.dedup and cfg.dedup.model_dump(exclude_unset=True),
        batch_size=cfg.batch_size)
    if not a.no_warmup:  # every runner once on one shard first: its driver's lazy imports (dedup, plots) are paid
        write_shards(a.corpus, f"{tmp}/warm", 1000)  # before timing, as Ray start-up is, for all runs alike
        timed(run_curate, cfg, f"{tmp}/warm", f"{tmp}/warm-out", cores)
        if old is not None:
            timed(old.run_curate, old_cfg, f"{tmp}/warm", f"{tmp}/warm-outb", cores)
        if commit is not None:
            timed(commit.run_curate, commit_cfg, f"{tmp}/warm", f"{tmp}/warm-outc", cores)
        print("warm-up: each runner ran once on one shard (untimed)")
    if old is not None and a.baseline_first:
        wallb, _ = timed(old.run_curate, old_cfg, f"{tmp}/in", f"{tmp}/outb", cores)
        print(f"commit {BASELINE}'s runner, {cores} cores: {wallb:.1f} s, {n / wallb:.0f} docs/s "
              f"(load average {os.getloadavg()[0]:.1f})")
    wall, s = timed(run_curate, cfg, f"{tmp}/in", f"{tmp}/out", cores)
    print(f"this runner, {cores} cores (load average {os.getloadavg()[0]:.1f}): {wall:.1f} s, {n / wall:.0f} docs/s; kept {s['kept']}, review {s['review']}, "
          f"rejected {s['rejected']} (dedup: {s.get('dedup', {}).get('by_rule')})")
    print("  CPU seconds per stage (summed over workers):",
          ", ".join(f"{k} {v:.1f}" for k, v in s["stage_seconds"].items()))
    print("  wall seconds per phase of the job:", ", ".join(f"{k} {v:.1f}" for k, v in s["phase_seconds"].items()))
    store = s["object_store_bytes"]
    print(f"  bytes through Ray's object store: {store / 1e6:.2f} MB = {store / arrow_bytes:.3f}x the input's Arrow "
          f"bytes ({store / file_bytes:.3f}x its Parquet bytes)")
    ids = kept_ids(f"{tmp}/out")
    if not a.no_one_core:
        wall1, s1 = timed(run_curate, cfg, f"{tmp}/in", f"{tmp}/out1", 1)
        same = kept_ids(f"{tmp}/out1") == ids
        print(f"this runner, 1 core: {wall1:.1f} s, {n / wall1:.0f} docs/s -> {cores} cores are {wall1 / wall:.2f}x "
              f"faster than 1; same kept ids: {same}")
        print("  wall seconds per phase on 1 core:", ", ".join(f"{k} {v:.1f}" for k, v in s1["phase_seconds"].items()))
    if old is not None:
        if not a.baseline_first:
            wallb, _ = timed(old.run_curate, old_cfg, f"{tmp}/in", f"{tmp}/outb", cores)
        same = kept_ids(f"{tmp}/outb") == ids
        print(f"commit {BASELINE}'s runner, {cores} cores: {wallb:.1f} s, {n / wallb:.0f} docs/s -> this runner is "
              f"{wallb / wall:.2f}x faster; same kept ids: {same}")
    if commit is not None:
        wallc, sc = timed(commit.run_curate, commit_cfg, f"{tmp}/in", f"{tmp}/outc", cores)
        print(f"commit {BASELINE} as committed (its runner, operators and default config), {cores} cores: "
              f"{wallc:.1f} s, {n / wallc:.0f} docs/s; kept {sc['kept']}, review {sc.get('review')}, rejected "
              f"{sc['rejected']} (its rules differ from today's) -> this runner is {wallc / wall:.2f}x faster")
    if commit is not None and a.rounds > 1:  # more pairs, each in the other order (load drifts)
        ours, theirs = [wall], [wallc]
        for r in range(1, a.rounds):
            pair = [("this", run_curate, cfg), ("commit", commit.run_curate, commit_cfg)]
            for who, run, c in pair[:: -1 if r % 2 else 1]:
                (theirs if who == "commit" else ours).append(timed(run, c, f"{tmp}/in", f"{tmp}/out-{who}{r}", cores)[0])
            print(f"round {r + 1}: this runner {ours[-1]:.1f} s, commit {BASELINE} as committed {theirs[-1]:.1f} s -> "
                  f"{theirs[-1] / ours[-1]:.2f}x (load average {os.getloadavg()[0]:.1f})")
        med = statistics.median
        print(f"over {a.rounds} rounds: this runner {min(ours):.1f}-{max(ours):.1f} s (median {med(ours):.1f}), commit "
              f"{BASELINE} as committed {min(theirs):.1f}-{max(theirs):.1f} s (median {med(theirs):.1f}) -> median "
              f"{med(theirs) / med(ours):.2f}x, per round {min(t / o for t, o in zip(theirs, ours)):.2f}-"
              f"{max(t / o for t, o in zip(theirs, ours)):.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
