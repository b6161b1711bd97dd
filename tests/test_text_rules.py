"""Text rules: each rule hits and misses on hand-written English and Chinese cases, real text from
installed Debian packages (or the excerpts in tests/data/text_excerpts.json), the n-gram repetition
screen, and hypothesis properties."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.base import KEEP, REJECT, REVIEW, build_operator
from operators.ngram_repetition import repetition_ratio, repetition_ratio_reference, repetition_ratios
from operators.text_rules import (
    GOPHER_DEFAULTS,
    TextRuleParams,
    analyze,
    ellipsis_count,
    gopher_decide,
    is_mostly_cjk,
    max_sentence_words,
    reference_reason,
    words_of,
)
from operators.words import CODE_LINE_RE, is_code_line
from pipeline.curate_config import bundled_config
from pipeline.schema import rows_to_table

DATA = Path(__file__).parent / "data" / "text_excerpts.json"

# ~80 words of ordinary English prose (written for this test).
PROSE = (
    "The library opened early on Saturday, and the reading room filled with students who had come to "
    "prepare for their examinations. Some of them worked in small groups at the long tables near the "
    "windows, while others preferred the quiet corners of the upper floor. The librarian walked between "
    "the shelves with a cart of returned books, stopping now and then to answer a question about where "
    "to find an old journal or how to use the catalogue."
)
# ~150 characters of ordinary Chinese prose (written for this test).
ZH_PROSE = (
    "星期六早上图书馆很早就开门了，阅览室里坐满了来复习考试的学生。有的人在靠窗的长桌旁小组讨论，"
    "有的人喜欢楼上安静的角落。图书管理员推着一车归还的书在书架之间走动，时不时停下来回答同学的问题，"
    "告诉他们旧期刊放在哪里，以及怎样使用图书目录。我们都觉得这是一个学习的好地方。"
)


def sample(text: str, turn: str = "gpt") -> dict:
    conv = [{"from": "human", "value": "Please answer."}, {"from": "gpt", "value": "Fine."}]
    conv[1 if turn == "gpt" else 0]["value"] = text
    return {"id": f"t/{abs(hash(text))}", "source": "t", "category": "", "conversations": conv,
            "images": [], "meta": "{}"}


def run_rules(texts: list[str], **params):
    op = build_operator({"op": "text_rules", **params})
    return op(rows_to_table([sample(t) for t in texts]))


def real_texts() -> dict[str, list[str]]:
    """Fortunes, Tang poems and man page text from the installed packages, else the shipped excerpts."""
    out: dict[str, list[str]] = {}
    fort = "/usr/share/games/fortunes/fortunes"
    if os.path.exists(fort):
        items = open(fort, encoding="utf-8", errors="replace").read().split("\n%\n")
        out["fortunes"] = [x.strip() for x in items if len(x.split()) > 12][:40]
    tang = "/usr/share/games/fortunes/tang300"
    if os.path.exists(tang):
        out["tang"] = [x.strip() for x in open(tang, encoding="utf-8").read().split("\n%\n") if x.strip()][:40]
    man = "/usr/share/man/man1/gzip.1.gz"
    if os.path.exists(man):
        try:
            text = subprocess.run(["man", "-P", "cat", man], capture_output=True, text=True, timeout=30,
                                  env={**os.environ, "MANWIDTH": "80"}).stdout
            paras = [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) > 60]
            if paras:
                out["man"] = paras[:10]
        except (OSError, subprocess.SubprocessError):
            pass
    shipped = json.loads(DATA.read_text(encoding="utf-8"))
    for k in ("fortunes", "tang", "man"):
        out.setdefault(k, shipped[k])
    return out


# ---------------------------------------------------------------- the paper's three rules
def test_clean_english_and_chinese_prose_pass_every_rule():
    v = run_rules([PROSE, ZH_PROSE, "Yes, it is a cat."])  # short answers skip the document rules
    assert list(v.decision) == [KEEP, KEEP, KEEP], v.rule
    assert v.columns["score_word_count"][0] > 60


def test_long_zero_run_hits_and_misses():
    v = run_rules([PROSE + " Balance: 1" + "0" * 25 + ".", PROSE + " It cost 1000000 dollars."])
    assert v.rule == ["long_zero_run", ""]
    assert v.decision[0] == REVIEW  # paper: heuristic hits go to manual review


def test_long_run_of_one_character_hits_and_misses():
    texts = [PROSE + " " + "!" * 120, PROSE + "\n" + "=" * 60, "哈" * 100 + "。" + ZH_PROSE]
    v = run_rules(texts, doc_min_words=10_000)  # the paper's rules only
    assert v.rule == ["long_char_run", "", "long_char_run"]


def test_abnormal_sentence_length_english_and_chinese():
    run_on = " ".join(PROSE.replace(".", "").split() * 5)  # ~400 words with no sentence end
    long_zh = ZH_PROSE.replace("。", "，") * 4  # ~600 Chinese characters without a full stop
    v = run_rules([run_on, long_zh, PROSE, ZH_PROSE], doc_min_words=10_000)
    assert v.rule == ["long_sentence", "long_sentence", "", ""]
    assert max_sentence_words(PROSE) < 60


def test_duplicate_lines_hit_and_miss_in_both_languages():
    en = "\n".join(["Click here to subscribe.", "Click here to subscribe.", "Click here to subscribe.", PROSE])
    zh = "\n".join(["点击这里订阅。"] * 4 + [ZH_PROSE])
    distinct = "\n".join(s.strip() + "." for s in PROSE.split(".") if s.strip())
    v = run_rules([en, zh, distinct], doc_min_words=10_000)
    assert v.rule[0] in ("dup_line_frac", "dup_para_frac")
    assert v.rule[1] in ("dup_line_frac", "dup_para_frac")
    assert v.rule[2] == ""
    assert v.columns["score_dup_line_frac"][1] == pytest.approx(3 / 5)


def test_reject_action_switch():
    v = run_rules([PROSE + " 1" + "0" * 30], action="reject")
    assert v.decision[0] == REJECT and v.rule[0] == "long_zero_run"


def test_turn_selection():
    table = rows_to_table([sample("0" * 40, turn="human")])
    assert build_operator({"op": "text_rules", "turns": "gpt"})(table).decision[0] == KEEP
    assert build_operator({"op": "text_rules", "turns": "human"})(table).rule[0] == "long_zero_run"


def test_unknown_threshold_fails_at_build():
    with pytest.raises(ValueError):
        build_operator({"op": "text_rules", "max_zero_runn": 3})


# ---------------------------------------------------------------- Gopher quality and repetition
def test_gopher_quality_rules_hit_and_miss():
    assert gopher_decide(PROSE) == (True, "")
    assert gopher_decide("Too short to be a document.") == (False, "few_words")
    assert gopher_decide("#tag " * 60 + PROSE)[1] == "many_hashes"
    bullets = "\n".join(f"- item number {i} of the list" for i in range(30))
    assert gopher_decide(bullets)[1] == "bullet_lines"
    numbers = " ".join(str(i * 7919 % 1000) + " ," for i in range(200)) + " " + PROSE
    assert gopher_decide(numbers)[1] in ("few_alpha_words", "short_mean_word")
    no_stop = " ".join(w for w in PROSE.split() if w.lower() not in {"the", "to", "of", "and", "with"})
    assert gopher_decide(no_stop, lang="en")[1] == "few_stop_words"  # the paper's eight English words
    assert gopher_decide(" ".join(["incomprehensibilities"] * 80 + PROSE.split()))[1] == "long_mean_word"
    lines = [" ".join(PROSE.split()[10 * i : 10 * i + 10]) for i in range(7)]
    trailing = "\n".join(line + ("..." if i % 2 else "") for i, line in enumerate(lines))  # 3 of 7 lines
    assert gopher_decide(trailing)[1] == "ellipsis_lines"
    assert gopher_decide("\n".join(lines[:3]) + "...\n" + "\n".join(lines[3:]))[0] is True  # 1 of 7


def test_gopher_repetition_rules_hit_and_miss():
    loop = " ".join(["the cat sat on the mat"] * 30)
    assert gopher_decide(loop)[0] is False
    repeated_tail = PROSE + " " + " ".join(PROSE.split()[:40])  # 40 words copied again
    keep, reason = gopher_decide(repeated_tail)
    assert not keep and reason.startswith(("dup_", "top_"))
    assert gopher_decide(PROSE)[0]


def test_cjk_text_is_measured_in_characters():
    assert is_mostly_cjk(ZH_PROSE) and not is_mostly_cjk(PROSE)
    assert words_of("图书馆", cjk=True) == ["图", "书", "馆"]
    # a Chinese document passes (mean word length is not applied; Chinese stop words are present)
    assert gopher_decide(ZH_PROSE) == (True, "")
    # Chinese without any function word lacks stop words
    assert gopher_decide("山水花鸟" * 30)[1] in ("few_stop_words", "top_2_gram", "dup_5_gram")


def test_words_are_whitespace_tokens_and_prose_passes_the_alpha_rule():
    """Issue 15: punctuation is part of a word, so ordinary prose has ~100% words with a letter."""
    text = ("Grover Cleveland, though constantly at loggerheads with the Senate, got on better with the "
            "House of Representatives. ") * 1 + PROSE
    assert words_of("Hello, world. f(x): x=True", cjk=False) == ["Hello,", "world.", "f(x):", "x=True"]
    assert words_of("图书馆 is 好", cjk=True) == ["图", "书", "馆", "is", "好"]
    assert analyze(text, TextRuleParams())[1]["alpha_word_frac"] == 1.0
    assert gopher_decide(text) == (True, "")


def test_stop_words_follow_the_language_column():
    it = ("Il gatto dorme sul divano della nonna mentre fuori piove e il vento soffia forte tra gli alberi "
          "del giardino, e la nonna legge un libro vicino alla finestra con una tazza di tè caldo. ") * 1
    it = it + "Poi si alza, prepara la cena per tutta la famiglia e aspetta che i nipoti tornino da scuola."
    assert len(it.split()) >= 50
    p = TextRuleParams()
    assert analyze(it, p, "it")[0] == ""  # Italian function words count for Italian text
    assert analyze(it, p, "en")[0] == "few_stop_words"  # English's eight are absent
    assert analyze(it, p, None)[0] == ""  # no lang column: every list counts
    assert analyze(it, p, "ru")[0] == ""  # a language without a list skips the rule
    ops = build_operator({"op": "text_rules"})
    table = rows_to_table([sample(it), sample(it)]).append_column("lang", pa.array(["it", "en"]))
    assert ops(table).rule == ["", "few_stop_words"]


def test_symbol_soup_is_caught_by_a_rule():
    soup = PROSE[:100] + " " + " ".join(["@#$%", "^&*(", "){}[", "]<>|", "\\/~`"] * 40)
    assert analyze(soup, TextRuleParams())[0] == "symbol_soup"
    assert analyze(PROSE, TextRuleParams())[0] == ""
    table = "│ a │ b │\n├───┼───┤\n│ 1 │ 2 │\n" + PROSE  # box drawing is layout, not symbols
    assert analyze(table, TextRuleParams())[0] == ""


@pytest.mark.parametrize("kind", ["fortunes", "tang", "man"])
def test_real_text_mostly_passes_the_paper_rules(kind):
    texts = real_texts()[kind]
    v = run_rules(texts, doc_min_words=10_000)  # the paper's rules only
    assert (v.decision == KEEP).mean() >= 0.9, Counter(v.rule)


def test_real_man_text_and_fortunes_are_not_chinese_and_poems_are():
    real = real_texts()
    assert all(is_mostly_cjk(t) for t in real["tang"])
    assert not any(is_mostly_cjk(t) for t in real["fortunes"] + real["man"])


# ---------------------------------------------------------------- n-gram repetition (InternVL screen)
def test_ngram_repetition_screen():
    loop = " ".join(["I think the answer is yes because"] * 20)
    assert repetition_ratio(loop) > 0.9
    assert repetition_ratio(PROSE) == 0.0
    assert repetition_ratio("我们都觉得这是一个学习的好地方。" * 6) > 0.4  # characters count in Chinese
    op = build_operator({"op": "ngram_repetition"})
    v = op(rows_to_table([sample(loop), sample(PROSE)]))
    assert list(v.decision) == [REVIEW, KEEP] and v.rule[0] == "repeated_ngrams"
    assert v.columns["score_ngram_repetition"][1] == 0.0


# ---------------------------------------------------------------- properties
words = st.sampled_from(PROSE.replace(".", " .").replace(",", " ,").split() + ["图", "书", "0", "-", "..."])
texts = st.lists(words, min_size=0, max_size=120).map(" ".join) | st.text(max_size=300)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts)
def test_rules_are_deterministic(text):
    p = TextRuleParams()
    assert analyze(text, p) == analyze(text, p)
    assert gopher_decide(text) == gopher_decide(text)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["alpha line", "beta line", "gamma", "delta delta"]), min_size=4, max_size=30),
       st.integers(0, 3))
def test_adding_a_copy_of_a_line_never_lowers_the_duplicate_line_fraction(lines, k):
    """Appending a line that is already present can only raise the duplicate-line fraction, so it
    never turns a duplicate-line hit into a keep."""
    p = TextRuleParams(doc_min_words=10_000)
    before = analyze("\n".join(lines), p)
    after = analyze("\n".join(lines + [lines[k % len(lines)]]), p)
    assert after[1]["dup_line_frac"] >= before[1]["dup_line_frac"]
    if before[0] == "dup_line_frac":
        assert after[0] in ("dup_line_frac", "dup_para_frac", "dup_para_char_frac")


def test_shipped_excerpts_pass_like_the_installed_text():
    """The fallback excerpts (used when the Debian packages are absent) behave like the real files."""
    data = json.loads(DATA.read_text(encoding="utf-8"))
    assert set(data) >= {"fortunes", "tang", "man", "sources"}
    v = run_rules(data["fortunes"] + data["man"], doc_min_words=10_000)
    assert (v.decision == KEEP).mean() >= 0.9
    assert all(is_mostly_cjk(t) for t in data["tang"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "bb", "ccc", "the", "cat", "sat", ",", ".", "图", "书", "#", "...", "\n",
                                 "\n\n", "- x", "0" * 25, "=" * 90, "!" * 79, "!", "il", "di", "#tag", "# c", "7",
                                 "[F...]", "+---+", "|", "• " + "w" * 90]),
                min_size=0, max_size=160),
       st.sampled_from([None, "", "en", "it", "zh", "ru"]),
       st.sampled_from(["default", "gopher", "all_sets", "config"]))
def test_fast_rules_decide_exactly_like_the_plain_definitions(words, lang, which):
    """The optimised path (numpy n-gram hashes, bounds, C-level counts) equals reference_reason."""
    p = {"default": TextRuleParams(), "gopher": GOPHER_DEFAULTS,
         "all_sets": TextRuleParams(doc_min_words=5, rule_sets=["gopher", "c4", "fineweb"]),
         "config": TextRuleParams(**{**_default_text_rule_params(), "alpha_min_words": 60, "ngram_min_words": 60,
                                     "stop_words_min_words": 30, "doc_min_words": 20})}[which]
    text = " ".join(words)
    assert analyze(text, p, lang)[0] == reference_reason(text, lang, p)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["...", "…", "....", "\n", "\n\t", "\n  ", " ", "a", "x.", "'", '"', "]", ")", ">",
                                 "}", "[", "\u2028", "\r"]), max_size=60).map("".join),
       st.sampled_from([0.1, 0.5, 1.0, 2.0, 4.0]))
def test_ellipsis_rule_counts_like_its_definition(text, ratio):
    """The '...' count without regex scans (prompts, metasyntax) decides as the regex definition, at any threshold."""
    p = TextRuleParams(doc_min_words=1, min_words=1, max_symbol_word_ratio=ratio, max_mean_word_len=None,
                       min_mean_word_len=None, max_char_run=None, max_symbol_char_frac=None, code_line_frac=None,
                       dup_line_frac=None, dup_line_char_frac=None, dup_para_frac=None, dup_para_char_frac=None)
    assert analyze(text, p)[0] == reference_reason(text, None, p)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=400), st.sampled_from([None, "en", "zh"]))
def test_fast_rules_match_the_definitions_on_any_unicode(text, lang):
    p = TextRuleParams(doc_min_words=3, min_words=3)
    assert analyze(text, p, lang)[0] == reference_reason(text, lang, p)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "the", "cat", "图", "书", "Über", "x_1", "!", "\n"]), max_size=120),
       st.integers(2, 10))
def test_hashed_repetition_ratio_equals_the_definition(words, n):
    text = " ".join(words)
    assert repetition_ratio(text, n) == repetition_ratio_reference(text, n)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "the", "图", "Über", "!", "\n"]), max_size=40), max_size=6),
       st.integers(2, 10))
def test_batched_repetition_ratios_equal_the_definition_text_by_text(texts, n):
    """One batch: no n-gram runs from one text into the next, and empty or short texts score 0."""
    texts = [" ".join(words) for words in texts]
    assert repetition_ratios(texts, n).tolist() == [repetition_ratio_reference(t, n) for t in texts]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet="ab_ 1\n!éİ図書・\u3099\U00020000\U00030001", max_size=160), max_size=5),
       st.integers(2, 5))
def test_numpy_words_are_the_definitions_on_any_unicode(texts, n):
    """The n-gram screen's words come from code-point tables (ngram_repetition.word_hasher): as many as
    WORDLIKE_RE finds in the lower-cased text (underscores, a kana mark that is no word char, 'İ' that
    lower-cases to two code points, planes 2 and 3), and the same ratios."""
    from operators.ngram_repetition import word_hasher
    from operators.words import WORDLIKE_RE

    words = word_hasher()
    assert words.token_hashes(texts)[1].tolist() == [len(WORDLIKE_RE.findall(t.lower())) for t in texts]
    assert repetition_ratios(texts, n, words).tolist() == [repetition_ratio_reference(t, n) for t in texts]


def test_c4_and_fineweb_rule_sets_are_options():
    p = TextRuleParams(rule_sets=["gopher", "c4"], min_stop_words=None)
    sentences = PROSE + " It was a calm day. Nobody was in a hurry. The clock on the wall ticked slowly."
    assert analyze(sentences, p)[0] == ""
    assert analyze(sentences + "\nfunction f() { return 1; }", p)[0] == ""  # no terminal punctuation: not kept
    assert analyze(sentences + "\nSee the code { here }.", p)[0] == "c4_curly_bracket"
    assert analyze("Lorem ipsum dolor sit amet. " + sentences, p)[0] == "c4_lorem_ipsum"
    assert analyze(PROSE.replace(".", ""), p)[0] == "c4_few_sentences"
    fw = TextRuleParams(rule_sets=["fineweb"])
    lines = "\n".join(f"item {i} in the menu of the page" for i in range(60))
    assert analyze(lines, fw)[0] == "fineweb_line_punct"
    assert analyze(PROSE, fw)[0] == ""


def test_default_config_identifies_the_language_before_the_text_rules():
    import yaml

    stages = [s["op"] for s in yaml.safe_load(Path(bundled_config()).read_text())["stages"]]
    assert stages.index("language_id") < stages.index("text_rules")


def _default_text_rule_params() -> dict:
    import yaml

    stages = yaml.safe_load(Path(bundled_config()).read_text())["stages"]
    spec = dict(next(s for s in stages if s["op"] == "text_rules"))
    spec.pop("op")
    return spec


@pytest.mark.parametrize("kind", ["fortunes", "tang", "man"])
def test_real_text_passes_the_default_config_document_rules_too(kind):
    """Issue 15: with the Gopher rules by the paper's definitions, real prose and man pages pass."""
    v = run_rules(real_texts()[kind], **_default_text_rule_params())
    assert (v.decision == KEEP).mean() >= 0.95, Counter(v.rule)


