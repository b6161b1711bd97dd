"""Build an InternVL 2.5 model with transformers' native classes (InternVL 2.5 report, arXiv 2412.05271, §3).

Ways in:
- `from_checkpoint(path)`: an InternVL HF-format directory (`-hf` checkpoints, or a stage output), in fp32 by
  default whatever dtype it was saved in (fp32 master weights, as InternVL trains);
- `from_preset(name, tokenizer)`: random init of a size preset (model/presets.py: `tiny` for tests, `1b`/`2b`/
  `4b`/`8b` = the published InternVL 2.5 shapes), the LLM vocabulary sized to the tokenizer the data was packed with;
- `build_empty(config)` + `materialize` + `load_weights`: the same model on the meta device, given storage (after
  FSDP2 sharding, if any) and then its weights, so no rank ever holds an unsharded copy it does not need;
- `compose(vision_from, llm_from)`: progressive scaling (InternVL 2.5 §3.3) -- the vision tower of an earlier
  checkpoint, the LLM of another checkpoint (or a preset), a freshly initialised projector; assembled on meta.
`build_model(spec, data_dir=...)` picks one of them from a CLI string.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from model.presets import PRESETS, get_preset, internvl_config, preset_config
from model.tokenizer import IMG_CONTEXT, add_internvl_tokens, load_tokenizer


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
    """Make model and tokenizer agree: every InternVL token present, vocab large enough, image_token_id set."""
    add_internvl_tokens(tokenizer)
    resize_embeddings_mean(model, len(tokenizer))
    model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)


# ---------------------------------------------------------------- meta-device building and weight loading
def build_empty(config: InternVLConfig) -> InternVLForConditionalGeneration:
    """The model of `config` on the meta device: shapes only, no memory (shard it, then `materialize`)."""
    with torch.device("meta"):
        return InternVLForConditionalGeneration(config)


def materialize(model: torch.nn.Module, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Give a meta-device (or FSDP2-sharded meta) model real, uninitialised storage on `device`, and recompute
    the buffers no checkpoint holds (RoPE `inv_freq`); `load_weights` fills the rest."""
    model.to_empty(device=device)
    fill_computed_buffers(model, device)
    return model


def fill_computed_buffers(model: torch.nn.Module, device: str | torch.device = "cpu") -> None:
    """Recompute the non-persistent buffers (RoPE `inv_freq`) of a model given storage by `to_empty`."""
    for mod in model.modules():
        missing = [n for n in getattr(mod, "_non_persistent_buffers_set", ()) if mod._buffers.get(n) is not None]
        if missing:
            with torch.device("cpu"):
                fresh = type(mod)(mod.config)  # RoPE modules compute their buffers from the config alone
            for n in missing:
                mod._buffers[n] = getattr(fresh, n).to(device)


class CheckpointRows:
    """The tensors of an HF checkpoint dir (safetensors, sharded or not) by name, read by row range: a
    `get_slice` reads only the bytes of the rows asked for, so an FSDP2 rank reads only its shard."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.handles = [safe_open(str(f), framework="pt") for f in _safetensors_files(Path(path))]
        self.where = {k: h for h in self.handles for k in h.keys()}

    def keys(self) -> list[str]:
        return list(self.where)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        sl = self.where[key].get_slice(key)
        return sl[start:stop] if len(sl.get_shape()) else sl[:]


class MappingRows:
    """The same interface over a name -> tensor mapping (e.g. `torch.load(..., mmap=True)`: slicing an mmap'd
    tensor reads only those rows' pages)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        t = self.tensors[key]
        return t[start:stop].clone() if t.dim() else t.clone()


def _shard_rows(param: torch.Tensor) -> tuple[int, int]:
    """[start, stop) of dim 0 this rank holds of an FSDP2 parameter (Shard(0), torch.chunk's split)."""
    if type(param).__name__ != "DTensor":
        return 0, param.shape[0] if param.dim() else 0
    mesh = param.device_mesh
    n, world, rank = param.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    return start, min(start + chunk, n)


def load_sharded(model: InternVLForConditionalGeneration, source, dtype: torch.dtype = torch.float32) -> int:
    """Fill a model given storage (FSDP2-sharded or not) from `source` (`CheckpointRows`, `MappingRows`): each
    parameter's local rows only, cast to `dtype`; persistent buffers whole. Returns the elements read.
    Legacy checkpoint names are mapped; a tied `lm_head.weight` follows the embeddings."""
    to_model = canonical_keys(model, source.keys())
    from_model = {v: k for k, v in to_model.items()}
    persistent = set(model.state_dict())
    tensors = dict(model.named_parameters())  # tied weights once
    tensors.update((n, b) for n, b in model.named_buffers() if n in persistent)
    missing = sorted(n for n in tensors if n not in from_model)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} of the model's tensors, e.g. {missing[:3]}")
    read = 0
    with torch.no_grad():
        for name, t in tensors.items():
            local = t.to_local() if type(t).__name__ == "DTensor" else t
            start, stop = _shard_rows(t)
            rows = source.rows(from_model[name], start, stop)
            if tuple(rows.shape) != tuple(local.shape):
                raise ValueError(f"{name}: checkpoint rows {tuple(rows.shape)}, this rank holds {tuple(local.shape)}")
            local.copy_(rows.to(dtype) if rows.is_floating_point() else rows)
            read += rows.numel()
    return read


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors under {path}")
    return files


