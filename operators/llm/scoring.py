"""Reading a 0-10 score distribution from one forward pass (shared by every backend).

The prompt ends where the assistant's answer starts, so the next-token distribution at that
position says how likely each score is. Digits are usually their own tokens (Qwen2.5, SmolLM2,
Llama 3 split numbers digit-wise or keep 0-9 whole), but "10" is then two tokens, "1" then "0".

Exact two-token "10" (why a second step is needed and what it computes)
-----------------------------------------------------------------------
With digit-wise tokens the first answer token "1" starts the answers "1", "10", "11".."19".
So P(first token = "1") is the mass of all of them, not of score 1. One more step on the "1"
branch splits it exactly:

    P(score = 10) = P("1") * P("0" | "1")
    P(score = 1)  = P("1") * (1 - sum_d P(d | "1"))     d over the ten digits: "1" then a non-digit
                                                         (end of turn, newline, "/10", ".") is "1"
    P("1") * sum_{d=1..9} P(d | "1")                    = "11".."19": out of range, dropped

We do not read P(<end> | "1") alone: models often follow the number with "\n", "." or "/10", all
of which still mean "1". The transformers backend gets both steps from one pass by appending "1"
to the prompt: causal attention means the logits at the prompt's last position do not see the
appended token, and the logits at the appended position are P(. | "1"). vLLM and OpenAI backends
ask for the second step as a second request whose prefix is cached.

The distribution over 0..10 is renormalised over the valid scores (its unnormalised total is
kept as `mass`: how much of the model's answer went to a score at all). From it: expected value
(the score column), argmax, and the full distribution.

Where even single digits are not single tokens (a tokenizer that splits or merges them with the
preceding text in ways we cannot read), the backends fall back to a short greedy generation and
parse the first integer (`parse_score`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

N_SCORES = 11  # 0..10
SCORES = np.arange(N_SCORES, dtype=np.float64)
SCORES.setflags(write=False)  # a constant
SINGLE, TWO_STEP, GENERATE = "single", "two_step", "generate"


class ScoringError(RuntimeError):
    """A row could not be scored (its row goes to review with this message)."""


@dataclass
class ScoreResult:
    expected: float  # expected score under `dist`: the score column
    argmax: int  # most likely score
    dist: list[float]  # P(score = s), s = 0..10, sums to 1
    mass: float  # unnormalised probability the model put on valid scores (1.0 for parsed text)
    error: str | None = None  # set when scoring failed; the other fields are NaN/-1/[]
    prompt_tokens: int = 0  # tokens in the prompt as scored (after truncation)
    truncated: bool = False  # the sample text was cut to fit the context
    approx: str | None = None  # None: exact distribution; else what approximated it (e.g. "top5")

    @classmethod
    def failed(cls, message: str, prompt_tokens: int = 0) -> ScoreResult:
        return cls(math.nan, -1, [], math.nan, error=message, prompt_tokens=prompt_tokens)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ScoreTokens:
    """Which token ids carry the scores for one tokenizer and prompt format."""

    mode: str  # SINGLE: "0".."10" are each one token; TWO_STEP: "10" = "1" "0"; GENERATE: neither
    first_ids: tuple[int, ...] = ()  # id of score s's (first) token, s = 0..10 (-1 for 10 in TWO_STEP)
    after_one_ids: tuple[int, ...] = field(default=())  # TWO_STEP: ids of "0".."9" following "1"

    @property
    def one_id(self) -> int:
        return self.first_ids[1]


def find_score_tokens(tokenizer, prefix: str) -> ScoreTokens:
    """Work out how `tokenizer` writes the scores right after `prefix` (a rendered prompt).

    Encoding prefix+answer and removing the prefix's ids gives the answer's ids as the model would
    produce them in this position (leading-space variants of sentencepiece tokenizers included)."""

    def answer_ids(answer: str) -> list[int] | None:
        base = tokenizer.encode(prefix, add_special_tokens=False)
        full = tokenizer.encode(prefix + answer, add_special_tokens=False)
        if full[: len(base)] != base:
            return None  # the answer merged with the end of the prefix: cannot read it by position
        return full[len(base) :]

    digits = [answer_ids(str(s)) for s in range(10)]
    if any(d is None or len(d) != 1 for d in digits):
        return ScoreTokens(GENERATE)
    first = [d[0] for d in digits]
    if len(set(first)) != 10:
        return ScoreTokens(GENERATE)
    ten = answer_ids("10")
    if ten is not None and len(ten) == 1 and ten[0] not in first:
        return ScoreTokens(SINGLE, tuple(first + ten))
    after = [answer_ids(f"1{d}") for d in range(10)]
    if ten is None or ten[0] != first[1] or any(a is None or len(a) != 2 or a[0] != first[1] for a in after):
        return ScoreTokens(GENERATE)
    return ScoreTokens(TWO_STEP, tuple(first + [-1]), tuple(a[1] for a in after))


def combine(first: np.ndarray, after_one: np.ndarray | None, mode: str) -> tuple[np.ndarray, float]:
    """Scores' probabilities from the first-step token probabilities (`first[s]` = P(token of s),
    length 11) and, in TWO_STEP mode, the digits' probabilities after "1" (`after_one`, length 10).

    Returns (distribution over 0..10 summing to 1, unnormalised mass). `after_one=None` in
    TWO_STEP mode means the "1" branch was not expanded, which is exact only when P("1") = 0.
    Raises ScoringError when no valid score has any probability."""
    q = np.array(first, dtype=np.float64)
    if mode == TWO_STEP:
        p_one = q[1]
        if after_one is None:
            if p_one > 0:
                raise ScoringError("two-step score: the '1' branch was not expanded")
            q[10] = 0.0
        else:
            a = np.asarray(after_one, dtype=np.float64)
            q[1] = p_one * max(0.0, 1.0 - float(a.sum()))  # "1" followed by a non-digit
            q[10] = p_one * a[0]  # "1" then "0"
    mass = float(q.sum())
    if not mass > 0 or not math.isfinite(mass):
        raise ScoringError("the model put no probability on any score 0-10")
    return q / mass, mass


def result_from_dist(
    dist: np.ndarray, mass: float, prompt_tokens: int = 0, truncated: bool = False, approx: str | None = None
) -> ScoreResult:
    return ScoreResult(
        approx=approx,
        expected=float(np.dot(dist, SCORES)),
        argmax=int(np.argmax(dist)),
        dist=[float(x) for x in dist],
        mass=mass,
        prompt_tokens=prompt_tokens,
        truncated=truncated,
    )


def score_from_probs(
    first: np.ndarray, after_one: np.ndarray | None, tokens: ScoreTokens, **info
) -> ScoreResult:
    """`combine` + summary, turning a ScoringError into a failed result."""
    try:
        dist, mass = combine(first, after_one, tokens.mode)
    except ScoringError as e:
        return ScoreResult.failed(str(e), info.get("prompt_tokens", 0))
    return result_from_dist(dist, mass, **info)


def probs_at(logprobs: dict[int, float], ids: tuple[int, ...]) -> np.ndarray:
    """Probabilities of `ids` from a sparse {token_id: logprob} map (top-k logprobs); a token
    outside the top-k counts as 0 (its true value is below the k-th probability)."""
    return np.array([math.exp(logprobs[i]) if i in logprobs else 0.0 for i in ids], dtype=np.float64)


_SCORE_RE = re.compile(r"(?<!\d)(10|[0-9])(?!\d)")


def parse_score(text: str) -> int | None:
    """The first integer 0-10 standing alone in a generated answer ("7", "Score: 8/10" -> 8)."""
    m = _SCORE_RE.search(text or "")
    return int(m.group(1)) if m else None


def result_from_text(text: str, prompt_tokens: int = 0, truncated: bool = False) -> ScoreResult:
    """Generation fallback: a parsed score is a one-hot distribution."""
    s = parse_score(text)
    if s is None:
        return ScoreResult.failed(f"no score 0-10 in the model's answer {text[:60]!r}", prompt_tokens)
    dist = np.zeros(N_SCORES)
    dist[s] = 1.0
    return result_from_dist(dist, 1.0, prompt_tokens, truncated)
