"""The cheap n-gram repetition screen InternVL runs on assistant turns before its LLM repetition detector
(InternVL 2.5 report, arXiv 2412.05271, §4.3 data filtering: repetitive samples; ratio of repeated 10-word
n-grams > 0.4).

Repetition ratio = share of all word n-grams whose n-gram occurs more than once in the text (the
Data-Juicer `word_repetition_filter` definition). Words are runs of letters/digits, lower-cased; in
Chinese/Japanese every Han/kana character is a word, so the check works without spaces. A model
stuck in a loop ("the cat sat on the mat. the cat sat on the mat. ...") scores near 1.0; normal
prose scores 0.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from operators.base import REJECT, REVIEW, Operator, Verdict, conversation_texts, register
from operators.dedup.minhash import TokenHasher
from operators.words import CODE_LINE_FRAC, HAN_KANA_RANGES, NGRAM_HASH_MIX, WORDLIKE_RE, is_code


def repetition_ratio_reference(text: str, n: int = 10) -> float:
    """The definition, plainly: fraction of the word n-grams of `text` that belong to an n-gram seen more
    than once (0 if < n words)."""
    words = WORDLIKE_RE.findall(text.lower())
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0.0
    return sum(c for c in counts.values() if c > 1) / len(grams)


def word_hasher() -> TokenHasher:
    """WORDLIKE_RE's words of the lower-cased text (runs of word chars, each Han/kana char alone), hashed
    in numpy over the batch's code points: no Python string per word (2.5x faster than findall + hash)."""
    return TokenHasher(re.compile(r"\w+"), HAN_KANA_RANGES, any_cjk=True)


def repetition_ratio(text: str, n: int = 10) -> float:
    """repetition_ratio_reference of one text (repetition_ratios)."""
    return float(repetition_ratios([text], n)[0])


def repetition_ratios(texts: list[str], n: int = 10, words: TokenHasher | None = None) -> np.ndarray:
    """repetition_ratio_reference of every text, on 64-bit n-gram hashes with numpy: words hashed (`words`,
    a word_hasher: its tables are built once per holder) and n-grams rolled for the whole batch at once,
    then one small sort per text (same values; a 64-bit hash collision inside one text, ~1e-15 per text,
    is the only way they could differ)."""
    ids, counts = (words or word_hasher()).token_hashes(texts)
    ratios = np.zeros(len(texts), np.float64)
    m = counts - n + 1  # n-grams per text
    total = len(ids)
    if not (m > 0).any():
        return ratios
    k = total - n + 1  # n-grams of the concatenation (those that cross into the next text are never read)
    h = ids[:k] * NGRAM_HASH_MIX
    for j in range(1, n):  # rolling: g_j = (g_{j-1} + id[i+j]) * MIX, wrapping modulo 2**64
        h = (h + ids[j : j + k]) * NGRAM_HASH_MIX
    ends = np.cumsum(counts).tolist()
    for i in np.flatnonzero(m > 0).tolist():  # text i's n-grams start at its words, up to n - 1 before its end
        srt = np.sort(h[ends[i] - int(counts[i]) : ends[i] - n + 1])  # (small sorts: faster than one of the batch)
        same = srt[1:] == srt[:-1]
        if same.any():
            dup = np.zeros(len(srt), bool)
            dup[1:] |= same
            dup[:-1] |= same
            ratios[i] = int(np.count_nonzero(dup)) / len(srt)
    return ratios


@register
class NgramRepetition(Operator):
    """Flags samples whose chosen turns repeat the same n-grams (a looping generation)."""

    name = "ngram_repetition"

    class Params(BaseModel):
        """Thresholds of the n-gram repetition screen."""

        model_config = ConfigDict(extra="forbid")
        turns: Literal["gpt", "human", "all"] = Field("gpt", description="which turns are checked")
        n: int = Field(10, ge=2, description="n-gram length in words (CJK: characters); InternVL uses 10")
        max_ratio: float = Field(0.4, description="flag when the repeated n-gram ratio exceeds this (InternVL: 0.4)")
        code_max_ratio: float | None = Field(
            None, description="the threshold for code (operators.words.is_code): listings repeat boilerplate; None = max_ratio"
        )
        action: Literal["review", "reject"] = Field(
            "review", description="review (paper §4.3: repetitive samples go to manual review) or reject"
        )

    words: TokenHasher | None = None  # the word hasher, built by setup()

    def setup(self) -> None:
        self.words = word_hasher()

    def ratios(self, texts: list[str]) -> np.ndarray:
        if self.words is None:  # (an operator used without setup())
            self.setup()
        return repetition_ratios(texts, self.params.n, self.words)

    def __call__(self, table: pa.Table) -> Verdict:
        p = self.params
        texts = conversation_texts(table, p.turns)
        ratios = self.ratios(texts)
        verdict = Verdict.keep_all(len(ratios), {"score_ngram_repetition": ratios})
        decision = REJECT if p.action == "reject" else REVIEW
        over = ratios > p.max_ratio
        if p.code_max_ratio is not None:  # only the texts over max_ratio need the code check
            for i in np.flatnonzero(over):
                over[i] = ratios[i] > (p.code_max_ratio if is_code(texts[i], CODE_LINE_FRAC) else p.max_ratio)
        for i in np.flatnonzero(over):
            verdict.flag(int(i), "repeated_ngrams", decision)
        return verdict
