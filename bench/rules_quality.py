"""Precision and recall of the curation rules on the labelled evaluation set (bench/build_rules_eval.py),
per rule and overall, for ivl's default curate config (jobs/configs/curate.yaml, no dedup) and its
rule-set options, and for DataTrove's Gopher, C4 and FineWeb filters side by side where importable.

    python bench/build_rules_eval.py --out /tmp/rules-eval/eval.jsonl
    /tmp/benchenv/bin/python bench/rules_quality.py --eval /tmp/rules-eval/eval.jsonl   # with DataTrove
    .venv/bin/python bench/rules_quality.py                                              # ivl only
    .venv/bin/python bench/rules_quality.py --eval /tmp/rules-eval/s*/eval.jsonl   # several draws: per draw + pooled

Each item is one conversation (an empty human turn, the item as the assistant turn) run through the
config's stages in order, as the curate runner does: rejected rows skip the later stages. A hit is a
row some rule sends to review/ or rejected/. Precision of a rule = its hits on planted items / all its
hits; recall of a defect kind = planted items of that kind that any rule hits. With several draws a rule's
hits are every item its own condition holds on (the text rules report only their first rule, so a
later rule would otherwise be credited only with what earlier ones left); the first-rule attribution
is printed beside it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_eval(path: str) -> tuple[dict, list[dict]]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return rows[0], rows[1:]


# the parameter that switches each text rule off (n-gram rules: their n's entry in the threshold dict)
RULE_SWITCH = {"long_zero_run": "max_zero_run", "long_char_run": "max_char_run", "long_sentence": "max_sentence_words",
               "symbol_soup": "max_symbol_char_frac", "few_words": "min_words", "many_words": "max_words",
               "short_mean_word": "min_mean_word_len", "long_mean_word": "max_mean_word_len",
               "bullet_lines": "max_bullet_lines_frac", "ellipsis_lines": "max_ellipsis_lines_frac",
               "few_alpha_words": "min_alpha_word_frac", "few_stop_words": "min_stop_words",
               # one threshold holds both: switching one off switches the other off too
               "many_hashes": "max_symbol_word_ratio", "many_ellipses": "max_symbol_word_ratio"}


def without_rule(params, rule: str):
    """`params` with `rule` switched off (the text rules report only the first rule that fires), or None
    for a rule no setting switches off (the C4 / FineWeb rules' thresholds take no null)."""
    if rule.endswith("_gram"):
        field = "top_ngram_char_frac" if rule.startswith("top_") else "dup_ngram_char_frac"
        return params.model_copy(update={field: {n: f for n, f in getattr(params, field).items()
                                                 if n != int(rule.split("_")[1])}})
    field = RULE_SWITCH.get(rule, rule)
    return params.model_copy(update={field: None}) if field in type(params).model_fields else None


def firing_rules(text: str, lang: str | None, params) -> list[str]:
    """Every text rule whose own condition holds on `text`: the first rule, then the first with it off, ...
    (up to a rule that cannot be switched off)."""
    from operators.text_rules import analyze

    fired: list[str] = []
    while params is not None and (rule := analyze(text, params, lang)[0]):
        fired.append(rule)
        params = without_rule(params, rule)
    return fired


def run_config(items: list[dict], stages: list[dict], every_rule: bool = False) -> list[list[str]]:
    """Per item, every `<operator>:<rule>` that fired, in stage order (a reject ends the row's chain).
    With `every_rule`, a text_rules stage reports every rule whose condition holds, not just the first."""
    import numpy as np
    import pyarrow as pa

    from operators.base import REJECT, build_operator
    from pipeline.schema import rows_to_table

    for mod in ("image_checks", "fasttext_ops", "text_rules", "ngram_repetition"):  # registers them (no Ray)
        __import__(f"operators.{mod}")
    ops = [build_operator(dict(s)) for s in stages]
    for op in ops:
        op.setup()
    rows = [{"id": it["id"], "source": it["source"], "category": "", "meta": "{}", "images": [],
             "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": it["text"]}]}
            for it in items]
    hits: list[list[str]] = [[] for _ in items]
    for start in range(0, len(rows), 500):
        table = rows_to_table(rows[start : start + 500])
        index = np.arange(start, start + table.num_rows)
        for op in ops:
            if not table.num_rows:
                break
            v = op(table)
            for j in np.flatnonzero(v.decision):
                if every_rule and op.name == "text_rules":
                    lang = table.column("lang")[int(j)].as_py() if "lang" in table.column_names else None
                    rules = firing_rules(items[index[j]]["text"], lang, op.params)
                    hits[index[j]].extend(f"{op.name}:{r}" for r in rules)
                else:
                    hits[index[j]].append(f"{op.name}:{v.rule[j]}")
            for col, values in v.columns.items():  # later stages read earlier columns (lang)
                arr = pa.array(list(values))
                table = table.set_column(table.column_names.index(col), col, arr) if col in table.column_names \
                    else table.append_column(col, arr)
            alive = v.decision != REJECT
            table, index = table.filter(pa.array(alive)), index[alive]
    return hits


