"""Checkpoint layouts: OpenGVLab's `InternVLChatModel` <-> transformers' `InternVLForConditionalGeneration`.

The OpenGVLab layout is what InternVL's repository (`internvl_chat/`) trains and most released checkpoints
use: `vision_model.*` (InternViT with a fused `attn.qkv`, layer scale `ls1`/`ls2`), `mlp1.{0,1,3}` (LayerNorm,
Linear, GELU, Linear), `language_model.*` (Qwen2 as is; InternLM2 with a fused `attention.wqkv`), and a
config.json with `vision_config` / `llm_config`, `architectures: ["InternVLChatModel"]`.

OpenGVLab -> HF follows transformers' own `convert_internvl_weights_to_hf.py` (not shipped in the wheel, so
its key mapping and q/k/v splits are re-implemented here, pattern for pattern) and then transformers' own
legacy-name mapping (`conversion_mapping`, imported) to this version's module names. HF -> OpenGVLab is
the exact inverse; both are tested to round-trip bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from model.tiling import IMAGE_SIZE

# ---- transformers' convert_internvl_weights_to_hf.py, ORIGINAL_TO_CONVERTED_KEY_MAPPING_* (same order)
VISION_TO_HF = [
    (r"vision_model", r"vision_tower"),
    (r"layers", r"layer"),
    (r"class_embedding", r"cls_token"),
    (r"position_embedding", r"position_embeddings"),
    (r"patch_embedding", r"patch_embeddings.projection"),
    (r"ls(\d+)", r"lambda_\1"),
    (r"attn.proj", r"attention.projection_layer"),
    (r"attn.dropout", r"attention.projection_dropout"),
    (r"attn", r"attention"),
    (r"norm1", r"layernorm_before"),
    (r"norm2", r"layernorm_after"),
]
INTERNLM2_TO_LLAMA = [
    (r"tok_embeddings", r"embed_tokens"),
    (r"attention.wo", r"self_attn.o_proj"),
    (r"feed_forward.w1", r"mlp.gate_proj"),
    (r"feed_forward.w2", r"mlp.down_proj"),
    (r"feed_forward.w3", r"mlp.up_proj"),
    (r"attention_norm", r"input_layernorm"),
    (r"ffn_norm", r"post_attention_layernorm"),
    (r"output", r"lm_head"),
]
PROJECTOR_TO_HF = [
    (r"mlp1.0", r"multi_modal_projector.layer_norm"),
    (r"mlp1.1", r"multi_modal_projector.linear_1"),
    (r"mlp1.3", r"multi_modal_projector.linear_2"),
]
# the script's UNNECESSARY_CONFIG_KEYS: dropped from both sub-configs
UNNECESSARY_CONFIG_KEYS = {
    "_name_or_path", "_attn_implementation_autoset", "auto_map", "use_bfloat16", "use_flash_attn", "bias",
    "laux_allreduce", "moe_coeff_ratio", "moe_intermediate_size", "moe_output_scale", "noisy_gate_policy",
    "shared_expert_intermediate_size", "use_residual", "use_moe", "use_rts", "use_weighted_residual", "moe_config",
    "num_experts", "num_routed_experts", "num_shared_experts", "capacity_factor", "eval_capacity_factor",
    "drop_path_rate",
}
# the script's image_token_id per LLM family (<IMG_CONTEXT> after InternVL's added tokens)
IMAGE_TOKEN_ID = {"qwen2": 151667, "llama": 92546}
_INTERNLM2_ARCH = "InternLM2ForCausalLM"

# ---- the exact inverses, for HF -> OpenGVLab (applied to names without their module prefix)
_VISION_FROM_HF = [
    (r"^embeddings\.cls_token", "embeddings.class_embedding"),
    (r"^embeddings\.position_embeddings", "embeddings.position_embedding"),
    (r"^embeddings\.patch_embeddings\.projection", "embeddings.patch_embedding"),
    (r"^encoder\.layer\.", "encoder.layers."),
    (r"\.lambda_(\d+)$", r".ls\1"),
    (r"\.attention\.projection_layer\.", ".attn.proj."),
    (r"\.attention\.", ".attn."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
]
_LLAMA_TO_INTERNLM2 = [
    (r"^embed_tokens\.", "tok_embeddings."),
    (r"\.self_attn\.o_proj\.", ".attention.wo."),
    (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
    (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
    (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
    (r"\.input_layernorm\.", ".attention_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
]
_PROJECTOR_FROM_HF = {"layer_norm": "mlp1.0", "linear_1": "mlp1.1", "linear_2": "mlp1.3"}


def _sub_all(text: str, rules) -> str:
    for pattern, repl in rules:
        text = re.sub(pattern, repl, text)
    return text


def llm_family(chat_config: dict) -> str:
    """"llama" for InternLM2 LLMs (transformers converts them to Llama), "qwen2" for Qwen2 ones."""
    llm = chat_config["llm_config"]
    if _INTERNLM2_ARCH in (llm.get("architectures") or []) or llm.get("model_type") == "internlm2":
        return "llama"
    if llm.get("model_type") == "qwen2" or "Qwen2ForCausalLM" in (llm.get("architectures") or []):
        return "qwen2"
    raise ValueError(f"unsupported LLM {llm.get('architectures')} (transformers' InternVL takes Qwen2 or InternLM2)")


# ---------------------------------------------------------------- configs
def opengvlab_config_to_hf(chat_config: dict, image_token_id: int | None = None):
    """InternVLChatConfig (dict) -> InternVLConfig, as the script's `get_internvl_config`."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, Qwen2Config

    family = llm_family(chat_config)
    llm = {k: v for k, v in chat_config["llm_config"].items() if k not in UNNECESSARY_CONFIG_KEYS}
    for k in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype"):
        llm.pop(k, None)
    llm["use_cache"] = True  # the script forces it
    llm.setdefault("tie_word_embeddings", bool(chat_config.get("tie_word_embeddings", False)))
    if family == "llama":
        llm.setdefault("head_dim", llm["hidden_size"] // llm["num_attention_heads"])
    text = (LlamaConfig if family == "llama" else Qwen2Config)(**_rope_to_current(llm))
    v = chat_config["vision_config"]
    vision = InternVLVisionConfig(
        hidden_size=v["hidden_size"],
        num_hidden_layers=v["num_hidden_layers"],
        num_attention_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"],
        attention_bias=bool(v.get("qkv_bias", True)),  # the script: qkv_bias -> attention_bias
        use_qk_norm=bool(v.get("qk_normalization", False)),  # qk_normalization -> use_qk_norm
        hidden_act=v.get("hidden_act", "gelu"),
        norm_type=v.get("norm_type", "layer_norm"),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        attention_dropout=v.get("attention_dropout", 0.0),
        projection_dropout=v.get("attention_dropout", 0.0),
        hidden_dropout_prob=v.get("dropout", 0.0),
        image_size=[v.get("image_size", IMAGE_SIZE)] * 2,
        patch_size=[v.get("patch_size", 14)] * 2,
        num_channels=v.get("num_channels", 3),
        layer_scale_init_value=v.get("initializer_factor", 0.1),  # InternViT's ls init = initializer_factor
        use_absolute_position_embeddings=True,  # the script forces it
        use_mean_pooling=True,  # InternViT has no final LayerNorm
    )
    return InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id if image_token_id is not None else IMAGE_TOKEN_ID[family],
        downsample_ratio=chat_config.get("downsample_ratio", 0.5),
        vision_feature_layer=chat_config.get("select_layer", -1),
        tie_word_embeddings=bool(llm["tie_word_embeddings"]),
        architectures=["InternVLForConditionalGeneration"],
    )


