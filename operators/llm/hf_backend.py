"""The transformers backend: CPU or GPU, one prefill-only forward pass per length-sorted batch.

bf16 on GPU (fp32 on CPU, where bf16 matmuls are slow), left padding with explicit position ids,
SDPA attention, and `logits_to_keep` so the LM head runs on the last positions only (with a
151k-token vocabulary the full-sequence head would cost more than the model). For the two-token
"10" the prompt gets "1" appended and the last two positions' logits give both steps in the same
pass (see scoring.py). Models load by local path or hub name; GGUF through `gguf_file=`.
"""

from __future__ import annotations

import numpy as np
import torch

from .backends import BackendConfig, TokenizedBackend, resolve_model
from .batching import length_sorted_batches
from .scoring import GENERATE, TWO_STEP, ScoreResult, ScoreTokens, result_from_text, score_from_probs

GENERATE_TOKENS = 4  # enough for "10", "10/10" or " 7." in the parsing fallback


def _dtype_kwarg() -> str:
    """transformers renamed `torch_dtype` to `dtype` in 4.56; 4.5x before that needs the old name."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_model(cfg: BackendConfig):
    """(model, tokenizer, device) from a local path, hub name or GGUF file, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_ref, gguf_file = resolve_model(cfg.model, cfg.gguf_file)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tok_ref = cfg.tokenizer or model_ref
    tokenizer = AutoTokenizer.from_pretrained(tok_ref, **(extra if tok_ref == model_ref else {}))
    device = pick_device(cfg.device)
    kwargs = {_dtype_kwarg(): pick_dtype(cfg.dtype, device), "attn_implementation": "sdpa", **extra}
    model = AutoModelForCausalLM.from_pretrained(model_ref, **kwargs)
    model.to(device).eval()
    return model, tokenizer, device


def score_token_probs(logprobs: torch.Tensor, tokens: ScoreTokens) -> tuple[np.ndarray, list]:
    """Score-token probabilities from full-vocabulary log-probabilities at the last positions.

    `logprobs` is (B, keep, V): keep = 1 for SINGLE, 2 for TWO_STEP (position 0 = after the prompt,
    position 1 = after the appended "1"). Returns first (B, 11) and after_one ((B, 10) or Nones)."""
    n = logprobs.shape[0]
    if tokens.mode == TWO_STEP:
        first = logprobs[:, 0, list(tokens.first_ids[:10])].exp().cpu().numpy().astype(np.float64)
        first = np.concatenate([first, np.zeros((n, 1))], axis=1)
        after = logprobs[:, 1, list(tokens.after_one_ids)].exp().cpu().numpy().astype(np.float64)
        return first, list(after)
    first = logprobs[:, 0, list(tokens.first_ids)].exp().cpu().numpy().astype(np.float64)
    return first, [None] * n


class HFBackend(TokenizedBackend):
    def __init__(self, model, tokenizer, cfg: BackendConfig, device: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.device = device or str(next(model.parameters()).device)
        self.cfg = cfg
        self.max_prompt_tokens = cfg.max_prompt_tokens
        ctx = getattr(model.config, "max_position_embeddings", None)
        if ctx:  # never past the model's own context
            self.max_prompt_tokens = min(self.max_prompt_tokens, int(ctx))
        self.pad_id = self._pad_id(tokenizer, model)

    @classmethod
    def load(cls, cfg: BackendConfig) -> HFBackend:
        model, tokenizer, device = load_model(cfg)
        return cls(model, tokenizer, cfg, device)

    @staticmethod
    def _pad_id(tokenizer, model) -> int:
        for ref in (tokenizer, model.config) if tokenizer is not None else (model.config,):
            for attr in ("pad_token_id", "eos_token_id"):
                v = getattr(ref, attr, None)
                if isinstance(v, list):
                    v = v[0] if v else None
                if v is not None:
                    return int(v)
        return 0  # masked out anyway: any id works as padding

    def _padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded input ids, attention mask and position ids (restarting at 0 after padding,
        as they would for the row alone: a plain forward call does not derive them from the mask)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[j, width - len(r) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    @torch.inference_mode()
    def last_logprobs(self, rows: list[list[int]], keep: int) -> torch.Tensor:
        """Log-softmax over the full vocabulary at each row's last `keep` positions: (B, keep, V), fp32."""
        ids, mask, pos = self._padded(rows)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=keep
        )
        return out.logits[:, -keep:, :].float().log_softmax(-1)

    def _score_batch(self, rows: list[list[int]], tokens: ScoreTokens) -> list[ScoreResult]:
        n_prompt = [len(r) for r in rows]
        if tokens.mode == GENERATE:
            return self._generate_batch(rows)
        keep = 2 if tokens.mode == TWO_STEP else 1
        rows = [r + [tokens.one_id] for r in rows] if keep == 2 else rows
        first, after = score_token_probs(self.last_logprobs(rows, keep), tokens)
        return [
            score_from_probs(first[j], after[j], tokens, prompt_tokens=n_prompt[j]) for j in range(len(rows))
        ]

    @torch.inference_mode()
    def _generate_batch(self, rows: list[list[int]]) -> list[ScoreResult]:
        ids, mask, _ = self._padded(rows)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=GENERATE_TOKENS,
            do_sample=False,
            pad_token_id=self.pad_id,
        )
        texts = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return [result_from_text(t, prompt_tokens=len(r)) for t, r in zip(texts, rows)]

    def score_ids(self, ids_list: list[list[int]], tokens: ScoreTokens) -> list[ScoreResult]:
        results: list[ScoreResult | None] = [None] * len(ids_list)
        lengths = [len(r) + 1 for r in ids_list]
        for batch in length_sorted_batches(lengths, self.cfg.batch_size, self.cfg.max_batch_tokens):
            for i, res in zip(batch, self.score_rows([ids_list[i] for i in batch], tokens)):
                results[i] = res
        return results  # type: ignore[return-value]

    def score_rows(self, rows: list[list[int]], tokens: ScoreTokens) -> list[ScoreResult]:
        """A failing batch (out of memory, say) is retried row by row, so one bad row fails alone."""
        try:
            return self._score_batch(rows, tokens)
        except Exception as e:  # noqa: BLE001
            if len(rows) == 1:
                return [ScoreResult.failed(f"{type(e).__name__}: {e}", len(rows[0]))]
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            return [r for row in rows for r in self.score_rows([row], tokens)]
