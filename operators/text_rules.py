"""Heuristic text rules: InternVL 2.5's three (REFERENCE.md "Data filtering", paper §4.3) and the
Gopher quality + repetition rules (Rae et al. 2021, Table A1) with DataTrove's semantics.

The paper's rules: sentences of abnormal length, excessively long runs of zeros (and of any one
repeated character), too many duplicate lines. The Gopher rules follow DataTrove's
`GopherQualityFilter` and `GopherRepetitionFilter` (same measures, thresholds, order of checks);
the differences are (1) words come from one regular expression that approximates spaCy's English
tokenizer instead of spaCy itself (>= 98% same decisions, see docs/bench_filters.md) and (2) mostly
Chinese/Japanese text counts one character as one word, skips the mean-word-length rule and uses
CJK stop words, because those scripts put no spaces between words.

Speed: words are found once per text and shared by all measures; n-grams are hashed as integers with
numpy (a rolling hash over Python's string hashes), and cheap upper bounds skip the exact n-gram
counts whenever they cannot reach a threshold, so decisions stay identical to the full computation.
"""

from __future__ import annotations

import re
import struct
from itertools import chain, compress
from operator import not_
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from operators.base import REJECT, REVIEW, Operator, Verdict, conversation_texts, register

# DataTrove's PUNCTUATION_SET (datatrove/utils/text.py: PUNCTUATION + TERMINAL_PUNCTUATION): a word
# made only of these characters is a "symbol word" in the Gopher quality rules.
_PUNCT = (
    "\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\r\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18"
    "\x19\x1a\x1b\x1c\x1d\x1e\x1f!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\x7f\x80\x81\x82\x83\x84\x85"
    "\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98\x99\x9a\x9b"
    "\x9c\x9d\x9e\x9f\xab\xb4\xbb\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837"
    "\u0839\u083d\u083e\u0964\u0965\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5"
    "\u17d6\u17d9\u17da\u1803\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f"
    "\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u2013\u2014\u2019\u201c\u201d\u201e\u2026\u203c\u203d"
    "\u2047\u2048\u2049\u2236\u2501\u25ba\u2e2e\u2e3c\u2e53\u2e54\u3001\u3002\u3008\u3009\u300a"
    "\u300b\u300c\u300d\u3010\u3011\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f"
    "\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff05\uff08\uff09"
    "\uff0c\uff0e\uff11\uff1a\uff1b\uff1f\uff5e\uff61\U00010a56\U00010a57\U00010f55\U00010f56"
    "\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89\U00011047\U00011048"
    "\U000110be\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5\U000111c6"
    "\U000111cd\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U0001144b"
    "\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce"
    "\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7"
    "\U00011641\U00011642\U0001173c\U0001173d\U0001173e\U00011944\U00011946\U00011a42\U00011a43"
    "\U00011a9b\U00011a9c\U00011c41\U00011c42\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016a6e"
    "\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44\U00016e98\U0001bc9f\U0001da88"
)
STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])  # Gopher's (DataTrove)
# Frequent function words of Chinese and Japanese: the stop-word rule for mostly-CJK text.
CJK_STOP_WORDS = frozenset("的了是在和有我不这也就都一他你们个上说要会着那" "のにはをたがでてとしも")

# Han ideographs and kana: scripts written without spaces (Hangul is spaced, so it is not here).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RE = re.compile(f"[{_CJK}]")
# A regular expression standing in for spaCy's English tokenizer (what DataTrove splits words with):
# a whitespace-separated chunk loses prefix marks at its start ("(", quotes, "_", "#", "$"...) and
# suffix marks at its end (")", ",", quotes, "." after a lowercase letter or digit...), and splits at
# spaCy's infixes: hyphens, "/", ":", "=", "<", ">" before a letter ("quick-brown", "a/b", "x=True"),
# "." between lowercase and uppercase ("torch.Tensor"), "," between letters, "+-*^" between digits.
# Anything else stays inside the word ("f(x", "stdio.h", "1,000", "12:30", "--all", "UTF-8").
# Special cases: URLs, "e.g."-style abbreviations, "'s"/"n't"-style clitics, "cannot", a few emoticons.
_L = r"[^\W\d_]"  # a letter
_AN = r"[^\W_]"  # a letter or digit
_PS = "…,:;!?¿¡()[]{}<>_#*&%。？！，、；：～·'\"”“`‘´’‚„»«「」『』（）〔〕【】《》〈〉⟦⟧"  # spaCy LIST_PUNCT+QUOTES
_INFIX = ".,:<>=/\\-–—~+*^…'’"