def run_datatrove(items: list[dict]) -> dict[str, list[list[str]]] | None:
    """DataTrove 0.10's quality filters, each over every item: name -> per item the reasons it dropped."""
    try:
        from datatrove.data import Document
        from datatrove.pipeline.filters import (
            C4QualityFilter,
            FineWebQualityFilter,
            GopherQualityFilter,
            GopherRepetitionFilter,
        )
    except ImportError:
        return None
    sets = {"gopher": [GopherRepetitionFilter(), GopherQualityFilter()], "c4": [C4QualityFilter()],
            "fineweb": [FineWebQualityFilter()]}
    out = {}
    for name, filters in sets.items():
        res = []
        for it in items:
            reasons = []
            for flt in filters:
                r = flt.filter(Document(text=it["text"], id=it["id"]))
                if r is not True:
                    reasons.append(f"datatrove_{name}:{r[1] if isinstance(r, tuple) else 'dropped'}")
                    break
            res.append(reasons)
        out[name] = res
    return out


def report(title: str, items: list[dict], hits: list[list[str]]) -> dict:
    real = [i for i, it in enumerate(items) if it["label"] == "real"]
    planted = [i for i, it in enumerate(items) if it["label"] != "real"]
    flagged_real = sum(bool(hits[i]) for i in real)
    caught = sum(bool(hits[i]) for i in planted)
    print(f"\n== {title}")
    print(f"real items flagged: {flagged_real} of {len(real)} ({flagged_real / len(real):.1%}); "
          f"planted defects caught: {caught} of {len(planted)} ({caught / max(1, len(planted)):.1%})")
    per_rule = collections.defaultdict(lambda: [0, 0])
    for i, hs in enumerate(hits):
        for h in set(hs):
            per_rule[h][items[i]["label"] != "real"] += 1
    print(f"{'rule':42s} {'hits':>5s} {'real':>5s} {'precision':>9s}")
    worst = 1.0
    for rule, (on_real, on_planted) in sorted(per_rule.items(), key=lambda kv: -sum(kv[1])):
        prec = on_planted / (on_real + on_planted)
        worst = min(worst, prec)
        print(f"{rule:42s} {on_real + on_planted:5d} {on_real:5d} {prec:9.1%}")
    kinds = collections.defaultdict(list)
    for i in planted:
        kinds[items[i]["label"]].append(i)
    print(f"{'defect kind':18s} {'n':>3s} {'recall':>7s}  rules that caught it")
    for kind, idx in kinds.items():
        got = collections.Counter(h.split(";")[0] for i in idx for h in hits[i][:1])
        print(f"{kind:18s} {len(idx):3d} {sum(bool(hits[i]) for i in idx) / len(idx):7.1%}  "
              f"{dict(got.most_common(3))}")
    by_cat = collections.defaultdict(lambda: [0, 0])
    for i in real:
        key = (items[i]["category"], items[i]["lang"] if items[i]["lang"] in ("en", "zh", "it", "de", "fr", "es")
               else "other")
        by_cat[key][0] += 1
        by_cat[key][1] += bool(hits[i])
    print("real items flagged by category/language:",
          ", ".join(f"{c}/{lang} {f}/{n}" for (c, lang), (n, f) in sorted(by_cat.items())))
    return {"real_flagged": flagged_real / len(real), "caught": caught / max(1, len(planted)),
            "worst_precision": worst}


def first_rules(hs: list[str]) -> list[str]:
    """`every_rule` hits cut back to what the runner records: each operator's first rule."""
    seen, out = set(), []
    for h in hs:
        if h.split(":")[0] not in seen:
            seen.add(h.split(":")[0])
            out.append(h)
    return out


