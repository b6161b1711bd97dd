"""`ivl submit` and `ivl jobs`: run ivl commands as Ray jobs (Job Submission SDK) with token auth on.

Ray 2.60 clusters started with `ray start` enforce token authentication. The client finds the token in
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, but only when RAY_AUTH_MODE=token, so we set
that mode (never disable it) and never print the token.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
import time
import uuid
from urllib.parse import urlparse

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def dashboard_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    if "://" not in address:
        address = f"http://{address}"
    return address


def client(address: str | None):
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before Ray is imported: it reads the mode once
    if os.environ["RAY_AUTH_MODE"] != "token":
        raise ValueError("ivl keeps Ray token authentication on; unset RAY_AUTH_MODE or set it to 'token'")
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard_address(address))


def _is_local(address: str) -> bool:
    return urlparse(address).hostname in ("127.0.0.1", "localhost", "::1")


def build_entrypoint(command: list[str], address: str) -> str:
    """The shell line the cluster runs. On a cluster on this machine, run this very ivl from this
    folder (relative paths keep working); elsewhere, `ivl` must be installed on the cluster."""
    if not command or command[0] != "ivl":
        raise ValueError("usage: ivl submit [--address URL] -- ivl <job> [flags]")
    if command[1:2] in (["submit"], ["jobs"]):
        raise ValueError(f"`ivl {command[1]}` cannot itself be submitted")
    if _is_local(address):
        exe = shutil.which("ivl") or os.path.join(os.path.dirname(sys.executable), "ivl")
        return f"cd {shlex.quote(os.getcwd())} && {shlex.quote(exe)} {shlex.join(command[1:])}"
    return shlex.join(command)


def submission_id(command: list[str]) -> str:
    job = command[1] if len(command) > 1 else "job"
    return f"ivl-{job}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def submit(command: list[str], address: str | None = None, wait: bool = True) -> int:
    """Submit, stream the logs until the job ends, return 0 if it SUCCEEDED."""
    if command[:1] == ["--"]:
        command = command[1:]
    address = dashboard_address(address)
    entry = build_entrypoint(command, address)
    c = client(address)
    from pipeline.session import job_from_argv, job_metadata  # imports Ray: after client() set the auth mode

    metadata = {**job_metadata(*job_from_argv(command)), "job": command[1]}  # the dashboard's job name
    job_id = c.submit_job(entrypoint=entry, submission_id=submission_id(command), metadata=metadata)
    print(f"submitted {job_id} to {address} (dashboard: {address}/#/jobs/{job_id})", flush=True)
    if not wait:
        return 0
    status = follow(c, job_id)
    print(f"{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def follow(c, job_id: str) -> str:
    async def tail():
        async for lines in c.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as e:  # the log stream can drop (cluster restart); fall back to polling status
        print(f"(log stream ended: {type(e).__name__})", file=sys.stderr)
    while (status := str(c.get_job_status(job_id)).split(".")[-1]) not in TERMINAL:
        time.sleep(1)
    return status


def jobs_command(action: str, job_id: str | None, address: str | None = None) -> None:
    c = client(address)
    if action == "list":
        rows = sorted(c.list_jobs(), key=lambda j: j.start_time or 0)
        print(f"{'submission id':40} {'status':10} {'started':19}  entrypoint")
        for j in rows:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
            entry = j.entrypoint if len(j.entrypoint) < 70 else "…" + j.entrypoint[-69:]
            print(f"{j.submission_id or j.job_id:40} {str(j.status).split('.')[-1]:10} {started}  {entry}")
        return
    if not job_id:
        raise ValueError(f"usage: ivl jobs {action} SUBMISSION_ID")
    if action == "status":
        info = c.get_job_info(job_id)
        print(f"{job_id}: {str(info.status).split('.')[-1]}" + (f" ({info.message})" if info.message else ""))
    elif action == "logs":
        print(c.get_job_logs(job_id), end="")
    elif action == "stop":
        print(f"{job_id}: stop requested" if c.stop_job(job_id) else f"{job_id}: already finished")