def _cls(chars) -> str:
    """The characters as the body of a regex character class."""
    return "".join("\\" + c if c in "\\]^-[" else c for c in sorted(set(chars)))


_SPECIAL = (  # an infix character that does not split the word where it stands
    r"(?<![a-z.])\.(?!\.)|(?<!\.)\.(?![A-Z.])"
    rf"|(?<!{_L}),|,(?!{_L})"
    rf"|(?<!{_AN})[:<>=/]|[:<>=/](?!{_L})"
    rf"|(?<!{_AN})[\-–—~]|(?<={_L})[\-–—~](?!{_L})|(?<=\d)[–—~](?!{_L})|(?<=\d)-(?![^\W_]|-)"
    r"|(?<!\d)[+*^]|[+*^](?![\d-])"
    r"|['’](?!(?i:s|m|d|t|ll|re|ve)(?!\w))"
)
def _token_re(cjk: bool) -> re.Pattern:
    """The tokenizer; with `cjk`, every Han/kana character is a word of its own (no spaces there)."""
    no = _CJK if cjk else ""  # characters that never join a word
    word = rf"[^\W_{no}]"
    inner = rf"[^\s{no}{_cls(_INFIX + _PS + '—–$')}]++|[{_cls(set(_PS + '—–$') - set(_INFIX))}]|(?>{_SPECIAL})"
    start = rf"(?:[^\s{no}{_cls(_PS + '§=—–$£€¥./-~+*^')}]|(?<![^\W_])(?:[./\-~*^]|\+(?=\d)))"
    end = rf"(?:(?<![{_cls(_PS + '—–$.')}])|(?<=(?<![A-Z])[A-Z]\.))"  # no suffix mark last, but "J." stays
    return re.compile(
        (rf"[{_CJK}]|" if cjk else "")
        + r"[Cc]an(?=not(?!\w))"
        + rf"|{word}++(?=[,;:!?)\]\"”’']*(?:\s|\Z))"  # fast path: a plain word followed by suffix marks only
        + r"|[,;!?(\]{}\"“”«»#*&%=§$£€¥_<>]|\)(?!:)|:(?![\])])"  # fast path: marks that stand alone
        + rf"|{word}*[a-z0-9](?=\.(?:\s|\Z))"  # fast path: the last word of a sentence
        + r"|https?://[^\s<>\"'()\[\]{}]*[^\s<>\"'()\[\]{}.,;:!?]"
        + r"|(?:[A-Za-z]\.){2,}(?!\w)"
        + rf"|{start}(?:{inner})*{end}"
        + r"|\.{2,}|…+"
        + r"|['’](?i:s|m|d|t|ll|re|ve)(?!\w)"
        + r"|\):|\[:|:\]|:\)"
        + r"|\S"
    )


_TOKEN_RE, _CJK_TOKEN_RE = _token_re(False), _token_re(True)
_ALPHA_RE = re.compile(r"[^\W\d_]")  # a letter: Gopher's "word with at least one alphabetic character"
# A sentence ends at terminal punctuation followed by space, at CJK terminal punctuation, or at a newline.
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])|\n")
_WORDLIKE_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier for the rolling n-gram hash


def tokenize(text: str, cjk: bool = False) -> list[str]:
    """Words as the Gopher rules see them: spaCy-like English words and punctuation marks; with
    `cjk`, one word per Han/kana character."""
    return (_CJK_TOKEN_RE if cjk else _TOKEN_RE).findall(text)


def is_mostly_cjk(text: str, min_frac: float = 0.3) -> bool:
    """True when Han/kana make up at least `min_frac` of the non-space characters."""
    if not text or text.isascii():
        return False
    n_cjk = len(_CJK_RE.findall(text))
    if not n_cjk:
        return False
    return n_cjk >= min_frac * (len(text) - text.count(" ") - text.count("\n"))


