"""Checkpoints: a HF-format model directory plus the trainer state, saved and restored as one unit.

Layout of OUT (litgpt/torchtitan style: the data position is part of the checkpoint):
    OUT/checkpoints/step_000010/  config.json  model.safetensors  tokenizer files  trainer_state.pt
    OUT/  config.json  model.safetensors  tokenizer files      <- final model; the next stage's --model
`trainer_state.pt` holds optimizer, scheduler, step and data position (tensors and plain types only, so it
loads with `torch.load(weights_only=True)`). A checkpoint is written to a temporary folder and renamed, so
a run killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def unwrap(model):
    """The InternVLForConditionalGeneration inside a DDP wrapper (FSDP2 shards in place, no wrapper)."""
    return getattr(model, "module", model)


def full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """Unsharded CPU state dict (gathers FSDP2 shards; every rank must call it)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return None


def is_sharded(model) -> bool:
    return any(type(p).__name__ == "DTensor" for p in unwrap(model).parameters())


def optimizer_state(model, optimizer) -> dict:
    """Optimizer state to save; under FSDP2 the unsharded, name-keyed form (every rank must call it)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            unwrap(model), optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict) -> None:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            unwrap(model), optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
        )
    else:
        optimizer.load_state_dict(state)


def save_model(path: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """HF-format directory loadable by `InternVLForConditionalGeneration.from_pretrained(path)`."""
    inner = unwrap(model)
    inner.save_pretrained(str(path), state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def save_checkpoint(
    out: Path,
    model,
    tokenizer,
    optimizer_state_dict: dict,
    scheduler,
    step: int,
    data_position: dict,
    extra: dict | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Write OUT/checkpoints/step_N atomically; returns its path. Call on rank 0 only (after gathering
    `full_state_dict` / `optimizer_state` on every rank when sharded)."""
    final = Path(out) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model, tokenizer, state_dict)
    torch.save(
        {
            "optimizer": optimizer_state_dict,
            "scheduler": scheduler.state_dict(),
            "step": step,
            "data_position": data_position,
            "extra": extra or {},
        },
        tmp / STATE_FILE,
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step under OUT/checkpoints, if any."""
    root = Path(out) / "checkpoints"
    found = [
        (int(m.group(1)), p)
        for p in (root.iterdir() if root.is_dir() else [])
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()
    ]
    return max(found)[1] if found else None


def load_trainer_state(path: Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def write_final(out: Path, checkpoint_dir: Path, summary: dict) -> None:
    """Copy the final checkpoint's model + tokenizer files to OUT (next stage's --model) and a summary."""
    out = Path(out)
    for f in Path(checkpoint_dir).iterdir():
        if f.is_file() and f.name != STATE_FILE:
            shutil.copy2(f, out / f.name)
    (out / "report").mkdir(exist_ok=True)
    (out / "report" / "summary.json").write_text(json.dumps(summary, indent=2))
