"""Heuristic text rules: InternVL 2.5's three (arXiv 2412.05271 §4.3, data filtering), symbol soup,
and document rule sets: Gopher's quality + repetition rules by the paper's own definitions (Rae et al.
2021, "Scaling Language Models", appendix A.1.1 and Table A1), with the C4 (Raffel et al. 2020 §2.2)
and FineWeb (Penedo et al. 2024; DataTrove's FineWebQualityFilter) rule sets as options.

Words are whitespace-separated tokens, as in the Gopher paper (DataTrove's spaCy tokenization counts
"," and "." as words, so ordinary prose fails its alpha-word rule: issue 15). Language-aware, keyed
on fastText's `lang` column when an earlier stage added it: Chinese and Japanese count one Han/kana
character as one word (no spaces there) and skip the mean-word-length rule; the stop-word rule uses
the language's own function words (the paper's eight for English); a language without a list skips
it; a row without `lang` uses every list (any language's function words count).

`reference_reason` states every rule plainly; `TextRules` computes the same decisions faster (word
counts from C-level str methods and regexes, n-grams as numpy integer hashes, bounds that skip exact
counts that cannot reach a threshold). A hypothesis test and bench/filters.py check they agree.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from operators.base import REJECT, REVIEW, Operator, Verdict, conversation_texts, register
from operators.words import (
    CJK_CHARS,
    CODE_LINE_FRAC,
    NGRAM_HASH_MIX,
    WORDLIKE_RE,
    is_code_lines,
    nonempty_lines,
)

GOPHER_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])  # Rae et al. A.1.1
# Frequent function words per fastText language code (ours; the paper gives only English's eight).
STOP_WORDS: Mapping[str, frozenset[str]] = MappingProxyType({
    "en": GOPHER_STOP_WORDS,
    "de": frozenset("der die das und ist zu den mit von nicht ein eine sich auf für im dem des".split()),
    "fr": frozenset("de la le et les des en un une du que est pour qui dans pas au sur ne".split()),
    "it": frozenset("di che il la un per non è del le si con una sono della lo gli nel".split()),
    "es": frozenset("de la que el en los del se las por un para con no una es al lo".split()),
    "pt": frozenset("de que do da em um para é com não uma os no se na por".split()),
    "nl": frozenset("de het een en van is dat op te zijn met niet voor".split()),
    "ca": frozenset("de la que el els les amb per una és del al".split()),
    "sv": frozenset("och att det som en på är av för med till den inte".split()),
    "da": frozenset("og at det som en på er af for med til den ikke".split()),
    "pl": frozenset("w na z że się nie do to jest jak po".split()),
    # Han characters: modern (simplified and traditional) and classical function words
    "zh": frozenset("的了是在和有我不这也就都他你们个上说要会着那为以中及或可与对时到将被"
                    "這們個說會著為與對時將從之而其於無也者"  # modern function words, traditional forms
                    "一人自无此来去下乎兮矣焉哉"),  # the commonest characters of classical verse
    "ja": frozenset("のにはをたがでてとしもないかるれ"),
})
CJK_LANGS = frozenset(["zh", "ja", "yue", "wuu"])  # written without spaces: one character = one word
_ALL_STOP = frozenset().union(*STOP_WORDS.values())
_CJK_STOP = STOP_WORDS["zh"] | STOP_WORDS["ja"]

_CJK_RE = re.compile(f"[{CJK_CHARS}]")
# a katakana run (loanwords: one word), a Han/hiragana character, or a spaced chunk between them
_CJK_WORD_RE = re.compile(rf"[\u30a0-\u30ff]+|[{CJK_CHARS}]|[^\s{CJK_CHARS}]+")
_LETTER_RE = re.compile(r"[^\W\d_]")  # "at least one alphabetic character" (A.1.1)
_NO_LETTER_WORD_RE = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")  # a whitespace word without a letter
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])|\n")
_BULLET_RE = re.compile(r"[ \t]*[•\-*‣◦⁃●▪–](?:\s|$)")  # a bullet line: a marker then a space ("-v" is an option)
_ELLIPSES = ("...", "…")
_HASHTAG_RE = re.compile(r"#(?=[^\W_])")  # a hashtag: '#' then a letter or digit ("# comment", "## Title" are not)
_C4_END = (".", "?", "!", '"', "'")  # C4: a kept line ends in terminal punctuation
_C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_C4_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_C4_SENTENCE = re.compile(r"[.!?]+(?:\s|$)")
_FINEWEB_END = (".", "'", '"', "!", "?")
# Box-drawing characters are table layout, not text: every rule sees them as spaces.
_LAYOUT = str.maketrans({c: " " for c in range(0x2500, 0x2580)})
# ASCII tables and rules draw the same lines with runs of one character ("+-----+", "=====")
_ASCII_RULE_RE = re.compile(r"([-=_~*+])\1{2,}")
_ASCII_RULES = ("---", "===", "___", "~~~", "***", "+++")
_REPL_PROMPT = re.compile(r"^[ \t]*\.\.\.(?=\s|$)", re.M)  # Python's "... " continuation prompt: no ellipsis
# metasyntax, not an ellipsis: a repeatable argument ("[FILE...]", "OPTIONS...)"), a placeholder ('...')
_METASYNTAX_DOTS = re.compile(r"\.\.\.(?=[\])}>])|(?<=['\"])\.\.\.(?=['\"])")
_DOTS_CLOSER = re.compile(r"\.\.\.[\])}>'\"]")  # what every _METASYNTAX_DOTS match holds


class TextRuleParams(BaseModel):
    """Every threshold of the text rules; None switches a rule off."""

    model_config = ConfigDict(extra="forbid")

    turns: Literal["gpt", "human", "all"] = Field("gpt", description="which turns of a sample are checked")
    action: Literal["review", "reject"] = Field(
        "review", description="what a hit does: review (paper §4.3: manual review first) or reject"
    )
    # the paper's three rules (InternVL 2.5 §4.3); thresholds are ours, the paper gives none
    max_sentence_words: int | None = Field(300, description="a sentence longer than this many words is abnormal")
    max_zero_run: int | None = Field(20, description="a run of more than this many '0' characters fires")
    max_char_run: int | None = Field(
        80, description="a run of more than this many of one non-space char fires (rule characters -=_~*#+ excepted)"
    )
    dup_line_frac: float | None = Field(0.3, description="max fraction of non-empty lines repeating an earlier one")
    dup_line_char_frac: float | None = Field(0.2, description="max fraction of chars in repeated lines")
    dup_para_frac: float | None = Field(0.3, description="max fraction of paragraphs that repeat")
    dup_para_char_frac: float | None = Field(0.2, description="max fraction of chars in repeated paragraphs")
    max_symbol_char_frac: float | None = Field(
        0.5, description="symbol soup: max share of non-space chars that are neither letters nor digits"
    )
    symbol_min_chars: int = Field(40, description="texts with fewer non-space chars skip the symbol-soup rule")
    # document rule sets, for texts with at least doc_min_words words
    rule_sets: list[Literal["gopher", "c4", "fineweb"]] = Field(
        ["gopher"], description="document rule sets: gopher (Rae et al. 2021), c4 (Raffel et al. 2020), fineweb"
    )
    doc_min_words: int = Field(
        50, description="texts with fewer words skip the document rule sets (short answers are normal)"
    )
    # Gopher quality (Rae et al. 2021 A.1.1)
    min_words: int | None = Field(50, description="fewer words than this fires")
    max_words: int | None = Field(100_000, description="more words than this fires")
    min_mean_word_len: float | None = Field(3, description="mean word length below this fires (not for CJK)")
    max_mean_word_len: float | None = Field(10, description="mean word length above this fires (not for CJK)")
    max_symbol_word_ratio: float | None = Field(0.1, description="max '#' per word, and max '...' per word")
    max_bullet_lines_frac: float | None = Field(0.9, description="max fraction of lines starting with a bullet")
    max_ellipsis_lines_frac: float | None = Field(0.3, description="max fraction of lines ending in an ellipsis")
    min_alpha_word_frac: float | None = Field(
        0.8, description="min fraction of words with a letter (Gopher: 0.8; the default config: 0.4, measured)"
    )
    min_stop_words: int | None = Field(2, description="min distinct stop words of the row's language")
    # Gopher repetition (Rae et al. 2021 Table A1)
    top_ngram_char_frac: dict[int, float] = Field(
        {2: 0.20, 3: 0.18, 4: 0.16}, description="n -> max char fraction covered by the most frequent n-gram (one that repeats)"
    )
    dup_ngram_char_frac: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> max char fraction covered by copies of an earlier n-gram (overlaps counted once)",
    )
    ngram_min_words: int = Field(
        0, description="texts with fewer words skip the top and duplicated n-gram rules (Gopher: 0)"
    )
    hashtags_only: bool = Field(
        False, description="the '#' rule counts only hashtags ('#' then a word char), not '# ' comments (Gopher: all)"
    )
    alpha_min_words: int = Field(
        0, description="texts with fewer words skip the alpha-word rule (Gopher: 0)"
    )
    stop_words_min_words: int = Field(
        0, description="texts with fewer words that hold a letter skip the stop-word rule (Gopher: 0)"
    )
    code_line_frac: float | None = Field(
        CODE_LINE_FRAC, description="text with this share of code-laid-out lines is code: skips the dup-line and document rules"
    )
    line_rules_min_lines: int = Field(3, description="texts with fewer lines skip the bullet and ellipsis line rules")
    bullet_line_width: int | None = Field(
        None, description="the bullet rule counts a line as the lines it wraps to at this width (None: one line)"
    )
    cjk_ngram_scale: int = Field(
        2, description="CJK text: this many characters count as one word (word counts, n-gram lengths)"
    )
    cjk_min_frac: float = Field(0.3, description="without a CJK `lang`, a text this Han/kana counts as CJK")
    # C4 (Raffel et al. 2020 §2.2, as DataTrove's C4QualityFilter; the bad-words list is not bundled)
    c4_min_sentences: int = Field(5, description="C4: fewer sentences in the kept lines fires")
    c4_min_line_words: int = Field(3, description="C4: lines with fewer words are not kept")
    c4_max_word_len: int = Field(1000, description="C4: lines with a longer word are not kept")
    # FineWeb (Penedo et al. 2024; DataTrove FineWebQualityFilter defaults)
    fineweb_line_punct_frac: float = Field(0.12, description="FineWeb: min fraction of lines ending in punctuation")
    fineweb_short_line_frac: float = Field(0.67, description="FineWeb: max fraction of short lines")
    fineweb_short_line_chars: int = Field(30, description="FineWeb: a line this short or shorter is short")
    fineweb_dup_line_char_frac: float = Field(0.01, description="FineWeb: max chars in repeated lines / chars")
    fineweb_newline_word_frac: float = Field(0.3, description="FineWeb: max newlines per word (lists)")


GOPHER_DEFAULTS = TextRuleParams(max_sentence_words=None, max_zero_run=None, max_char_run=None,
                                 max_symbol_char_frac=None, doc_min_words=0)  # the paper's rules only
PAPER_RULES = ("long_zero_run", "long_char_run", "long_sentence", "symbol_soup", "dup_para_frac",
               "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac")


# ---------------------------------------------------------------- language and words
_SAMPLE_RUN_RE = re.compile(r"([^\s\-=_~*#+])\1{3}")
_BOX_RE = re.compile("[\u2500-\u257f]")


def _char_run_pattern(k: int) -> str:
    return rf"([^\s\-=_~*#+])\1{{{k},}}"  # horizontal rules ("-----", "=====") are layout


def ellipsis_count(text: str) -> int:
    """'...' and '…' in the text, but not Python's '... ' continuation prompt at a line start, nor
    synopsis metasyntax ('[FILE...]', a quoted '...' placeholder)."""
    n = text.count("...")
    if n:  # (the three kinds never overlap, so the subtraction is exact)
        n -= len(_REPL_PROMPT.findall(text)) + len(_METASYNTAX_DOTS.findall(text))
    return n + text.count("…")


def _ellipsis_count_fast(text: str) -> int:
    """ellipsis_count without scanning the text for the two exceptions: a prompt is a '...' that starts a
    line's first non-blank char, so it is among str.find's non-overlapping hits; metasyntax needs a '...'
    followed by a closer or a quote."""
    n = text.count("...")
    if n:
        i = text.find("...")
        while i >= 0:
            if not text[text.rfind("\n", 0, i) + 1 : i].strip(" \t") and (i + 3 == len(text) or text[i + 3].isspace()):
                n -= 1  # a prompt: _REPL_PROMPT's (?=\s|$), where \s is str.isspace()
            i = text.find("...", i + 3)
        if _DOTS_CLOSER.search(text):
            n -= len(_METASYNTAX_DOTS.findall(text))
    return n + text.count("…")


def hash_count(text: str, p: TextRuleParams) -> int:
    """'#' characters, or with `hashtags_only` the hashtags among them."""
    n = text.count("#")
    return len(_HASHTAG_RE.findall(text)) if n and p.hashtags_only else n


def is_mostly_cjk(text: str, min_frac: float = 0.3) -> bool:
    """True when Han/kana make up at least `min_frac` of the non-space characters."""
    if not text or text.isascii():
        return False
    n_cjk = len(_CJK_RE.findall(text))
    return n_cjk > 0 and n_cjk >= min_frac * (len(text) - text.count(" ") - text.count("\n"))


def language_of(text: str, lang: str | None, p: TextRuleParams) -> tuple[bool, frozenset[str] | None]:
    """(count characters as words, the stop words to look for; None = skip the stop-word rule).

    CJK text (by `lang` or by script) uses the Chinese and Japanese lists; a language with a list uses
    it plus English's (docs and code mix in English; a mis-identified English text still passes);
    no `lang` uses every list; a language without a list skips the rule."""
    if (lang in CJK_LANGS) or is_mostly_cjk(text, p.cjk_min_frac):
        return True, _CJK_STOP
    if not lang:
        return False, _ALL_STOP
    return False, (STOP_WORDS[lang] | GOPHER_STOP_WORDS) if lang in STOP_WORDS else None


def words_of(text: str, cjk: bool) -> list[str]:
    """Whitespace-separated words; with `cjk`, every Han/hiragana character is a word of its own
    (and a katakana run is one word: Japanese writes loanwords such as ファイアウォール in katakana)."""
    return _CJK_WORD_RE.findall(text) if cjk else text.split()


def is_code(text: str, p: TextRuleParams) -> bool:
    """Code or a code listing (operators.words.is_code with the params' `code_line_frac`)."""
    return p.code_line_frac is not None and is_code_lines(_lines(text), p.code_line_frac)


def word_count(words: list[str], cjk: bool, p: TextRuleParams) -> int:
    """Words for the word-count rules: CJK text counts `cjk_ngram_scale` characters as one word."""
    return len(words) // p.cjk_ngram_scale if cjk else len(words)


def has_letter(word: str) -> bool:
    return _LETTER_RE.search(word) is not None


def _stop_key(word: str) -> str:
    return word.strip("\"'“”‘’«»()[]{}.,;:!?¿¡").lower()


_lines = nonempty_lines


def _text_lines(lines: list[str]) -> list[str]:
    """The lines that hold a letter or digit: a line of rules or connectors ("+    +", "  |") is layout,
    not a line of text that repeats (the duplicate-line rules)."""
    return [ln for ln in lines if _ALNUM_RE.search(ln)]


_ALNUM_RE = re.compile(r"[^\W_]")


def _line_count(line: str, p: TextRuleParams) -> int:
    """Lines `line` takes when wrapped at `bullet_line_width` (a paragraph written on one line is several
    lines of a page: a bulleted item of three sentences is one bullet line in four, not one in one)."""
    return -(-len(line) // p.bullet_line_width) if p.bullet_line_width else 1


def _paragraphs(text: str) -> list[str]:
    """Paragraphs: text between blank lines."""
    return [q for q in re.split(r"\n\s*\n", text) if q.strip()]


def max_sentence_words(text: str, at_least: int = 0) -> int:
    """Words in the longest sentence (a CJK character counts as a word). Sentences with fewer characters
    than `at_least` cannot hold `at_least` words, so they are not counted (returns 0 when none can)."""
    longest = 0
    for s in _SENTENCE_SPLIT.split(text):
        if len(s) >= at_least and len(s) > longest:  # n words need at least n characters
            longest = max(longest, len(WORDLIKE_RE.findall(s)))
    return longest


def _has_char_run(text: str, k: int, char_re: re.Pattern) -> bool:
    """char_re.search(text), skipped when it cannot match: a run of k+1 equal characters covers at least
    4 consecutive positions of every stride-((k+1)//4) sample of the text, all the same character."""
    stride = max(1, (k + 1) // 4)
    if stride > 1 and not _SAMPLE_RUN_RE.search(text[::stride]):
        return False
    return char_re.search(text) is not None


def _has_long_sentence(text: str, k: int, is_ascii: bool = False) -> bool:
    """max_sentence_words(text) > k. More than k word-like tokens need k+1 characters, and 2k+1 where
    no CJK character is (a separator between tokens), so shorter lines and sentences are skipped; an
    ASCII line with at most k word-like tokens in all holds no such sentence."""
    at_least = 2 * k + 1 if is_ascii or not _CJK_RE.search(text) else k + 1
    if len(text) < at_least:
        return False
    lines = text.split("\n")
    if max(map(len, lines)) < at_least:
        return False
    for line in lines:
        if len(line) < at_least or (is_ascii and len(line.translate(_ASCII_NON_WORD).split()) <= k):
            continue
        if max_sentence_words(line, at_least) > k:
            return True
    return False


_ASCII_NON_WORD = str.maketrans({c: " " for c in map(chr, range(128)) if not (c.isalnum() or c == "_")})


# ---------------------------------------------------------------- the plain definitions
def _covered_chars(words: list[str], starts: list[int], n: int) -> int:
    covered = set()
    for s in starts:
        covered.update(range(s, s + n))
    return sum(len(words[i]) for i in covered)


def reference_reason(text: str, lang: str | None = None, p: TextRuleParams = GOPHER_DEFAULTS) -> str:
    """The first rule that fires on `text`, every rule written as its definition ("" if none fires)."""
    text = _ASCII_RULE_RE.sub(lambda m: " " * len(m.group()), text.translate(_LAYOUT))
    if not text.strip():
        return ""
    if p.max_zero_run is not None and "0" * (p.max_zero_run + 1) in text:
        return "long_zero_run"
    if p.max_char_run is not None and re.search(_char_run_pattern(p.max_char_run), text):
        return "long_char_run"
    if p.max_sentence_words is not None and max_sentence_words(text) > p.max_sentence_words:
        return "long_sentence"
    chars = [c for c in text if not c.isspace()]
    symbols = [c for c in chars if not (c.isalnum() or c == "_")]
    if p.max_symbol_char_frac is not None and len(chars) >= p.symbol_min_chars \
            and len(symbols) / len(chars) > p.max_symbol_char_frac:
        return "symbol_soup"
    if is_code(text, p):
        return ""  # the duplicate-line and document rules are for prose
    for unit, parts in (("para", _paragraphs(text)), ("line", _text_lines(_lines(text)))):
        seen, n_dup, c_dup = set(), 0, 0
        for part in parts:
            if part in seen:
                n_dup, c_dup = n_dup + 1, c_dup + len(part)
            seen.add(part)
        frac, char_frac = getattr(p, f"dup_{unit}_frac"), getattr(p, f"dup_{unit}_char_frac")
        if frac is not None and parts and n_dup / len(parts) > frac:
            return f"dup_{unit}_frac"
        if char_frac is not None and c_dup / len(text) > char_frac:
            return f"dup_{unit}_char_frac"
    cjk, stops = language_of(text, lang, p)
    words = words_of(text, cjk)
    if word_count(words, cjk, p) < p.doc_min_words:
        return ""
    for rule_set in p.rule_sets:
        reason = {"gopher": _reference_gopher, "c4": c4_reason, "fineweb": fineweb_reason}[rule_set](
            text, words, cjk, stops, p)
        if reason:
            return reason
    return ""


def _gopher_counts_reason(text: str, n: int, n_count: int, n_chars: int, cjk: bool, p: TextRuleParams,
                          stats: dict, ellipses: Callable[[str], int] = ellipsis_count) -> str:
    """Gopher's word-count, mean-word-length, '#' and '...' rules (A.1.1), in order, for a text of `n`
    words (`n_count` for the count rules) holding `n_chars` chars; puts the mean word length in `stats`."""
    if p.min_words is not None and n_count < p.min_words:
        return "few_words"
    if p.max_words is not None and n_count > p.max_words:
        return "many_words"
    if not n:
        return ""
    stats["mean_word_len"] = mean = n_chars / n
    if not cjk:
        if p.min_mean_word_len is not None and mean < p.min_mean_word_len:
            return "short_mean_word"
        if p.max_mean_word_len is not None and mean > p.max_mean_word_len:
            return "long_mean_word"
    if p.max_symbol_word_ratio is not None:
        if hash_count(text, p) / n > p.max_symbol_word_ratio:
            return "many_hashes"
        if ellipses(text) / n > p.max_symbol_word_ratio:
            return "many_ellipses"
    return ""


def _reference_gopher(text: str, words: list[str], cjk: bool, stops, p: TextRuleParams) -> str:
    n = len(words)
    reason = _gopher_counts_reason(text, n, word_count(words, cjk, p), sum(len(w) for w in words), cjk, p, {})
    if reason or not n:
        return reason
    lines = _lines(text)
    short = len(lines) < p.line_rules_min_lines
    if p.max_bullet_lines_frac is not None and not short and \
            sum(bool(_BULLET_RE.match(ln)) for ln in lines) / sum(_line_count(ln, p) for ln in lines) \
            > p.max_bullet_lines_frac:
        return "bullet_lines"
    if p.max_ellipsis_lines_frac is not None and not short and \
            sum(ln.rstrip().endswith(_ELLIPSES) for ln in lines) / len(lines) > p.max_ellipsis_lines_frac:
        return "ellipsis_lines"
    n_alpha = sum(map(has_letter, words))
    if p.min_alpha_word_frac is not None and word_count(words, cjk, p) >= p.alpha_min_words \
            and n_alpha / n < p.min_alpha_word_frac:
        return "few_alpha_words"
    if p.min_stop_words is not None and stops is not None and n_alpha >= p.stop_words_min_words and \
            len({_stop_key(w) for w in words} & stops) < p.min_stop_words:
        return "few_stop_words"
    if word_count(words, cjk, p) < p.ngram_min_words:
        return ""
    total = sum(len(w) for w in words)
    scale = p.cjk_ngram_scale if cjk else 1
    for k, frac in sorted(p.top_ngram_char_frac.items()):
        k *= scale
        grams = [tuple(words[i : i + k]) for i in range(n - k + 1)]
        if grams:
            top, count = Counter(grams).most_common(1)[0]  # ties: the first to appear
            # an n-gram seen once repeats nothing (a 4-gram of unspaced Japanese paragraphs can be 16%)
            if count > 1 and _covered_chars(words, [i for i, g in enumerate(grams) if g == top], k) / total > frac:
                return f"top_{k // scale}_gram"
    for k, frac in sorted(p.dup_ngram_char_frac.items()):
        k *= scale
        grams = [tuple(words[i : i + k]) for i in range(n - k + 1)]
        seen: set = set()
        copies = [i for i, g in enumerate(grams) if g in seen or seen.add(g)]  # occurrences after the first
        if _covered_chars(words, copies, k) / total > frac:
            return f"dup_{k // scale}_gram"
    return ""


def c4_reason(text: str, words, cjk, stops, p: TextRuleParams) -> str:
    """C4's page rules on the lines C4 would keep (ivl flags the page, never rewrites it)."""
    if "lorem ipsum" in text.lower():
        return "c4_lorem_ipsum"
    n_sentences = 0
    for line in text.splitlines():
        line = line.strip()
        line_words = line.split()
        if any(len(w) > p.c4_max_word_len for w in line_words):
            continue
        line = _C4_CITATION.sub("", line)
        if not line.endswith(_C4_END) or line.endswith("...") or len(line_words) < p.c4_min_line_words:
            continue
        low = line.lower()
        if "javascript" in low or any(s in low for s in _C4_POLICY):
            continue
        if "{" in line:
            return "c4_curly_bracket"
        n_sentences += max(1, len(_C4_SENTENCE.findall(line)))
    return "c4_few_sentences" if n_sentences < p.c4_min_sentences else ""


def fineweb_reason(text: str, words, cjk, stops, p: TextRuleParams) -> str:
    """FineWeb's three line rules and its list rule (Penedo et al. 2024 §3.3)."""
    lines = _lines(text)
    if not lines:
        return ""
    if sum(ln.endswith(_FINEWEB_END) for ln in lines) / len(lines) < p.fineweb_line_punct_frac:
        return "fineweb_line_punct"
    if sum(len(ln) <= p.fineweb_short_line_chars for ln in lines) / len(lines) > p.fineweb_short_line_frac:
        return "fineweb_short_lines"
    dup_chars = sum(map(len, lines)) - sum(map(len, set(lines)))
    if dup_chars / max(1, len(text.replace("\n", ""))) > p.fineweb_dup_line_char_frac:
        return "fineweb_dup_line_chars"
    if text.count("\n") / len(words) > p.fineweb_newline_word_frac:
        return "fineweb_list"
    return ""


# ---------------------------------------------------------------- the fast path (same decisions)
def _dup_count_chars(parts: list[str]) -> tuple[int, int]:
    """How many parts repeat an earlier one, and their total length."""
    uniq = set(parts)
    return len(parts) - len(uniq), sum(map(len, parts)) - sum(map(len, uniq))


def _line_reason(text: str, lines: list[str], p: TextRuleParams) -> tuple[str, float, float]:
    """Duplicate paragraph and line rules on the text and its non-empty `lines`:
    (reason, dup line fraction, dup line char fraction)."""
    reason = ""
    if len(lines) > 1:  # else one line and one paragraph: nothing repeats
        paras = _paragraphs(text)
        n_dup, c_dup = _dup_count_chars(paras)
        if p.dup_para_frac is not None and paras and n_dup / len(paras) > p.dup_para_frac:
            reason = "dup_para_frac"
        elif p.dup_para_char_frac is not None and c_dup / len(text) > p.dup_para_char_frac:
            reason = "dup_para_char_frac"
        n_dup, c_dup = _dup_count_chars(lines)
        if n_dup:  # a repeat may be layout: count again without the lines that hold no letter or digit
            lines = _text_lines(lines)
            n_dup, c_dup = _dup_count_chars(lines)
        line_frac, line_char_frac = (n_dup / len(lines) if lines else 0.0), c_dup / len(text)
    else:
        line_frac = line_char_frac = 0.0
    if not reason:
        if p.dup_line_frac is not None and line_frac > p.dup_line_frac:
            reason = "dup_line_frac"
        elif p.dup_line_char_frac is not None and line_char_frac > p.dup_line_char_frac:
            reason = "dup_line_char_frac"
    return reason, line_frac, line_char_frac


def _symbol_frac(text: str, n_chars: int) -> float:
    """Share of non-space chars that are neither letters nor digits (nor '_')."""
    if text.isascii():  # deleting letters, digits and spaces leaves the symbols (4x faster than findall)
        return len(text.translate(_ASCII_NOT_SYMBOL)) / n_chars
    # else the same deletion on the UTF-8 bytes (multi-byte chars stay whole), then findall on what is left
    return len(_SYMBOL_RE.findall(text.encode("utf-8", "surrogatepass").translate(None, _ASCII_NOT_SYMBOL_BYTES)
                                  .decode("utf-8", "surrogatepass"))) / n_chars


_SYMBOL_RE = re.compile(r"[^\w\s]")  # \w is str.isalnum() or "_" (Python re docs)
_ASCII_NOT_SYMBOL_BYTES = bytes(c for c in range(128) if chr(c).isalnum() or chr(c) == "_" or chr(c).isspace())
_ASCII_NOT_SYMBOL = str.maketrans("", "", _ASCII_NOT_SYMBOL_BYTES.decode())
_ASCII_SPACES = tuple(c for c in map(chr, range(128)) if c.isspace())  # what str.split() splits ASCII at
# deleting every ASCII char but letters and spaces: a word without a letter vanishes from .split()
_ASCII_LETTERS_ONLY = str.maketrans("", "", "".join(c for c in map(chr, range(128)) if not (c.isalpha()
                                                    or c.isspace())))


class _NgramHashes:
    """Rolling 64-bit hashes of word n-grams (wrapping modulo 2**64 on purpose), each n built from
    the n-1 one: g_n[i] = (g_{n-1}[i] + id[i+n-1]) * MIX."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids
        self.done = {1: ids * NGRAM_HASH_MIX}

    def __call__(self, n: int) -> np.ndarray:
        if n not in self.done:
            m = len(self.ids) - n + 1
            self.done[n] = (self(n - 1)[:m] + self.ids[n - 1 : n - 1 + m]) * NGRAM_HASH_MIX
        return self.done[n]


def _coverage(starts: np.ndarray, n: int, cum: np.ndarray) -> int:
    """Chars of the words covered by n-grams starting at sorted `starts`, overlaps counted once."""
    ends = np.minimum(starts + n, len(cum) - 1)
    # an n-gram's covered span starts at its start or where the previous span ended, whichever is later
    prev_end = np.empty_like(ends)
    prev_end[0] = 0
    np.maximum.accumulate(ends[:-1], out=prev_end[1:])
    begin = np.maximum(starts, prev_end)
    return int((cum[ends] - cum[np.minimum(begin, ends)]).sum())


def _max_run(sorted_h: np.ndarray) -> int:
    """Length of the longest run of equal values in a sorted array (the top n-gram's count)."""
    edges = np.flatnonzero(sorted_h[1:] != sorted_h[:-1])  # a run ends at each edge
    m = len(sorted_h)
    if len(edges) == m - 1:
        return 1
    if not len(edges):
        return m
    inner = int((edges[1:] - edges[:-1]).max()) if len(edges) > 1 else 0
    return max(int(edges[0]) + 1, m - 1 - int(edges[-1]), inner)


def _top_positions(h: np.ndarray, sorted_h: np.ndarray, cmax: int) -> np.ndarray:
    """Where the most frequent n-gram (`cmax` times) starts, sorted; ties: the n-gram that appears first."""
    starts = np.flatnonzero(np.concatenate(([True], sorted_h[1:] != sorted_h[:-1])))
    tied = sorted_h[starts[np.diff(starts, append=len(sorted_h)) == cmax]]
    top = tied[0] if len(tied) == 1 else h[np.argmax(np.isin(h, tied))]  # the first of them in the text
    return np.flatnonzero(h == top)


def _ngram_reason(words: list[str], p: TextRuleParams, scale: int = 1) -> str:
    """Gopher's top and duplicated n-gram rules ("" when none fires), exact; bounds skip hopeless work:
    an n-gram is never more frequent than its (n-1)-gram prefix; the later copies of n-grams, and the
    chars they cover, never grow with n (a copied n-gram's (n-1)-gram prefix and suffix are copies
    too); k occurrences cover at most k times the longest n-gram's chars. Counting needs only a sort;
    the positions (an argsort) are taken only when a bound cannot rule the n-gram out."""
    n_words = len(words)
    cum = np.zeros(n_words + 1, np.int64)
    lens = np.fromiter(map(len, words), np.int64, n_words)
    np.cumsum(lens, out=cum[1:])
    total = int(cum[-1])
    if n_words < 2 or not total:
        return ""
    max_len = int(lens.max())  # an n-gram has at most n * max_len chars: a bound before the exact longest
    hashes = _NgramHashes(np.fromiter(map(hash, words), np.int64, n_words).view(np.uint64))
    cmax = None
    for rule_n, frac in sorted(p.top_ngram_char_frac.items()):
        n = rule_n * scale
        if n_words < n:
            continue
        if cmax is not None and (cmax < 2 or cmax * n * max_len / total <= frac):
            continue
        longest = int((cum[n:] - cum[:-n]).max())
        if cmax is not None and cmax * longest / total <= frac:
            continue  # even cmax occurrences of the longest n-gram would cover too little
        sorted_h = np.sort(hashes(n))
        cmax = _max_run(sorted_h)
        if cmax < 2 or cmax * longest / total <= frac:
            continue  # (the most frequent n-gram must repeat)
        if _coverage(_top_positions(hashes(n), sorted_h, cmax), n, cum) / total > frac:
            return f"top_{rule_n}_gram"
    covered_max = n_copies = None  # at the last n looked at: chars its copies cover (at most), copies
    for rule_n, frac in sorted(p.dup_ngram_char_frac.items()):
        n = rule_n * scale
        if n_words < n or (covered_max is not None and covered_max / total <= frac):
            continue
        if n_copies is not None and n_copies * n * max_len / total <= frac:
            continue
        longest = int((cum[n:] - cum[:-n]).max()) if n_copies is not None else None
        if longest is not None and n_copies * longest / total <= frac:
            continue
        sorted_h = np.sort(hashes(n))
        n_copies = int(np.count_nonzero(sorted_h[1:] == sorted_h[:-1]))
        if not n_copies:
            break  # no n-gram repeats, so no longer one does either
        if longest is None:  # (taken after the sort the first time: most texts repeat no n-gram at all)
            longest = int((cum[n:] - cum[:-n]).max())
        if n_copies * longest / total <= frac:
            continue
        order = np.argsort(hashes(n), kind="stable")
        same = hashes(n)[order[1:]] == hashes(n)[order[:-1]]
        copies = np.sort(order[1:][same])  # later members of a group copy an earlier occurrence
        covered_max = _coverage(copies, n, cum)
        if covered_max / total > frac:
            return f"dup_{rule_n}_gram"
    return ""


def _gopher_reason(text: str, words: list[str], lines: list[str], n_chars: int, cjk: bool, stops,
                   p: TextRuleParams, stats: dict) -> str:
    """Gopher quality then repetition, in reference order, given the text's words, non-empty lines
    and the chars of its words; fills `stats` with the score columns."""
    n, n_count = len(words), word_count(words, cjk, p)
    reason = _gopher_counts_reason(text, n, n_count, n_chars, cjk, p, stats, _ellipsis_count_fast)
    if reason or not n:
        return reason
    if len(lines) < p.line_rules_min_lines:
        pass
    elif p.max_bullet_lines_frac is not None and (bullets := sum(1 for ln in lines if _BULLET_RE.match(ln))) \
            / len(lines) > p.max_bullet_lines_frac and bullets / (sum(_line_count(ln, p) for ln in lines)
                                                             if p.bullet_line_width else len(lines)) > p.max_bullet_lines_frac:
        return "bullet_lines"  # (wrapped lines are at least as many: the first test only skips)
    elif p.max_ellipsis_lines_frac is not None and ("..." in text or "…" in text):
        if sum(1 for ln in lines if ln.rstrip().endswith(_ELLIPSES)) / len(lines) > p.max_ellipsis_lines_frac:
            return "ellipsis_lines"
    if cjk:
        no_letter = sum(1 for w in words if not has_letter(w))
    elif text.isascii():
        no_letter = n - len(text.translate(_ASCII_LETTERS_ONLY).split())
    else:
        no_letter = len(_NO_LETTER_WORD_RE.findall(text))
    stats["alpha_word_frac"] = alpha = (n - no_letter) / n
    if p.min_alpha_word_frac is not None and n_count >= p.alpha_min_words and alpha < p.min_alpha_word_frac:
        return "few_alpha_words"
    if p.min_stop_words is not None and stops is not None and n - no_letter >= p.stop_words_min_words:
        found = stops.intersection(words)  # most texts: enough exact hits without stripping punctuation
        if len(found) < p.min_stop_words:
            found = stops.intersection(map(_stop_key, set(words)))
        if len(found) < p.min_stop_words:
            return "few_stop_words"
    if n_count < p.ngram_min_words:
        return ""
    return _ngram_reason(words, p, p.cjk_ngram_scale if cjk else 1)


def analyze(text: str, p: TextRuleParams, lang: str | None = None, char_re: re.Pattern | None = None
            ) -> tuple[str, dict[str, float]]:
    """The first rule that fires on `text` ("" if none) and the score columns; equals reference_reason.
    `char_re` is the compiled long_char_run pattern (TextRules compiles it once)."""
    scores = {"word_count": 0.0, "mean_word_len": 0.0, "alpha_word_frac": 0.0, "dup_line_frac": 0.0,
              "dup_line_char_frac": 0.0, "symbol_char_frac": 0.0}
    is_ascii = text.isascii()
    if not is_ascii and _BOX_RE.search(text):
        text = text.translate(_LAYOUT)
    if any(map(text.__contains__, _ASCII_RULES)):  # (no generator frame per rule)
        text = _ASCII_RULE_RE.sub(lambda m: " " * len(m.group()), text)
    if not text or text.isspace():
        return "", scores
    if char_re is None and p.max_char_run is not None:
        char_re = re.compile(_char_run_pattern(p.max_char_run))
    reason = ""
    if p.max_zero_run is not None and "0" * (p.max_zero_run + 1) in text:
        reason = "long_zero_run"
    elif char_re is not None and _has_char_run(text, p.max_char_run, char_re):
        reason = "long_char_run"
    elif p.max_sentence_words is not None and _has_long_sentence(text, p.max_sentence_words, is_ascii):
        reason = "long_sentence"
    cjk, stops = language_of(text, lang, p)
    words = words_of(text, cjk)
    if is_ascii:  # the words' chars are the non-space chars
        n_chars = len(text) - sum(map(text.count, _ASCII_SPACES))
    else:
        n_chars = sum(map(len, words)) if cjk else len("".join(words))
    scores["word_count"] = len(words)
    if n_chars:
        scores["symbol_char_frac"] = sym = _symbol_frac(text, n_chars)
        if not reason and p.max_symbol_char_frac is not None and n_chars >= p.symbol_min_chars \
                and sym > p.max_symbol_char_frac:
            reason = "symbol_soup"
    if reason:
        return reason, scores
    lines = _lines(text)
    if p.code_line_frac is not None and is_code_lines(lines, p.code_line_frac):
        return reason, scores  # the duplicate-line and document rules are for prose
    reason, scores["dup_line_frac"], scores["dup_line_char_frac"] = _line_reason(text, lines, p)
    if reason or word_count(words, cjk, p) < p.doc_min_words:
        return reason, scores
    for rule_set in p.rule_sets:
        if rule_set == "gopher":
            reason = _gopher_reason(text, words, lines, n_chars, cjk, stops, p, scores)
        else:
            reason = (c4_reason if rule_set == "c4" else fineweb_reason)(text, words, cjk, stops, p)
        if reason:
            break
    return reason, scores


def gopher_decide(text: str, params: TextRuleParams = GOPHER_DEFAULTS, lang: str | None = None) -> tuple[bool, str]:
    """(keep, reason) of the Gopher quality + repetition rules alone (the paper's definitions)."""
    if not text.strip():
        return False, "empty"
    reason = analyze(text, params, lang)[0]
    return not reason, reason


@register
class TextRules(Operator):
    """The paper's heuristic rules, symbol soup and the document rule sets on the chosen turns."""

    name = "text_rules"
    Params = TextRuleParams

    def __init__(self, params: TextRuleParams | None = None, **kwargs):
        super().__init__(params, **kwargs)
        p = self.params
        self._char_re = re.compile(_char_run_pattern(p.max_char_run)) if p.max_char_run is not None else None

    def thresholds(self) -> dict[str, list[float]]:
        p = self.params
        cut = {"score_mean_word_len": [p.min_mean_word_len, p.max_mean_word_len],
               "score_alpha_word_frac": [p.min_alpha_word_frac], "score_dup_line_frac": [p.dup_line_frac],
               "score_dup_line_char_frac": [p.dup_line_char_frac], "score_symbol_char_frac": [p.max_symbol_char_frac]}
        return {k: [x for x in v if x is not None] for k, v in cut.items()}

    def __call__(self, table: pa.Table) -> Verdict:
        texts = conversation_texts(table, self.params.turns)
        langs = table.column("lang").to_pylist() if "lang" in table.column_names else [None] * len(texts)
        verdict = Verdict.keep_all(len(texts))
        decision = REJECT if self.params.action == "reject" else REVIEW
        names = ("word_count", "mean_word_len", "alpha_word_frac", "dup_line_frac", "dup_line_char_frac",
                 "symbol_char_frac")
        cols = {k: np.zeros(len(texts), np.float64) for k in names}
        for i, (text, lang) in enumerate(zip(texts, langs)):
            reason, scores = analyze(text, self.params, lang, self._char_re)
            for k in names:
                cols[k][i] = scores[k]
            if reason:
                verdict.flag(i, reason, decision)
        verdict.columns = {f"score_{k}": v for k, v in cols.items()}
        return verdict