class TextRuleParams(BaseModel):
    """Every threshold of the text rules; None switches a rule off. Gopher defaults are DataTrove's."""

    model_config = ConfigDict(extra="forbid")

    turns: Literal["gpt", "human", "all"] = Field("gpt", description="which turns of a sample are checked")
    action: Literal["review", "reject"] = Field(
        "review", description="what a hit does: review (paper §4.3: manual review first) or reject"
    )
    # the paper's three rules (InternVL 2.5 §4.3); thresholds are ours, the paper gives none
    max_sentence_words: int | None = Field(300, description="a sentence longer than this many words is abnormal")
    max_zero_run: int | None = Field(20, description="a run of more than this many '0' characters fires")
    max_char_run: int | None = Field(80, description="a run of more than this many of one non-space char fires")
    dup_line_frac: float | None = Field(0.3, description="max fraction of lines that repeat an earlier line")
    dup_line_char_frac: float | None = Field(0.2, description="max fraction of chars in repeated lines")
    dup_para_frac: float | None = Field(0.3, description="max fraction of paragraphs that repeat")
    dup_para_char_frac: float | None = Field(0.2, description="max fraction of chars in repeated paragraphs")
    # Gopher quality (Rae et al. 2021 §A.1.1; DataTrove GopherQualityFilter defaults)
    gopher_min_words: int = Field(
        50, description="texts with fewer words skip the Gopher quality and n-gram rules (they are for documents)"
    )
    min_words: int | None = Field(50, description="fewer non-symbol words than this fires")
    max_words: int | None = Field(100_000, description="more non-symbol words than this fires")
    min_mean_word_len: float | None = Field(3, description="mean word length below this fires (not for CJK)")
    max_mean_word_len: float | None = Field(10, description="mean word length above this fires (not for CJK)")
    max_symbol_word_ratio: float | None = Field(0.1, description="max '#' or '...' per word")
    max_bullet_lines_frac: float | None = Field(0.9, description="max fraction of lines starting with a bullet")
    max_ellipsis_lines_frac: float | None = Field(0.3, description="max fraction of lines ending in an ellipsis")
    min_alpha_word_frac: float | None = Field(0.8, description="min fraction of words with a letter")
    min_stop_words: int | None = Field(2, description="min distinct stop words present (CJK ones for CJK text)")
    # Gopher repetition (Rae et al. 2021 Table A1; DataTrove GopherRepetitionFilter defaults)
    top_ngram_char_frac: dict[int, float] = Field(
        {2: 0.20, 3: 0.18, 4: 0.16}, description="n -> max char fraction covered by the most frequent n-gram"
    )
    dup_ngram_char_frac: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> max char fraction covered by repeated n-grams",
    )
    cjk_min_frac: float = Field(0.3, description="a text whose chars are at least this Han/kana counts as CJK")


# exactly DataTrove's GopherQuality + GopherRepetition: no paper rules, no short-text exemption
GOPHER_DEFAULTS = TextRuleParams(max_sentence_words=None, max_zero_run=None, max_char_run=None, gopher_min_words=0)


# ---------------------------------------------------------------- measures shared by the rules
_PUNCT_SET = frozenset(_PUNCT)
# Per-process caches. A word's code packs a never-reused id with its classes:
# 16 * id + 8 * (CJK stop word) + 4 * (stop word) + 2 * (not a symbol word) + (has a letter);
# n-grams are hashed from the ids. A whitespace-separated chunk's words depend on that chunk alone,
# so each distinct chunk is tokenized once and kept as packed int64 (code, length) pairs.
_WORD_PAIRS: dict[str, bytes] = {}  # word -> its packed (code, length)
_CHUNKS: tuple[dict[str, bytes], dict[str, bytes]] = ({}, {})  # chunk -> its words' pairs, joined
_CACHE_LIMIT = 1_000_000  # ~250 MB at most; a 50k-document corpus has ~0.9M distinct chunks
_PAIR = struct.Struct("=qq")  # native int64 (code, length), as np.frombuffer reads it back
_next_id = [1]