# ---------------------------------------------------------------- issue 15 target 3: precision on real text
REAL = Path(__file__).parent / "data" / "real_paragraphs.json"


def test_default_config_sends_no_shipped_real_paragraph_to_review():
    """Real paragraphs of installed packages (a third of them flagged by the defaults before the per-rule
    word floors and measured thresholds) pass the default config's text stages, language id first."""
    import numpy as np
    import yaml

    import operators.fasttext_ops  # noqa: F401  (registers language_id)

    data = json.loads(REAL.read_text(encoding="utf-8"))
    assert {it["source"] for it in data["items"]} <= set(data["licences"])
    stages = yaml.safe_load(Path(bundled_config()).read_text())["stages"]
    table = rows_to_table([sample(it["text"]) for it in data["items"]])
    flagged = []
    for spec in (s for s in stages if s["op"] in ("language_id", "text_rules", "ngram_repetition")):
        op = build_operator(dict(spec))
        op.setup()
        v = op(table)
        flagged += [(spec["op"], v.rule[i], data["items"][i]["text"][:60]) for i in np.flatnonzero(v.decision)]
        for col, values in v.columns.items():  # the text rules read language_id's `lang`
            if col not in table.column_names:
                table = table.append_column(col, pa.array(list(values)))
    assert flagged == []
    assert sum("old_default_hit" in it for it in data["items"]) >= 20


