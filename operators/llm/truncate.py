"""Cut over-long samples to the model's context, keeping the head and the tail (token-based).

Both ends matter to a rater: the head holds the question, the tail the final answer and where
degenerate looping shows. The middle is replaced by a visible marker so the model knows text is
missing (issue 5: "over-long samples are cut to the model's context keeping head and tail").
"""

from __future__ import annotations

MARKER = "\n[... middle of the sample omitted ...]\n"


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def truncate_middle(tokenizer, text: str, max_tokens: int, head_fraction: float = 0.5) -> tuple[str, bool]:
    """`text` cut to at most `max_tokens` tokens (marker included), or unchanged if it fits.

    Returns (text, truncated). Decoding token slices and re-encoding can merge tokens at the seams
    differently, so the result is re-measured and shrunk until it fits."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text, False
    marker_len = count_tokens(tokenizer, MARKER)
    keep = max_tokens - marker_len
    while keep > 0:
        head = int(keep * head_fraction)
        tail = keep - head
        cut = (
            tokenizer.decode(ids[:head], skip_special_tokens=False)
            + MARKER
            + (tokenizer.decode(ids[len(ids) - tail :], skip_special_tokens=False) if tail else "")
        )
        if count_tokens(tokenizer, cut) <= max_tokens:
            return cut, True
        keep -= max(1, keep // 50)
    raise ValueError(f"cannot fit any of the sample in {max_tokens} tokens")


def truncate_middle_chars(text: str, max_chars: int, head_fraction: float = 0.5) -> tuple[str, bool]:
    """Character-based variant for backends without a local tokenizer (OpenAI chat endpoint)."""
    if len(text) <= max_chars:
        return text, False
    keep = max(0, max_chars - len(MARKER))
    head = int(keep * head_fraction)
    tail = keep - head
    return text[:head] + MARKER + (text[len(text) - tail :] if tail else ""), True
