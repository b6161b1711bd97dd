"""A two-node Ray cluster on 127.0.0.1 with token auth: ingest -> curate -> pack -> train stage 1 run there
give the same outputs as the one-node run (`ivl demo`, an embedded Ray), and every job carries its ivl
name on the dashboard (job metadata, Ray Data dataset names)."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest
from conftest import read_rows
from test_submit import BIN, api, free_port, start_head, stop_head

from pipeline.session import dataset_name, job_from_argv, job_metadata

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

# the parameters `ivl demo` runs its chain with (jobs/demo.py), so its outputs are the one-node reference
DEMO_PACK = ["--max-tokens", "4096", "--max-tiles", "24"]
STEPS = 2


def start_worker(d: Path, env: dict, gcs: str) -> subprocess.Popen:
    """A second raylet (1 CPU) joining the head. Its agents get their own ports: both nodes share a host."""
    ports = [free_port() for _ in range(5)]
    log = d / f"worker{ports[0]}.log"
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--address", gcs, "--block", "--node-ip-address", "127.0.0.1",
         "--num-cpus", "1", "--runtime-env-agent-port", str(ports[0]), "--dashboard-agent-listen-port",
         str(ports[1]), "--dashboard-agent-grpc-port", str(ports[2]), "--metrics-export-port", str(ports[3]),
         "--node-manager-port", str(ports[4]), "--disable-usage-stats"],
        env=env, cwd=d, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def alive_nodes(c) -> list[dict]:
    nodes = api(c, "/api/v0/nodes?limit=100")["data"]["result"]["result"]
    return [n for n in nodes if n["state"] == "ALIVE"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Head (1 CPU) + worker (1 CPU), token auth on; fresh ports and a second try if either does not come up."""
    d = tmp_path_factory.mktemp("cluster2")
    token = secrets.token_hex(32)
    (d / "token").write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(d / "token"))
    for attempt in (1, 2):
        head = worker = temp = None
        try:
            head, url, temp, gcs = start_head(d, env, token, num_cpus=1)
            c = {"url": url, "env": env, "token": token, "dir": d, "gcs": gcs}
            worker = start_worker(d, env, gcs)
            deadline = time.time() + 90
            while len(alive_nodes(c)) < 2 and time.time() < deadline and worker.poll() is None:
                time.sleep(1)
            if len(alive_nodes(c)) < 2:
                raise RuntimeError("the second node did not join:\n" + "\n".join(
                    f.read_text(errors="replace")[-1500:] for f in d.glob("worker*.log")))
            break
        except RuntimeError as e:
            for p in (worker, head):
                if p is not None:
                    stop_head(p, temp if p is head else None)
            if attempt == 2:
                pytest.fail(f"two-node cluster did not come up:\n{e}")
    yield c
    stop_head(worker)
    stop_head(head, temp)


def test_job_names_from_the_command_line():
    assert job_from_argv(["/x/.venv/bin/ivl", "curate", "--in", "a", "--out", "s3://b/run?scheme=http"]) == (
        "ivl-curate", "s3://b/run?scheme=http")
    assert job_from_argv(["python", "-m", "pytest"]) == ("ivl", None)
    assert job_metadata("ivl-curate", "s3://b/run?access_key=k") == {
        "tool": "ivl", "job_name": "ivl-curate", "ivl_out": "s3://b/run"}  # a query never reaches the dashboard
    assert dataset_name("read").endswith(":read")


