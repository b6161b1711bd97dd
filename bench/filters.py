"""Gopher quality + repetition: ivl's `gopher_decide` vs DataTrove's filters, side by side, one process.

Measures docs per CPU-second (time.process_time) of each, their ratio, and the fraction of documents
on which both make the same keep/drop decision; then times the default curate config's operators
(jobs/configs/curate.yaml) over the same corpus as canonical text-only rows, single process.

DataTrove is a benchmark-only baseline: run this with a separate venv that has it, not the project's:
    python3 -m venv /tmp/benchenv && /tmp/benchenv/bin/pip install datatrove spacy regex pyarrow pydantic pyyaml
    /tmp/benchenv/bin/python bench/filters.py --corpus /tmp/text-corpus/corpus.jsonl
Without DataTrove importable, only ivl's side and the curate config are timed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from operators.text_rules import gopher_decide, is_mostly_cjk  # noqa: E402


def load_corpus(path: str, limit: int | None) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if limit and len(texts) >= limit:
                break
    return texts


def time_ivl(texts: list[str]) -> tuple[list[tuple[bool, str]], float]:
    t0 = time.process_time()
    out = [gopher_decide(t) for t in texts]
    return out, time.process_time() - t0


def time_datatrove(texts: list[str]):
    """DataTrove's pair, each filter over every document (as its anchor was measured); None if absent."""
    try:
        from datatrove.data import Document
        from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    except ImportError:
        return None
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    quality, repetition = GopherQualityFilter(), GopherRepetitionFilter()
    quality.filter(docs[0])  # load spaCy's tokenizer outside the timed part
    results = {}
    for name, flt in (("quality", quality), ("repetition", repetition)):
        t0 = time.process_time()
        res = [flt.filter(d) for d in docs]
        results[name] = (res, time.process_time() - t0)
    decisions = []
    for q, r in zip(results["quality"][0], results["repetition"][0]):
        q_ok, r_ok = q is True, r is True
        reason = "" if q_ok and r_ok else (r[1] if not r_ok else q[1])
        decisions.append((q_ok and r_ok, reason))
    return decisions, results["quality"][1], results["repetition"][1]


def time_curate_ops(texts: list[str], config: str, batch: int = 1000) -> tuple[float, collections.Counter]:
    """The default curate config's operators over the corpus as one-turn text samples (no Ray)."""
    import pyarrow as pa
    import yaml

    from operators.base import REVIEW, build_operator
    from pipeline.schema import rows_to_table

    for mod in ("text_rules", "ngram_repetition", "image_checks", "fasttext_ops"):
        __import__(f"operators.{mod}")
    with open(config) as f:
        stages = yaml.safe_load(f)["stages"]
    ops = [build_operator(s) for s in stages]
    for op in ops:
        op.setup()
    rows = [
        {"id": f"corpus/{i}", "source": "corpus", "category": "", "meta": "{}", "images": [],
         "conversations": [{"from": "human", "value": "Tell me about it."}, {"from": "gpt", "value": t}]}
        for i, t in enumerate(texts)
    ]
    tables = [rows_to_table(rows[i : i + batch]) for i in range(0, len(rows), batch)]
    counts: collections.Counter = collections.Counter()
    t0 = time.process_time()
    for table in tables:
        alive = table
        for op in ops:
            v = op(alive)
            for d, r in zip(v.decision, v.rule):
                if d:
                    counts[f"{op.name}:{r}" + (" (review)" if d == REVIEW else "")] += 1
            alive = alive.filter(pa.array(v.decision == 0))
        counts["kept"] += alive.num_rows
    return time.process_time() - t0, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="/tmp/text-corpus/corpus.jsonl")
    ap.add_argument("--limit", type=int, default=None, help="first N documents only")
    ap.add_argument("--config", default=os.path.join(ROOT, "jobs/configs/curate.yaml"))
    ap.add_argument("--skip-curate", action="store_true")
    args = ap.parse_args()

    texts = load_corpus(args.corpus, args.limit)
    n, mb = len(texts), sum(map(len, texts)) / 1e6
    print(f"corpus: {n} docs, {mb:.1f} M chars ({args.corpus})")
    ours, t_ours = time_ivl(texts)
    print(f"ivl gopher_decide (quality+repetition): {n / t_ours:,.0f} docs/CPU-s ({t_ours:.2f} s)")
    dt = time_datatrove(texts)
    if dt is None:
        print("datatrove not importable: baseline skipped")
    else:
        theirs, t_q, t_r = dt
        pair = n / (t_q + t_r)
        print(f"datatrove GopherQualityFilter:    {n / t_q:,.0f} docs/CPU-s ({t_q:.1f} s)")
        print(f"datatrove GopherRepetitionFilter: {n / t_r:,.0f} docs/CPU-s ({t_r:.1f} s)")
        print(f"datatrove pair:                   {pair:,.0f} docs/CPU-s")
        print(f"speed ratio ivl / datatrove pair: {n / t_ours / pair:.1f}x")
        same = sum(a[0] == b[0] for a, b in zip(ours, theirs))
        non_cjk = [i for i, t in enumerate(texts) if not is_mostly_cjk(t)]
        same_nc = sum(ours[i][0] == theirs[i][0] for i in non_cjk)
        print(f"decision agreement: {same / n:.4f} ({n - same} of {n} differ); "
              f"non-CJK docs: {same_nc / max(1, len(non_cjk)):.4f}")
        print(f"kept: ivl {sum(o[0] for o in ours)}, datatrove {sum(t[0] for t in theirs)}")
        diff = collections.Counter((a[1], b[1]) for a, b in zip(ours, theirs) if a[0] != b[0])
        print("disagreements (ivl reason, datatrove reason):", diff.most_common(8))
    if not args.skip_curate:
        t_cur, counts = time_curate_ops(texts, args.config)
        print(f"default curate config operators, one process: {n / t_cur:,.0f} docs/CPU-s ({t_cur:.1f} s)")
        print("outcomes:", dict(counts.most_common(12)))


if __name__ == "__main__":
    main()
