"""bench/gpu_llm.sh --dry: the GPU check's code (sorted vs arrival-order batches, % of peak) on CPU."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_llm_script_dry_mode_runs_every_path():
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_llm.sh"), "--dry"], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "transformers, length-sorted batches:" in out.stdout
    assert "arrival-order batches:" in out.stdout and "speed ratio" in out.stdout
    assert "of bf16 peak" in out.stdout
