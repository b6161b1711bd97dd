"""Stage presets train exactly the modules the paper says (arXiv 2412.05271, Table 3)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest_train import (
    pack_samples,
    random_samples,
    small_packed_dataset,
    write_packed_dataset,
)

from model.build import from_checkpoint, from_preset
from train.launcher import run_train
from train.stages import apply_stage, build_optimizer, load_stage_config, stage_config


@pytest.fixture(scope="module")
def data(train_tok, tmp_path_factory):
    return small_packed_dataset(tmp_path_factory.mktemp("packed"), train_tok, n_rows=3, per_row=2, max_tiles=1)


def _parts(model) -> dict[str, dict[str, torch.Tensor]]:
    sd = model.state_dict()
    return {
        "vision": {k: v for k, v in sd.items() if ".vision_tower." in f".{k}"},
        "projector": {k: v for k, v in sd.items() if "multi_modal_projector" in k},
        "llm": {k: v for k, v in sd.items() if "language_model" in k or k.startswith("lm_head")},
    }


@pytest.mark.parametrize(
    "stage, changed",
    [("1", {"projector"}), ("1.5", {"vision", "projector"}), ("2", {"vision", "projector", "llm"})],
)
def test_stage_trains_only_its_modules(train_tok, data, tmp_path, stage, changed):
    before = _parts(from_preset("tiny", train_tok, seed=0))
    run_train(
        stage, data, "tiny", tmp_path, config={"warmup_steps": 0, "lr": 1e-3}, max_steps=2, use_ray=False
    )
    after = _parts(from_checkpoint(tmp_path))  # saved in bf16 (the default save_dtype)
    for group in ("vision", "projector", "llm"):
        bf16 = lambda t: t.to(torch.bfloat16)  # noqa: E731
        same = all(torch.equal(bf16(before[group][k]), bf16(after[group][k])) for k in before[group])
        if group in changed:
            assert not same, f"stage {stage} should train the {group}"
        else:
            assert same, f"stage {stage} must leave the {group} bit-identical"


def test_frozen_modules_get_no_grad_and_no_optimizer_state(train_tok):
    model = from_preset("tiny", train_tok)
    apply_stage(model, stage_config("1"))
    opt = build_optimizer(model, stage_config("1"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    proj = {id(p) for p in model.model.multi_modal_projector.parameters()}
    assert in_opt == proj
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert not any(p.requires_grad for p in model.model.language_model.parameters())


def test_paper_presets_and_yaml_override(tmp_path):
    s1, s15, s2 = stage_config("1"), stage_config("1.5"), stage_config("2")
    assert (s1.lr, s1.warmup_steps, s1.drop_path, s1.trainable) == (2e-4, 100, 0.0, ["projector"])
    assert (s15.lr, s15.drop_path) == (1e-5, 0.1) and s15.trainable == ["vision", "projector"]
    assert s15.warmup_steps == 100  # internvl2.5 stage1.5 script: --warmup_steps 100
    assert (s2.lr, s2.warmup_ratio, s2.loss_averaging) == (4e-5, 0.03, "square")
    y = tmp_path / "s.yaml"
    y.write_text("lr: 3.0e-5\nweight_decay: 0.05\ngrad_accum: 4\n")
    cfg = load_stage_config("2", y, max_steps=7)
    assert (cfg.lr, cfg.weight_decay, cfg.grad_accum, cfg.max_steps) == (3e-5, 0.05, 4, 7)
    y.write_text("learning_rate: 1.0\n")
    with pytest.raises(ValueError):
        load_stage_config("2", y)


def test_loss_falls_on_repeated_packed_set(train_tok, tmp_path):
    samples = random_samples(train_tok, 4, seed=7, image_every=2, max_tiles=1)
    data = write_packed_dataset(tmp_path / "packed", train_tok, [samples[:2], samples[2:]])
    run_train(
        "2",
        data,
        "tiny",
        tmp_path / "out",
        config={"warmup_steps": 0, "lr": 1e-2, "drop_path": 0.0},
        max_steps=10,
        use_ray=False,
    )
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0  # nats, from ~ln(vocab) at random init
    assert (tmp_path / "out" / "report" / "loss.png").stat().st_size > 0
    assert pack_samples(samples[:2])["num_tokens"] > 0


def test_gradient_checkpointing_on_by_default_and_gives_the_same_step(train_tok, data, tmp_path):
    from train.loop import prepare_model
    from train.stages import grad_checkpointing_state

    model = from_preset("tiny", train_tok)
    for stage, expected in (("1", {"vision": True, "llm": False}), ("1.5", {"vision": True, "llm": True})):
        prepare_model(model, stage_config(stage), torch.device("cpu"))
        assert grad_checkpointing_state(model) == expected  # InternVL: ViT always, LLM in 1.5 and 2
    prepare_model(model, stage_config("2", {"grad_checkpointing": False}), torch.device("cpu"))
    assert grad_checkpointing_state(model) == {"vision": False, "llm": False}

    cfg = {"warmup_steps": 0, "lr": 1e-3, "drop_path": 0.0, "save_dtype": "float32"}
    ckpt = run_train("2", data, "tiny", tmp_path / "ckpt", config=cfg, max_steps=2, use_ray=False)
    plain = run_train(
        "2",
        data,
        "tiny",
        tmp_path / "plain",
        config={**cfg, "grad_checkpointing": False},
        max_steps=2,
        use_ray=False,
    )
    assert ckpt["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-5)
    a, b = from_checkpoint(tmp_path / "plain").state_dict(), from_checkpoint(tmp_path / "ckpt").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