def _rope_to_current(llm: dict) -> dict:
    """OpenGVLab's `rope_theta` + `rope_scaling` -> this transformers version's form."""
    import inspect

    from transformers import Qwen2Config

    if "rope_parameters" not in inspect.signature(Qwen2Config.__init__).parameters:
        return llm
    llm = dict(llm)
    params = {"rope_type": "default", "rope_theta": float(llm.pop("rope_theta", 10000.0))}
    scaling = llm.pop("rope_scaling", None)
    if scaling:
        params.update({k: v for k, v in scaling.items() if k != "type"})
        params["rope_type"] = scaling.get("rope_type") or scaling.get("type")
    llm["rope_parameters"] = params
    return llm


def _rope_to_opengvlab(text: dict) -> dict:
    params = text.pop("rope_parameters", None)
    if params is not None:
        params = dict(params)
        text["rope_theta"] = params.pop("rope_theta")
        kind = params.pop("rope_type", "default")
        text["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
    return text


# the text-config fields an OpenGVLab llm_config keeps (the rest are transformers' generic defaults)
_LLM_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "rope_theta", "rope_scaling", "attention_dropout", "tie_word_embeddings", "bos_token_id",
    "eos_token_id", "pad_token_id", "use_sliding_window", "sliding_window", "max_window_layers",
)


