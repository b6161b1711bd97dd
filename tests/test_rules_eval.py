"""The labelled evaluation's own machinery (bench/build_rules_eval.py, bench/rules_quality.py): what it
counts as a page's text, and which rules it says fire on an item."""

from __future__ import annotations

from build_rules_eval import HTMLText
from rules_quality import firing_rules, without_rule

from operators.text_rules import TextRuleParams, analyze

PROSE = ("The committee met on Tuesday to review the budget, and after a long debate it agreed to fund the new "
         "library, the repairs to the bridge and a study of the harbour that the town has wanted for years.")


def test_navigation_is_not_page_text():
    """Sphinx's sidebar, menu and prev/next bars repeat link titles: they are not the page's paragraphs."""
    page = ('<html><body><nav class="menu"><p>statistics — Mathematical statistics</p></nav>'
            '<div class="related"><div><p>Previous topic</p></div></div>'
            '<div class="body"><p>The modules in this chapter support functional programming.</p>'
            '<pre>import itertools</pre></div>'
            '<div class="sphinxsidebar"><div class="sphinxsidebarwrapper"><p class="topless">statistics — '
            'Mathematical statistics</p></div></div><p>Last paragraph.</p></body></html>')
    parser = HTMLText()
    parser.feed(page)
    assert parser.out == [("p", "The modules in this chapter support functional programming."),
                          ("pre", "import itertools"), ("p", "Last paragraph.")]


def test_every_rule_whose_condition_holds_is_reported():
    """A paragraph pasted four more times breaks the paragraph rules and the duplicated n-gram rules: the
    evaluation credits each of them, the first being the one the operator reports."""
    p = TextRuleParams(ngram_min_words=0)
    text = "\n\n".join([PROSE] * 5)
    fired = firing_rules(text, "en", p)
    assert fired[0] == analyze(text, p, "en")[0]
    assert {"dup_para_frac", "dup_para_char_frac", "dup_5_gram", "dup_10_gram"} <= set(fired)
    assert firing_rules(PROSE, "en", p) == []


def test_switching_a_rule_off_leaves_the_others():
    p = TextRuleParams()
    q = without_rule(p, "dup_7_gram")
    assert 7 not in q.dup_ngram_char_frac and q.dup_ngram_char_frac[5] == p.dup_ngram_char_frac[5]
    assert without_rule(p, "top_3_gram").top_ngram_char_frac == {2: 0.20, 4: 0.16}
    assert without_rule(p, "few_stop_words").min_stop_words is None and q.min_stop_words == p.min_stop_words
    assert without_rule(p, "many_ellipses").max_symbol_word_ratio is None  # a rule named unlike its setting
    assert without_rule(p, "c4_few_sentences") is None  # no null switches it off: the walk stops there


def test_rules_after_a_ratio_rule_are_reported_too():
    """An ellipsis-riddled paragraph pasted five times: the walk goes past the '...' rule (whose setting is
    named otherwise) to the duplicated n-gram rules after it."""
    p = TextRuleParams(ngram_min_words=0)
    fired = firing_rules("\n\n".join([PROSE.replace(", ", "... ").replace(" the ", " the... ")] * 5), "en", p)
    after = fired[fired.index("many_ellipses") + 1:]
    assert "dup_5_gram" in after
