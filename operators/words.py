"""Words, lines and code detection shared by the text operators (text_rules, ngram_repetition).

A word-like token is a run of letters/digits, or one Han/kana character alone (Chinese and Japanese are
written without spaces). Word n-grams are hashed as 64-bit integers with `NGRAM_HASH_MIX`.
"""

from __future__ import annotations

import re

import numpy as np

HAN_KANA_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF))  # (Hangul is spaced)
CJK_CHARS = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in HAN_KANA_RANGES)  # Han and kana, as a regex class
WORDLIKE_RE = re.compile(rf"[{CJK_CHARS}]|[^\W{CJK_CHARS}]+")  # runs of letters/digits; a CJK char alone
NGRAM_HASH_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the rolling n-gram hash
CODE_LINE_FRAC = 0.5  # default share of code-laid-out lines that makes a text code
# a line laid out as code: indented, a REPL or shell prompt, a comment, or ending in code punctuation
CODE_LINE_RE = re.compile(r"^(?:    |\t|>>>|\.\.\.|\$ |#|//)|[{}();:,\[\]\\=]\s*$")
_CODE_LINE_START = ("    ", "\t", ">>>", "...", "$ ", "#", "//")  # CODE_LINE_RE as str methods (3x faster)
_CODE_LINE_END = frozenset("{}();:,[]\\=")


def nonempty_lines(text: str) -> list[str]:
    """Non-empty lines (a blank line is no line of content)."""
    return [ln for ln in text.split("\n") if ln.strip()]


def is_code(text: str, code_line_frac: float | None = CODE_LINE_FRAC) -> bool:
    """Code or a code listing: at least `code_line_frac` of 3+ non-empty lines are laid out as code
    (None: never code)."""
    if code_line_frac is None or text.count("\n") < 2:
        return False
    return is_code_lines(nonempty_lines(text), code_line_frac)


def is_code_lines(lines: list[str], code_line_frac: float | None = CODE_LINE_FRAC) -> bool:
    """is_code given the text's non-empty lines (callers that split the lines already)."""
    if code_line_frac is None or len(lines) < 3:
        return False
    return sum(1 for ln in lines if is_code_line(ln)) >= code_line_frac * len(lines)


def is_code_line(line: str) -> bool:
    """CODE_LINE_RE.search(line) for a non-empty line (no newline), with str methods."""
    return line.startswith(_CODE_LINE_START) or line.rstrip()[-1:] in _CODE_LINE_END
