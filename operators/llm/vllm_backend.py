"""The vLLM backend: `vllm.LLM` in an actor of the curate runner's actor pool, one per GPU group.

Why an actor pool of `vllm.LLM` and not `ray.data.llm`'s vLLM processor: the LLM filters are
operators like every other one (a `Verdict` per batch: decisions, rules, score columns), and the
runner already runs model-holding operators as `map_batches` actor pools with `num_gpus` per actor
(operators/base.py: `needs_model`). Holding the engine inside the operator keeps one code path
for the three backends (prompts, truncation, score parsing and routing to review on failure are
shared), lets the two-token "10" read issue its dependent second request against the same engine
(whose prefix cache makes it nearly free), and keeps failures per row. The processor would be a
separate Dataset stage producing generated text, outside the operator contract and accounting.

Each actor asks Ray for `tensor_parallel_size` GPUs; Ray sets CUDA_VISIBLE_DEVICES to them and
vLLM's multiprocessing executor splits the model over exactly those (no nested placement groups).

vLLM API used (checked against vllm/logprobs.py and SamplingParams in vLLM >= 0.8):
`LLM.generate(prompts=[{"prompt_token_ids": [...]}], sampling_params=SamplingParams(max_tokens=1,
temperature=0, logprobs=k))` returns `RequestOutput`s whose `.outputs[0].logprobs` is a list (one
entry per generated token) of `dict[token_id, Logprob(logprob, rank, decoded_token)]` holding the
top-k tokens plus the sampled one. vLLM's V1 engine reports raw logprobs (before any sampling
processors), i.e. the model's own distribution.

Everything below except `VLLMBackend.__init__`/`_generate` is plain Python, unit-tested without vLLM.
"""

from __future__ import annotations

import os

import numpy as np

from .backends import BackendConfig, TokenizedBackend, resolve_model
from .scoring import (
    GENERATE,
    TWO_STEP,
    ScoreResult,
    ScoreTokens,
    probs_at,
    result_from_text,
    score_from_probs,
)

GENERATE_TOKENS = 4


def engine_kwargs(cfg: BackendConfig) -> dict:
    """Keyword arguments for `vllm.LLM` from the backend config."""
    model_ref, gguf_file = resolve_model(cfg.model, cfg.gguf_file)
    model = os.path.join(model_ref, gguf_file) if gguf_file else model_ref  # vLLM takes the .gguf path itself
    kw = dict(
        model=model,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_prompt_tokens + GENERATE_TOKENS,
        max_logprobs=cfg.top_logprobs,
        enable_prefix_caching=True,  # the "1"-branch request re-uses its prompt's KV cache
        seed=0,
    )
    if cfg.tokenizer:
        kw["tokenizer"] = cfg.tokenizer
    if cfg.dtype != "auto":
        kw["dtype"] = cfg.dtype
    if cfg.tensor_parallel_size > 1:
        kw["distributed_executor_backend"] = "mp"  # workers on this actor's GPUs, no extra Ray actors
    return kw


def sampling_kwargs(mode: str, top_logprobs: int) -> dict:
    """`SamplingParams` fields: one greedy token with its top-k logprobs, or a short greedy
    generation for the parsing fallback."""
    if mode == GENERATE:
        return dict(max_tokens=GENERATE_TOKENS, temperature=0.0)
    return dict(max_tokens=1, temperature=0.0, logprobs=top_logprobs, detokenize=False)


def build_requests(ids_list: list[list[int]], suffix: list[int] | None = None) -> list[dict]:
    """Token prompts (`vllm.inputs.TokensPrompt` is a TypedDict with this key)."""
    extra = suffix or []
    return [{"prompt_token_ids": list(ids) + extra} for ids in ids_list]


