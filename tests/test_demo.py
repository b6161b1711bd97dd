"""`ivl demo` as a new user meets it: one console line per stage, a summary table, strict JSON, pages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
def test_demo_console_reports_and_json(tmp_path):
    ivl = os.path.join(os.path.dirname(sys.executable), "ivl")
    env = {k: v for k, v in os.environ.items() if k != "IVL_PROGRESS"}  # the demo's own default, as a user runs it
    p = subprocess.run([ivl, "demo", "--out", str(tmp_path / "demo"), "--steps", "2"], capture_output=True,
                       text=True, env=env, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    stage_lines = [x for x in lines if re.match(r"\[\d/4\] ", x)]
    assert [x.split()[1] for x in stage_lines] == ["ingest", "curate", "pack", "train"]
    assert len(lines) < 30, p.stdout  # no progress bar repeated per block or per row
    assert any(x.startswith("chain report: ") for x in lines)
    out = tmp_path / "demo"
    report = _strict((out / "demo_report.json").read_text())
    assert report["curate"]["input"] == report["ingest"]["kept"]
    for job in ("ingest", "curate", "pack", "train"):
        _strict((out / job / "report" / "summary.json").read_text())
        assert (out / job / "report" / "index.html").stat().st_size > 1000
    chain = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert all(f'href="#{j}"' in chain for j in ("ingest", "curate", "pack", "train"))
    assert "data:image/png;base64," in chain
    assert list((out / "train" / "report").glob("*.png")), "the training report folder holds its plots"
