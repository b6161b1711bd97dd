"""Size presets: the published InternVL 2.5 shapes (arXiv 2412.05271) as transformers' native configs.

Every number comes from a published config, cited per preset:
- [IVL-1B] OpenGVLab InternVL 2.5/3 1B `config.json` (InternVLChatConfig): vision_config = InternViT-300M-448px-V2_5
  (1024 wide, 24 layers, 16 heads, MLP 4096, qkv_bias true, qk_normalization false, layer_norm eps 1e-6, gelu,
  initializer_factor 0.1 = layer-scale init), llm_config = Qwen2.5-0.5B (896 wide, 24 layers, 14 q / 2 kv heads,
  MLP 4864, rms eps 1e-6, rope_theta 1e6, rope_scaling dynamic x2.0, vocab 151674), tie_word_embeddings false;
  the InternVL3-1B print of it is in github.com/shivangjhalani/multicoco InternVL3-1B_data.md (same ViT + LLM).
- [IVL-2B] OpenGVLab/InternVL2_5-2B `config.json` as quoted in PaddleMIX's InternVL2.5 test: llm = internlm2_5-1_8b-chat
  (2048 wide, 24 layers, 16 q / 8 kv heads, MLP 8192, rms eps 1e-5, rope_theta 1e6, dynamic x2.0, vocab 92553).
- [IVL-4B] InternVL2_5-4B `llm_config` (as quoted in a public test, surgmllm): Qwen2.5-3B (2048 wide, 36 layers,
  16 q / 2 kv heads, MLP 11008, vocab 151674); rms eps / rope_theta from Qwen2.5-3B-Instruct's config.json (1e-6,
  1e6); rope_scaling dynamic x2.0 by analogy with [IVL-1B] (InternVL sets it on its Qwen2.5 LLMs; not seen for 4B).
- [IVL-8B] InternVL2-8B / 2.5-8B `llm_config` (PaddleMIX InternVL2 test): internlm2_5-7b-chat (4096 wide, 32 layers,
  32 q / 8 kv heads, MLP 14336, rms eps 1e-5, rope_theta 1e6, dynamic x2.0, vocab 92553).
- [HF-CONV] transformers' `models/internvl/convert_internvl_weights_to_hf.py` (not shipped in the wheel): InternLM2
  LLMs become `LlamaConfig` (wqkv split into q/k/v), Qwen2 stays `Qwen2Config`; qkv_bias -> attention_bias,
  qk_normalization -> use_qk_norm, use_absolute_position_embeddings true; image_token_id 151667 (Qwen2) / 92546
  (InternLM2); no final vision LayerNorm (use_mean_pooling left at its default, so `layernorm` is Identity).
The vocabulary of a random-init preset follows the tokenizer the data was packed with (Qwen2.5's 151665 tokens +
InternVL's 9 = 151674, the published size); `vocab_size` below is that published size, used without a tokenizer.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, Qwen2Config

from model.tiling import IMAGE_SIZE, TOKENS_PER_TILE

PATCH_SIZE = 14  # InternViT patch, 448/14 = 32x32 patches per tile


@dataclass(frozen=True)
class Preset:
    """Shape of one size preset; the vocabulary comes from the tokenizer (or `vocab_size` without one)."""

    vision: dict
    text: dict
    text_type: str = "qwen2"  # "qwen2" (Qwen2.5 LLMs) or "llama" (InternLM2 as converted by [HF-CONV])
    vocab_size: int | None = None  # published LLM vocabulary incl. InternVL's 9 added tokens
    image_token_id: int | None = None  # published <IMG_CONTEXT> id
    tie_word_embeddings: bool = False
    notes: str = ""


# InternViT-300M-448px-V2_5 [IVL-1B]
INTERNVIT_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
_QWEN = dict(max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1_000_000.0)
_INTERNLM2 = dict(max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1_000_000.0, rope_scaling=2.0)
# per LLM family: its config fields, published vocabulary (incl. InternVL's 9 tokens) and <IMG_CONTEXT> id
_FAMILY = {
    "qwen2": (dict(rope_scaling=2.0, **_QWEN), 151674, 151667),  # Qwen2.5 (dynamic rope x2.0, [IVL-1B])
    "llama": (_INTERNLM2, 92553, 92546),  # InternLM2.5 as converted to Llama by [HF-CONV]
}


def _internvl25(family: str, notes: str, hidden: int, mlp: int, layers: int, heads: int, kv_heads: int) -> Preset:
    """A published InternVL 2.5 shape: InternViT-300M + an LLM of `family` with these dimensions."""
    extra, vocab, image_token = _FAMILY[family]
    text = dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, **extra)
    return Preset(vision=INTERNVIT_300M, text=text, text_type=family, vocab_size=vocab, image_token_id=image_token,
                  notes=notes)


PRESETS: dict[str, Preset] = {
    # Tests: a few layers and small widths, but the real 448 / patch 14 geometry so one tile is still
    # 1024 patches -> 256 LLM tokens, and the real architecture flags (q/k/v bias, no final LayerNorm).
    "tiny": Preset(
        vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        text=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **_QWEN,
        ),
        tie_word_embeddings=True,
        notes="test-sized; 448px tiles, patch 14, 256 tokens per tile",
    ),
    "1b": _internvl25("qwen2", "InternViT-300M-448px-V2_5 + Qwen2.5-0.5B", 896, 4864, 24, 14, 2),  # [IVL-1B]
    "2b": _internvl25("llama", "InternViT-300M-448px-V2_5 + internlm2_5-1_8b-chat (as Llama)",  # [IVL-2B]
                      2048, 8192, 24, 16, 8),
    "4b": _internvl25("qwen2", "InternViT-300M-448px-V2_5 + Qwen2.5-3B", 2048, 11008, 36, 16, 2),  # [IVL-4B]
    "8b": _internvl25("llama", "InternViT-300M-448px-V2_5 + internlm2_5-7b-chat (as Llama)",  # [IVL-8B]
                      4096, 14336, 32, 32, 8),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


def _rope_kwargs(config_cls, theta: float, dynamic_factor: float | None) -> dict:
    # transformers 5.x folds rope settings into `rope_parameters`; 4.5x takes `rope_theta` / `rope_scaling`.
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:
        params = {"rope_type": "default", "rope_theta": theta}
        if dynamic_factor:
            params.update(rope_type="dynamic", factor=dynamic_factor)
        return {"rope_parameters": params}
    out = {"rope_theta": theta}
    if dynamic_factor:
        out["rope_scaling"] = {"type": "dynamic", "factor": dynamic_factor}
    return out


def text_config(vocab_size: int, shape: dict, tie: bool, text_type: str = "qwen2"):
    """Qwen2Config (Qwen2.5 LLMs) or LlamaConfig (InternLM2, as transformers' conversion makes it) of `shape`."""
    shape = dict(shape)
    rope = _rope_kwargs(Qwen2Config if text_type == "qwen2" else LlamaConfig, shape.pop("rope_theta"),
                        shape.pop("rope_scaling", None))
    common = dict(vocab_size=vocab_size, hidden_act="silu", tie_word_embeddings=tie, **rope, **shape)
    if text_type == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)  # q/k/v bias is built into Qwen2
    if text_type == "llama":
        head_dim = shape["hidden_size"] // shape["num_attention_heads"]
        return LlamaConfig(attention_bias=False, mlp_bias=False, head_dim=head_dim, **common)  # InternLM2: bias False
    raise ValueError(f"unknown text_type {text_type!r}")


