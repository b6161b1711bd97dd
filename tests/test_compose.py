"""Progressive scaling from the command line: `ivl train --stage 1 --vit RUN --llm PATH` (InternVL 2.5 §3.3).

The ViT of an earlier run, a different (wider) plain causal LM and a new projector are assembled on the meta
device into OUT/_composed, then stage 1 trains the projector on real packed shards.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest_train import small_packed_dataset
from safetensors.torch import load_file
from transformers import AutoTokenizer, InternVLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

from jobs.cli import main as ivl
from model.build import compose_checkpoint, from_preset


@pytest.fixture(scope="module")
def sources(train_tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    data = small_packed_dataset(root / "data", train_tok, n_rows=2)
    torch.manual_seed(3)
    vit = from_preset("tiny", train_tok)
    with torch.no_grad():
        for p in vit.model.vision_tower.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # a ViT that is not a fresh init
    vit.to(torch.bfloat16).save_pretrained(str(root / "vit_run"))  # as a stage-1.5 run saves it (bf16)
    train_tok.save_pretrained(str(root / "vit_run"))
    n_base = len(train_tok) - 3  # the LLM knows the base vocabulary only
    torch.manual_seed(4)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=n_base, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    llm.save_pretrained(str(root / "llm"))
    return root, data, vit, llm


def test_compose_checkpoint_keeps_the_parts(sources, train_tok):
    root, data, vit, llm = sources
    out = compose_checkpoint(root / "vit_run", root / "llm", root / "composed", data_dir=data)
    model = InternVLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    for k, v in vit.model.vision_tower.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[k], v.float()), k
    sd = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in sd.values()} == {torch.float32}  # the widest source dtype
    n_old = llm.config.vocab_size
    emb = model.get_input_embeddings().weight
    assert emb.shape == (len(train_tok), 96) and model.config.text_config.hidden_size == 96
    torch.testing.assert_close(emb[:n_old], llm.get_input_embeddings().weight, rtol=0, atol=0)
    torch.testing.assert_close(emb[n_old:], llm.get_input_embeddings().weight.mean(0).expand(3, -1))
    torch.testing.assert_close(model.lm_head.weight[:n_old], llm.lm_head.weight, rtol=0, atol=0)
    for k, v in llm.model.layers.state_dict().items():
        assert torch.equal(model.model.language_model.layers.state_dict()[k], v), k
    assert model.model.multi_modal_projector.linear_1.weight.shape == (96, 32 * 4)
    assert model.config.image_token_id == train_tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "InternVLProcessor"
    assert len(AutoTokenizer.from_pretrained(str(out))) == len(train_tok)


def test_bad_progressive_flags_fail_with_one_line(sources, tmp_path, capsys):
    root, data, _, _ = sources
    base = ["train", "--data", str(data), "--out", str(tmp_path / "o")]
    cases = [
        (["--stage", "1", "--vit", str(root / "vit_run")], "go together"),
        (["--stage", "2", "--vit", str(root / "vit_run"), "--llm", str(root / "llm")], "--stage 1"),
        (["--stage", "1", "--model", "tiny", "--vit", str(root / "vit_run"), "--llm", str(root / "llm")], "not both"),
        (["--stage", "1", "--vit", str(root / "llm"), "--llm", str(root / "llm")], "not an InternVL checkpoint"),
        (["--stage", "1"], "needs --model"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as e:
            ivl(base + flags)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], (flags, err)


@pytest.mark.slow
def test_ivl_train_vit_llm_stage1(sources, tmp_path, ray_local):
    root, data, vit, _ = sources
    out = tmp_path / "big_s1"
    ivl(["train", "--stage", "1", "--data", str(data), "--vit", str(root / "vit_run"), "--llm", str(root / "llm"),
         "--out", str(out), "--max-steps", "1"])
    assert (out / "_composed" / "config.json").exists()
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["finished"]
    trained = InternVLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    for k, v in vit.model.vision_tower.state_dict().items():  # stage 1 trains the projector only
        assert torch.equal(trained.model.vision_tower.state_dict()[k], v.float()), k
    composed = InternVLForConditionalGeneration.from_pretrained(str(out / "_composed"), dtype=torch.float32)
    assert not torch.equal(trained.model.multi_modal_projector.linear_2.weight,
                           composed.model.multi_modal_projector.linear_2.weight)
