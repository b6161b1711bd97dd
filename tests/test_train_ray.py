"""Ray Train end to end: 2 CPU workers on a real local Ray, packed data through Ray Data, DDP."""

from __future__ import annotations

import json

import pytest
from conftest_train import small_packed_dataset

pytestmark = pytest.mark.slow


def test_two_cpu_workers_train_and_checkpoint(ray_local, train_tok, tmp_path):
    from transformers import InternVLForConditionalGeneration

    from train.launcher import run_train

    data = small_packed_dataset(tmp_path / "packed", train_tok, n_rows=4, per_row=2, max_tiles=1)
    out = tmp_path / "out"
    cfg = {"warmup_steps": 0, "save_every": 2}
    cut = run_train("1", data, "tiny", out, workers=2, config=cfg, max_steps=3, use_ray=True, stop_at_step=2)
    assert not cut["finished"]
    # --resume under Ray: the driver restarts each rank's plan dataset at the checkpoint's data position
    summary = run_train("1", data, "tiny", out, workers=2, config=cfg, max_steps=3, use_ray=True, resume=True)
    assert summary["finished"] and summary["steps"] == 3
    assert (out / "checkpoints" / "step_000002" / "trainer_state.pt").exists()
    InternVLForConditionalGeneration.from_pretrained(out)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    # step s: rank r trained plan slot s * world + r, in order, across the interruption
    assert [r["plan_index"] for r in recs] == [[0, 1], [2, 3], [4, 5]]


def test_fsdp2_interrupted_and_resumed_matches_ddp(ray_local, train_tok, tmp_path):
    """FSDP2 (sharded params, full-state checkpoints) cut after step 1 and resumed == DDP, step by step."""
    from train.launcher import run_train

    data = small_packed_dataset(tmp_path / "packed", train_tok, n_rows=4, per_row=2, max_tiles=1)
    cfg = {"warmup_steps": 0, "save_every": 1}
    fsdp = {"workers": 2, "config": {**cfg, "fsdp": True}, "max_steps": 2}
    run_train("2", data, "tiny", tmp_path / "fsdp", stop_at_step=1, **fsdp)
    run_train("2", data, "tiny", tmp_path / "fsdp", resume=True, **fsdp)
    run_train("2", data, "tiny", tmp_path / "ddp", workers=2, config=cfg, max_steps=2)
    f, d = (
        [json.loads(ln) for ln in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
        for k in ("fsdp", "ddp")
    )
    assert [r["plan_index"] for r in f] == [r["plan_index"] for r in d] == [[0, 1], [2, 3]]
    for a, b in zip(f, d):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_killed_worker_is_restarted_from_the_last_checkpoint(ray_local, train_tok, tmp_path):
    """A Ray Train worker SIGKILLed mid-run (what an OOM kill on a loaded node does, and what Ray reports
    as "A worker health check failed"): the group restarts from the newest checkpoint, the data order
    stays exact."""
    import contextlib
    import os
    import signal
    import threading
    import time

    import psutil

    from train.launcher import run_train

    data = small_packed_dataset(tmp_path / "packed", train_tok, n_rows=4, per_row=2, max_tiles=1)
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_a_worker() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not (out / "checkpoints" / "step_000002" / "trainer_state.pt").exists():
            time.sleep(0.1)
        me = os.getpid()
        for p in psutil.process_iter(["cmdline"]):
            if "RayTrainWorker" not in " ".join(p.info["cmdline"] or []):
                continue
            mine = False
            with contextlib.suppress(psutil.Error):
                mine = any(a.pid == me for a in p.parents())  # this test's Ray only, never another session's
            if mine:
                os.kill(p.pid, signal.SIGKILL)
                killed.append(p.pid)
                return

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    cfg = {"warmup_steps": 0, "save_every": 1}
    summary = run_train("1", data, "tiny", out, workers=2, config=cfg, max_steps=8, use_ray=True)
    killer.join(timeout=5)
    assert killed, "no Ray Train worker process was found to kill"
    assert summary["finished"] and summary["steps"] == 8
    assert int(summary["resumed_from"].rsplit("_", 1)[1]) >= 2  # the restart began at a checkpoint, not at 0
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert [r["plan_index"] for r in recs] == [[2 * s, 2 * s + 1] for s in range(8)]
