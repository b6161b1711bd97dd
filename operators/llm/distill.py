"""Distilling the LLM quality score into a fastText classifier (beyond the paper, issue 5 item 5).

Scoring every row with an LLM costs a forward pass per row; a fastText classifier costs
microseconds. So: score a configurable random sample with the LLM operator, bucket the expected
scores (by default at the operator's threshold: "low" / "high"), train the fastText quality
classifier of the curate issue on the buckets (operators/fasttext_ops.py owns the training), measure
its agreement with the LLM on held-out sampled rows, and label the remaining rows with it.

Functions here take tables and return labels and a report; writing files other than the model the
caller names, and deciding "LLM on all" vs "LLM on a sample + classifier", belong to the runner.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from .ops import LLMQuality
from .prompts import render_sample


@dataclass
class DistillReport:
    sampled: int  # rows sent to the LLM
    scored: int  # of those, rows with a score (failed and skipped rows are not used)
    train: int
    holdout: int
    agreement: float  # fraction of held-out rows where classifier label == LLM bucket
    edges: list[float]
    labels: list[str]
    label_counts: dict[str, int] = field(default_factory=dict)
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # llm label -> classifier label -> n
    model_path: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def bucket_names(edges: list[float]) -> list[str]:
    return ["low", "high"] if len(edges) == 1 else [f"b{i}" for i in range(len(edges) + 1)]


def bucket_labels(scores: np.ndarray, edges: list[float]) -> list[str]:
    """Score -> bucket name; bucket i holds edges[i-1] <= score < edges[i]."""
    names = bucket_names(edges)
    return [names[int(np.searchsorted(edges, s, side="right"))] for s in scores]


def one_line(text: str) -> str:
    """fastText reads one example per line."""
    return " ".join(text.split())


def sample_indices(n_rows: int, sample_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=min(sample_size, n_rows), replace=False))


def distill_quality(
    table: pa.Table,
    op: LLMQuality,
    model_path: str,
    sample_size: int = 10_000,
    holdout_fraction: float = 0.2,
    edges: list[float] | None = None,
    quantiles: list[float] | None = None,
    seed: int = 0,
    **hyper,
) -> tuple[DistillReport, list[str | None], np.ndarray]:
    """Score a sample with `op`, train fastText on its buckets, label every row.

    Returns (report, label per row of `table`, LLM expected score per row (NaN where not scored)).
    Sampled rows keep their LLM bucket; the others get the classifier's; rows the quality operator
    does not score (multimodal) get None. Bucket edges: `edges`, else the sample's score
    `quantiles` (for a rater whose scores cluster on one side of the threshold), else the threshold."""
    from operators.fasttext_ops import train_quality_classifier  # the curate issue's trainer

    idx = sample_indices(table.num_rows, sample_size, seed)
    verdict = op(table.take(pa.array(idx)))
    scores = np.array(verdict.columns["score_quality"].to_pylist(), dtype=np.float64)  # null -> NaN
    texts = [one_line(render_sample(c, op.params.turns)) for c in table.column("conversations").to_pylist()]
    ok = np.flatnonzero(~np.isnan(scores))
    if edges is None and quantiles and len(ok):
        edges = [float(x) for x in np.quantile(scores[ok], quantiles)]
    edges = sorted(edges or [op.params.threshold])
    llm_labels = bucket_labels(scores[ok], edges)
    order = np.random.default_rng(seed + 1).permutation(len(ok))
    n_hold = int(round(len(ok) * holdout_fraction))
    hold, train = order[:n_hold], order[n_hold:]
    if len(train) == 0 or len(set(llm_labels[j] for j in train)) < 2:
        raise ValueError(
            f"the LLM sample has {len(train)} training rows in fewer than two buckets: sample more rows"
        )
    train_quality_classifier(
        [texts[idx[ok[j]]] for j in train], [llm_labels[j] for j in train], model_path, **hyper
    )
    classifier = _load(model_path)
    confusion: dict[str, Counter] = {}
    agree = 0
    if len(hold):
        predicted = predict_labels(classifier, [texts[idx[ok[j]]] for j in hold])
        for j, p in zip(hold, predicted):
            confusion.setdefault(llm_labels[j], Counter())[p] += 1
            agree += p == llm_labels[j]
    report = DistillReport(
        sampled=len(idx),
        scored=len(ok),
        train=len(train),
        holdout=len(hold),
        agreement=agree / len(hold) if len(hold) else math.nan,
        edges=list(edges),
        labels=bucket_names(edges),
        label_counts=dict(Counter(llm_labels)),
        confusion={k: dict(v) for k, v in confusion.items()},
        model_path=model_path,
    )
    # every row: the LLM's bucket where it was scored, the classifier's elsewhere
    per_row_score = np.full(table.num_rows, np.nan)
    per_row_score[idx] = scores
    labels: list[str | None] = [None] * table.num_rows
    for k, j in enumerate(ok):
        labels[idx[j]] = llm_labels[k]
    images = table.column("images").to_pylist()
    sampled = set(idx.tolist())
    rest = [i for i in range(table.num_rows) if i not in sampled and not images[i]]
    for i, p in zip(rest, predict_labels(classifier, [texts[i] for i in rest])):
        labels[i] = p
    return report, labels, per_row_score


def _load(path: str):
    import fasttext

    return fasttext.load_model(path)


def predict_labels(model, texts: list[str]) -> list[str]:
    if not texts:
        return []
    labels, _ = model.predict([one_line(t) for t in texts], k=1)
    return [lab[0].removeprefix("__label__") for lab in labels]