def logprob_map(step) -> dict[int, float]:
    """{token_id: logprob} from one position of `CompletionOutput.logprobs`.

    Values are `vllm.logprobs.Logprob` objects; plain floats and {"logprob": x} dicts (the same
    data after serialisation) are accepted too."""
    out = {}
    for tid, lp in (step or {}).items():
        if hasattr(lp, "logprob"):
            lp = lp.logprob
        elif isinstance(lp, dict):
            lp = lp["logprob"]
        out[int(tid)] = float(lp)
    return out


def first_step_logprobs(completion_logprobs) -> dict[int, float]:
    """The top-k map at the first generated position of a `CompletionOutput.logprobs`."""
    if not completion_logprobs:
        raise ValueError("the output carries no logprobs (SamplingParams.logprobs unset?)")
    return logprob_map(completion_logprobs[0])


def first_probs(top: dict[int, float], tokens: ScoreTokens) -> np.ndarray:
    """P(token of score s), s = 0..10, from a top-k map (0 for scores outside the top-k)."""
    if tokens.mode == TWO_STEP:
        return np.append(probs_at(top, tokens.first_ids[:10]), 0.0)
    return probs_at(top, tokens.first_ids)


def needs_second_step(top: dict[int, float], tokens: ScoreTokens) -> bool:
    """Expand the "1" branch only where "1" is among the top-k: elsewhere P("1") counts as 0."""
    return tokens.mode == TWO_STEP and tokens.one_id in top


def parse_results(
    first_outputs: list,
    second_outputs: dict[int, list],
    tokens: ScoreTokens,
    prompt_tokens: list[int],
) -> list[ScoreResult]:
    """ScoreResults from the `CompletionOutput.logprobs` of each prompt (`first_outputs[i]`) and of
    the prompts that had "1" appended (`second_outputs[i]`, only for rows that needed it)."""
    results = []
    for i, lp in enumerate(first_outputs):
        try:
            top = first_step_logprobs(lp)
            after = None
            if i in second_outputs:
                after = probs_at(first_step_logprobs(second_outputs[i]), tokens.after_one_ids)
            results.append(
                score_from_probs(first_probs(top, tokens), after, tokens, prompt_tokens=prompt_tokens[i])
            )
        except Exception as e:  # noqa: BLE001 - one malformed output fails its row only
            results.append(ScoreResult.failed(f"{type(e).__name__}: {e}", prompt_tokens[i]))
    return results


class VLLMBackend(TokenizedBackend):
    def __init__(self, cfg: BackendConfig) -> None:
        super().__init__()
        try:
            import vllm  # lazy: optional extra ivl[vllm]
        except ImportError as e:
            raise ImportError("the vllm backend needs vLLM: pip install 'ivl[vllm]'") from e
        self.cfg = cfg
        self._vllm = vllm
        self.llm = vllm.LLM(**engine_kwargs(cfg))
        self.tokenizer = self.llm.get_tokenizer()
        self.max_prompt_tokens = cfg.max_prompt_tokens

    def _generate(self, requests: list[dict], mode: str):
        params = self._vllm.SamplingParams(**sampling_kwargs(mode, self.cfg.top_logprobs))
        return self.llm.generate(requests, sampling_params=params, use_tqdm=False)

    def score_ids(self, ids_list: list[list[int]], tokens: ScoreTokens) -> list[ScoreResult]:
        lengths = [len(ids) for ids in ids_list]
        outs = self._generate(build_requests(ids_list), tokens.mode)
        if tokens.mode == GENERATE:
            return [result_from_text(o.outputs[0].text, prompt_tokens=n) for o, n in zip(outs, lengths)]
        first = [o.outputs[0].logprobs for o in outs]
        second: dict[int, list] = {}
        expand = []
        for i, lp in enumerate(first):
            try:
                if needs_second_step(first_step_logprobs(lp), tokens):
                    expand.append(i)
            except ValueError:
                pass  # parse_results reports it for this row
        if expand:
            more = self._generate(build_requests([ids_list[i] for i in expand], [tokens.one_id]), tokens.mode)
            second = {i: o.outputs[0].logprobs for i, o in zip(expand, more)}
        return parse_results(first, second, tokens, lengths)
