"""Build an InternVL 2.5 model with transformers' native classes (REFERENCE.md, "Model").

Three ways in:
- `from_checkpoint(path)`: an InternVL HF-format directory (`-hf` checkpoints, or a stage output);
- `from_preset(name, tokenizer)`: random init of a size preset (`tiny` for tests, `1b` = InternViT-300M +
  Qwen2.5-0.5B shape), the LLM vocabulary sized to the tokenizer the data was packed with;
- `compose(vision_from, llm_from)`: progressive scaling (InternVL 2.5 §3.3) -- the vision tower of an
  earlier checkpoint, the LLM of another checkpoint (or a preset), and a freshly initialised projector.
`build_model(spec, data_dir=...)` picks one of them from a CLI string.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from model.tiling import TOKENS_PER_TILE  # 448/14 = 32x32 patches, pixel unshuffle 0.5 -> 16x16
from model.tokenizer import IMG_CONTEXT, IMG_END, IMG_START

# what the model itself needs (`ivl pack` also adds the grounding tokens)
SPECIAL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT)


@dataclass(frozen=True)
class Preset:
    """Shape of one size preset; the vocabulary comes from the tokenizer."""

    vision: dict
    text: dict
    tie_word_embeddings: bool = True
    notes: str = ""


PRESETS: dict[str, Preset] = {
    # Tests: a few layers and small widths, but the real 448 / patch 14 geometry so one tile is still
    # 1024 patches -> 256 LLM tokens and packed shards need no special casing.
    "tiny": Preset(
        vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1_000_000.0,
        ),
        notes="test-sized; 448px tiles, patch 14, 256 tokens per tile",
    ),
    # InternVL2.5-1B: InternViT-300M-448px-V2.5 (24 layers, 1024 wide, 16 heads, MLP 4096, LayerNorm,
    # layer scale) + Qwen2.5-0.5B-Instruct (24 layers, 896 wide, 14 q / 2 kv heads, MLP 4864, tied emb).
    "1b": Preset(
        vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        text=dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1_000_000.0,
        ),
        notes="InternViT-300M + Qwen2.5-0.5B shape",
    ),
}


def _text_config(vocab_size: int, shape: dict, tie: bool) -> Qwen2Config:
    shape = dict(shape)
    theta = shape.pop("rope_theta")
    # transformers 5.x moved rope settings into `rope_parameters`; 4.5x takes `rope_theta`.
    if "rope_parameters" in inspect.signature(Qwen2Config.__init__).parameters:
        shape["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        shape["rope_theta"] = theta
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        tie_word_embeddings=tie,
        **shape,
    )


def _vision_config(shape: dict) -> InternVLVisionConfig:
    return InternVLVisionConfig(
        image_size=[448, 448],
        patch_size=[14, 14],
        norm_type="layer_norm",
        use_qk_norm=False,
        layer_scale_init_value=0.1,
        use_mean_pooling=False,
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


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Add `<img>`, `</img>`, `<IMG_CONTEXT>` when missing; return the ones added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def resize_embeddings_mean(model: InternVLForConditionalGeneration, vocab_size: int) -> None:
    """Grow (or keep) the LLM vocabulary to `vocab_size`; new rows = mean of the old ones (input and output)."""
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if vocab_size <= old:
        return
    old_in = emb.weight.detach().clone()
    out = model.get_output_embeddings()
    old_out = out.weight.detach().clone() if out is not None else None
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:] = old_in.mean(0)
        new_out = model.get_output_embeddings()
        if new_out is not None and new_out.weight is not model.get_input_embeddings().weight:
            new_out.weight[old:] = old_out.mean(0)
    model.config.text_config.vocab_size = vocab_size


def attach_tokenizer(model: InternVLForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make model and tokenizer agree: special tokens present, vocab large enough, image_token_id set."""
    ensure_special_tokens(tokenizer)
    resize_embeddings_mean(model, len(tokenizer))
    model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(path))
    ensure_special_tokens(tok)
    return tok


