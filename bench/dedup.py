"""MinHash dedup benchmark on the real text corpus (../shared/tools/build_text_corpus.py) with planted near-dups.

Part 1 (one core, same process): shingling + signatures, ours vs datasketch's update loop,
update_batch and MinHash.bulk, and LSH candidates vs datasketch MinHashLSH insert+query; docs per
CPU-second and ratios; signature equality; recall of the planted pairs for both shingle hashes.
Part 2 (`--e2e`): `dedup_dataset` through a local Ray with 2 CPUs at growing sizes (the corpus
replicated with a per-replica letter shift, so replicas are new documents with the same length and
duplicate structure): wall time, docs/s, peak memory (largest process RSS and total PSS of the Ray
processes), recall/precision on the planted pairs.

  .venv/bin/python bench/dedup.py --corpus /tmp/text-corpus [--e2e 10000,50000,100000,200000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from datasketch import MinHash, MinHashLSH  # noqa: E402

from operators.dedup import components as cc  # noqa: E402
from operators.dedup.lsh import band_keys, estimated_jaccard, optimal_param  # noqa: E402
from operators.dedup.minhash import MinHasher  # noqa: E402
from pipeline.dedup_stage import DedupConfig  # noqa: E402


def load(corpus: Path) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    ids, texts = [], []
    with open(corpus / "corpus.jsonl") as f:
        for line in f:
            r = json.loads(line)
            ids.append(r["id"])
            texts.append(r["text"])
    with open(corpus / "near_dups.jsonl") as f:
        pairs = [(r["dup_id"], r["orig_id"]) for r in map(json.loads, f)]
    return ids, texts, pairs


def cpu_rate(n: int, fn) -> tuple[float, object]:
    t = time.process_time()
    out = fn()
    return n / (time.process_time() - t), out


def part1(ids: list[str], texts: list[str], pairs: list[tuple[str, str]], threshold: float) -> dict:
    res: dict = {}
    fast, sha1 = MinHasher(hash="fast"), MinHasher(hash="sha1")
    fast.signatures(texts[:200])  # build the code-point tables once, as a long-running worker would

    def batched(h: MinHasher, docs: list[str]):
        return np.concatenate([h.signatures(docs[i : i + 1000])[0] for i in range(0, len(docs), 1000)])

    res["ours_fast"], sig_fast = cpu_rate(len(texts), lambda: batched(fast, texts))
    res["ours_sha1"], sig_sha1 = cpu_rate(len(texts), lambda: batched(sha1, texts))

    sub = texts[:3000]
    res["ds_update_loop"], _ = cpu_rate(len(sub[:1000]), lambda: [_update_loop(sha1, t) for t in sub[:1000]])
    res["ds_update_batch"], _ = cpu_rate(len(sub), lambda: [_update_batch(sha1, t) for t in sub])
    res["shingling_only"], shingles = cpu_rate(len(texts), lambda: [sha1.shingles(t) for t in texts])
    res["ds_bulk_premade_shingles"], ds_sigs = cpu_rate(len(texts), lambda: MinHash.bulk(shingles, num_perm=128, seed=1))
    res["ds_bulk_with_shingling"] = 1 / (1 / res["shingling_only"] + 1 / res["ds_bulk_premade_shingles"])

    # equality: sha1 mode == default datasketch MinHash; fast mode == datasketch with our hashfunc
    res["sha1_equal_datasketch"] = all(np.array_equal(sig_sha1[i], ds_sigs[i].hashvalues) for i in range(len(texts)))
    fast_ds = MinHash.bulk(shingles[:2000], num_perm=128, seed=1, hashfunc=fast.hashfunc)
    res["fast_equal_datasketch_hashfunc"] = all(np.array_equal(sig_fast[i], fast_ds[i].hashvalues) for i in range(2000))

    # LSH: datasketch MinHashLSH insert + query vs band keys + bucket star edges + verification
    def ds_lsh():
        lsh = MinHashLSH(threshold=threshold, num_perm=128)
        for i, m in enumerate(ds_sigs):
            lsh.insert(ids[i], m)
        return sum(len(lsh.query(m)) for m in ds_sigs)

    res["ds_lsh_insert_query"], _ = cpu_rate(len(texts), ds_lsh)
    bands, rows = optimal_param(threshold, 128, 0.2, 0.8)
    res["lsh_params"] = [bands, rows]
    res["ours_lsh_candidates_verified"], _ = cpu_rate(len(texts), lambda: _our_lsh(ids, sig_fast, bands, rows, threshold))

    # recall of the planted pairs under our LSH + verification, per shingle hash
    index = {d: i for i, d in enumerate(ids)}
    sh_sets = {}
    true_j = []
    for d, o in pairs:
        for x in (d, o):
            if x not in sh_sets:
                sh_sets[x] = set(shingles[index[x]])
        a, b = sh_sets[d], sh_sets[o]
        true_j.append(len(a & b) / len(a | b))
    true_j = np.array(true_j)
    res["planted_pairs"] = len(pairs)
    res["planted_true_jaccard_median"] = float(np.median(true_j))
    res["planted_share_true_jaccard_ge_threshold"] = float((true_j >= threshold).mean())
    for name, sig in (("fast", sig_fast), ("sha1", sig_sha1)):
        found = _pair_found(sig, [index[d] for d, _ in pairs], [index[o] for _, o in pairs], bands, rows, threshold)
        res[f"recall_{name}_all_planted"] = float(found.mean())
        res[f"recall_{name}_planted_true_j_ge_threshold"] = float(found[true_j >= threshold].mean())
        for lo, hi in ((0.5, 0.6), (0.6, 0.7), (0.7, 0.75), (0.75, 0.8), (0.8, 1.01)):
            sel = (true_j >= lo) & (true_j < hi)
            res[f"recall_{name}_true_j_{lo:.2f}-{min(hi, 1):.2f} (n={int(sel.sum())})"] = float(found[sel].mean()) if sel.any() else float("nan")
    best = max(res["ds_update_loop"], res["ds_update_batch"], res["ds_bulk_premade_shingles"])
    res["ratio_fast_vs_best_datasketch"] = res["ours_fast"] / best
    return res


def _update_loop(h: MinHasher, text: str) -> MinHash:
    m = MinHash(num_perm=128, seed=1)
    for s in h.shingles(text):
        m.update(s)
    return m


def _update_batch(h: MinHasher, text: str) -> MinHash:
    m = MinHash(num_perm=128, seed=1)
    m.update_batch(h.shingles(text))
    return m


def _our_lsh(ids, sig, bands, rows, threshold) -> int:
    keys = band_keys(sig, bands, rows)
    n = len(ids)
    table = pa.table(
        {
            "band": pa.array(np.tile(np.arange(bands, dtype=np.int32), n)),
            "key": pa.array(keys.ravel()),
            "id": pa.array(np.repeat(np.array(ids, dtype=object), bands), pa.string()),
        }
    )
    edges = cc.bucket_star_edges(table)
    index = {d: i for i, d in enumerate(ids)}
    u = np.array([index[x] for x in edges.column("u").to_pylist()], dtype=np.int64)
    v = np.array([index[x] for x in edges.column("v").to_pylist()], dtype=np.int64)
    return int((estimated_jaccard(sig[u], sig[v]) >= threshold).sum()) if len(u) else 0


def _pair_found(sig, a, b, bands, rows, threshold) -> np.ndarray:
    ka, kb = band_keys(sig[a], bands, rows), band_keys(sig[b], bands, rows)
    return (ka == kb).any(axis=1) & (estimated_jaccard(sig[a], sig[b]) >= threshold)


# ---------------------------------------------------------------------------------------------
def _shift(text: str, r: int) -> str:
    """Replica r of a text: ASCII letters rotated by r (a new document, same lengths and structure)."""
    if r == 0:
        return text
    lower = "abcdefghijklmnopqrstuvwxyz"
    table = str.maketrans(lower + lower.upper(), lower[r:] + lower[:r] + (lower[r:] + lower[:r]).upper())
    return text.translate(table)


def _ray_procs(psutil, driver: int):
    for p in psutil.process_iter(["pid", "cmdline", "memory_info", "cpu_times"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] == driver:
            yield "driver", p
        elif "raylet" in cmd or "gcs_server" in cmd:
            yield "ray_daemon", p  # the raylet holds the shared-memory object store
        elif "ray::" in cmd or "default_worker" in cmd:
            yield "worker", p


def _sample_memory(stop, result, every: float) -> None:
    """In its own process (so the driver's GIL stays free): peak private memory (USS) of the largest
    Ray worker, peak RSS of
    the raylet (object store), of the driver (which also holds the benchmark's input), peak total
    PSS of all of them (/proc/PID/smaps_rollup: shared object-store pages split fairly), and the
    CPU seconds they used meanwhile."""
    import psutil

    driver = psutil.Process().ppid()
    cpu0 = {p.info["pid"]: sum(p.info["cpu_times"][:2]) for _, p in _ray_procs(psutil, driver) if p.info["cpu_times"]}
    peak = [0.0, 0.0, 0.0, 0.0]
    cpu_now: dict[int, float] = {}
    while True:
        cur = [0.0, 0.0, 0.0, 0.0]
        for kind, p in _ray_procs(psutil, driver):
            try:
                cpu_now[p.info["pid"]] = sum(p.info["cpu_times"][:2])
                with open(f"/proc/{p.info['pid']}/smaps_rollup") as f:
                    kb = {k.rstrip(":"): int(v) for k, v, *_ in (line.split() for line in f) if k.endswith(":")}
            except (OSError, ValueError, AttributeError, TypeError):
                continue
            cur[3] += kb.get("Pss", 0) * 1024
            # USS (private pages): what the process itself holds; object-store pages it maps are shared
            uss = (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) * 1024
            i = {"worker": 0, "ray_daemon": 1, "driver": 2}[kind]
            cur[i] = max(cur[i], uss if kind == "worker" else p.info["memory_info"].rss)
        peak = [max(a, b) for a, b in zip(peak, cur)]
        result[:4] = peak
        result[4] = sum(v - cpu0.get(pid, 0.0) for pid, v in cpu_now.items())
        if stop.is_set():
            return
        stop.wait(every)


class PeakMemory:
    """Context manager around `_sample_memory` in a spawned process."""

    def __init__(self, every: float = 0.5):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.stop, self.result = ctx.Event(), ctx.Array("d", 5)
        self.proc = ctx.Process(target=_sample_memory, args=(self.stop, self.result, every), daemon=True)

    def __enter__(self):
        self.proc.start()
        time.sleep(1.0)  # let the sampler start before the timed work
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.proc.join()
        self.worker_rss, self.raylet_rss, self.driver_rss, self.total_pss, self.cpu_s = self.result[:5]


def part2(ids, texts, pairs, sizes: list[int], threshold: float) -> list[dict]:
    import ray

    sh = MinHasher(hash="sha1")
    index = {d: i for i, d in enumerate(ids)}
    pair_j = {}
    for d, o in pairs:  # the letter shift maps shingles one to one, so every replica has the same Jaccard
        a, b = set(sh.shingles(texts[index[d]])), set(sh.shingles(texts[index[o]]))
        pair_j[d] = len(a & b) / len(a | b)

    from pipeline.dedup_stage import dedup_dataset
    from pipeline.schema import CANONICAL

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = []
    for size in [2000, *sizes]:  # the first run warms the workers (imports, code-point tables); not reported
        reps = -(-size // len(texts))
        rid, rtext = [], []
        for r in range(reps):
            for i, t in zip(ids, texts):
                rid.append(f"r{r}/{i}")
                rtext.append(_shift(t, r))
        rid, rtext = rid[:size], rtext[:size]
        n = len(rid)
        conv = pa.array([[{"from": "gpt", "value": t}] for t in rtext], CANONICAL.field("conversations").type)
        table = pa.table(
            {
                "id": rid,
                "source": ["corpus"] * n,
                "category": [""] * n,
                "conversations": conv,
                "images": pa.array([[] for _ in range(n)], pa.list_(pa.binary())),
                "meta": ["{}"] * n,
            }
        )
        ds = ray.data.from_arrow(table).repartition(max(4, n // 5000)).materialize()
        cfg = DedupConfig(threshold=threshold)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            res = dedup_dataset(ds, cfg).select_columns(["id", "dedup_rule", "dup_of"]).materialize()
            wall = time.perf_counter() - t0
        rows = res.to_pandas()
        assert len(rows) == n
        final = dict(zip(rows["id"], np.where(rows["dup_of"] == "", rows["id"], rows["dup_of"])))
        present = set(rid)
        planted = [(f"r{r}/{d}", f"r{r}/{o}") for r in range(reps) for d, o in pairs]
        planted = [(d, o) for d, o in planted if d in present and o in present]
        hit = np.array([final[d] == final[o] for d, o in planted])
        above = np.array([pair_j[d.split("/", 1)[1]] >= threshold for d, _ in planted])
        recall = float(hit.mean()) if planted else float("nan")
        recall_above = float(hit[above].mean()) if above.any() else float("nan")
        removed = rows[rows["dedup_rule"] != ""]
        planted_set = {frozenset(p) for p in planted}
        # a removed row is right when it is half of a planted pair with its survivor, or a natural
        # near-duplicate: estimated Jaccard of the two texts >= threshold (checked on signatures below)
        hasher = MinHasher()
        idx = {x: k for k, x in enumerate(rid)}
        a = [rtext[idx[x]] for x in removed["id"]]
        b = [rtext[idx[x]] for x in removed["dup_of"]]
        ok = np.zeros(len(removed), dtype=bool)
        for k in range(0, len(a), 2000):
            sa, _ = hasher.signatures(a[k : k + 2000])
            sb, _ = hasher.signatures(b[k : k + 2000])
            ok[k : k + 2000] = estimated_jaccard(sa, sb) >= threshold - 0.1
        in_planted = np.array([frozenset((x, y)) in planted_set for x, y in zip(removed["id"], removed["dup_of"])])
        row = {
            "docs": n,
            "wall_s": round(wall, 1),
            "docs_per_s": round(n / wall),
            "removed": int(len(removed)),
            "removed_exact": int((removed["dedup_rule"] == "exact").sum()),
            "planted_pairs": len(planted),
            "recall_planted": round(recall, 4),
            "recall_planted_true_j_ge_threshold": round(recall_above, 4),
            "precision_planted_or_similar": round(float((ok | in_planted).mean()) if len(removed) else 1.0, 4),
            "cpu_s": round(mem.cpu_s, 1),
            "docs_per_cpu_s": round(n / mem.cpu_s) if mem.cpu_s else None,
            "peak_worker_uss_MiB": round(mem.worker_rss / 2**20),
            "peak_raylet_rss_MiB": round(mem.raylet_rss / 2**20),
            "peak_driver_rss_MiB": round(mem.driver_rss / 2**20),
            "peak_total_pss_MiB": round(mem.total_pss / 2**20),
        }
        if size == 2000 and len(out) == 0 and not getattr(part2, "_warm", False):
            part2._warm = True
            continue
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="/tmp/text-corpus")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--e2e", default="", help="comma-separated sizes for the Ray end-to-end runs")
    ap.add_argument("--skip-part1", action="store_true")
    args = ap.parse_args()
    ids, texts, pairs = load(Path(args.corpus))
    if not args.skip_part1:
        res = part1(ids, texts, pairs, args.threshold)
        for k, v in res.items():
            print(f"{k:45s} {v:.4g}" if isinstance(v, float) else f"{k:45s} {v}")
    if args.e2e:
        part2(ids, texts, pairs, [int(s) for s in args.e2e.split(",")], args.threshold)


if __name__ == "__main__":
    main()
