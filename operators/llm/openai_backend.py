"""The OpenAI-compatible HTTP backend (`vllm serve`, llama.cpp's server, OpenAI, ...), stdlib only.

Two endpoints:
- `completions` (default): the prompt is built locally as token ids (the same literal-sample splice
  as the local backends, backends.py), so the server adds no BOS and parses no special token
  from the sample, and sent as a token array with `max_tokens: 1`. Where "10" is two tokens, a
  second request with "1" appended reads P(digit | "1") (scoring.py).
- `chat`: `/chat/completions`; the server applies the template (no local tokenizer needed).

How exact the distribution is depends on the server (`server:`):
- `vllm`: `logprob_token_ids` asks for exactly the score tokens, `return_tokens_as_token_ids` keys
  them by id, `add_special_tokens: false` keeps a second BOS out; on `chat` the "1" branch is a
  second request that continues an assistant message "1" (`continue_final_message`). Exact.
- anything else: the top `top_logprobs` per position (capped at 5 for `openai`, its legacy limit).
  A score token outside that cut counts as 0, and the row's `approx` column says `top<k>`. On
  `chat` without continuation the "1" branch is read only where the greedy answer starts with "1";
  elsewhere P("1") is left out of the distribution (not counted as score 1) and `approx` says so.
Both response formats are read: legacy `logprobs.top_logprobs[0]` ({token: logprob}) and
`logprobs.content[0].top_logprobs` ([{token, logprob}], llama.cpp's server and the chat API).

Failures: the server is probed at start (`check_server`): 401/403/404 or no answer raise there,
so a bad URL, key or model fails the job before any row. During the job 429/5xx/connection errors
are retried (`Retry-After` honoured, with jitter); when retries run out the exception propagates,
so the shard fails with no marker and a rerun scores its rows. A malformed answer fails its row.
Connections are kept alive, one per worker thread.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backends import BackendConfig, TokenizedBackend, escape_delimiters, resolve_model
from .prompts import build_messages
from .scoring import SINGLE, TWO_STEP, ScoreResult, ScoreTokens, score_from_probs
from .truncate import truncate_middle_chars

CHARS_PER_TOKEN = 3  # conservative for the character budget of the chat endpoint
LEGACY_CAP = {"openai": 5}  # OpenAI's /completions refuses logprobs > 5 (400 on every row)
MAX_BACKOFF_S = 30.0


class ServerError(RuntimeError):
    """The server cannot serve this job (bad URL/key/model, or down after retries): fail, never review."""


def top_logprobs(response: dict) -> list[dict[str, float]]:
    """Per generated position, {token: logprob} from either response format."""
    lp = response["choices"][0].get("logprobs") or {}
    if lp.get("content"):  # chat API, llama.cpp's server: content[i].top_logprobs = [{token, logprob}]
        return [{t["token"]: float(t["logprob"]) for t in c.get("top_logprobs") or []} for c in lp["content"]]
    tops = lp.get("top_logprobs") or []
    if not tops or tops[0] is None:
        raise ValueError("response has no top_logprobs")
    return [{str(k): float(v) for k, v in (t or {}).items()} for t in tops]


def chosen_tokens(response: dict) -> list[str]:
    lp = response["choices"][0].get("logprobs") or {}
    if lp.get("content"):
        return [c["token"] for c in lp["content"]]
    return list(lp.get("tokens") or [])


def digit_probs(top: dict[str, float], labels: range) -> np.ndarray:
    """Probability of each label's text, summing tokens that differ only by whitespace."""
    p = np.zeros(len(labels))
    for tok, lp in top.items():
        s = tok.strip()
        if s.isdigit() and int(s) in labels and str(int(s)) == s:
            p[int(s) - labels.start] += math.exp(lp)
    return p


def id_probs(top: dict[str, float], ids) -> np.ndarray:
    """Probabilities of token ids from a map keyed `token_id:<id>` (vLLM's return_tokens_as_token_ids)."""
    by_id = {int(k.split(":", 1)[1]): v for k, v in top.items() if k.startswith("token_id:")}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"the server returned no logprob for requested token ids {missing[:5]}")
    return np.exp(np.array([by_id[i] for i in ids], dtype=np.float64))