def hf_config_to_opengvlab(config) -> dict:
    """InternVLConfig -> InternVLChatConfig dict (the inverse of `opengvlab_config_to_hf`), with the
    internvl_chat 2.5 inference settings (template internvl2_5, pixel shuffle v2, 448px, 1..12 tiles)."""
    v, t = config.vision_config, config.text_config
    if not v.use_mean_pooling:
        raise ValueError("this vision tower has a final LayerNorm, which InternViT (OpenGVLab layout) has not")
    family = "llama" if t.model_type == "llama" else "qwen2"
    text = _rope_to_opengvlab(t.to_dict())
    llm = {k: text[k] for k in _LLM_FIELDS if k in text}
    if family == "llama":
        llm.update(architectures=[_INTERNLM2_ARCH], model_type="internlm2", bias=bool(t.attention_bias))
        for k in ("use_sliding_window", "sliding_window", "max_window_layers"):
            llm.pop(k, None)
    else:
        llm.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    vision = dict(
        architectures=["InternVisionModel"],
        model_type="intern_vit_6b",
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        intermediate_size=v.intermediate_size,
        qkv_bias=bool(v.attention_bias),
        qk_normalization=bool(v.use_qk_norm),
        hidden_act=v.hidden_act,
        norm_type=v.norm_type,
        layer_norm_eps=v.layer_norm_eps,
        attention_dropout=v.attention_dropout,
        dropout=v.hidden_dropout_prob,
        drop_path_rate=0.0,
        image_size=int(v.image_size[0]),
        patch_size=int(v.patch_size[0]),
        num_channels=v.num_channels,
        initializer_factor=v.layer_scale_init_value,
    )
    return dict(
        architectures=["InternVLChatModel"],
        model_type="internvl_chat",
        vision_config=vision,
        llm_config=llm,
        downsample_ratio=config.downsample_ratio,
        select_layer=config.vision_feature_layer,
        force_image_size=int(v.image_size[0]),
        template="internvl2_5",
        ps_version="v2",
        dynamic_image_size=True,
        use_thumbnail=True,
        min_dynamic_patch=1,
        max_dynamic_patch=12,
        pad2square=False,
        use_backbone_lora=0,
        use_llm_lora=0,
        tie_word_embeddings=bool(config.tie_word_embeddings),
    )


# ---------------------------------------------------------------- the OpenGVLab model's parameters
def opengvlab_param_shapes(chat_config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of `InternVLChatModel`'s state dict for `chat_config` (InternViT + mlp1 + LLM), as
    InternVL's modeling code defines them (modeling_intern_vit.py, modeling_internvl_chat.py, Qwen2/InternLM2)."""
    v, llm = chat_config["vision_config"], chat_config["llm_config"]
    c, ffn = v["hidden_size"], v["intermediate_size"]
    patch, size = v.get("patch_size", 14), v.get("image_size", IMAGE_SIZE)
    out: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": (c, v.get("num_channels", 3), patch, patch),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "vision_model.embeddings.position_embedding": (1, (size // patch) ** 2 + 1, c),
    }
    norm_has_bias = v.get("norm_type", "layer_norm") == "layer_norm"
    for i in range(v["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        out[p + "attn.qkv.weight"] = (3 * c, c)
        if v.get("qkv_bias", True):
            out[p + "attn.qkv.bias"] = (3 * c,)
        if v.get("qk_normalization", False):
            out[p + "attn.q_norm.weight"] = (c,)
            out[p + "attn.k_norm.weight"] = (c,)
        out |= {p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,)}
        out |= {p + "mlp.fc1.weight": (ffn, c), p + "mlp.fc1.bias": (ffn,)}
        out |= {p + "mlp.fc2.weight": (c, ffn), p + "mlp.fc2.bias": (c,)}
        for n in ("norm1", "norm2"):
            out[p + n + ".weight"] = (c,)
            if norm_has_bias:
                out[p + n + ".bias"] = (c,)
        out |= {p + "ls1": (c,), p + "ls2": (c,)}
    d, vocab = llm["hidden_size"], llm["vocab_size"]
    c4 = c * int(1 / chat_config.get("downsample_ratio", 0.5)) ** 2
    out |= {"mlp1.0.weight": (c4,), "mlp1.0.bias": (c4,), "mlp1.1.weight": (d, c4), "mlp1.1.bias": (d,),
            "mlp1.3.weight": (d, d), "mlp1.3.bias": (d,)}
    heads, kv, ffn = llm["num_attention_heads"], llm["num_key_value_heads"], llm["intermediate_size"]
    hd = llm.get("head_dim") or d // heads
    internlm2 = llm_family(chat_config) == "llama"
    m = "language_model.model."
    out[m + ("tok_embeddings.weight" if internlm2 else "embed_tokens.weight")] = (vocab, d)
    for i in range(llm["num_hidden_layers"]):
        p = f"{m}layers.{i}."
        if internlm2:
            out[p + "attention.wqkv.weight"] = ((heads + 2 * kv) * hd, d)
            out[p + "attention.wo.weight"] = (d, heads * hd)
            out |= {p + "feed_forward.w1.weight": (ffn, d), p + "feed_forward.w3.weight": (ffn, d),
                    p + "feed_forward.w2.weight": (d, ffn)}
            out |= {p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,)}
        else:
            for n, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
                out[p + f"self_attn.{n}.weight"] = (rows, d)
                out[p + f"self_attn.{n}.bias"] = (rows,)  # Qwen2: q/k/v bias
            out[p + "self_attn.o_proj.weight"] = (d, heads * hd)
            out |= {p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
                    p + "mlp.down_proj.weight": (d, ffn)}
            out |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
    out[m + "norm.weight"] = (d,)
    if not bool(llm.get("tie_word_embeddings", chat_config.get("tie_word_embeddings", False))):
        out["language_model.output.weight" if internlm2 else "language_model.lm_head.weight"] = (vocab, d)
    return out


