#!/usr/bin/env python3
"""The whole default curate config (jobs/configs/curate.yaml: structure, image checks, text rules,
n-gram repetition, fastText language ID, exact + MinHash dedup) over the real text corpus through Ray
on this machine's cores: docs/s end to end, and where the time went per stage.
The corpus documents become one-turn samples (the document is the assistant turn), written as
canonical Parquet shards of 1,000 rows first (not timed).
Usage: .venv/bin/python bench/curate_corpus.py [--corpus /tmp/text-corpus/corpus.jsonl] [--limit N]"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="/tmp/text-corpus/corpus.jsonl")
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    os.environ["IVL_PROGRESS"] = "0"
    from pipeline.curate import load_curate_config, run_curate
    from pipeline.session import init_ray

    tmp = tempfile.mkdtemp(prefix="bench-curate-")
    n = write_shards(a.corpus, f"{tmp}/in", a.limit)
    init_ray(num_cpus=os.cpu_count())
    t = time.perf_counter()
    s = run_curate(f"{tmp}/in", f"{tmp}/out", load_curate_config(None))
    wall = time.perf_counter() - t
    print(f"docs: {n}, cores: {os.cpu_count()}, wall: {wall:.1f} s (Ray start excluded)")
    print(f"default curate config through Ray: {n / wall:.0f} docs/s")
    print(f"kept {s['kept']}, review {s['review']}, rejected {s['rejected']} "
          f"(dedup: {s.get('dedup', {}).get('by_rule')})")
    print("CPU seconds per stage (summed over workers):",
          ", ".join(f"{k} {v:.1f}" for k, v in s["stage_seconds"].items()))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
