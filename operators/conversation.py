"""InternVL conversations: turn normalisation and the `<image>` placeholder rule, defined once.

Ingest (pipeline/readers.py), the structure operator (operators/image_checks.py), the tokenizer
(model/tokenizer.py) and pack all call these functions, so a sample one accepts the others accept.

The rule, as InternVL's `internvl_chat` trains it (OpenGVLab/InternVL,
`internvl_chat/internvl/train/internvl_chat_finetune.py` and `internvl/train/dataset.py`):
- **Which turns count**: only `human` turns. `preprocess_internvl2_5` replaces `<image>` by image tokens
  in human turns alone; a `<image>` in a `system` or `gpt` turn would stay literal text, so here it is a
  mismatch (the image it points at would never be shown).
- **Single-image prepend**: a sample with exactly one image and no `<image>` gets `"<image>\\n"` in front
  of its first human turn (`multi_modal_get_item`: `'<image>\\n' + conversations[0]['value']`).
  InternVL tests `conversations[0]` only; here the first *human* turn gets it (a leading system turn
  would otherwise swallow it and fail InternVL's own assert), and only when no human turn has one
  (InternVL would add a second, left as literal text). Several images never get a prepend.
- **Mismatch**: human-turn placeholders != images after the prepend. InternVL asserts only
  "fewer than images" (extras stay text); here both ways are a mismatch, so no `<image>` is literal.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "human", "gpt")
MESSAGE_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}  # OpenAI/TRL role -> InternVL


class ConversationProblem(StrEnum):
    """Why turns are not an InternVL conversation; the value is the reject rule ingest writes."""

    EMPTY = "empty_conversation"
    MALFORMED = "malformed_conversation"  # not a list of {from: str, value: str}
    UNKNOWN_ROLE = "unknown_role"
    NO_ANSWER = "no_gpt_turn"
    IMAGE_COUNT_MISMATCH = "image_count_mismatch"


def normalise_turns(conv) -> tuple[list[dict], ConversationProblem | None]:
    """(turns as fresh `{from, value}` dicts, None), or ([], the problem) when `conv` is not a non-empty
    list of turns with known roles and at least one `gpt` answer. Extra turn keys are dropped."""
    if not isinstance(conv, list) or not conv:
        return [], ConversationProblem.EMPTY
    turns = []
    for t in conv:
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            return [], ConversationProblem.MALFORMED
        if t["from"] not in ROLES:
            return [], ConversationProblem.UNKNOWN_ROLE
        turns.append({"from": t["from"], "value": t["value"]})
    if not any(t["from"] == "gpt" for t in turns):
        return [], ConversationProblem.NO_ANSWER
    return turns, None


def count_placeholders(turns: Sequence[dict]) -> int:
    """`<image>` placeholders in human turns (the only ones InternVL turns into image tokens)."""
    return sum((t.get("value") or "").count(IMAGE_PLACEHOLDER) for t in turns if t.get("from") == "human")


def stray_placeholders(turns: Sequence[dict]) -> int:
    """`<image>` placeholders outside human turns (system, gpt): never image tokens, so always a mismatch."""
    return sum((t.get("value") or "").count(IMAGE_PLACEHOLDER) for t in turns if t.get("from") != "human")


def place_images(turns: Sequence[dict], n_images: int) -> tuple[list[dict], ConversationProblem | None]:
    """Apply the single-image prepend and check the count: (turns, None) with exactly `n_images`
    placeholders, all in human turns, or (turns, IMAGE_COUNT_MISMATCH).

    The input is never modified: a prepend returns a new list whose first human turn is a copy."""
    out = list(turns)
    if stray_placeholders(out):
        return out, ConversationProblem.IMAGE_COUNT_MISMATCH
    found = count_placeholders(out)
    if n_images == 1 and found == 0:
        k = next((k for k, t in enumerate(out) if t.get("from") == "human"), None)
        if k is None:
            return out, ConversationProblem.IMAGE_COUNT_MISMATCH
        out[k] = {**out[k], "value": f"{IMAGE_PLACEHOLDER}\n{out[k].get('value') or ''}"}
        found = 1
    return out, (None if found == n_images else ConversationProblem.IMAGE_COUNT_MISMATCH)


def check_conversation(conv, n_images: int) -> tuple[list[dict], ConversationProblem | None]:
    """`normalise_turns` then `place_images`: the whole check ingest applies to every record."""
    turns, problem = normalise_turns(conv)
    if problem:
        return [], problem
    turns, problem = place_images(turns, n_images)
    return ([], problem) if problem else (turns, None)
