"""Presets are the published InternVL 2.5 shapes; checkpoints load in fp32; meta-device build + load is exact.

The OpenGVLab configs below are the published ones (architecture fields, as cited in model/presets.py); they go
through transformers' OpenGVLab -> HF conversion (model/convert.py) and must give the preset's config, and
InternVLChatModel's state dict for them must load into the preset with strict=True (on the meta device).
"""

from __future__ import annotations

import pytest
import torch

from model.build import build_empty, from_checkpoint, from_preset, load_weights, materialize
from model.convert import opengvlab_config_to_hf, opengvlab_param_shapes, opengvlab_to_hf
from model.presets import PRESETS, preset_config

INTERNVIT_300M = {  # InternViT-300M-448px-V2_5, vision_config of every InternVL2.5 1B-8B config.json
    "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 1024,
    "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24, "qkv_bias": True,
    "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-06, "hidden_act": "gelu",
    "image_size": 448, "patch_size": 14, "num_channels": 3, "initializer_factor": 0.1, "drop_path_rate": 0.0,
    "dropout": 0.0, "attention_dropout": 0.0, "use_flash_attn": False,
}
QWEN25_05B = {  # llm_config of InternVL 2.5/3 1B (Qwen2.5-0.5B)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"}, "use_sliding_window": False,
    "sliding_window": None, "max_window_layers": 70, "vocab_size": 151674, "bos_token_id": 151643,
    "eos_token_id": 151643, "use_bfloat16": True,
}
INTERNLM25_18B = {  # llm_config of OpenGVLab/InternVL2_5-2B (internlm2_5-1_8b-chat)
    "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8,
    "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000,
    "rope_scaling": {"factor": 2.0, "type": "dynamic"}, "bias": False, "tie_word_embeddings": False,
    "vocab_size": 92553, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "attn_implementation": "eager",
}
QWEN25_3B = {  # llm_config of InternVL2_5-4B (Qwen2.5-3B); rope_scaling as InternVL sets it on Qwen2.5 (1B)
    **QWEN25_05B, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 2,
}
INTERNLM25_7B = {  # llm_config of InternVL2(.5)-8B (internlm2_5-7b-chat)
    **INTERNLM25_18B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8,
}
PUBLISHED = {"1b": QWEN25_05B, "2b": INTERNLM25_18B, "4b": QWEN25_3B, "8b": INTERNLM25_7B}


def chat_config(llm: dict) -> dict:
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "select_layer": -1, "template": "internvl2_5", "ps_version": "v2", "force_image_size": 448,
        "tie_word_embeddings": False, "vision_config": INTERNVIT_300M, "llm_config": llm,
    }


def arch(config) -> dict:
    """The fields that decide the architecture and its weights."""
    v, t = config.vision_config, config.text_config
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
              "attention_bias", "mlp_bias", "hidden_act", "use_sliding_window")
    vf = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "attention_bias",
          "use_qk_norm", "norm_type", "layer_norm_eps", "use_mean_pooling", "use_absolute_position_embeddings",
          "image_size", "patch_size", "hidden_act", "layer_scale_init_value")
    return {
        "text_type": t.model_type,
        "text": {k: getattr(t, k) for k in fields if hasattr(t, k)},
        "rope": dict(t.rope_parameters),
        "vision": {k: tuple(getattr(v, k)) if isinstance(getattr(v, k), list | tuple) else getattr(v, k) for k in vf},
        "top": (config.image_token_id, config.image_seq_length, config.downsample_ratio, config.vision_feature_layer,
                config.tie_word_embeddings, config.projector_hidden_act),
    }


@pytest.mark.parametrize("name", ["1b", "2b", "4b", "8b"])
def test_preset_is_the_published_architecture(name):
    published = chat_config(PUBLISHED[name])
    converted = opengvlab_config_to_hf(published)  # transformers' OpenGVLab -> HF config conversion
    assert arch(preset_config(name)) == arch(converted)
    # InternVLChatModel's state dict for that config, converted with the script's mapping, loads strictly
    shapes = opengvlab_param_shapes(published)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    hf_sd, _ = opengvlab_to_hf(sd, published)
    model = build_empty(preset_config(name))
    load_weights(model, hf_sd, strict=True)  # raises on any missing, unexpected or mis-shaped tensor
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in sd.values())


def test_1b_has_qkv_bias_layer_scale_and_no_final_layernorm():
    model = build_empty(preset_config("1b"))
    names = dict(model.named_parameters())
    assert names["model.vision_tower.encoder.layer.0.attention.q_proj.bias"].shape == (1024,)
    assert names["model.vision_tower.encoder.layer.23.lambda_2"].shape == (1024,)
    assert not any(n.startswith("model.vision_tower.layernorm") for n in names)
    assert names["lm_head.weight"].shape == (151674, 896) and not model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 938_193_024
    assert PRESETS["1b"].image_token_id == 151667  # <IMG_CONTEXT> after Qwen2.5's 151665 tokens + <img> </img>


def test_bf16_checkpoint_loads_as_fp32(tmp_path):
    model = from_preset("tiny", vocab_size=512)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = from_checkpoint(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.float(), b), k  # bf16 -> fp32 is exact
    assert {p.dtype for p in from_checkpoint(tmp_path, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_meta_build_then_load_equals_from_pretrained(tmp_path):
    torch.manual_seed(0)
    model = from_preset("tiny", vocab_size=512)
    model.save_pretrained(tmp_path)
    empty = from_checkpoint(tmp_path, meta=True)
    assert all(p.device.type == "meta" for p in empty.parameters())
    materialize(empty)
    load_weights(empty, tmp_path)
    ref = from_checkpoint(tmp_path)
    for (k, a), b in zip(ref.state_dict().items(), empty.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(ref.named_buffers(), empty.buffers()):
        assert torch.equal(a, b), k  # RoPE inv_freq recomputed
    assert empty.lm_head.weight is empty.get_input_embeddings().weight  # tied again
    ids = torch.randint(0, 500, (1, 17))
    px = torch.randn(1, 3, 448, 448)
    ids[0, 2:4] = model.config.image_token_id  # not a real image span: only checks the same numbers come out
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, empty(input_ids=ids).logits)
        assert torch.equal(ref.model.get_image_features(px).pooler_output,
                           empty.model.get_image_features(px).pooler_output)
    with pytest.raises(ValueError, match="missing"):
        load_weights(materialize(from_checkpoint(tmp_path, meta=True)),
                     {k: v for k, v in ref.state_dict().items() if "lambda_1" not in k})


def test_load_weights_into_an_fsdp2_sharded_meta_model(tmp_path):
    """The FSDP path: build on meta, shard, give storage, load the full checkpoint into the shards."""
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already up in this session")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.manual_seed(0)
    from_preset("tiny", vocab_size=512).save_pretrained(tmp_path)
    ref = from_checkpoint(tmp_path)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = from_checkpoint(tmp_path, meta=True)
        for layer in [*model.model.vision_tower.encoder.layer, *model.model.language_model.layers]:
            fully_shard(layer)
        fully_shard(model)
        materialize(model)
        load_weights(model, tmp_path)
        assert type(model.lm_head.weight).__name__ == "DTensor"
        ids = torch.randint(0, 500, (1, 13))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    finally:
        dist.destroy_process_group()
