"""A real `ray start --head` cluster with token auth: `ivl submit`, the dashboard's job API, `ivl jobs`
(the whole chain on a two-node cluster is in test_cluster.py)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# `ray start` beside an embedded Ray in the same test process fails to come up (its client server times
# out on node info), so these run in a pytest process of their own: `make test` runs `-m cluster` apart.
pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(d: Path, env: dict, token: str, num_cpus: int = 2):
    """`ray start --head --block` in its own process group: (process, dashboard URL, Ray's temp dir, GCS
    address), or RuntimeError with the tails of Ray's logs if it does not come up.

    The runtime-env agent port is pinned: with Ray's default (0, self-assigned) the Ray Client server must
    look the node up in GCS at start, and on Ray 2.60 with token auth that lookup can time out and take
    the whole head down ("Timed out waiting for node info")."""
    gcs, dash, client, agent, agent_http = (free_port() for _ in range(5))
    temp = Path(tempfile.mkdtemp(prefix="ivlray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    log = d / f"ray{gcs}.log"
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", str(num_cpus),
         "--ray-client-server-port", str(client), "--runtime-env-agent-port", str(agent),
         "--dashboard-agent-listen-port", str(agent_http),  # not 52365: a second node or Ray on this machine
         "--temp-dir", str(temp), "--disable-usage-stats"],
        env=env, cwd=d, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            req = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
            urllib.request.urlopen(req, timeout=2)
            return proc, url, temp, f"127.0.0.1:{gcs}"
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(1)
    stop_head(proc)
    tails = [log.read_text(errors="replace")[-1500:]]
    for name in ("raylet.out", "gcs_server.out", "ray_client_server.err", "dashboard.log"):
        for f in temp.glob(f"session_*/logs/{name}"):
            tails.append(f"--- {name}\n" + f.read_text(errors="replace")[-800:])
    shutil.rmtree(temp, ignore_errors=True)
    raise RuntimeError("\n".join(tails))


def stop_head(proc, temp: Path | None = None) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    if temp is not None:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node on 127.0.0.1 with token auth on (a second try on fresh ports if the first does not come
    up); torn down after."""
    d = tmp_path_factory.mktemp("cluster")
    token = secrets.token_hex(32)
    (d / "token").write_text(token)
    # a clean Ray environment: the embedded Ray of other tests in this process sets RAY_* variables
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(d / "token"))
    for attempt in (1, 2):
        try:
            proc, url, temp, _gcs = start_head(d, env, token)
            break
        except RuntimeError as e:
            if attempt == 2:
                pytest.fail(f"ray start did not come up:\n{e}")
    yield {"url": url, "env": env, "token": token, "dir": d}
    stop_head(proc, temp)


def api(cluster, path, token=True):
    headers = {"Authorization": f"Bearer {cluster['token']}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(cluster["url"] + path, headers=headers), timeout=10) as r:
        return json.loads(r.read())


def test_submit_ingest_to_a_token_auth_cluster(cluster, sample_meta, tmp_path):
    out = tmp_path / "ing"
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_MODE"}  # ivl submit turns it on itself
    p = subprocess.run([str(BIN / "ivl"), "submit", "--address", cluster["url"], "--",
                        "ivl", "ingest", sample_meta, "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "SUCCEEDED" in p.stdout and "report:" in p.stdout  # the job's own logs were streamed
    assert cluster["token"] not in p.stdout + p.stderr  # never print the token
    sub_id = next(w for w in p.stdout.split() if w.startswith("ivl-ingest-"))
    jobs = api(cluster, "/api/jobs/")
    mine = [j for j in jobs if j.get("submission_id") == sub_id]
    assert mine and mine[0]["status"] == "SUCCEEDED"
    assert mine[0]["metadata"]["job_name"] == "ivl-ingest" and mine[0]["metadata"]["ivl_out"] == str(out)
    assert json.load(open(out / "report" / "summary.json"))["input"] == 117
    listing = subprocess.run([str(BIN / "ivl"), "jobs", "--address", cluster["url"]], env=env,
                             capture_output=True, text=True, timeout=120)
    assert sub_id in listing.stdout and "SUCCEEDED" in listing.stdout
    with pytest.raises(urllib.error.HTTPError) as e:  # and the cluster refuses anyone without the token
        api(cluster, "/api/jobs/", token=False)
    assert e.value.code in (401, 403)
