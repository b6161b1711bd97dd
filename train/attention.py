"""Packed attention kept exact, and the packed forward pass (InternVL 2.5 report,
arXiv 2412.05271 §4.2, packing step 3: tokens attend only within their own sample).

Samples packed into one row must never attend to each other. Two paths are exact:
- `varlen`: our attention function registered with transformers; it receives `cu_seqlens` and runs
  `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10) or flash-attn's `flash_attn_varlen_func` on
  GPU, and an exact per-sample SDPA loop elsewhere (a reference for tests, not a fast path);
- `sdpa`: transformers' SDPA with the block-diagonal causal mask it derives from restarting
  `position_ids` (only when no 2-D attention_mask is given; CPU default, and the stock baseline).
`check_packed` refuses a row on any other path, or whose position_ids do not restart at every piece.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

VARLEN = "ivl_varlen"
SDPA = "sdpa"
EXACT_PATHS = (VARLEN, SDPA, "eager")


class PackedAttentionError(RuntimeError):
    """Raised when packed rows would run on an attention path that mixes samples."""


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _flash_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def varlen_kernel_name(device: torch.device) -> str:
    """Which kernel the varlen path uses on `device`."""
    if device.type == "cuda":
        if _torch_varlen() is not None:
            return "torch.varlen_attn"
        if _flash_varlen() is not None:
            return "flash_attn_varlen_func"
    return "sdpa_per_sample"


def per_sample_sdpa(q, k, v, cu, scale):
    # q,k,v: (T, H, D); exact: plain causal SDPA on each sample separately
    outs = []
    groups = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs, 0)


def varlen_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query (B=1, H, T, D) -> (1, T, H, D), causal within each sample."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise PackedAttentionError(
            "varlen attention called without cu_seq_lens_q (use train.attention.packed_kwargs)"
        )
    if query.shape[0] != 1:
        raise PackedAttentionError("varlen attention expects one flattened row (batch size 1)")
    max_len = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    kernel = varlen_kernel_name(q.device)
    if kernel != "sdpa_per_sample":
        # flash kernels take fp16/bf16 only; RoPE in fp32 under autocast can hand us fp32 q/k
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else v.dtype
        if half not in (torch.float16, torch.bfloat16):
            kernel = "sdpa_per_sample"  # fp32 without autocast: stay exact on the slow path
        else:
            q, k, v = q.to(half), k.to(half), v.to(half)
    if kernel == "torch.varlen_attn":
        fn = _torch_varlen()
        params = inspect.signature(fn).parameters
        # torch 2.10 took is_causal; later versions express causality as window_size=(-1, 0)
        causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                causal["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        out = fn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **causal)
    elif kernel == "flash_attn_varlen_func":
        out = _flash_varlen()(q, k, v, cu, cu, max_len, max_len, softmax_scale=scaling, causal=True)
    else:
        out = per_sample_sdpa(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


AttentionInterface.register(VARLEN, varlen_attention_forward)


def default_mode(device: torch.device) -> str:
    """varlen on a GPU with a varlen kernel; transformers' SDPA block mask otherwise."""
    return VARLEN if varlen_kernel_name(device) != "sdpa_per_sample" else SDPA


def set_packed_attention(model, mode: str) -> None:
    """Select the LLM's attention path; the vision tower (no packing across tiles) keeps SDPA."""
    if mode not in EXACT_PATHS:
        raise PackedAttentionError(
            f"attention {mode!r} is not an exact packed path; use one of {EXACT_PATHS}"
        )
    model.model.language_model.config._attn_implementation = mode


def check_packed(model, position_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """Refuse a packed row whose attention could mix samples."""
    mode = model.model.language_model.config._attn_implementation
    n_pieces = cu_seqlens.numel() - 1
    if n_pieces > 1 and mode not in EXACT_PATHS:
        raise PackedAttentionError(f"attention {mode!r} would let packed samples attend to each other")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    expected = torch.cat([torch.arange(n, device=position_ids.device) for n in lengths])
    if position_ids.shape[-1] != expected.numel() or not torch.equal(position_ids.reshape(-1), expected):
        # transformers' SDPA mask splits where position ids stop increasing by 1: they must restart exactly
        raise PackedAttentionError("position_ids do not restart at 0 at every cu_seqlens boundary")


def packed_kwargs(model, cu_seqlens: torch.Tensor) -> dict:
    """Extra forward kwargs for the LLM: varlen needs cu_seqlens; SDPA derives its mask from position_ids."""
    if model.model.language_model.config._attn_implementation != VARLEN:
        return {}
    cu = cu_seqlens.to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)


def packed_hidden_states(model, batch: dict) -> torch.Tensor:
    """LLM last hidden states (T, D) of one flattened packed row.

    batch: input_ids (T,), position_ids (T,), cu_seqlens (N+1,), pixel_values (tiles, 3, 448, 448),
    has_image (bool). A pure-text row runs the vision tower on its dummy tile and adds 0 x features,
    as InternVL does, so every parameter gets a gradient and DDP does not wait forever."""
    core = model.model
    input_ids = batch["input_ids"].reshape(1, -1)
    position_ids = batch["position_ids"].reshape(1, -1)
    check_packed(model, position_ids, batch["cu_seqlens"])
    embeds = core.get_input_embeddings()(input_ids)
    feats = core.get_image_features(
        pixel_values=batch["pixel_values"],
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    )
    feats = getattr(feats, "pooler_output", feats).to(embeds.dtype)  # 5.x: output object; 4.5x: tensor
    if bool(batch["has_image"]):
        mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
        if int(mask.sum()) != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"{int(mask.sum())} image tokens for {feats.shape[0]} tiles x {feats.shape[1]}")
        embeds = embeds.masked_scatter(mask, feats)
    else:
        embeds = embeds + feats.sum() * 0.0  # dummy tile, zero weight (InternVL pure-text batches)
    out = core.language_model(
        inputs_embeds=embeds,
        position_ids=position_ids,
        attention_mask=None,  # None: transformers builds the block-diagonal mask from position_ids
        use_cache=False,
        **packed_kwargs(model, batch["cu_seqlens"]),
    )
    return out.last_hidden_state[0]
