"""The OpenAI-compatible HTTP backend (`vllm serve`, SGLang, llama.cpp's server, ...), stdlib only.

Two endpoints:
- `completions` (default, exact): the prompt is rendered locally with the model's chat template
  (`tokenizer` / `model` must name a loadable tokenizer), sent to `/completions` with
  `max_tokens=1, logprobs=k`; where "10" is two tokens a second request with "1" appended
  expands the "1" branch exactly (scoring.py). Truncation is token-based.
- `chat`: `/chat/completions` with `logprobs: true, top_logprobs: k, max_tokens: 2`. The server
  applies the template, so no local tokenizer is needed, but the "1" branch can only be read when
  the greedy first token is "1"; otherwise P("1") is taken as P(score 1) (an approximation,
  documented in the result's absence of a second step). Truncation is by characters.

Token strings are matched to scores by their stripped text ("7", " 7" -> 7), so no token ids are
needed. Requests run `concurrency` at a time; connection errors, 429 and 5xx are retried with
exponential backoff; a row whose request still fails gets a failed result (-> review).

Tests run it against a real server only when IVL_OPENAI_URL is set, e.g. with
`python -m llama_cpp.server --model <SmolLM2 .gguf>` (pip install llama-cpp-python).
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backends import BackendConfig, ScoringBackend, resolve_model
from .prompts import build_messages, render_chat
from .scoring import SINGLE, TWO_STEP, ScoreResult, ScoreTokens, score_from_probs
from .truncate import truncate_middle, truncate_middle_chars

CHARS_PER_TOKEN = 3  # conservative for the character budget of the chat endpoint


def completions_body(model: str, prompt: str, top_logprobs: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": top_logprobs}


def chat_body(model: str, messages: list[dict], top_logprobs: int) -> dict:
    return {
        "model": model,
        "messages": messages,
        "max_tokens": 2,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": top_logprobs,
    }


def completion_top(response: dict) -> dict[str, float]:
    """{token string: logprob} at the first generated position of a /completions response
    (`choices[0].logprobs.top_logprobs[0]`, the legacy OpenAI format vLLM and llama.cpp return)."""
    lp = response["choices"][0].get("logprobs") or {}
    tops = lp.get("top_logprobs") or []
    if not tops or tops[0] is None:
        raise ValueError("response has no top_logprobs")
    return {str(k): float(v) for k, v in tops[0].items()}


def chat_tops(response: dict) -> list[tuple[str, dict[str, float]]]:
    """Per generated position of a /chat/completions response: (chosen token, {token: logprob})."""
    content = ((response["choices"][0].get("logprobs") or {}).get("content")) or []
    if not content:
        raise ValueError("response has no logprobs.content")
    return [
        (c["token"], {t["token"]: float(t["logprob"]) for t in c.get("top_logprobs") or []}) for c in content
    ]


def digit_probs(top: dict[str, float], labels: range) -> np.ndarray:
    """Probability of each label's text, summing tokens that differ only by whitespace."""
    p = np.zeros(len(labels))
    for tok, lp in top.items():
        s = tok.strip()
        if s.isdigit() and int(s) in labels and str(int(s)) == s:
            p[int(s) - labels.start] += math.exp(lp)
    return p


class OpenAIBackend(ScoringBackend):
    def __init__(self, cfg: BackendConfig) -> None:
        if not cfg.url:
            raise ValueError("the openai backend needs `url` (e.g. http://localhost:8000/v1)")
        self.cfg = cfg
        self.url = cfg.url.rstrip("/")
        self.api_key = os.environ.get(cfg.api_key_env, "")
        self.tokenizer = None
        if cfg.endpoint == "completions":
            from transformers import AutoTokenizer

            ref, gguf = resolve_model(cfg.tokenizer or cfg.model, cfg.gguf_file)
            self.tokenizer = AutoTokenizer.from_pretrained(ref, **({"gguf_file": gguf} if gguf else {}))
        self.two_step = (
            self.tokenizer is not None and len(self.tokenizer.encode("10", add_special_tokens=False)) == 2
        )

    # -- HTTP ---------------------------------------------------------------------------------
    def post(self, path: str, body: dict) -> dict:
        """POST JSON with retries on connection errors, 429 and 5xx (exponential backoff)."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        delay = 0.5
        for attempt in range(self.cfg.retries + 1):
            req = urllib.request.Request(f"{self.url}/{path}", data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500 or attempt == self.cfg.retries:
                    raise RuntimeError(f"HTTP {e.code} from {path}: {e.read()[:200]!r}") from e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.cfg.retries:
                    raise RuntimeError(f"{path}: {e}") from e
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    # -- one sample ---------------------------------------------------------------------------
    def _prompt(self, template: str, sample: str) -> tuple[str, bool]:
        empty = render_chat(self.tokenizer, build_messages(template, ""))
        budget = self.cfg.max_prompt_tokens - 1 - len(self.tokenizer.encode(empty, add_special_tokens=False))
        text, truncated = truncate_middle(self.tokenizer, sample, budget)
        return render_chat(self.tokenizer, build_messages(template, text)), truncated

    def score_one(self, template: str, sample: str) -> ScoreResult:
        try:
            if self.cfg.endpoint == "completions":
                return self._score_completions(template, sample)
            return self._score_chat(template, sample)
        except Exception as e:  # noqa: BLE001 - the row goes to review with this message
            return ScoreResult.failed(f"{type(e).__name__}: {e}")

    def _score_completions(self, template: str, sample: str) -> ScoreResult:
        prompt, truncated = self._prompt(template, sample)
        resp = self.post("completions", completions_body(self.cfg.model, prompt, self.cfg.top_logprobs))
        n_prompt = int((resp.get("usage") or {}).get("prompt_tokens", 0))
        top = completion_top(resp)
        first = digit_probs(top, range(11))
        after = None
        if self.two_step:
            first[10] = 0.0  # "10" is "1" "0" for this tokenizer: read through the second step
            if first[1] > 0:
                more = self.post(
                    "completions", completions_body(self.cfg.model, prompt + "1", self.cfg.top_logprobs)
                )
                after = digit_probs(completion_top(more), range(10))
        mode = TWO_STEP if self.two_step else SINGLE
        return _score(first, after, mode, n_prompt, truncated)

    def _score_chat(self, template: str, sample: str) -> ScoreResult:
        text, truncated = truncate_middle_chars(sample, self.cfg.max_prompt_tokens * CHARS_PER_TOKEN)
        resp = self.post(
            "chat/completions",
            chat_body(self.cfg.model, build_messages(template, text), self.cfg.top_logprobs),
        )
        n_prompt = int((resp.get("usage") or {}).get("prompt_tokens", 0))
        steps = chat_tops(resp)
        chosen, top = steps[0]
        first = digit_probs(top, range(11))
        if chosen.strip() == "1" and len(steps) > 1 and first[10] == 0:
            return _score(first, digit_probs(steps[1][1], range(10)), TWO_STEP, n_prompt, truncated)
        return _score(first, None, SINGLE, n_prompt, truncated)

    def score(self, template: str, samples: list[str]) -> list[ScoreResult]:
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(lambda s: self.score_one(template, s), samples))


def _score(first, after, mode, n_prompt, truncated) -> ScoreResult:
    return score_from_probs(first, after, ScoreTokens(mode), prompt_tokens=n_prompt, truncated=truncated)