def test_ngram_rules_skip_texts_under_their_word_floor():
    text = PROSE + " The librarian walked between the shelves again."  # one repeated 5-gram in ~85 words
    p = TextRuleParams(dup_ngram_char_frac={5: 0.05})
    assert analyze(text, p)[0] == reference_reason(text, None, p) == "dup_5_gram"
    q = TextRuleParams(dup_ngram_char_frac={5: 0.05}, ngram_min_words=100)
    assert analyze(text, q)[0] == reference_reason(text, None, q) == ""
    loop = PROSE + " and the cat sat" * 30  # a loop longer than the floor still fires
    assert analyze(loop, q)[0] == reference_reason(loop, None, q) != ""


def test_hashtags_only_counts_hashtags_not_comments():
    code_like = PROSE + "\n" + "\n".join(f"value_{i} = {i}  # checked" for i in range(25))  # inline comments
    assert analyze(code_like, GOPHER_DEFAULTS)[0] == "many_hashes"
    p = TextRuleParams(hashtags_only=True, min_alpha_word_frac=None, top_ngram_char_frac={}, dup_ngram_char_frac={})
    assert analyze(code_like, p)[0] == reference_reason(code_like, None, p) == ""
    spam = " ".join(w if i % 3 else f"#{w}" for i, w in enumerate(PROSE.split()))
    assert analyze(spam, p)[0] == reference_reason(spam, None, p) == "many_hashes"


