"""Stage presets 1 / 1.5 / 2 (InternVL 2.5 report, arXiv 2412.05271, Table 3) and what they freeze.

`stage_config("1.5", overrides)` gives a validated `StageConfig`; every field can be overridden from a
YAML file (`load_stage_config(stage, "stage.yaml")`). `apply_stage(model, cfg)` freezes the modules the stage
does not train (requires_grad False, so they get no gradients and no optimizer state), sets the vision
tower's drop path, and `build_optimizer` / `build_scheduler` give AdamW + warmup-cosine on what is left.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

Module = Literal["vision", "projector", "llm"]


class StageConfig(BaseModel):
    """One training stage; defaults come from the preset, any field may be overridden."""

    model_config = ConfigDict(extra="forbid")

    stage: str = Field(description="stage name: 1, 1.5 or 2")
    trainable: list[Module] = Field(description="modules that are trained; the rest are frozen")
    lr: float = Field(description="peak learning rate (one LR for all trained modules)")
    warmup_steps: int | None = Field(None, description="linear warmup steps; when None use warmup_ratio")
    warmup_ratio: float = Field(0.03, description="warmup as a fraction of total steps (InternVL 2.5: 3%)")
    min_lr_ratio: float = Field(0.0, description="cosine decays to lr * min_lr_ratio")
    weight_decay: float = Field(0.01, description="AdamW weight decay, 0.01 for 1B-4B, 0.05 larger (paper)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, description="AdamW epsilon")
    grad_clip: float = Field(1.0, description="max global grad norm (0 = no clipping)")
    drop_path: float = Field(0.0, description="vision tower stochastic depth rate (max, linear over depth)")
    loss_averaging: Literal["token", "sample", "square"] = Field("square", description="loss reweighting")
    context_length: int = Field(16384, description="token budget of a packed row, for the padding fraction")
    grad_accum: int = Field(1, description="micro-batches (one packed row each) per optimizer step")
    epochs: float = Field(1.0, description="passes over the packed rows when max_steps is not set")
    max_steps: int | None = Field(None, description="optimizer steps; overrides epochs")
    save_every: int = Field(0, description="checkpoint every N steps (0 = only at the end)")
    log_every: int = Field(1, description="write metrics every N steps")
    grad_checkpointing: bool = Field(
        True, description="activation checkpointing: ViT always, the LLM where checkpoint_llm (InternVL: on)"
    )
    checkpoint_llm: bool = Field(True, description="also checkpoint the LLM layers (stages 1.5 and 2)")
    attention: Literal["auto", "ivl_varlen", "sdpa", "eager"] = Field(
        "auto", description="packed attention path"
    )
    bf16: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU); parameters stay fp32")
    save_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the saved model weights (InternVL saves bf16)"
    )
    ce_chunk: int = Field(2048, description="rows of logits per cross-entropy chunk")
    seed: int = Field(0, description="seed for init, data order and augmentation")
    fsdp: bool = Field(False, description="shard with FSDP2 instead of DDP (models that do not fit one GPU)")


# InternVL 2.5 Table 3 and the public stage scripts (internvl_chat/shell/internvl2.5/*).
PRESETS: dict[str, dict] = {
    "1": dict(trainable=["projector"], lr=2e-4, warmup_steps=100, drop_path=0.0, checkpoint_llm=False),
    # stage 1.5: 100 warmup steps as internvl2.5 stage1.5 script; drop path 0.4 for the 6B ViT
    "1.5": dict(trainable=["vision", "projector"], lr=1e-5, warmup_steps=100, drop_path=0.1),
    "2": dict(trainable=["vision", "projector", "llm"], lr=4e-5, warmup_ratio=0.03, drop_path=0.1),  # <= 8B
}


def stage_config(stage: str | float, overrides: dict | None = None) -> StageConfig:
    stage = str(stage)
    if stage not in PRESETS:
        raise ValueError(f"unknown stage {stage!r}; choose from {sorted(PRESETS)}")
    return StageConfig(stage=stage, **{**PRESETS[stage], **(overrides or {})})


def load_stage_config(stage: str | float, path: str | Path | None = None, **overrides) -> StageConfig:
    """Preset, then the YAML file's keys, then keyword overrides (e.g. max_steps from the CLI)."""
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of stage fields")
    return stage_config(stage, {**(data or {}), **{k: v for k, v in overrides.items() if v is not None}})