def outputs(root: Path) -> dict:
    """What the two runs must agree on: ingest and curate ids per split, packed rows, training metrics."""
    pack_cols = ("input_ids", "labels", "position_ids", "cu_seqlens", "sample_ids", "tiles_per_image",
                 "num_tokens", "num_tiles", "images")
    metrics = [json.loads(ln) for ln in (root / "train" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {
        "ingest": {s: sorted(r["id"] for r in read_rows(root / "ingest" / s)) for s in ("kept", "rejected")},
        "curate": {s: sorted((r["id"], r.get("reject_reason") or r.get("review_reason") or "")
                             for r in read_rows(root / "curate" / s)) for s in ("kept", "rejected", "review")},
        "pack": [{k: r[k] for k in pack_cols} for r in read_rows(root / "pack" / "kept")],
        "train": [{k: m[k] for k in ("step", "tokens", "samples", "sample_ids", "plan_index")} for m in metrics],
        "loss": [m["loss"] for m in metrics],
    }


def test_chain_on_two_nodes_equals_one_node(two_nodes, sample_meta, tmp_path):
    from model.tokenizer import smollm2_gguf_path

    c, tok = two_nodes, smollm2_gguf_path()
    t0 = time.time()
    ref = tmp_path / "one-node"
    plain = {k: v for k, v in c["env"].items() if not k.startswith("RAY_")}  # an embedded Ray of its own
    p = subprocess.run([str(BIN / "ivl"), "demo", "--out", str(ref), "--steps", str(STEPS)], env=plain,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    print(f"one-node demo: {time.time() - t0:.0f} s", flush=True)  # -s shows where the minutes go

    two = tmp_path / "two-nodes"
    ing, cur, pk, tr = (str(two / n) for n in ("ingest", "curate", "pack", "train"))
    # ingest joins the cluster as a driver (--address); the rest go through the Job Submission API
    p = subprocess.run([str(BIN / "ivl"), "ingest", sample_meta, "--out", ing, "--address", c["gcs"]],
                       env=c["env"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    submitted = []
    sub_env = {k: v for k, v in c["env"].items() if k != "RAY_AUTH_MODE"}
    for job in (["curate", "--in", ing, "--out", cur], ["pack", "--in", cur, "--out", pk, "--tokenizer", tok, *DEMO_PACK],
                ["train", "--stage", "1", "--data", pk, "--model", "tiny", "--out", tr, "--max-steps", str(STEPS)]):
        p = subprocess.run([str(BIN / "ivl"), "submit", "--address", c["url"], "--", "ivl", *job],
                           env=sub_env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{job[0]}: " + p.stdout[-3000:] + p.stderr[-2000:]
        submitted.append(next(w for w in p.stdout.split() if w.startswith(f"ivl-{job[0]}-")))
        print(f"two nodes, up to {job[0]}: {time.time() - t0:.0f} s", flush=True)

    # the chain adds up on the cluster (counts, ids carried from stage to stage, a model at the end)
    s_ing, s_cur, s_pk, s_tr = (json.load(open(two / n / "report" / "summary.json")) for n in ("ingest", "curate", "pack", "train"))
    assert s_cur["input"] == s_ing["kept"] == s_cur["kept"] + s_cur["rejected"] + s_cur["review"]
    kept_ids = {r["id"] for r in read_rows(two / "curate" / "kept")}
    packed = [re.sub(r"#\d+$", "", sid) for r in read_rows(two / "pack" / "kept") for sid in r["sample_ids"]]  # piece k
    assert set(packed) <= kept_ids and s_pk["samples"] == s_cur["kept"] - s_pk.get("rejected", 0)
    assert s_tr["steps"] == STEPS and (two / "train" / "model.safetensors").exists()

    a, b = outputs(ref), outputs(two)
    assert a["ingest"]["kept"] and a["curate"]["kept"] and a["pack"] and len(a["train"]) == STEPS
    for stage in ("ingest", "curate", "pack", "train"):
        assert b[stage] == a[stage], stage
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # same rows, same seed, 1 torch thread per worker

    jobs = api(c, "/api/jobs/")
    # item 7: the ingest driver carries init_ray's metadata; its Ray Data dataset is named after the job
    (driver,) = [j for j in jobs if j["type"] == "DRIVER" and j["metadata"].get("ivl_out") == ing]
    assert driver["metadata"]["job_name"] == "ivl-ingest" and driver["status"] == "SUCCEEDED"
    datasets = api(c, f"/api/data/datasets/{driver['job_id']}")["datasets"]
    assert datasets and all(d["dataset"].startswith("ivl-ingest:read_") for d in datasets), datasets
    by_sub = {j.get("submission_id"): j for j in jobs}
    for sub, name in zip(submitted, ("ivl-curate", "ivl-pack", "ivl-train")):
        assert by_sub[sub]["status"] == "SUCCEEDED" and by_sub[sub]["metadata"]["job_name"] == name
    # and the work really was spread: tasks ran on both raylets
    tasks = api(c, "/api/v0/tasks?limit=10000")["data"]["result"]["result"]
    assert len({t["node_id"] for t in tasks if t.get("node_id")}) == 2