def test_alpha_and_stop_word_rules_skip_short_number_lists():
    notice = "\n\n".join(f"Copyright © {', '.join(map(str, range(start, 2023)))} {name}"  # ~68 words, 8 with letters
                           for start, name in ((1990, "Ann Lee"), (1994, "Bo Chen")))
    assert analyze(notice, TextRuleParams())[0] == "few_alpha_words"
    p = TextRuleParams(alpha_min_words=100, stop_words_min_words=50, ngram_min_words=100)
    assert analyze(notice, p)[0] == reference_reason(notice, None, p) == ""
    table = "Table of measured values\n" + " ".join(str(1000 + i * 37 % 9000) for i in range(200))
    assert analyze(table, p)[0] == reference_reason(table, None, p) == "few_alpha_words"
    stuffed = " ".join(w for w in PROSE.split() if w.lower() not in ("the", "and", "to", "of", "with")) * 2
    assert analyze(stuffed, p, "en")[0] == reference_reason(stuffed, "en", p) == "few_stop_words"


def test_ngram_repetition_has_a_code_threshold():
    tb = 'Traceback (most recent call last):\n  File "<stdin>", line 1, in <module>\nValueError: bad value'
    code = "\n".join(f">>> f({i})\n{tb}" for i in range(3))
    assert repetition_ratio(code) > 0.4
    op = build_operator({"op": "ngram_repetition", "code_max_ratio": 0.8})
    loop = "the cat sat on the mat and looked at the door " * 20
    v = op(rows_to_table([sample(code), sample(loop), sample(PROSE)]))
    assert list(v.decision) == [KEEP, REVIEW, KEEP]
    v = build_operator({"op": "ngram_repetition"})(rows_to_table([sample(code)]))
    assert list(v.decision) == [REVIEW]  # InternVL's 0.4 for every text when code_max_ratio is unset