# ---------------------------------------------------------------- state dicts
def opengvlab_to_legacy_hf(state_dict: dict, chat_config: dict, hf_config) -> dict:
    """The script's `write_model` loop: renamed keys, `attn.qkv` split in three, InternLM2 `wqkv` un-grouped.
    Output names are the -hf checkpoints' (`vision_tower.*`, `language_model.model.*`)."""
    keys = list(state_dict)
    vision = [k for k in keys if k.startswith("vision_model")]
    lang = [k for k in keys if k.startswith("language_model")]
    other = [k for k in keys if k not in set(vision) | set(lang)]
    new = {k: _sub_all(k, VISION_TO_HF) for k in vision}
    internlm2 = llm_family(chat_config) == "llama"
    new |= {k: _sub_all(k, INTERNLM2_TO_LLAMA) if internlm2 else k for k in lang}
    new |= {k: _sub_all(k, PROJECTOR_TO_HF) for k in other}
    dim, text = hf_config.vision_config.hidden_size, hf_config.text_config
    out = {}
    for k in keys:
        t, nk = state_dict[k], new[k]
        if "attn.qkv" in k:
            out[nk.replace("attention.qkv", "attention.q_proj")] = t[:dim]
            out[nk.replace("attention.qkv", "attention.k_proj")] = t[dim : 2 * dim]
            out[nk.replace("attention.qkv", "attention.v_proj")] = t[-dim:]
        elif "attention.wqkv" in k:
            groups = text.num_attention_heads // text.num_key_value_heads
            hd = text.head_dim
            qkv = t.reshape(-1, 2 + groups, hd, t.shape[-1])  # rearrange "(h gs d) z -> h gs d z"
            out[nk.replace("attention.wqkv", "self_attn.q_proj")] = qkv[:, :groups].reshape(-1, t.shape[-1])
            out[nk.replace("attention.wqkv", "self_attn.k_proj")] = qkv[:, -2].reshape(-1, t.shape[-1])
            out[nk.replace("attention.wqkv", "self_attn.v_proj")] = qkv[:, -1].reshape(-1, t.shape[-1])
        else:
            out[nk] = t
    return out