def from_preset(
    name: str, tokenizer: PreTrainedTokenizerBase | None = None, vocab_size: int | None = None, seed: int = 0
) -> InternVLForConditionalGeneration:
    """Random-init model of preset `name`; vocab = len(tokenizer) (or `vocab_size` without a tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    preset = PRESETS[name]
    if tokenizer is not None:
        ensure_special_tokens(tokenizer)
        vocab_size = len(tokenizer)
        image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    elif vocab_size is not None:
        image_token_id = vocab_size - 1  # benchmark use: the last id plays <IMG_CONTEXT>
    else:
        raise ValueError("from_preset needs a tokenizer or a vocab_size")
    config = internvl_config(
        _vision_config(preset.vision),
        _text_config(vocab_size, preset.text, preset.tie_word_embeddings),
        image_token_id,
        preset.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(config)


def from_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> InternVLForConditionalGeneration:
    """Load an InternVL HF-format checkpoint directory (as written by `train.checkpoint.save_model`)."""
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return InternVLForConditionalGeneration.from_pretrained(str(path), **kwargs)


def _is_internvl(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get("model_type") == "internvl"


def compose(
    vision_from: str | Path,
    llm_from: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Progressive scaling: vision tower of `vision_from` + LLM of `llm_from` + a fresh projector.

    `llm_from` is an InternVL checkpoint (its language model and head are taken), a plain causal-LM
    checkpoint (e.g. a Qwen2.5 directory), or a preset name (random LLM; then `tokenizer` is required).
    The tokenizer follows the LLM, since the vocabulary belongs to it."""
    vision_src = from_checkpoint(vision_from)
    vision_cfg = vision_src.config.vision_config
    llm_from = str(llm_from)
    if llm_from in PRESETS:
        if tokenizer is None:
            raise ValueError("compose with an LLM preset needs the data's tokenizer")
        llm_src = from_preset(llm_from, tokenizer, seed=seed)
        text_cfg, lm, head = llm_src.config.text_config, llm_src.model.language_model, llm_src.lm_head
        tie = bool(llm_src.config.tie_word_embeddings)
    elif _is_internvl(llm_from):
        llm_src = from_checkpoint(llm_from)
        text_cfg, lm, head = llm_src.config.text_config, llm_src.model.language_model, llm_src.lm_head
        tie = bool(llm_src.config.tie_word_embeddings)
        tokenizer = tokenizer or load_tokenizer(llm_from)
    else:
        llm_src = AutoModelForCausalLM.from_pretrained(llm_from)
        text_cfg, lm, head = llm_src.config, llm_src.model, llm_src.lm_head
        tie = bool(getattr(AutoConfig.from_pretrained(llm_from), "tie_word_embeddings", False))
        tokenizer = tokenizer or load_tokenizer(llm_from)
    ensure_special_tokens(tokenizer)
    config = internvl_config(vision_cfg, text_cfg, tokenizer.convert_tokens_to_ids(IMG_CONTEXT), tie)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)  # projector stays freshly initialised
    model.model.vision_tower.load_state_dict(vision_src.model.vision_tower.state_dict())
    model.model.language_model.load_state_dict(lm.state_dict())
    if not tie:
        model.lm_head.load_state_dict(head.state_dict())
    attach_tokenizer(model, tokenizer)
    return model, tokenizer


def build_model(
    spec: str | Path,
    data_dir: str | Path | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase]:
    """`spec` is a preset name or a checkpoint directory. With a preset the tokenizer is the one
    `ivl pack` saved to `DATA/tokenizer/`; with a checkpoint it is the checkpoint's own."""
    spec = str(spec)
    if spec in PRESETS:
        if tokenizer is None:
            if data_dir is None or not (Path(data_dir) / "tokenizer").exists():
                raise FileNotFoundError(
                    f"preset {spec!r} needs the packed data's tokenizer at DATA/tokenizer/"
                )
            tokenizer = load_tokenizer(Path(data_dir) / "tokenizer")
        return from_preset(spec, tokenizer, seed=seed), tokenizer
    path = Path(spec)
    if not _is_internvl(path):
        raise FileNotFoundError(
            f"{spec!r} is neither a preset ({sorted(PRESETS)}) nor an InternVL checkpoint dir"
        )
    model = from_checkpoint(path)
    tokenizer = tokenizer or load_tokenizer(path)
    attach_tokenizer(model, tokenizer)
    return model, tokenizer
