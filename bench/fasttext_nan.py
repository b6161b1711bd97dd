#!/usr/bin/env python3
"""Why ivl trains fastText with 12 threads: the `fasttext-numpy2-wheel` build leaves the input matrix
uninitialised where `DenseMatrix::uniform` does not reach (one tenth per thread), so on a heap that held
NaN a one-thread training fails with "Encountered NaN". This probe dirties the heap with freed NaN
buffers, then trains small classifiers on real texts (9 rows, random labels, like a distill sample) with
1 and with 12 threads, and through ivl's `train_quality_classifier`, and counts the failures.
Usage: .venv/bin/python bench/fasttext_nan.py [--trials 200]"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=200)
    a = ap.parse_args()
    import fasttext
    from llm_samples import real_texts

    from operators.fasttext_ops import one_line, train_quality_classifier

    texts = real_texts()  # standard-library docstrings, plus the bundled fortunes and Tang poems' answers
    for name in ("fortunes_text", "tang_poems"):
        with open(os.path.join(ROOT, "data", "sample", f"{name}.jsonl")) as f:
            texts += [t["value"] for line in f for t in json.loads(line)["conversations"] if t["from"] == "gpt"]
    texts = [t for t in one_line(texts, 20_000) if t.strip()]
    junk = [np.full(400, np.nan, dtype=np.float32) for _ in range(20_000)]
    del junk
    tmp = tempfile.mkdtemp(prefix="bench-ft-")
    samples = []
    rng = random.Random(0)
    while len(samples) < a.trials:
        idx = rng.sample(range(len(texts)), 9)
        labels = [rng.choice(["low", "high"]) for _ in idx]
        if len(set(labels)) == 2:
            samples.append(([texts[i] for i in idx], labels))

    def raw(threads: int, lr: float) -> int:
        failed = 0
        for k, (xs, ys) in enumerate(samples):
            path = os.path.join(tmp, "train.txt")
            with open(path, "w") as f:
                f.write("".join(f"__label__{y} {x}\n" for x, y in zip(xs, ys)))
            try:
                fasttext.train_supervised(input=path, verbose=0, epoch=25, lr=lr, wordNgrams=2, dim=64,
                                          minCount=1, bucket=10_000, thread=threads, seed=k)
            except RuntimeError:
                failed += 1
        return failed

    def ivl() -> int:
        failed = 0
        for k, (xs, ys) in enumerate(samples):
            try:
                train_quality_classifier(xs, ys, os.path.join(tmp, "m.bin"), seed=k, bucket=10_000)
            except RuntimeError:
                failed += 1
        return failed

    print(f"{a.trials} trainings of 9 of {len(texts)} real texts each, on a heap of freed NaN buffers:")
    for threads in (1, 12):
        for lr in (0.5, 0.0625):
            print(f"  fasttext.train_supervised, {threads:2d} thread(s), lr {lr:<6}: {raw(threads, lr):3d} NaN")
    print(f"  ivl train_quality_classifier (12 threads, lr 0.5)    : {ivl():3d} NaN")


if __name__ == "__main__":
    main()
