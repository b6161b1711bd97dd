"""Checkpoints: a HF-format model directory plus the trainer state, saved and restored as one unit.

Layout of OUT (litgpt/torchtitan style: the data position is part of the checkpoint):
    OUT/checkpoints/step_000010/  config.json  model.safetensors  tokenizer files  trainer_state.pt
                                  master_weights.pt   (fp32 weights, only when saving in bf16/fp16)
    OUT/  config.json  model.safetensors  tokenizer files      <- final model; the next stage's --model
Training keeps fp32 master weights; `model.safetensors` is written in the dtype asked for (bf16 by default,
as InternVL saves), and `master_weights.pt` keeps the fp32 copy that `--resume` continues from, so a resumed
run is exact. `trainer_state.pt` holds optimizer, scheduler, step and data position (tensors and plain types
only, so it loads with `torch.load(weights_only=True)`). A checkpoint is written to a temporary folder and
renamed, so a run killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from pipeline.report import json_safe

STATE_FILE = "trainer_state.pt"
MASTER_FILE = "master_weights.pt"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
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


def cast_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to `dtype`; a tensor shared by two keys (tied embeddings) stays shared."""
    done: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in state_dict.items():
        if id(v) not in done:
            done[id(v)] = v.detach().to(dtype) if v.is_floating_point() else v
        out[k] = done[id(v)]
    return out


def save_model(
    path: Path, model, tokenizer, state_dict: dict | None = None, dtype: str = "bfloat16"
) -> dict[str, torch.Tensor]:
    """HF-format directory loadable by `InternVLForConditionalGeneration.from_pretrained(path)`, weights
    and config `dtype` in `dtype`. Returns the full-precision state dict it was cast from."""
    inner = unwrap(model)
    full = state_dict if state_dict is not None else inner.state_dict()
    inner.save_pretrained(str(path), state_dict=cast_state_dict(full, DTYPES[dtype]), safe_serialization=True)
    cfg_path = Path(path) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for c in (cfg, cfg.get("text_config") or {}, cfg.get("vision_config") or {}):
        c["dtype"] = dtype  # save_pretrained writes the fp32 master dtype; `dtype="auto"` readers follow this
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        from model.processor import save_processor

        save_processor(path, tokenizer)  # so AutoProcessor.from_pretrained(checkpoint) works (issue 13 item 7)
    return full


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
    dtype: str = "bfloat16",
) -> Path:
    """Write OUT/checkpoints/step_N atomically; returns its path. Call on rank 0 only (after gathering
    `full_state_dict` / `optimizer_state` on every rank when sharded)."""
    final = Path(out) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    full = save_model(tmp, model, tokenizer, state_dict, dtype)
    if DTYPES[dtype] != torch.float32:  # the saved weights are rounded: keep the fp32 masters for --resume
        torch.save(cast_state_dict(full, torch.float32), tmp / MASTER_FILE)
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


def load_master_weights(path: Path, model) -> bool:
    """Replace `model`'s weights by the checkpoint's fp32 masters when it has them; True if it did."""
    f = Path(path) / MASTER_FILE
    if not f.exists():
        return False
    state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    unwrap(model).load_state_dict(state, strict=True)
    return True


def write_final(out: Path, checkpoint_dir: Path, summary: dict) -> None:
    """Copy the final checkpoint's model + tokenizer files to OUT (next stage's --model) and a summary."""
    out = Path(out)
    for f in Path(checkpoint_dir).iterdir():
        if f.is_file() and f.name not in (STATE_FILE, MASTER_FILE):
            shutil.copy2(f, out / f.name)
    (out / "report").mkdir(exist_ok=True)
    (out / "report" / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
