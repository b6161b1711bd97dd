"""Distillation for `ivl curate` (beyond the paper): a teacher operator on a sample, a student classifier on
every row. The one implementation of it; two phases, both before the runner's phase 1.

With `distill:` in the curate config the teacher stage (the `llm_quality` stage,
pipeline/curate_config.py:llm_stage_index) is not run on every row. `prepare_distilled_stage`
  phase 1 (teacher): draws a deterministic sample of pure-text rows from the input shards (the rows whose
     hash(seed, id) is smallest, so the sample does not depend on shard order or partitioning) and scores it
     with the teacher as a Ray Data actor pool (the runner's own OperatorActor, so batching, GPUs and error
     routing are those of teacher-on-all);
  phase 2 (student): trains the fastText quality classifier (operators/fasttext_ops.py) on buckets of the
     teacher's score column (the first column of its `thresholds()`, cut by default at the teacher's own
     threshold), measures its agreement with the teacher on held-out sampled rows, and returns the
     `fasttext_quality` stage (resolved, pipeline/curate_config.py:Stage) that takes the teacher stage's place.

Outputs: OUT/_distill/quality.bin (the model), OUT/_distill/sample_scores.parquet (the LLM's
scores of the sample), OUT/report/distill.json (agreement, bucket counts, sample size, LLM rows/s)
and OUT/_distill/done.json, the marker that makes a resumed run skip all of this.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from operators.base import KEEP, conversation_texts
from pipeline.curate_config import DistillConfig, Stage, llm_stage_index, resolve_stage
from pipeline.io import atomic_write_bytes, read_canonical, write_parquet_atomic

STAGE_NAME = "llm_quality_distilled"  # reject reasons read `llm_quality_distilled:low_quality`
INPUT_COLUMNS = ["id", "source", "category", "conversations", "images", "meta"]


def distilled_stages(stages: list[Stage], files: list[str], out_dir: str, cfg: DistillConfig) -> list[Stage]:
    """The stage list with its `llm_quality` stage replaced by the distilled classifier."""
    i = llm_stage_index(stages)
    return stages[:i] + [prepare_distilled_stage(files, out_dir, stages[i], cfg)] + stages[i + 1:]


# ---- the sample ---------------------------------------------------------------------------------

def row_hash(seed: int, row_id: str) -> int:
    """A stable 63-bit hash (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def smallest_in_shard(batch: dict, k: int, seed: int) -> pa.Table:
    """One shard's k pure-text rows with the smallest hashes (a global bottom-k is a uniform sample)."""
    t = read_canonical(str(batch["path"][0]))
    t = t.filter(pc.equal(pc.fill_null(pc.list_value_length(t.column("images")), 0), 0))
    t = t.select(INPUT_COLUMNS)
    h = pa.array([row_hash(seed, i) for i in t.column("id").to_pylist()], pa.int64())
    t = t.append_column("_h", h).sort_by("_h")
    return t.slice(0, k)


def draw_sample(files: list[str], size: int, seed: int) -> pa.Table:
    """`size` pure-text rows from the shards, the same for any order or grouping of the files."""
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(smallest_in_shard, fn_kwargs={"k": size, "seed": seed}, batch_size=1,
                        batch_format="pyarrow")
    blocks = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    if not blocks:
        raise ValueError("distill: the input has no pure-text rows to score")
    return pa.concat_tables(blocks).sort_by([("_h", "ascending"), ("id", "ascending")]).slice(0, size)


def teacher_score(teacher) -> tuple[str, float]:
    """(score column, threshold) of a teacher operator: the first column its `thresholds()` names."""
    found = teacher.thresholds()
    if not found:
        raise ValueError(f"distill: operator {teacher.name} names no score column to distill")
    column, cuts = next(iter(found.items()))
    return column, float(cuts[0])


def bucket_names(edges: list[float]) -> list[str]:
    return ["low", "high"] if len(edges) == 1 else [f"b{i}" for i in range(len(edges) + 1)]


def bucket_labels(scores: np.ndarray, edges: list[float]) -> list[str]:
    """Score -> bucket name; bucket i holds edges[i-1] <= score < edges[i]."""
    names = bucket_names(edges)
    return [names[int(np.searchsorted(edges, s, side="right"))] for s in scores]


def score_sample(sample: pa.Table, teacher: Stage, cfg: DistillConfig) -> tuple[pa.Table, float]:
    """Phase 1: the teacher's scores of the sample through the curate runner's actor (setup once, batches
    after); returns id, _h, _decision and every column the teacher added (score, domain, error, ...) sorted
    by hash (the report draws its histograms from them), and the teacher's busy seconds."""
    from pipeline.verdicts import OperatorActor  # the runner's own actor

    name = teacher.label
    n = sample.num_rows
    routed = (sample.append_column("_decision", pa.array([KEEP] * n, pa.int8()))
              .append_column("reject_reason", pa.array([""] * n, pa.string()))
              .append_column("review_reason", pa.array([""] * n, pa.string())))
    blocks = max(1, min(cfg.actors * 4, -(-n // cfg.batch_size)))  # enough blocks to feed every actor
    ds = ray.data.from_arrow(routed).repartition(blocks).map_batches(
        OperatorActor, fn_constructor_kwargs={"stage": teacher}, batch_size=cfg.batch_size,
        batch_format="pyarrow", concurrency=cfg.actors, num_gpus=teacher.num_gpus or None)
    dropped = set(INPUT_COLUMNS[1:]) | {"reject_reason", "review_reason"}
    blocks = [b.select([c for c in b.column_names if c not in dropped])
              for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    out = pa.concat_tables(blocks, promote_options="default")  # a block whose rows all scored: null-typed errors
    seconds = float(pc.sum(out.column(f"_sec_{name}")).as_py() or 0.0)
    return out.drop_columns([f"_sec_{name}"]).sort_by("_h"), seconds


# ---- training and agreement ---------------------------------------------------------------------

def _bucket_edges(scores: np.ndarray, cfg: DistillConfig, llm_threshold: float) -> list[float]:
    if cfg.edges is not None:
        return sorted(cfg.edges)
    if cfg.quantiles:
        return sorted(float(x) for x in np.quantile(scores, cfg.quantiles))
    return [llm_threshold]  # one edge at the LLM's own cut: "low" (rejected) vs "high" (kept)


def prepare_distilled_stage(files: list[str], out_dir: str, teacher: Stage, cfg: DistillConfig) -> Stage:
    """Score a sample with the LLM, train fastText on score buckets, report agreement; returns the
    `fasttext_quality` stage that replaces `teacher`. Skips all work when OUT/_distill/done.json
    says a model for the same settings is there (resume); refuses one made with other settings."""
    from operators.fasttext_ops import evaluate_classifier, train_quality_classifier

    ddir = os.path.join(os.path.abspath(out_dir), "_distill")
    model_path = os.path.join(ddir, "quality.bin")
    done_path = os.path.join(ddir, "done.json")
    report_path = os.path.join(os.path.abspath(out_dir), "report", "distill.json")
    settings = {"distill": cfg.model_dump(), "llm": teacher.spec(), "files": sorted(os.path.basename(f) for f in files)}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if os.path.exists(done_path) and os.path.exists(model_path):
        with open(done_path) as f:
            done = json.load(f)
        if done["fingerprint"] != fingerprint:
            raise ValueError(f"{ddir} holds a classifier distilled with other settings; use a fresh --out")
        return resolve_stage(done["stage"])

    llm = teacher.build()
    score_column, teacher_threshold = teacher_score(llm)
    t0 = time.time()
    sample = draw_sample(files, cfg.sample_size, cfg.seed)
    scored, llm_seconds = score_sample(sample, teacher, cfg)
    write_parquet_atomic(scored, os.path.join(ddir, "sample_scores.parquet"))
    # the texts exactly as fasttext_quality will read them (same turns, same joining)
    text_of = dict(zip(sample.column("id").to_pylist(), conversation_texts(sample, llm.params.turns)))
    scores = scored.column(score_column).to_numpy(zero_copy_only=False).astype(np.float64)  # null -> NaN
    ok = [j for j in range(scored.num_rows) if not np.isnan(scores[j])]  # failed rows carry a null score
    if not ok:
        raise ValueError(f"distill: the LLM scored none of the {scored.num_rows} sampled rows (see {ddir})")
    edges = _bucket_edges(scores[ok], cfg, teacher_threshold)
    labels = bucket_labels(scores[ok], edges)
    ids = [scored.column("id")[j].as_py() for j in ok]
    order = np.random.default_rng(cfg.seed + 1).permutation(len(ok))
    n_hold = max(1, int(round(len(ok) * cfg.holdout_fraction)))
    hold, train = order[:n_hold], order[n_hold:]
    if len({labels[j] for j in train}) < 2:
        raise ValueError(f"distill: the {len(train)} training rows fall in fewer than two score buckets "
                         f"(edges {edges}); raise sample_size or set edges/quantiles")
    hyper = dict(epoch=cfg.epoch, lr=cfg.lr, wordNgrams=cfg.word_ngrams, dim=cfg.dim, minCount=cfg.min_count,
                 bucket=cfg.bucket)  # fastText's default 2M buckets would make a 512 MB model at dim 64
    tmp_model = model_path + ".tmp"
    train_quality_classifier([text_of[ids[j]] for j in train], [labels[j] for j in train], tmp_model,
                             seed=cfg.seed, **hyper)
    os.replace(tmp_model, model_path)  # a killed run never leaves a half-written model behind

    good = bucket_names(edges)[-1]  # the top bucket is "good"; fasttext_quality flags P(good) < threshold
    stage = {"op": "fasttext_quality", "name": STAGE_NAME, "model_path": model_path, "good_label": good,
             "threshold": cfg.threshold, "turns": llm.params.turns, "action": cfg.action}
    student = resolve_stage(stage)
    hold_texts, hold_labels = [text_of[ids[j]] for j in hold], [labels[j] for j in hold]
    quality = evaluate_classifier(model_path, hold_texts, hold_labels)
    p_good = student.build().good_probability(hold_texts)
    # the decision that matters: would the classifier pass the rows the LLM puts in the top bucket?
    decision_agreement = float(np.mean([(p >= cfg.threshold) == (lab == good) for p, lab in zip(p_good, hold_labels)]))
    report = {
        "sample_size": cfg.sample_size, "sampled": sample.num_rows, "scored": len(ok),
        "failed": scored.num_rows - len(ok), "train": len(train), "holdout": len(hold),
        "llm_threshold": teacher_threshold, "score_column": score_column, "edges": edges, "labels": bucket_names(edges), "good_label": good,
        "bucket_counts": {lab: labels.count(lab) for lab in bucket_names(edges)},
        "agreement": quality["accuracy"], "decision_agreement": decision_agreement,
        "per_label": {k: v for k, v in quality.items() if isinstance(v, dict)},
        "llm_seconds": round(llm_seconds, 3),
        "llm_rows_per_s": round(scored.num_rows / llm_seconds, 3) if llm_seconds > 0 else None,
        "seconds": round(time.time() - t0, 2), "model_path": model_path, "stage": stage,
    }
    atomic_write_bytes(report_path, json.dumps(report, indent=2, sort_keys=True).encode())
    atomic_write_bytes(done_path, json.dumps({"fingerprint": fingerprint, "stage": stage}).encode())
    return student