def _add_words(words: set[str]) -> None:
    """Give new words their codes."""
    first = _next_id[0]
    _next_id[0] += len(words)
    pack, symbols, letter = _PAIR.pack, _PUNCT_SET.issuperset, _ALPHA_RE.search
    _WORD_PAIRS.update({
        w: pack(16 * i + 8 * (w in CJK_STOP_WORDS) + 4 * (w in STOP_WORDS) + 2 * (not symbols(w))
                + (w.isalpha() or letter(w) is not None), len(w))
        for i, w in enumerate(words, first)
    })


def encode(text: str, cjk: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per word of `tokenize(text, cjk)`: its code (see _WORD_PAIRS) and its length."""
    cache = _CHUNKS[cjk]
    if len(cache) > _CACHE_LIMIT or len(_WORD_PAIRS) > _CACHE_LIMIT:  # bounded; never mid-text
        _WORD_PAIRS.clear()
        _CHUNKS[0].clear()
        _CHUNKS[1].clear()
    chunks = text.split()
    entries = list(map(cache.get, chunks))  # one pass over a large dict: most of the time
    if None in entries:  # tokenize this text's new chunks, all at once
        missing = list(compress(range(len(entries)), map(not_, entries)))  # a cached entry is never b""
        new = list(dict.fromkeys([chunks[i] for i in missing]))
        per_chunk = list(map((_CJK_TOKEN_RE if cjk else _TOKEN_RE).findall, new))
        _add_words(set(chain.from_iterable(per_chunk)).difference(_WORD_PAIRS))
        pair = _WORD_PAIRS.__getitem__
        cache.update(zip(new, [b"".join(map(pair, words)) for words in per_chunk]))
        for i in missing:
            entries[i] = cache[chunks[i]]
    arr = np.frombuffer(b"".join(entries), np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def _quality_stats(codes: np.ndarray, lens: np.ndarray) -> tuple[int, float, float]:
    """(non-symbol word count, their mean length, fraction of all words holding a letter)."""
    n = len(codes)
    if not n:
        return 0, 0.0, 0.0
    nonsym = (codes & 2) != 0
    n_nonsym = int(np.count_nonzero(nonsym))
    mean_len = int(lens[nonsym].sum()) / n_nonsym if n_nonsym else 0.0  # == .mean(): exact sum, one rounding
    return n_nonsym, mean_len, int(np.count_nonzero(codes & 1)) / n


def _dup_count_chars(parts: list[str]) -> tuple[int, int]:
    """DataTrove's find_duplicates: how many parts repeat an earlier one, and their total length."""
    uniq = set(parts)
    return len(parts) - len(uniq), sum(map(len, parts)) - sum(map(len, uniq))


class _NgramHashes:
    """Rolling 64-bit hashes of word n-grams (wrapping modulo 2**64 on purpose), each n built from
    the n-1 one: g_n[i] = (g_{n-1}[i] + id[i+n-1]) * MIX."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids
        self.done = {1: ids * _MIX}

    def __call__(self, n: int) -> np.ndarray:
        if n not in self.done:
            m = len(self.ids) - n + 1  # (numpy integer arrays wrap silently)
            self.done[n] = (self(n - 1)[:m] + self.ids[n - 1 : n - 1 + m]) * _MIX
        return self.done[n]


def _top_ngram(hn: np.ndarray, glen: np.ndarray) -> tuple[int, int]:
    """DataTrove's find_top_duplicate: chars of the most common n-gram times its count (the first
    seen wins ties, as with Counter.most_common); also returns the count."""
    order = np.argsort(hn, kind="stable")  # equal hashes stay in text order: a group starts at its first
    s = hn[order]
    new_group = np.empty(len(s), bool)
    new_group[0] = True
    np.not_equal(s[1:], s[:-1], out=new_group[1:])
    starts = new_group.nonzero()[0]
    counts = np.empty_like(starts)
    np.subtract(starts[1:], starts[:-1], out=counts[:-1])
    counts[-1] = len(s) - starts[-1]
    cmax = int(counts.max())
    first = int(order[starts[counts == cmax]].min())
    return int(glen[first]) * cmax, cmax


def _repeats(hn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions whose value repeats an earlier one, positions whose value occurs more than once)."""
    order = np.argsort(hn, kind="stable")
    same = hn[order[1:]] == hn[order[:-1]]
    later = order[1:][same]
    multi = np.zeros(len(hn), bool)
    multi[later] = True
    multi[order[:-1][same]] = True
    return later, np.flatnonzero(multi)


