"""Length-sorted batches: prompts of similar length share a batch, so left padding wastes little."""

from __future__ import annotations


def length_sorted_batches(lengths: list[int], max_batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices of `lengths` grouped into batches, longest first (an out-of-memory shows up at once).

    A batch holds at most `max_batch_size` rows and at most `max_batch_tokens` padded tokens
    (rows x longest row); a single row longer than the token budget gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # sorted: the first row is the longest
        if current and (len(current) >= max_batch_size or (len(current) + 1) * width > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