def module_groups(model) -> dict[str, list[torch.nn.Module]]:
    """The three trainable units of InternVL: vision tower, MLP projector, LLM (with its head)."""
    core = model.model
    return {
        "vision": [core.vision_tower],
        "projector": [core.multi_modal_projector],
        "llm": [core.language_model, model.lm_head],
    }


def apply_stage(model, cfg: StageConfig) -> None:
    """Freeze what the stage does not train and set the vision drop path."""
    for name, modules in module_groups(model).items():
        for m in modules:
            m.requires_grad_(name in cfg.trainable)
    set_drop_path(model, cfg.drop_path)


def _drop_path_hook(rate: float):
    def hook(module, args, output):
        if not module.training or rate == 0.0:
            return output
        tensor = output[0] if isinstance(output, tuple) else output
        keep = 1.0 - rate
        mask = tensor.new_empty((tensor.shape[0],) + (1,) * (tensor.ndim - 1)).bernoulli_(keep) / keep
        return (tensor * mask, *output[1:]) if isinstance(output, tuple) else tensor * mask

    return hook


def set_drop_path(model, rate: float) -> None:
    """Stochastic depth on both residual branches of each ViT layer, rate rising linearly over depth
    (InternViT's `dpr = linspace(0, drop_path_rate, depth)`). transformers' InternVL layer has no drop
    path, so it is a forward hook on the attention output and on the MLP output (before layer scale;
    a per-sample scalar commutes with it)."""
    layers = model.model.vision_tower.encoder.layer
    for layer in layers:
        for h in getattr(layer, "_ivl_drop_path_hooks", []):
            h.remove()
        layer._ivl_drop_path_hooks = []
    if rate <= 0:
        return
    for i, layer in enumerate(layers):
        r = rate * i / max(1, len(layers) - 1)
        layer._ivl_drop_path_hooks = [
            layer.attention.register_forward_hook(_drop_path_hook(r)),
            layer.dropout.register_forward_hook(_drop_path_hook(r)),  # applied to the MLP output
        ]


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model, cfg: StageConfig) -> torch.optim.Optimizer:
    """AdamW on trained parameters only; no weight decay on biases, norms, layer scales, embeddings of position."""
    decay, no_decay = [], []
    for _, p in trainable_parameters(model):
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    if not groups:
        raise ValueError(f"stage {cfg.stage} trains nothing: trainable={cfg.trainable}")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def warmup_steps(cfg: StageConfig, total_steps: int) -> int:
    return (
        cfg.warmup_steps if cfg.warmup_steps is not None else int(math.ceil(cfg.warmup_ratio * total_steps))
    )


def lr_factor(step: int, total_steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup from 0, then cosine to min_ratio: HF `get_cosine_schedule_with_warmup` (min_ratio 0) /
    `get_cosine_with_min_lr_schedule_with_warmup`, step for step, as InternVL's HF Trainer runs it."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max(0.0, min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(optimizer, cfg: StageConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = warmup_steps(cfg, total_steps)  # not clamped to total_steps: HF does not clamp either
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warm, cfg.min_lr_ratio)
    )


def set_grad_checkpointing(model, cfg: StageConfig) -> dict[str, bool]:
    """Activation checkpointing as InternVL 2.5 runs it (`--grad_checkpoint True` in every script): the
    ViT always, the LLM in stages that checkpoint it; `grad_checkpointing: false` turns both off.
    Non-reentrant, so frozen inputs and drop-path RNG replay are handled. Returns what is on."""
    core = model.model
    on = {
        "vision": cfg.grad_checkpointing,
        "llm": cfg.grad_checkpointing and cfg.checkpoint_llm,
    }
    for part, tower in (("vision", core.vision_tower), ("llm", core.language_model)):
        new = hasattr(tower, "activation_checkpointing_enable")  # transformers >= 5.2x renamed it
        if on[part] and new:
            tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif on[part]:
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif new:
            tower.activation_checkpointing_disable()
        else:
            tower.gradient_checkpointing_disable()
    return on


def grad_checkpointing_state(model) -> dict[str, bool]:
    """Which towers have checkpointed layers (for tests and the run log)."""
    core = model.model
    return {
        part: any(getattr(m, "gradient_checkpointing", False) for m in tower.modules())
        for part, tower in (("vision", core.vision_tower), ("llm", core.language_model))
    }