def _dup_ngram_chars(hn: np.ndarray, glen: np.ndarray, n: int, cand: np.ndarray) -> int:
    """DataTrove's find_all_duplicate, exactly: scan n-grams; a repeat of one seen before adds its
    chars and jumps n ahead (what is jumped over is never added to the seen set). Only positions
    whose n-gram occurs more than once (`cand`) can matter, so only those are visited."""
    seen: set[int] = set()
    repeated = next_free = 0
    for i, g, ln in zip(cand.tolist(), hn[cand].tolist(), glen[cand].tolist()):
        if i < next_free:
            continue
        if g in seen:
            repeated += ln
            next_free = i + n
        else:
            seen.add(g)
    return repeated


def _ngram_reason(codes: np.ndarray, lens: np.ndarray, text_len: int, p: TextRuleParams, sep: int) -> str:
    """Gopher's top n-gram and duplicated n-gram rules over word ids; "" when none fires.

    Exact, but cheap upper bounds skip the work that cannot change the outcome: an n-gram is never
    more frequent than its (n-1)-gram prefix, and only positions whose 5-gram repeats an earlier
    one can start a repeated longer n-gram."""
    n_words = len(codes)
    if n_words < 2 or not (p.top_ngram_char_frac or p.dup_ngram_char_frac):
        return ""
    hashes = _NgramHashes((codes >> 4).astype(np.uint64))
    cum = np.zeros(n_words + 1, np.int64)
    np.cumsum(lens, out=cum[1:])
    cmax = None
    for n, frac in sorted(p.top_ngram_char_frac.items()):
        if n_words < n:
            continue
        glen = cum[n:] - cum[:-n] + sep * (n - 1)  # DataTrove joins these n-grams with " "
        max_chars = int(glen.max())
        if cmax is not None and cmax * max_chars / text_len <= frac:
            continue
        top_chars, cmax = _top_ngram(hashes(n), glen)
        if top_chars / text_len > frac:
            return f"top_{n}_gram"
    if not p.dup_ngram_char_frac:
        return ""
    n0 = min(p.dup_ngram_char_frac)
    if n_words < n0:
        return ""
    repeat_pos = _repeats(hashes(n0))[0]  # positions whose n0-gram repeats an earlier one
    if not len(repeat_pos):
        return ""
    # One bound for every n at once: each candidate covering its longest n-gram (or the rest of the text).
    longest = cum[np.minimum(repeat_pos + max(p.dup_ngram_char_frac), n_words)] - cum[repeat_pos]
    if int(longest.sum()) / text_len <= min(p.dup_ngram_char_frac.values()):
        return ""
    for n, frac in sorted(p.dup_ngram_char_frac.items()):
        if n_words < n:
            continue
        glen = cum[n:] - cum[:-n]  # DataTrove joins these n-grams with "" (no separator)
        if int(glen[repeat_pos[repeat_pos <= n_words - n]].sum()) / text_len <= frac:
            continue  # even if every candidate repeated, the rule would not fire
        hn = hashes(n)
        later, multi = _repeats(hn)
        if int(glen[later].sum()) / text_len <= frac:  # the same bound with this n's own repeats
            continue
        if _dup_ngram_chars(hn, glen, n, multi) / text_len > frac:
            return f"dup_{n}_gram"
    return ""


def _paragraphs(text: str) -> list[str]:
    """DataTrove's paragraphs, re.split(r"\n{2,}", text.strip()), with str.split (3x faster): a run of
    3+ newlines leaves a piece starting with "\n" or an empty one, which a real paragraph never is."""
    s = text.strip()
    parts = s.split("\n\n")
    if "\n\n\n" in s:
        parts = list(filter(None, [q.lstrip("\n") for q in parts]))
    return parts


