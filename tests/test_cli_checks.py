"""Bad configuration and sources fail before Ray starts: exit 2, one line on stderr, nothing before it."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest


def run_cli(*args):
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=120)
    return p, time.time() - t0


@pytest.mark.parametrize("job", ["ingest", "curate", "pack", "export"])
def test_missing_input_is_one_line_before_ray(tmp_path, job):
    nope = str(tmp_path / "nope")
    args = {"ingest": [nope], "curate": ["--in", nope], "pack": ["--in", nope, "--tokenizer", "x.gguf"],
            "export": ["--in", nope]}[job]
    p, took = run_cli(job, *args, "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"ivl {job}: error:") and "nope" in p.stderr
    assert took < 10, f"{took:.1f}s"  # generous bound; Ray never starts (README has the measured figures)
    assert not (tmp_path / "o").exists()


def test_pack_bad_tokenizer_and_budget(tmp_path, sample_meta):
    shards = tmp_path / "shards"
    shards.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.schema import CANONICAL

    pq.write_table(pa.Table.from_pylist([], schema=CANONICAL), shards / "a.parquet")
    p, _ = run_cli("pack", "--in", str(shards), "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "tok.gguf"))
    assert p.returncode == 2 and "tokenizer" in p.stderr and "does not exist" in p.stderr
    p, _ = run_cli("pack", "--in", str(shards), "--out", str(tmp_path / "o"), "--tokenizer", sample_meta,
                   "--max-tiles", "0")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--max-tiles must be positive" in p.stderr


def test_curate_bad_config_is_one_line_without_importing_ray(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.schema import CANONICAL

    pq.write_table(pa.Table.from_pylist([], schema=CANONICAL), shards / "a.parquet")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - op: text_rules\n    no_such_setting: 1\n")
    p, took = run_cli("curate", "--in", str(shards), "--out", str(tmp_path / "o"), "--config", str(bad))
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("ivl curate: error: config") and "stage 0 (text_rules)" in p.stderr
    assert took < 10, f"{took:.1f}s"
    # the check itself never imports Ray or datasketch (they cost seconds before the line could print)
    probe = subprocess.run([sys.executable, "-c", "import sys; from pipeline.curate_config import load_curate_config;"
                            f" load_curate_config({str(bad)!r})"], capture_output=True, text=True)
    assert "stage 0" in probe.stderr
    probe = subprocess.run([sys.executable, "-c", "import sys; from pipeline.curate_config import load_curate_config;"
                            " load_curate_config(None); print(sorted(m for m in ('ray', 'datasketch') if m in sys.modules))"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "[]", probe.stderr[-2000:]