def retry_delay(attempt: int, retry_after: str | None, rng: random.Random) -> float:
    """Seconds before retry `attempt` (0-based): the server's Retry-After plus up to 20% jitter (so
    a pool of workers does not return at the same instant), else capped exponential full jitter."""
    if retry_after:
        try:
            wait = float(retry_after)
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                wait = parsedate_to_datetime(retry_after).timestamp() - time.time()
            except (TypeError, ValueError):
                wait = 1.0
        wait = max(0.0, wait)
        return wait + rng.uniform(0, 0.2 * wait + 0.05)
    return rng.uniform(0, min(MAX_BACKOFF_S, 0.5 * 2**attempt))


class HTTPClient:
    """JSON over keep-alive connections, one per thread; retries on 429, 5xx and connection errors."""

    def __init__(self, url: str, api_key: str, timeout_s: float, retries: int) -> None:
        u = urllib.parse.urlsplit(url.rstrip("/"))
        self.scheme, self.host, self.base = u.scheme, u.netloc, u.path
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s, self.retries = timeout_s, retries
        self.local = threading.local()
        self.rng = random.Random(0)
        self.connections_opened = 0  # how many TCP connections this client made (reuse check)
        self.requests_sent = 0

    def _conn(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = self.local.conn = cls(self.host, timeout=self.timeout_s)
            self.connections_opened += 1
        return conn

    def _send(self, method: str, path: str, data: bytes | None, fresh: bool) -> http.client.HTTPResponse:
        reused = not fresh and getattr(self.local, "conn", None) is not None
        conn = self._conn(fresh=fresh)
        self.requests_sent += 1
        try:
            conn.request(method, f"{self.base}/{path}", body=data, headers=self.headers)
            return conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            if not reused:
                raise
            # the server closed an idle kept-alive connection (uvicorn: after 5 s): reconnect once
            conn = self._conn(fresh=True)
            conn.request(method, f"{self.base}/{path}", body=data, headers=self.headers)
            return conn.getresponse()

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        last = ""
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                resp = self._send(method, path, data, fresh=attempt > 0)
                payload = resp.read()
                if resp.status == 200:
                    return json.loads(payload)
                last = f"HTTP {resp.status} from {path}: {payload[:200]!r}"
                if resp.status != 429 and resp.status < 500:
                    raise RequestError(resp.status, last)
                retry_after = resp.getheader("Retry-After")
            except (OSError, http.client.HTTPException) as e:
                last = f"{path}: {type(e).__name__}: {e}"
                self.local.conn = None
            if attempt < self.retries:
                time.sleep(retry_delay(attempt, retry_after, self.rng))
        raise ServerError(f"{last} (after {self.retries + 1} attempts)")


class RequestError(RuntimeError):
    """A 4xx answer other than 429: the request itself is refused."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class OpenAIBackend(TokenizedBackend):
    def __init__(self, cfg: BackendConfig) -> None:
        super().__init__()
        if not cfg.url:
            raise ValueError("the openai backend needs `url` (e.g. http://localhost:8000/v1)")
        self.cfg = cfg
        self.max_prompt_tokens = cfg.max_prompt_tokens
        self.http = HTTPClient(cfg.url, os.environ.get(cfg.api_key_env, ""), cfg.timeout_s, cfg.retries)
        self.exact = cfg.server == "vllm"
        self.k = min(cfg.top_logprobs, LEGACY_CAP.get(cfg.server, 20))
        self.pool = ThreadPoolExecutor(max_workers=cfg.concurrency)  # long-lived: its threads keep their connections
        self.tokenizer = None
        if cfg.endpoint == "completions":
            from transformers import AutoTokenizer

            ref, gguf = resolve_model(cfg.tokenizer or cfg.model, cfg.gguf_file)
            self.tokenizer = AutoTokenizer.from_pretrained(ref, **({"gguf_file": gguf} if gguf else {}))
        self.check_server()

    @property
    def served_model(self) -> str:
        return self.cfg.served_model or self.cfg.model

    def check_server(self) -> None:
        """Fail at start, with one line, when the URL, key or model is wrong or nothing answers."""
        try:
            models = self.http.request("GET", "models")
        except RequestError as e:
            hint = {401: "bad or missing API key", 403: "key not allowed", 404: "wrong URL"}.get(e.status, "")
            raise ServerError(f"{self.cfg.url}: {e} {hint}".strip()) from None
        names = [m.get("id") for m in models.get("data") or []]
        if names and self.served_model not in names:
            raise ServerError(f"{self.cfg.url} does not serve model {self.served_model!r} (it serves {names[:5]})")

    # -- completions ---------------------------------------------------------------------------
    def completion_body(self, ids: list[int], want: list[int]) -> dict:
        body = {"model": self.served_model, "prompt": ids, "max_tokens": 1, "temperature": 0.0}
        if self.exact:
            # vLLM requires `logprobs` set alongside the ids (and then returns exactly the ids)
            body.update(logprob_token_ids=want, logprobs=1, return_tokens_as_token_ids=True, add_special_tokens=False)
        else:
            body["logprobs"] = self.k
        return body

    def step_probs(self, ids: list[int], want, labels: range) -> tuple[np.ndarray, int]:
        resp = self.http.request("POST", "completions", self.completion_body(ids, list(want)))
        top = top_logprobs(resp)[0]
        n_prompt = int((resp.get("usage") or {}).get("prompt_tokens", 0))
        return (id_probs(top, want) if self.exact else digit_probs(top, labels)), n_prompt

    def score_ids(self, ids_list: list[list[int]], tokens: ScoreTokens) -> list[ScoreResult]:
        return list(self.pool.map(lambda ids: self._score_completion(ids, tokens), ids_list))

    def _score_completion(self, ids: list[int], tokens: ScoreTokens) -> ScoreResult:
        approx = None if self.exact else f"top{self.k}"
        try:
            if tokens.mode == TWO_STEP:
                first, n_prompt = self.step_probs(ids, tokens.first_ids[:10], range(10))
                after, _ = self.step_probs(ids + [tokens.one_id], tokens.after_one_ids, range(10))
                return score_from_probs(np.append(first, 0.0), after, tokens, prompt_tokens=n_prompt, approx=approx)
            if tokens.mode == SINGLE:
                first, n_prompt = self.step_probs(ids, tokens.first_ids, range(11))
                return score_from_probs(first, None, tokens, prompt_tokens=n_prompt, approx=approx)
            raise ValueError("this tokenizer does not write scores as digit tokens: use the vllm backend")
        except (ValueError, KeyError, IndexError, RequestError) as e:  # this row's answer only
            return ScoreResult.failed(f"{type(e).__name__}: {e}", len(ids))

    # -- chat ----------------------------------------------------------------------------------
    def score(self, template: str, samples: list[str]) -> list[ScoreResult]:
        if self.cfg.endpoint == "completions":
            return super().score(template, samples)
        return list(self.pool.map(lambda s: self._score_chat(template, s), samples))

    def chat_body(self, messages: list[dict], continue_answer: bool = False) -> dict:
        body = {"model": self.served_model, "messages": messages, "max_tokens": 1 if continue_answer else 2,
                "temperature": 0.0, "logprobs": True, "top_logprobs": min(self.cfg.top_logprobs, 20)}
        if continue_answer:  # vLLM: the assistant turn "1" is continued, not closed
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body

    def _score_chat(self, template: str, sample: str) -> ScoreResult:
        text, truncated = truncate_middle_chars(escape_delimiters(sample), self.cfg.max_prompt_tokens * CHARS_PER_TOKEN)
        messages = build_messages(template, text)
        try:
            resp = self.http.request("POST", "chat/completions", self.chat_body(messages))
            n_prompt = int((resp.get("usage") or {}).get("prompt_tokens", 0))
            steps, chosen = top_logprobs(resp), chosen_tokens(resp)
            first = digit_probs(steps[0], range(11))
            k = f"top{min(self.cfg.top_logprobs, 20)}"
            if first[10] > 0:  # "10" is one token for this model: every score is one token
                return _score(first, None, SINGLE, n_prompt, truncated, k)
            if self.exact:  # continue the answer "1" to split P("1") into 1 / 10 / 11..19
                more = self.http.request(
                    "POST", "chat/completions",
                    self.chat_body(messages + [{"role": "assistant", "content": "1"}], continue_answer=True))
                after = digit_probs(top_logprobs(more)[0], range(10))
                return _score(first, after, TWO_STEP, n_prompt, truncated, k)
            if chosen and chosen[0].strip() == "1" and len(steps) > 1:
                return _score(first, digit_probs(steps[1], range(10)), TWO_STEP, n_prompt, truncated, k)
            first[1] = 0.0  # the "1" branch was not expanded: leave it out, never call it all score 1
            return _score(first, None, SINGLE, n_prompt, truncated, f"{k},one_branch_dropped")
        except (ValueError, KeyError, IndexError, RequestError) as e:
            return ScoreResult.failed(f"{type(e).__name__}: {e}")


def _score(first, after, mode, n_prompt, truncated, approx) -> ScoreResult:
    return score_from_probs(first, after, ScoreTokens(mode), prompt_tokens=n_prompt, truncated=truncated,
                            approx=approx)