def vision_config(shape: dict) -> InternVLVisionConfig:
    """InternViT as [HF-CONV] converts it: q/k/v bias, no qk-norm, LayerNorm, layer scale, no final LayerNorm."""
    return InternVLVisionConfig(
        image_size=[IMAGE_SIZE, IMAGE_SIZE],
        patch_size=[PATCH_SIZE, PATCH_SIZE],
        norm_type="layer_norm",
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        attention_bias=True,
        use_qk_norm=False,
        layer_scale_init_value=0.1,
        use_absolute_position_embeddings=True,
        use_mean_pooling=True,  # = no final LayerNorm: InternViT-300M has none
        **shape,
    )


def internvl_config(vision: InternVLVisionConfig, text, image_token_id: int, tie: bool) -> InternVLConfig:
    return InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=tie,
    )


def preset_config(name: str, vocab_size: int | None = None, image_token_id: int | None = None) -> InternVLConfig:
    """The InternVLConfig of preset `name`; vocab and <IMG_CONTEXT> id default to the published ones."""
    p = get_preset(name)
    vocab_size = vocab_size or p.vocab_size
    if vocab_size is None:
        raise ValueError(f"preset {name!r} has no published vocabulary: give a tokenizer or vocab_size")
    if image_token_id is None:
        image_token_id = p.image_token_id if vocab_size == p.vocab_size else vocab_size - 1
    return internvl_config(
        vision_config(p.vision),
        text_config(vocab_size, p.text, p.tie_word_embeddings, p.text_type),
        image_token_id,
        p.tie_word_embeddings,
    )