def draws(paths: list[str], stages: list[dict]) -> None:
    """The default config on several draws (build_rules_eval.py --seed N): per draw the review rate,
    recall and the rules under 98% precision, then every rule pooled. A rule's precision counts every
    item its own condition holds on (hits on planted / all hits); the runner records only each
    operator's first rule, so the pooled table also gives that attribution (later rules then see only
    what earlier rules left)."""
    pooled = {"every": collections.defaultdict(lambda: [0, 0]), "first": collections.defaultdict(lambda: [0, 0])}
    for path in paths:
        header, items = load_eval(path)
        hits = run_config(items, stages, every_rule=True)
        per_rule = collections.defaultdict(lambda: [0, 0])
        for it, hs in zip(items, hits):
            for h in set(hs):
                per_rule[h][it["label"] != "real"] += 1
                pooled["every"][h][it["label"] != "real"] += 1
            for h in set(first_rules(hs)):
                pooled["first"][h][it["label"] != "real"] += 1
        real = [bool(h) for it, h in zip(items, hits) if it["label"] == "real"]
        planted = [bool(h) for it, h in zip(items, hits) if it["label"] != "real"]
        low = ", ".join(f"{r.split(':')[-1]} {p}/{p + q} ({p / (p + q):.1%})" for r, (q, p) in sorted(per_rule.items())
                        if p / (p + q) < 0.98)
        print(f"seed {header.get('seed')}: real flagged {sum(real)} of {len(real)} ({sum(real) / len(real):.2%}), "
              f"planted caught {sum(planted)} of {len(planted)} ({sum(planted) / len(planted):.1%}); "
              f"rules < 98% precise (planted hits / hits): {low or 'none'}")
    print(f"pooled over {len(paths)} draws: rule, hits on real / on planted / precision: every item the rule's "
          "condition holds on | first rule only (the runner's reason)")
    every, first = pooled["every"], pooled["first"]
    for rule, (on_real, on_planted) in sorted(every.items(), key=lambda kv: (-kv[1][0], -kv[1][1])):
        f_real, f_planted = first.get(rule, (0, 0))
        f_prec = f"{f_planted / (f_real + f_planted):8.2%}" if f_real + f_planted else "       -"
        print(f"  {rule:40s} {on_real:4d} {on_planted:5d} {on_planted / (on_real + on_planted):8.2%} | "
              f"{f_real:4d} {f_planted:5d} {f_prec}")
    worst = min(p / (q + p) for q, p in every.values())
    print(f"every rule >= 98% precise (pooled, own condition): {'MET' if worst >= 0.98 else 'NOT MET'} "
          f"(worst {worst:.2%})")


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", nargs="+", default=["/tmp/rules-eval/eval.jsonl"],
                    help="eval sets; with several, the default config per set and pooled per rule")
    ap.add_argument("--config", default=os.path.join(ROOT, "jobs/configs/curate.yaml"))
    ap.add_argument("--examples", type=int, default=0, help="print this many flagged real items per rule")
    args = ap.parse_args()
    with open(args.config) as f:
        stages = yaml.safe_load(f)["stages"]
    if len(args.eval) > 1:
        return draws(args.eval, stages)
    args.eval = args.eval[0]
    header, items = load_eval(args.eval)
    real = sum(it["label"] == "real" for it in items)
    langs = collections.Counter(it["lang"] for it in items if it["label"] == "real")
    print(f"eval set: {args.eval}: {real} real items in {len(langs)} languages {dict(langs.most_common())}, "
          f"{len(items) - real} planted defects")
    hits = run_config(items, stages, every_rule=True)
    summary = report(f"ivl default config ({os.path.relpath(args.config, ROOT)}), no dedup", items, hits)
    ok = summary["real_flagged"] <= 0.05 and summary["caught"] >= 0.90 and summary["worst_precision"] >= 0.98
    print(f"targets (<= 5% real flagged, >= 90% caught, every rule >= 98% precise): {'MET' if ok else 'NOT MET'}")
    if args.examples:
        shown = collections.Counter()
        for it, hs in zip(items, hits):
            if it["label"] == "real" and hs and shown[hs[0]] < args.examples:
                shown[hs[0]] += 1
                print(f"--- {hs} {it['source']} {it['lang']}: {it['text'][:300]!r}")
    for rule_set in ("c4", "fineweb"):
        opt = [dict(s, rule_sets=["gopher", rule_set]) if s["op"] == "text_rules" else s for s in stages]
        report(f"ivl default config with rule_sets [gopher, {rule_set}]", items, run_config(items, opt, every_rule=True))
    dt = run_datatrove(items)
    if dt is None:
        print("\ndatatrove not importable: its filters are skipped (run with /tmp/benchenv/bin/python)")
        return
    for name, res in dt.items():
        report(f"DataTrove {name} filters (their defaults, every item)", items, res)
        long_idx = [i for i, it in enumerate(items) if len(it["text"].split()) >= 50]
        report(f"DataTrove {name} filters, items with >= 50 whitespace words only",
               [items[i] for i in long_idx], [res[i] for i in long_idx])


if __name__ == "__main__":
    main()
