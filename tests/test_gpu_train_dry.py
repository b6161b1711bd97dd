"""bench/gpu_train.sh --dry: the prepared GPU check runs end to end on CPU (tiny preset) without Ray."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_train_script_dry_run():
    proc = subprocess.run(["bash", "bench/gpu_train.sh", "--dry"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert res["ok"] and res["ray_imported"] is False
    assert res["varlen_vs_per_sample"]["ok"] and res["model_varlen_vs_stock"]["ok"]
    assert res["grad_checkpointing"] == {"vision": True, "llm": True}
    for path in ("ours", "stock_packed_sdpa"):
        assert res[path]["step_s"] > 0 and res[path]["tokens_per_s"] > 0