def canonical_keys(model: InternVLForConditionalGeneration, keys: Iterable[str]) -> dict[str, str]:
    """Checkpoint key -> this transformers version's name, with transformers' own legacy mapping (the -hf
    checkpoints on the hub use `language_model.model.*`, `vision_tower.*` at the top level)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renames = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if not isinstance(m, WeightRenaming)]
    own = dict.fromkeys(model.state_dict().keys(), True)
    return {k: rename_source_key(k, renames, converters, model.base_model_prefix, own)[0] for k in keys}


def read_state_dict(
    path: str | Path, prefixes: tuple[str, ...] | None = None, dtype: torch.dtype | None = torch.float32
) -> dict[str, torch.Tensor]:
    """The tensors of an HF checkpoint dir (sharded or not) whose names start with one of `prefixes`, floating
    ones cast to `dtype` (fp32 master weights); only those tensors are read from disk."""
    from safetensors import safe_open

    out = {}
    for f in _safetensors_files(Path(path)):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if prefixes is None or k.startswith(prefixes):
                    t = fh.get_tensor(k)
                    out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def load_weights(
    model: InternVLForConditionalGeneration,
    state_dict: dict[str, torch.Tensor] | str | Path,
    strict: bool = True,
) -> None:
    """Copy a full (unsharded) state dict into `model` -- real, meta (a shape check only) or FSDP2-sharded: then
    each rank keeps only its shard. Legacy key names are mapped; a tied `lm_head.weight` may be absent."""
    sd = read_state_dict(state_dict) if isinstance(state_dict, str | Path) else state_dict
    names = canonical_keys(model, sd)
    sd = {names[k]: v for k, v in sd.items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # the tied copy; it follows the embeddings
    own = model.state_dict()
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if strict:
        missing = sorted(set(own) - set(sd) - tied)
        unexpected = sorted(set(sd) - set(own))
        bad = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or bad:
            raise ValueError(
                f"state dict does not match the model: {len(missing)} missing {missing[:3]}, {len(unexpected)} "
                f"unexpected {unexpected[:3]}, {len(bad)} of another shape {bad[:3]}"
            )
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(sd, strict=False)
    if model.config.tie_word_embeddings and not any(type(p).__name__ == "DTensor" for p in model.parameters()):
        model.tie_weights()


# ---------------------------------------------------------------- the ways in
def from_preset(
    name: str, tokenizer: PreTrainedTokenizerBase | None = None, vocab_size: int | None = None, seed: int = 0
) -> InternVLForConditionalGeneration:
    """Random-init model of preset `name`; vocab = len(tokenizer), else `vocab_size`, else the published one."""
    preset = get_preset(name)
    image_token_id = None
    if tokenizer is not None:
        add_internvl_tokens(tokenizer)
        vocab_size = len(tokenizer)
        image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    elif vocab_size is None and preset.vocab_size is None:
        raise ValueError("from_preset needs a tokenizer or a vocab_size")
    config = preset_config(name, vocab_size, image_token_id)
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(config)


def from_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32, meta: bool = False
) -> InternVLForConditionalGeneration:
    """Load an InternVL HF-format checkpoint directory in `dtype` (fp32 by default, even from a bf16 checkpoint:
    transformers 5 would keep bf16). `meta=True` builds it on the meta device instead, without reading weights
    (then shard, `materialize` and `load_weights(model, path)`)."""
    if meta:
        return build_empty(AutoConfig.from_pretrained(str(path)))
    return InternVLForConditionalGeneration.from_pretrained(str(path), dtype=dtype)


def _is_internvl(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get("model_type") == "internvl"


def _init_projector(model: InternVLForConditionalGeneration, seed: int) -> None:
    """Fresh projector weights, as transformers' `_init_weights` makes them (normal(0, initializer_range) linears,
    zero biases, unit LayerNorm)."""
    gen = torch.Generator().manual_seed(seed)
    std = getattr(model.config.text_config, "initializer_range", 0.02) or 0.02
    with torch.no_grad():
        for mod in model.model.multi_modal_projector.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
                mod.bias.zero_()
            elif isinstance(mod, torch.nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()


def compose(
    vision_from: str | Path,
    llm_from: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Progressive scaling: vision tower of `vision_from` + LLM of `llm_from` + a fresh projector, built on the
    meta device and then given only the weights it keeps (the source models are never built).

    `llm_from` is an InternVL checkpoint (its language model and head are taken), a plain causal-LM
    checkpoint (e.g. a Qwen2.5 directory), or a preset name (random LLM; then `tokenizer` is required).
    The tokenizer follows the LLM, since the vocabulary belongs to it; pass the data's tokenizer to size the
    vocabulary for the packed ids."""
    vision_cfg = AutoConfig.from_pretrained(str(vision_from)).vision_config
    llm_from = str(llm_from)
    if llm_from in PRESETS:
        if tokenizer is None:
            raise ValueError("compose with an LLM preset needs the data's tokenizer")
        src = from_preset(llm_from, tokenizer, seed=seed)
        text_cfg, tie = src.config.text_config, bool(src.config.tie_word_embeddings)
        llm_sd = {k: v for k, v in src.state_dict().items() if k.startswith(("model.language_model.", "lm_head."))}
    elif _is_internvl(llm_from):
        src_cfg = AutoConfig.from_pretrained(llm_from)
        text_cfg, tie = src_cfg.text_config, bool(src_cfg.tie_word_embeddings)
        llm_sd = read_state_dict(llm_from, ("model.language_model.", "language_model.", "lm_head."))
        tokenizer = tokenizer or load_tokenizer(llm_from)
    else:
        text_cfg = AutoConfig.from_pretrained(llm_from)
        tie = bool(getattr(text_cfg, "tie_word_embeddings", False))
        raw = read_state_dict(llm_from, ("model.", "lm_head."))
        llm_sd = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
                  for k, v in raw.items()}
        tokenizer = tokenizer or load_tokenizer(llm_from)
    add_internvl_tokens(tokenizer)
    config = internvl_config(vision_cfg, text_cfg, tokenizer.convert_tokens_to_ids(IMG_CONTEXT), tie)
    model = materialize(build_empty(config), device)
    vision_sd = read_state_dict(vision_from, ("model.vision_tower.", "vision_tower."))
    _init_projector(model, seed)
    proj = {f"model.multi_modal_projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()}
    load_weights(model, {**vision_sd, **llm_sd, **proj}, strict=True)
    attach_tokenizer(model, tokenizer)
    return model, tokenizer


def _saved_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint's weights were saved in (config.json `dtype` / `torch_dtype`); fp32 if unsaid."""
    cfg = Path(path) / "config.json"
    raw = json.loads(cfg.read_text()) if cfg.exists() else {}
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def _check_same_vocabulary(data_tok: PreTrainedTokenizerBase, llm_from: str | Path) -> None:
    """The packed ids must mean what the LLM learned: its own tokens keep their ids in the data's tokenizer."""
    from transformers import AutoTokenizer

    if not (Path(llm_from) / "tokenizer_config.json").exists():
        return
    own, data = AutoTokenizer.from_pretrained(str(llm_from)).get_vocab(), data_tok.get_vocab()
    moved = [t for t, i in own.items() if data.get(t) != i]
    if moved:
        raise ValueError(f"the data was packed with another tokenizer than --llm {llm_from}'s "
                         f"({len(moved)} of its tokens have other ids, e.g. {moved[0]!r})")


def compose_checkpoint(
    vision_from: str | Path,
    llm_from: str | Path,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    reuse: bool = False,
    seed: int = 0,
) -> Path:
    """`compose` written as an HF checkpoint dir (with its processor) that a stage-1 run takes as `--model`.

    The vocabulary is the packed data's tokenizer (DATA/tokenizer/) when there is one, so every packed id is
    in range. Weights are saved in the widest dtype the sources were saved in (bf16 stays bf16). With
    `reuse`, an already composed `out_dir` is kept (a resumed run trains the same model)."""
    from model.processor import save_processor

    out_dir, llm_from = Path(out_dir), str(llm_from)
    if reuse and _is_internvl(out_dir):
        return out_dir
    if not _is_internvl(vision_from):
        raise FileNotFoundError(f"--vit {vision_from}: not an InternVL checkpoint (give a stage-1.5 run's OUT)")
    if llm_from not in PRESETS and not (Path(llm_from) / "config.json").exists():
        raise FileNotFoundError(f"--llm {llm_from}: neither a preset ({sorted(PRESETS)}) nor a model dir")
    tok = None
    if data_dir is not None and (Path(data_dir) / "tokenizer").exists():
        tok = load_tokenizer(Path(data_dir) / "tokenizer")
        if llm_from not in PRESETS:
            _check_same_vocabulary(tok, llm_from)
    model, tok = compose(vision_from, llm_from, tokenizer=tok, seed=seed)
    dtypes = {_saved_dtype(vision_from), torch.float32 if llm_from in PRESETS else _saved_dtype(llm_from)}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(dtype).save_pretrained(str(tmp))
    save_processor(tmp, tok)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


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