def _lines(text: str) -> list[str]:
    """DataTrove's lines, re.split(r"\n+", text), with str.split: no empty line but at either end."""
    if not text:
        return [""]
    lines = list(filter(None, text.split("\n")))
    if text.startswith("\n"):
        lines.insert(0, "")
    if text.endswith("\n"):
        lines.append("")
    return lines


def _line_reason(text: str, p: TextRuleParams, need_stats: bool = True) -> tuple[str, float, float]:
    """Duplicate paragraph and line rules; returns (reason, dup line fraction, dup line char fraction)
    (the fractions are 0 when a paragraph rule fires and `need_stats` is False)."""
    paras = _paragraphs(text)
    n_dup, c_dup = _dup_count_chars(paras)
    reason = ""
    if p.dup_para_frac is not None and n_dup / len(paras) > p.dup_para_frac:
        reason = "dup_para_frac"
    elif p.dup_para_char_frac is not None and c_dup / len(text) > p.dup_para_char_frac:
        reason = "dup_para_char_frac"
    if reason and not need_stats:
        return reason, 0.0, 0.0
    lines = _lines(text)
    n_dup, c_dup = _dup_count_chars(lines)
    line_frac, line_char_frac = n_dup / len(lines), c_dup / len(text)
    if not reason:
        if p.dup_line_frac is not None and line_frac > p.dup_line_frac:
            reason = "dup_line_frac"
        elif p.dup_line_char_frac is not None and line_char_frac > p.dup_line_char_frac:
            reason = "dup_line_char_frac"
    return reason, line_frac, line_char_frac


def _quality_reason(text: str, codes: np.ndarray, stats: tuple[int, float, float], cjk: bool, p) -> str:
    """Gopher quality rules in DataTrove's order; "" when none fires."""
    n_nonsym, mean_len, alpha_frac = stats
    n_words = len(codes)
    if p.min_words is not None and n_nonsym < p.min_words:
        return "few_words"
    if p.max_words is not None and n_nonsym > p.max_words:
        return "many_words"
    if not n_words:
        return ""
    if not cjk:
        if p.min_mean_word_len is not None and mean_len < p.min_mean_word_len:
            return "short_mean_word"
        if p.max_mean_word_len is not None and mean_len > p.max_mean_word_len:
            return "long_mean_word"
    n_ellipses = text.count("...") + text.count("…")
    if p.max_symbol_word_ratio is not None:
        if text.count("#") / n_words > p.max_symbol_word_ratio:
            return "many_hashes"
        if n_ellipses / n_words > p.max_symbol_word_ratio:
            return "many_ellipses"
    # The line rules split lines only when they could fire: a text has at least count("\n") lines (at
    # least one), at most count("-") + count("•") of them start with a bullet and at most n_ellipses end
    # with an ellipsis.
    min_lines = max(1, text.count("\n"))
    lines = None
    frac = p.max_bullet_lines_frac
    if frac is not None and (text.count("-") + text.count("•")) / min_lines > frac:
        lines = text.splitlines()
        bullets = sum(1 for s in map(str.lstrip, lines) if s.startswith(("•", "-")))
        if bullets / len(lines) > frac:
            return "bullet_lines"
    frac = p.max_ellipsis_lines_frac
    if frac is not None and n_ellipses / min_lines > frac:
        lines = lines or text.splitlines()
        ends = sum(1 for s in map(str.rstrip, lines) if s.endswith(("...", "…")))
        if ends / len(lines) > frac:
            return "ellipsis_lines"
    if p.min_alpha_word_frac is not None and alpha_frac < p.min_alpha_word_frac:
        return "few_alpha_words"
    if p.min_stop_words is not None:
        stop_ids = codes[(codes & (8 if cjk else 4)) != 0]
        if (len(set(stop_ids.tolist())) if len(stop_ids) else 0) < p.min_stop_words:
            return "few_stop_words"
    return ""


