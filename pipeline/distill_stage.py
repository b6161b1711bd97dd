"""LLM-on-a-sample + fastText for `ivl curate` (issue 5 item 5; beyond the paper).

With `distill:` in the curate config, the `llm_quality` stage is not run on every row. Before
phase 1 the runner calls `prepare_distilled_stage`, which
  1. draws a deterministic sample of pure-text rows from the input shards: the rows whose
     hash(seed, id) is smallest, so the sample does not depend on shard order or partitioning;
  2. scores it with the configured `llm_quality` operator as a Ray Data actor pool (the runner's
     own actor, so batching, GPUs and error routing are the same as LLM-on-all);
  3. trains the fastText quality classifier (operators/fasttext_ops.py) on buckets of the LLM's
     expected score and measures its agreement with the LLM on held-out sampled rows;
  4. returns a `fasttext_quality` stage spec that takes the place of the `llm_quality` stage.

Outputs: OUT/_distill/quality.bin (the model), OUT/_distill/sample_scores.parquet (the LLM's
scores of the sample), OUT/report/distill.json (agreement, bucket counts, sample size, LLM rows/s)
and OUT/_distill/done.json, the marker that makes a resumed run skip all of this.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from operators.base import KEEP, build_operator, conversation_texts
from pipeline.curate_config import LLM_OP, DistillConfig, llm_stage_index  # noqa: F401
from pipeline.io import atomic_write_bytes, read_canonical, write_parquet_atomic

STAGE_NAME = "llm_quality_distilled"  # reject reasons read `llm_quality_distilled:low_quality`


def distilled_stages(stages: list[dict[str, Any]], files: list[str], out_dir: str,
                     cfg: DistillConfig) -> list[dict[str, Any]]:
    """The stage list with its `llm_quality` stage replaced by the distilled classifier."""
    i = llm_stage_index(stages)
    return stages[:i] + [prepare_distilled_stage(files, out_dir, stages[i], cfg)] + stages[i + 1:]


# ---- the sample ---------------------------------------------------------------------------------

def row_hash(seed: int, row_id: str) -> int:
    """A stable 63-bit hash (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _smallest_in_shard(batch: dict, k: int, seed: int) -> pa.Table:
    """One shard's k pure-text rows with the smallest hashes (a global bottom-k is a uniform sample)."""
    t = read_canonical(str(batch["path"][0]))
    t = t.filter(pc.equal(pc.fill_null(pc.list_value_length(t.column("images")), 0), 0))
    t = t.select(["id", "source", "category", "conversations", "images", "meta"])
    h = pa.array([row_hash(seed, i) for i in t.column("id").to_pylist()], pa.int64())
    t = t.append_column("_h", h).sort_by("_h")
    return t.slice(0, k)


def draw_sample(files: list[str], size: int, seed: int) -> pa.Table:
    """`size` pure-text rows from the shards, the same for any order or grouping of the files."""
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(_smallest_in_shard, fn_kwargs={"k": size, "seed": seed}, batch_size=1,
                        batch_format="pyarrow")
    blocks = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    if not blocks:
        raise ValueError("distill: the input has no pure-text rows to score")
    return pa.concat_tables(blocks).sort_by([("_h", "ascending"), ("id", "ascending")]).slice(0, size)


def score_sample(sample: pa.Table, llm_spec: dict, cfg: DistillConfig) -> tuple[pa.Table, float]:
    """LLM scores of the sample through the curate runner's actor (setup once, batches after);
    returns (id, _h, _decision, score_quality, llm_quality_domain, llm_quality_error) sorted by
    hash (the report draws its histograms from them), and the LLM's busy seconds."""
    from pipeline.curate import OperatorActor, load_operators

    load_operators()
    name = llm_spec.get("name") or LLM_OP
    n = sample.num_rows
    routed = (sample.append_column("_decision", pa.array([KEEP] * n, pa.int8()))
              .append_column("reject_reason", pa.array([""] * n, pa.string()))
              .append_column("review_reason", pa.array([""] * n, pa.string())))
    num_gpus = build_operator({k: v for k, v in llm_spec.items() if k != "name"}).num_gpus
    blocks = max(1, min(cfg.actors * 4, -(-n // cfg.batch_size)))  # enough blocks to feed every actor
    ds = ray.data.from_arrow(routed).repartition(blocks).map_batches(
        OperatorActor, fn_constructor_kwargs={"spec": llm_spec}, batch_size=cfg.batch_size,
        batch_format="pyarrow", concurrency=cfg.actors, num_gpus=num_gpus or None)
    cols = ["id", "_h", "_decision", "score_quality", "llm_quality_domain", "llm_quality_error", f"_sec_{name}"]
    # promote: a block whose rows all scored has a null-typed error column
    out = pa.concat_tables([b.select([c for c in cols if c in b.column_names]) for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)],
                           promote_options="default")
    seconds = float(pc.sum(out.column(f"_sec_{name}")).as_py() or 0.0)
    return out.drop_columns([f"_sec_{name}"]).sort_by("_h"), seconds


# ---- training and agreement ---------------------------------------------------------------------

def _bucket_edges(scores: np.ndarray, cfg: DistillConfig, llm_threshold: float) -> list[float]:
    if cfg.edges is not None:
        return sorted(cfg.edges)
    if cfg.quantiles:
        return sorted(float(x) for x in np.quantile(scores, cfg.quantiles))
    return [llm_threshold]  # one edge at the LLM's own cut: "low" (rejected) vs "high" (kept)


def prepare_distilled_stage(files: list[str], out_dir: str, llm_spec: dict, cfg: DistillConfig) -> dict:
    """Score a sample with the LLM, train fastText on score buckets, report agreement; returns the
    `fasttext_quality` stage spec that replaces `llm_spec`. Skips all work when OUT/_distill/done.json
    says a model for the same settings is there (resume); refuses one made with other settings."""
    from operators.fasttext_ops import FasttextQuality, evaluate_classifier, train_quality_classifier
    from operators.llm.distill import bucket_labels, bucket_names

    ddir = os.path.join(os.path.abspath(out_dir), "_distill")
    model_path = os.path.join(ddir, "quality.bin")
    done_path = os.path.join(ddir, "done.json")
    report_path = os.path.join(os.path.abspath(out_dir), "report", "distill.json")
    settings = {"distill": cfg.model_dump(), "llm": llm_spec, "files": sorted(os.path.basename(f) for f in files)}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if os.path.exists(done_path) and os.path.exists(model_path):
        with open(done_path) as f:
            done = json.load(f)
        if done["fingerprint"] != fingerprint:
            raise ValueError(f"{ddir} holds a classifier distilled with other settings; use a fresh --out")
        return done["stage"]

    llm = build_operator({k: v for k, v in llm_spec.items() if k != "name"})
    t0 = time.time()
    sample = draw_sample(files, cfg.sample_size, cfg.seed)
    scored, llm_seconds = score_sample(sample, llm_spec, cfg)
    write_parquet_atomic(scored, os.path.join(ddir, "sample_scores.parquet"))
    # the texts exactly as fasttext_quality will read them (same turns, same joining)
    text_of = dict(zip(sample.column("id").to_pylist(), conversation_texts(sample, llm.params.turns)))
    scores = scored.column("score_quality").to_numpy(zero_copy_only=False).astype(np.float64)
    errors = scored.column("llm_quality_error").to_pylist()
    ok = [j for j in range(scored.num_rows) if errors[j] is None and not np.isnan(scores[j])]
    if not ok:
        raise ValueError(f"distill: the LLM scored none of the {scored.num_rows} sampled rows (see {ddir})")
    edges = _bucket_edges(scores[ok], cfg, llm.params.threshold)
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
    hold_texts, hold_labels = [text_of[ids[j]] for j in hold], [labels[j] for j in hold]
    quality = evaluate_classifier(model_path, hold_texts, hold_labels)
    p_good = FasttextQuality(**{k: v for k, v in stage.items() if k not in ("op", "name")}).good_probability(hold_texts)
    # the decision that matters: would the classifier pass the rows the LLM puts in the top bucket?
    decision_agreement = float(np.mean([(p >= cfg.threshold) == (lab == good) for p, lab in zip(p_good, hold_labels)]))
    report = {
        "sample_size": cfg.sample_size, "sampled": sample.num_rows, "scored": len(ok),
        "failed": scored.num_rows - len(ok), "train": len(train), "holdout": len(hold),
        "llm_threshold": llm.params.threshold, "edges": edges, "labels": bucket_names(edges), "good_label": good,
        "bucket_counts": {lab: labels.count(lab) for lab in bucket_names(edges)},
        "agreement": quality["accuracy"], "decision_agreement": decision_agreement,
        "per_label": {k: v for k, v in quality.items() if isinstance(v, dict)},
        "llm_seconds": round(llm_seconds, 3),
        "llm_rows_per_s": round(scored.num_rows / llm_seconds, 3) if llm_seconds > 0 else None,
        "seconds": round(time.time() - t0, 2), "model_path": model_path, "stage": stage,
    }
    atomic_write_bytes(report_path, json.dumps(report, indent=2, sort_keys=True).encode())
    atomic_write_bytes(done_path, json.dumps({"fingerprint": fingerprint, "stage": stage}).encode())
    return stage
