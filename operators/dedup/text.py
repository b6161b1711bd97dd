"""Text normalisation and tokenisation shared by exact and MinHash dedup.

Normalisation follows the FineWeb/text-dedup convention: lowercase, punctuation to spaces, whitespace
collapsed, so copies that differ only in case, spacing or punctuation hash the same. Tokens are
words; every CJK character is a token of its own, so CJK text gets character n-grams while mixed
text keeps words for the Latin parts.
"""

from __future__ import annotations

import re

# Every non-word character (and "_", which \w keeps) becomes a space: punctuation never splits a match.
_PUNCT = re.compile(r"[^\w\s]|_")
# Han, kana, hangul and CJK compatibility blocks: scripts written without spaces between words.
CJK_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xAC00, 0xD7AF))
_CJK_CLASS = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in CJK_RANGES)
_HAS_CJK = re.compile(f"[{_CJK_CLASS}]")
_CJK_TOKENS = re.compile(f"[{_CJK_CLASS}]|[^\\s{_CJK_CLASS}]+")


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, runs of whitespace to one space, trimmed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def tokens(text: str) -> list[str]:
    """The tokens of the normalised text: words, and single characters for CJK scripts.

    The reference tokeniser; minhash.token_hashes is the vectorised one and yields the same tokens."""
    norm = _PUNCT.sub(" ", text.lower())
    if _HAS_CJK.search(norm):
        return _CJK_TOKENS.findall(norm)
    return norm.split()