def gopher_decide(text: str, params: TextRuleParams = GOPHER_DEFAULTS) -> tuple[bool, str]:
    """(keep, reason) of the Gopher quality + repetition pair on one text ("" reason when kept).

    Same decisions as DataTrove's GopherRepetitionFilter followed by GopherQualityFilter, stopping at
    the first rule that fires (cheapest first: lines, then word counts, then n-grams)."""
    if not text:
        return False, "empty"
    reason = _line_reason(text, params, need_stats=False)[0]
    if reason:
        return False, reason
    cjk = is_mostly_cjk(text, params.cjk_min_frac)
    codes, lens = encode(text, cjk)
    stats = _quality_stats(codes, lens)
    if stats[0] < params.gopher_min_words:
        return True, ""
    reason = _quality_reason(text, codes, stats, cjk, params) or _ngram_reason(
        codes, lens, len(text), params, 0 if cjk else 1
    )
    return not reason, reason


# ---------------------------------------------------------------- the paper's character rules
def _run_reason(text: str, p: TextRuleParams, zero_re, char_re) -> str:
    if zero_re is not None and zero_re.search(text):
        return "long_zero_run"
    if char_re is not None and char_re.search(text):
        return "long_char_run"
    return ""


def max_sentence_words(text: str, at_least: int = 0) -> int:
    """Words in the longest sentence (a CJK character counts as a word). Sentences with fewer characters
    than `at_least` cannot hold `at_least` words, so they are not counted (returns 0 when none can)."""
    longest = 0
    for s in _SENTENCE_SPLIT.split(text):
        if len(s) >= at_least and len(s) > longest:  # n words need at least n characters
            longest = max(longest, len(_WORDLIKE_RE.findall(s)))
    return longest


def analyze(text: str, p: TextRuleParams, zero_re=None, char_re=None) -> tuple[str, dict[str, float]]:
    """The first rule that fires on `text` ("" if none) and the score columns for it."""
    scores = {"word_count": 0.0, "mean_word_len": 0.0, "alpha_word_frac": 0.0, "dup_line_frac": 0.0,
              "dup_line_char_frac": 0.0}
    if not text:
        return "", scores
    reason = _run_reason(text, p, zero_re, char_re)
    if not reason and p.max_sentence_words is not None:
        if max_sentence_words(text, p.max_sentence_words) > p.max_sentence_words:
            reason = "long_sentence"
    line_reason, scores["dup_line_frac"], scores["dup_line_char_frac"] = _line_reason(text, p)
    reason = reason or line_reason
    cjk = is_mostly_cjk(text, p.cjk_min_frac)
    codes, lens = encode(text, cjk)
    stats = _quality_stats(codes, lens)
    scores["word_count"], scores["mean_word_len"], scores["alpha_word_frac"] = stats
    if reason or stats[0] < p.gopher_min_words:
        return reason, scores
    reason = _quality_reason(text, codes, stats, cjk, p) or _ngram_reason(codes, lens, len(text), p, 0 if cjk else 1)
    return reason, scores


@register
class TextRules(Operator):
    """The paper's heuristic rules plus Gopher quality/repetition on the chosen turns of each sample."""

    name = "text_rules"
    Params = TextRuleParams

    def __init__(self, **params):
        self.params = self.Params(**params)
        p = self.params
        self._zero_re = re.compile(f"0{{{p.max_zero_run + 1},}}") if p.max_zero_run is not None else None
        self._char_re = re.compile(rf"(\S)\1{{{p.max_char_run},}}") if p.max_char_run is not None else None

    def __call__(self, table: pa.Table) -> Verdict:
        texts = conversation_texts(table, self.params.turns)
        verdict = Verdict.keep_all(len(texts))
        decision = REJECT if self.params.action == "reject" else REVIEW
        names = ("word_count", "mean_word_len", "alpha_word_frac", "dup_line_frac", "dup_line_char_frac")
        cols = {k: np.zeros(len(texts), np.float64) for k in names}
        for i, text in enumerate(texts):
            reason, scores = analyze(text, self.params, self._zero_re, self._char_re)
            for k in names:
                cols[k][i] = scores[k]
            if reason:
                verdict.flag(i, reason, decision)
        verdict.columns = {f"score_{k}": v for k, v in cols.items()}
        return verdict
