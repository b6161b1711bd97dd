"""`ivl convert`: OpenGVLab InternVLChatModel layout <-> HF InternVLForConditionalGeneration, exact both ways.

Tiny random models are written in the OpenGVLab layout as released checkpoints are (bf16 safetensors, config.json
with vision_config / llm_config) for a Qwen2 and an InternLM2 LLM; opengvlab -> hf -> opengvlab must give the same
tensors bit for bit, and hf -> opengvlab -> hf the same logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration

from jobs.cli import main as ivl
from model.build import from_preset
from model.convert import hf_to_opengvlab, opengvlab_param_shapes, opengvlab_to_hf, opengvlab_to_legacy_hf
from model.presets import internvl_config, text_config, vision_config
from model.tokenizer import render_sample

TINY_VIT = {
    "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 32,
    "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "qkv_bias": True,
    "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-06, "hidden_act": "gelu",
    "image_size": 448, "patch_size": 14, "num_channels": 3, "initializer_factor": 0.1, "drop_path_rate": 0.1,
    "dropout": 0.0, "attention_dropout": 0.0, "use_flash_attn": True,
}
TINY_LLM = {
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
              "rope_theta": 1000000.0, "rope_scaling": {"factor": 2.0, "type": "dynamic"},
              "use_sliding_window": False, "tie_word_embeddings": False},
    "internlm2": {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 64,
                  "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                  "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000,
                  "rope_scaling": {"factor": 2.0, "type": "dynamic"}, "bias": False, "tie_word_embeddings": False},
}


def write_opengvlab(path, llm: str, tok, seed: int = 0):
    """A random InternVLChatModel checkpoint as released ones are laid out (bf16)."""
    cfg = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "select_layer": -1, "template": "internvl2_5", "ps_version": "v2", "force_image_size": 448,
        "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
        "tie_word_embeddings": False, "vision_config": TINY_VIT,
        "llm_config": {**TINY_LLM[llm], "vocab_size": len(tok)},
    }
    gen = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in opengvlab_param_shapes(cfg).items()}
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(str(path))
    return sd, cfg


ARCH_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "rms_norm_eps", "max_position_embeddings", "rope_theta", "rope_scaling", "qkv_bias",
             "qk_normalization", "norm_type", "layer_norm_eps", "image_size", "patch_size", "initializer_factor",
             "tie_word_embeddings", "model_type", "architectures")


def arch(cfg: dict) -> dict:
    pick = lambda d: {k: d[k] for k in ARCH_KEYS if k in d}  # noqa: E731
    return {"top": pick(cfg), "vision": pick(cfg["vision_config"]), "llm": pick(cfg["llm_config"]),
            "ratio": cfg["downsample_ratio"], "layer": cfg["select_layer"]}


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_opengvlab_hf_opengvlab_is_bit_exact(train_tok, tmp_path, llm):
    src, hf, back = tmp_path / "ogl", tmp_path / "hf", tmp_path / "back"
    sd, cfg = write_opengvlab(src, llm, train_tok)
    ivl(["convert", "--from", "opengvlab", "--to", "hf", str(src), str(hf)])
    model = InternVLForConditionalGeneration.from_pretrained(str(hf))  # transformers reads it as is
    assert model.config.image_token_id == train_tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert model.config.text_config.model_type == ("llama" if llm == "internlm2" else "qwen2")
    ivl(["convert", "--from", "hf", "--to", "opengvlab", str(hf), str(back)])
    again = load_file(str(back / "model.safetensors"))
    assert sorted(again) == sorted(sd)
    for k, v in sd.items():
        assert again[k].dtype == v.dtype and torch.equal(again[k], v), k
    assert arch(json.loads((back / "config.json").read_text())) == arch(cfg)


def test_qkv_split_is_transformers_layout(train_tok, tmp_path):
    """Vision qkv rows are [q; k; v]; InternLM2's wqkv is grouped per kv head as `(h gs d) z` (the script's
    einops rearrange), checked here against einops itself."""
    einops = pytest.importorskip("einops")
    sd, cfg = write_opengvlab(tmp_path / "ogl", "internlm2", train_tok)
    hf_sd, hf_cfg = opengvlab_to_hf(sd, cfg)
    legacy = opengvlab_to_legacy_hf(sd, cfg, hf_cfg)
    qkv = sd["vision_model.encoder.layers.1.attn.qkv.weight"]
    c = TINY_VIT["hidden_size"]
    assert torch.equal(hf_sd["model.vision_tower.encoder.layer.1.attention.k_proj.weight"], qkv[c : 2 * c])
    w = sd["language_model.model.layers.0.attention.wqkv.weight"]
    groups, hd = 8 // 2, 64 // 8
    ref = einops.rearrange(w, "(h gs d) z -> h gs d z", gs=2 + groups, d=hd)
    assert torch.equal(legacy["language_model.model.layers.0.self_attn.q_proj.weight"],
                       ref[:, :groups].reshape(-1, 64))
    assert torch.equal(hf_sd["model.language_model.layers.0.self_attn.v_proj.weight"], ref[:, -1].reshape(-1, 64))
    assert "lm_head.weight" in hf_sd and "language_model.output.weight" in sd


def _logits(model, tok, pixel_values):
    ids, _, _ = render_sample([{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A coin."}],
                              [1], tok)
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids[None], dtype=torch.long), pixel_values=pixel_values).logits


@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_hf_opengvlab_hf_keeps_logits(train_tok, tmp_path, llm):
    torch.manual_seed(0)
    if llm == "qwen2":
        model = from_preset("tiny", train_tok)  # tied embeddings: no lm_head in the OpenGVLab file
    else:
        text = text_config(len(train_tok), dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=8, num_key_value_heads=2,
                                                max_position_embeddings=32768, rms_norm_eps=1e-5,
                                                rope_theta=1e6, rope_scaling=2.0), False, "llama")
        vision = vision_config(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
        model = InternVLForConditionalGeneration(
            internvl_config(vision, text, train_tok.convert_tokens_to_ids("<IMG_CONTEXT>"), False))
    model.save_pretrained(str(tmp_path / "hf"))
    train_tok.save_pretrained(str(tmp_path / "hf"))
    ivl(["convert", "--from", "hf", "--to", "opengvlab", str(tmp_path / "hf"), str(tmp_path / "ogl")])
    ogl_cfg = json.loads((tmp_path / "ogl" / "config.json").read_text())
    assert ogl_cfg["architectures"] == ["InternVLChatModel"] and "llm_config" in ogl_cfg
    ivl(["convert", "--from", "opengvlab", "--to", "hf", str(tmp_path / "ogl"), str(tmp_path / "hf2")])
    again = InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "hf2"))
    px = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(model.eval(), train_tok, px), _logits(again.eval(), train_tok, px))
    ogl, _ = hf_to_opengvlab(model.state_dict(), model.config)
    assert "mlp1.3.weight" in ogl and "vision_model.encoder.layers.0.ls1" in ogl


def test_convert_refuses_wrong_layouts(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "internvl"}))
    with pytest.raises(SystemExit) as e:
        ivl(["convert", "--from", "opengvlab", "--to", "hf", str(tmp_path / "x"), str(tmp_path / "y")])
    assert e.value.code == 2 and "not an InternVLChatModel config" in capsys.readouterr().err
