"""Checkpoints: HF-loadable, exact resume after an interruption, stage hand-off, progressive scaling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest_train import small_packed_dataset
from transformers import AutoTokenizer, InternVLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

from model.build import compose
from model.tokenizer import IMG_CONTEXT, INTERNVL_TOKENS
from train.checkpoint import latest_checkpoint, load_trainer_state
from train.launcher import run_train

ROOT = Path(__file__).resolve().parents[1]
CFG = {"warmup_steps": 1, "lr": 1e-3, "grad_accum": 2, "save_every": 2}  # stage 1.5: drop path on


@pytest.fixture(scope="module")
def data(train_tok, tmp_path_factory):
    return small_packed_dataset(tmp_path_factory.mktemp("packed"), train_tok, n_rows=3, per_row=2, max_tiles=1)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_stop_and_resume_matches_uninterrupted_run(data, tmp_path):
    full = run_train("1.5", data, "tiny", tmp_path / "full", config=CFG, max_steps=4, use_ray=False)
    part = run_train(
        "1.5", data, "tiny", tmp_path / "cut", config=CFG, max_steps=4, use_ray=False, stop_at_step=3
    )
    assert not part["finished"] and latest_checkpoint(tmp_path / "cut").name == "step_000003"
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # no final model before the stage ends
    resumed = run_train(
        "1.5", data, "tiny", tmp_path / "cut", config=CFG, max_steps=4, use_ray=False, resume=True
    )
    assert resumed["finished"] and resumed["steps"] == full["steps"] == 4
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["sample_ids"] for r in a] == [r["sample_ids"] for r in b]  # same data order
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-9)
    wa = InternVLForConditionalGeneration.from_pretrained(tmp_path / "full").state_dict()
    wb = InternVLForConditionalGeneration.from_pretrained(tmp_path / "cut").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    state = load_trainer_state(latest_checkpoint(tmp_path / "cut"))  # weights_only=True load
    assert state["step"] == 4 and state["data_position"]["micro_batches_per_rank"] == 8


STEPS = 16  # long enough that the kill lands mid-run on a fast machine


@pytest.mark.slow
def test_killed_process_resumes(data, tmp_path):
    """A real SIGKILL mid-run, then --resume: ends at the same step with the same data order."""
    out = tmp_path / "run"
    code = (
        "import sys; from train.launcher import run_train; "
        f"run_train('1', {str(data)!r}, 'tiny', {str(out)!r}, config={{'save_every': 1, 'warmup_steps': 0}}, "
        f"max_steps={STEPS}, use_ray=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while (
            time.time() < deadline and not (out / "checkpoints" / "step_000002" / "trainer_state.pt").exists()
        ):
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = latest_checkpoint(out)
    assert done is not None and int(done.name.split("_")[1]) < STEPS
    summary = run_train(
        "1",
        data,
        "tiny",
        out,
        config={"save_every": 1, "warmup_steps": 0},
        max_steps=STEPS,
        use_ray=False,
        resume=True,
    )
    ref = run_train(
        "1",
        data,
        "tiny",
        tmp_path / "ref",
        config={"save_every": 1, "warmup_steps": 0},
        max_steps=STEPS,
        use_ray=False,
    )
    assert summary["steps"] == ref["steps"] == STEPS
    assert [r["sample_ids"] for r in _metrics(out)] == [r["sample_ids"] for r in _metrics(tmp_path / "ref")]
    assert summary["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-5)


def test_stage_output_is_hf_checkpoint_and_next_stage_model(train_tok, data, tmp_path):
    run_train("1", data, "tiny", tmp_path / "s1", config={"warmup_steps": 0}, max_steps=1, use_ray=False)
    model = InternVLForConditionalGeneration.from_pretrained(tmp_path / "s1")
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "s1")
    assert (
        model.config.image_token_id
        == loaded_tok.convert_tokens_to_ids(IMG_CONTEXT)
        == train_tok.convert_tokens_to_ids(IMG_CONTEXT)
    )
    assert (tmp_path / "s1" / "report" / "summary.json").exists() and (tmp_path / "s1" / "report" / "loss.png").exists()
    s15 = run_train(
        "1.5", data, tmp_path / "s1", tmp_path / "s15", config={"warmup_steps": 0}, max_steps=1, use_ray=False
    )
    assert s15["finished"]


def test_progressive_scaling_compose_then_stage1(train_tok, data, tmp_path):
    run_train("1", data, "tiny", tmp_path / "small", config={"warmup_steps": 0}, max_steps=1, use_ray=False)
    # a different, wider LLM saved as a plain causal-LM checkpoint with a tokenizer lacking the InternVL tokens
    base_tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    plain = tmp_path / "plain_tok"
    base_tok.save_pretrained(plain)
    llm_cfg = Qwen2Config(
        vocab_size=len(base_tok) - len(INTERNVL_TOKENS),
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    llm = Qwen2ForCausalLM(llm_cfg)
    llm_dir = tmp_path / "llm"
    llm.save_pretrained(llm_dir)
    from tokenizers import Tokenizer  # drop the InternVL tokens to exercise adding them

    raw = json.loads(Tokenizer.from_file(str(plain / "tokenizer.json")).to_str())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] not in INTERNVL_TOKENS]
    Tokenizer.from_str(json.dumps(raw)).save(str(llm_dir / "tokenizer.json"))
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        if (plain / f).exists():
            cfg = (plain / f).read_text()
            if f == "tokenizer_config.json":
                d = json.loads(cfg)
                d.pop("added_tokens_decoder", None)
                d.pop("extra_special_tokens", None)
                cfg = json.dumps(d)
            (llm_dir / f).write_text(cfg)
    assert IMG_CONTEXT not in AutoTokenizer.from_pretrained(llm_dir).get_vocab()

    model, new_tok = compose(tmp_path / "small", llm_dir)
    small = InternVLForConditionalGeneration.from_pretrained(tmp_path / "small")
    for k, v in small.model.vision_tower.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[k], v)
    emb = model.get_input_embeddings().weight
    n_old = llm_cfg.vocab_size
    assert emb.shape[0] == len(new_tok) == n_old + 9 and model.config.text_config.hidden_size == 96
    torch.testing.assert_close(emb[:n_old], llm.get_input_embeddings().weight)
    torch.testing.assert_close(emb[n_old:], llm.get_input_embeddings().weight.mean(0).expand(9, -1))
    assert model.model.multi_modal_projector.linear_2.weight.shape == (96, 96)
    assert model.config.image_token_id == new_tok.convert_tokens_to_ids(IMG_CONTEXT)

    composed = tmp_path / "composed"
    model.save_pretrained(composed)
    new_tok.save_pretrained(composed)
    summary = run_train(
        "1", data, composed, tmp_path / "big_s1", config={"warmup_steps": 0}, max_steps=2, use_ray=False
    )
    assert summary["finished"] and summary["final_loss"] > 0