# ---------------------------------------------------------------- issue 15: fixes found on held-out draws
def test_ascii_rules_are_layout_not_symbols_nor_repeated_lines():
    diagram = "".join(f"+-----------+\n| {name:9s} |\n+-----------+\n      |\n      v\n"  # (Python's socketserver docs)
                      for name in ("Base", "TCPServer", "UDPServer")) + "class Threading(ThreadingMixIn, UDPServer):\n    pass"
    p = TextRuleParams()
    assert analyze(diagram, p)[0] == reference_reason(diagram, None, p) == ""
    assert analyze(diagram.replace("-", "$"), p)[0] == "symbol_soup"  # the same shape in other symbols is soup
    boiler = "\n".join(f"Line {i} of the page.\nShare this page" for i in range(8))
    assert analyze(boiler, p)[0] == "dup_line_frac"  # a repeated line of text still repeats


def test_synopsis_metasyntax_is_no_ellipsis():
    synopsis = "\n".join(f"tool [OPTIONS...] command{i} [FILE...] {{ ... }} '...'" for i in range(30))
    assert ellipsis_count(synopsis) == 30  # only the '{ ... }' ones: a repeatable argument is no ellipsis
    teaser = " ".join(w + ("..." if i % 3 == 0 else "") for i, w in enumerate(PROSE.split()))
    assert analyze(teaser, TextRuleParams())[0] == "many_ellipses"


def test_bulleted_paragraphs_are_not_a_bullet_list():
    items = [f"• {sentence.strip()}." for sentence in PROSE.split(".") if sentence.strip()]  # 100-200 chars each
    p = TextRuleParams(bullet_line_width=80)
    assert analyze("\n\n".join(items), p)[0] == reference_reason("\n\n".join(items), None, p) == ""
    assert analyze("\n\n".join(items), TextRuleParams())[0] == "bullet_lines"  # the paper's one line per line
    short = "\n".join(f"- {' '.join(PROSE.split()[i:i + 5])}" for i in range(0, 80, 5))
    assert analyze(short, p)[0] == reference_reason(short, None, p) == "bullet_lines"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(" \t\x0b\x1c\u3000ab#/>.$ {}();:,[]\\=x")), min_size=1, max_size=12))
def test_code_line_test_equals_its_pattern(line):
    if line.strip() and "\n" not in line:
        assert is_code_line(line) == bool(CODE_LINE_RE.search(line))
