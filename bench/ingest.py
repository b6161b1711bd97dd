#!/usr/bin/env python3
"""Ingest throughput: `ivl ingest` (Ray Data, embedded local Ray) vs a plain single-process loop that
reads the same JSONL and images, decodes each image (the same validity check ivl makes) and writes
Parquet with pyarrow. Same machine, same run. Usage: .venv/bin/python bench/ingest.py [--n 10000]

`--json-array N`: peak memory reading a LLaVA-style JSON array of N records (llava_v1_5_mix665k.json has
665k): `json.load` of the whole file (what a plain loader does) against ivl's span scan + per-element
parse, each in its own process, memory above the process's own imports."""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shutil
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_dataset(d: str, n: int) -> tuple[str, int]:
    """n JSONL lines over the sample's real images (cycled), 1 in 10 text-only, 1 in 10 two-image."""
    imgs = sorted(p for p in glob.glob(f"{ROOT}/data/sample/images/**/*.png", recursive=True) if "broken" not in p)
    caps = [json.loads(x)["conversations"][1]["value"] for x in open(f"{ROOT}/data/sample/tuxpaint_caption.jsonl")]
    os.makedirs(f"{d}/img")
    for i, p in enumerate(imgs):
        shutil.copy(p, f"{d}/img/{i}.png")
    nbytes = 0
    with open(f"{d}/ann.jsonl", "w") as f:
        for i in range(n):
            cap = caps[i % len(caps)]
            if i % 10 == 0:
                rec = {"conversations": [{"from": "human", "value": "Say something."}, {"from": "gpt", "value": cap}]}
            elif i % 10 == 1:
                rec = {"image": [f"{i % len(imgs)}.png", f"{(i + 1) % len(imgs)}.png"], "conversations": [
                    {"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": cap}]}
            else:
                rec = {"image": f"{i % len(imgs)}.png", "conversations": [
                    {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": cap}]}
            line = json.dumps(rec)
            nbytes += len(line) + sum(os.path.getsize(f"{d}/img/{p}") for p in
                                      ([rec["image"]] if isinstance(rec.get("image"), str) else rec.get("image", [])))
            f.write(line + "\n")
    json.dump({"bench": {"root": "img", "annotation": "ann.jsonl"}}, open(f"{d}/meta.json", "w"))
    return f"{d}/meta.json", nbytes


def plain_loop(d: str, out: str, rows_per_shard: int = 1000) -> int:
    os.makedirs(out)
    rows, part, n = [], 0, 0
    for line_no, line in enumerate(open(f"{d}/ann.jsonl")):
        rec = json.loads(line)
        paths = rec.get("image") or []
        paths = [paths] if isinstance(paths, str) else paths
        images = [open(f"{d}/img/{p}", "rb").read() for p in paths]
        for b in images:
            with Image.open(io.BytesIO(b)) as im:
                im.load()
        rows.append({"id": f"bench/{line_no}", "conversations": rec["conversations"], "images": images})
        n += 1
        if len(rows) == rows_per_shard:
            pq.write_table(pa.Table.from_pylist(rows), f"{out}/{part:05d}.parquet", compression="zstd")
            rows, part = [], part + 1
    if rows:
        pq.write_table(pa.Table.from_pylist(rows), f"{out}/{part:05d}.parquet", compression="zstd")
    return n


def make_json_array(path: str, n: int) -> int:
    """n LLaVA-style records (id, image path, 2-4 turns of the sample's captions), written as one JSON array."""
    caps = [json.loads(x)["conversations"][1]["value"] for x in open(f"{ROOT}/data/sample/tuxpaint_caption.jsonl")]
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(n):
            turns = [{"from": "human", "value": f"Question {i}: what does the picture show, in detail?"},
                     {"from": "gpt", "value": " ".join(caps[(i + k) % len(caps)] for k in range(8))}]
            turns += turns if i % 2 else []
            f.write(("" if i == 0 else ",\n") + json.dumps({"id": f"{i:012d}", "conversations": turns}))
        f.write("\n]\n")
    return os.path.getsize(path)


PEAK = """
import json, sys, time
sys.path.insert(0, {root!r})
def rss():  # VmHWM: this process's peak resident memory (ru_maxrss would carry the parent's over exec)
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")) / 1024
if {ivl}:
    from pipeline.readers import entries_from_sources, plan_tasks, read_task
before = rss(); t = time.perf_counter()
if {ivl}:
    n = 0
    for task in plan_tasks(entries_from_sources([{path!r}]), 1000):
        kept, rejected = read_task(task)
        n += len(kept) + len(rejected)
else:
    n = len([r["conversations"] for r in json.load(open({path!r}))])
print(json.dumps({{"rows": n, "peak_mb": rss() - before, "seconds": time.perf_counter() - t}}))
"""


def bench_json_array(n: int) -> None:
    import subprocess
    import sys

    tmp = tempfile.mkdtemp(prefix="bench-jsonarray-")
    path = f"{tmp}/llava.json"
    size = make_json_array(path, n) / 2**20
    res = {}
    for name, ivl in (("json.load", False), ("ivl", True)):
        out = subprocess.run([sys.executable, "-c", PEAK.format(root=ROOT, ivl=ivl, path=path)], capture_output=True,
                             text=True, check=True).stdout
        res[name] = json.loads(out.strip().splitlines()[-1])
        assert res[name]["rows"] == n, res
    print(f"records: {n}, file: {size:.0f} MiB, cores: {os.cpu_count()}, load avg: {os.getloadavg()[0]:.1f}")
    for name, r in res.items():
        print(f"{name:10s}: peak memory above imports {r['peak_mb']:7.0f} MiB ({r['peak_mb'] / size:.2f}x the file), "
              f"{r['seconds']:.1f} s, {n / r['seconds']:.0f} records/s")
    print(f"ratio json.load / ivl peak memory: {res['json.load']['peak_mb'] / max(res['ivl']['peak_mb'], 1):.1f}x")
    shutil.rmtree(tmp)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--json-array", type=int, default=None, help="records of the JSON-array memory bench")
    a = ap.parse_args()
    if a.json_array:
        bench_json_array(a.json_array)
        return
    tmp = tempfile.mkdtemp(prefix="bench-ingest-")
    meta, nbytes = make_dataset(f"{tmp}/src", a.n)
    mb = nbytes / 1e6

    t = time.perf_counter()
    n = plain_loop(f"{tmp}/src", f"{tmp}/plain")
    plain = time.perf_counter() - t

    from pipeline.ingest import run_ingest
    from pipeline.session import init_ray

    os.environ["IVL_PROGRESS"] = "0"
    init_ray(num_cpus=os.cpu_count())
    t = time.perf_counter()
    s = run_ingest([meta], f"{tmp}/ivl")
    cold = time.perf_counter() - t
    assert s["kept"] == n == a.n, s
    # the same job again on the now-warm workers (modules imported, as on a long-lived cluster)
    t = time.perf_counter()
    run_ingest([meta], f"{tmp}/ivl2")
    ivl = time.perf_counter() - t
    print(f"samples: {n}, input MB (JSONL + image files): {mb:.1f}, cores: {os.cpu_count()}")
    print(f"plain single-process loop : {n / plain:8.0f} samples/s {mb / plain:7.1f} MB/s ({plain:.1f} s)")
    print(f"ivl ingest, cold workers  : {n / cold:8.0f} samples/s {mb / cold:7.1f} MB/s ({cold:.1f} s, Ray start excluded)")
    print(f"ivl ingest, warm workers  : {n / ivl:8.0f} samples/s {mb / ivl:7.1f} MB/s ({ivl:.1f} s)")
    print(f"ratio ivl / plain         : {plain / cold:.2f}x cold, {plain / ivl:.2f}x warm")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