def opengvlab_to_hf(state_dict: dict, chat_config: dict, image_token_id: int | None = None):
    """(HF state dict with this transformers version's names, InternVLConfig) from an OpenGVLab one."""
    from model.build import build_empty, canonical_keys

    config = opengvlab_config_to_hf(chat_config, image_token_id)
    legacy = opengvlab_to_legacy_hf(state_dict, chat_config, config)
    names = canonical_keys(build_empty(config), legacy)  # transformers' own legacy -> current mapping
    sd = {names[k]: v for k, v in legacy.items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd, config


def hf_to_opengvlab(state_dict: dict, config) -> tuple[dict, dict]:
    """(OpenGVLab state dict, InternVLChatConfig dict) from an HF one (current or legacy names)."""
    from model.build import build_empty, canonical_keys

    chat = hf_config_to_opengvlab(config)
    internlm2 = llm_family(chat) == "llama"
    names = canonical_keys(build_empty(config), state_dict)
    sd = {names[k]: v for k, v in state_dict.items()}
    t = config.text_config
    out, fused = {}, {}
    for k, v in sd.items():
        if k.startswith("model.vision_tower."):
            rest = k[len("model.vision_tower."):]
            m = re.match(r"^(encoder\.layer\.\d+\.attention\.)([qkv])_proj\.(weight|bias)$", rest)
            if m:
                fused.setdefault(("v", m.group(1), m.group(3)), {})[m.group(2)] = v
                continue
            out["vision_model." + _sub_all(rest, _VISION_FROM_HF)] = v
        elif k.startswith("model.multi_modal_projector."):
            mod, param = k[len("model.multi_modal_projector."):].split(".", 1)
            out[f"{_PROJECTOR_FROM_HF[mod]}.{param}"] = v
        elif k.startswith("model.language_model."):
            rest = k[len("model.language_model."):]
            if internlm2:
                m = re.match(r"^(layers\.\d+\.)self_attn\.([qkv])_proj\.weight$", rest)
                if m:
                    fused.setdefault(("l", m.group(1), "weight"), {})[m.group(2)] = v
                    continue
                rest = _sub_all(rest, _LLAMA_TO_INTERNLM2)
            out["language_model.model." + rest] = v
        elif k == "lm_head.weight":
            if not config.tie_word_embeddings:
                out["language_model.output.weight" if internlm2 else "language_model.lm_head.weight"] = v
        else:
            raise ValueError(f"unexpected key {k!r}")
    for (kind, prefix, param), qkv in fused.items():
        if kind == "v":
            out[f"vision_model.{_sub_all(prefix, _VISION_FROM_HF)}qkv.{param}"] = torch.cat(
                [qkv["q"], qkv["k"], qkv["v"]], 0
            )
        else:  # InternLM2 groups [q x groups, k, v] per kv head
            groups, hd = t.num_attention_heads // t.num_key_value_heads, t.head_dim
            z = qkv["q"].shape[-1]
            q = qkv["q"].reshape(t.num_key_value_heads, groups, hd, z)
            k_ = qkv["k"].reshape(t.num_key_value_heads, 1, hd, z)
            v_ = qkv["v"].reshape(t.num_key_value_heads, 1, hd, z)
            out[f"language_model.model.{prefix}attention.wqkv.weight"] = torch.cat([q, k_, v_], 1).reshape(-1, z)
    return out, chat


# ---------------------------------------------------------------- directories
# tokenizer / processor files travel with the weights
_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def _save_safetensors(sd: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path), metadata=metadata or {"format": "pt"})


def convert_checkpoint(src: str | Path, dst: str | Path, src_format: str, dst_format: str) -> Path:
    """Write `src` (a checkpoint dir in `src_format`: "opengvlab" or "hf") to `dst` in `dst_format`; tensors keep
    their dtype and values. An HF output also gets the InternVL processor (model.processor)."""
    from model.build import read_state_dict

    src, dst = Path(src), Path(dst)
    if (src_format, dst_format) not in {("opengvlab", "hf"), ("hf", "opengvlab")}:
        raise ValueError(f"convert from {src_format!r} to {dst_format!r}: use opengvlab -> hf or hf -> opengvlab")
    cfg_path = src / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{src} has no config.json")
    raw = json.loads(cfg_path.read_text())
    if src_format == "opengvlab" and "llm_config" not in raw:
        raise ValueError(f"{cfg_path} is not an InternVLChatModel config (no llm_config)")
    if src_format == "hf" and raw.get("model_type") != "internvl":
        raise ValueError(f"{cfg_path} is not an InternVL HF config (model_type {raw.get('model_type')!r})")
    sd = read_state_dict(src, dtype=None)
    dst.mkdir(parents=True, exist_ok=True)
    for f in _SIDE_FILES:
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)
    if src_format == "opengvlab":
        from model.build import build_empty, load_weights

        current, config = opengvlab_to_hf(sd, raw, _image_token_id(src))
        load_weights(build_empty(config), current, strict=True)  # every tensor named and shaped for the model
        out = opengvlab_to_legacy_hf(sd, raw, config)  # the names -hf checkpoints (and save_pretrained) use
        if config.tie_word_embeddings:
            out.pop("language_model.lm_head.weight", None)
        config.save_pretrained(str(dst))
        _save_safetensors(out, dst / "model.safetensors")
        from model.processor import save_processor

        save_processor(dst)
    else:
        from transformers import AutoConfig

        out, chat = hf_to_opengvlab(sd, AutoConfig.from_pretrained(str(src)))
        (dst / "config.json").write_text(json.dumps(chat, indent=2))
        _save_safetensors(out, dst / "model.safetensors")
    return dst


def _image_token_id(src: Path) -> int | None:
    """<IMG_CONTEXT>'s id in the checkpoint's own tokenizer, when it ships one."""
    if not (src / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    tid = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    return None if tid is None or tid == tok.unk_token_id else int(tid)
