"""Security: token auth stays on, checkpoints never unpickle code, outputs follow the user's umask."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ivl-pwned",))


def test_trainer_state_with_pickled_code_is_refused(tmp_path):
    from train.checkpoint import STATE_FILE, load_trainer_state

    with open(tmp_path / STATE_FILE, "wb") as f:
        pickle.dump({"step": 1, "evil": Boom()}, f)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_trainer_state(tmp_path)
    assert not os.path.exists("/tmp/ivl-pwned")


def test_submit_refuses_to_switch_auth_off(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "jobs", "--address", "http://127.0.0.1:9"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "token authentication" in p.stderr


def test_outputs_follow_the_umask(tmp_path):
    from pipeline.io import atomic_write_bytes

    old = os.umask(0o077)
    try:
        atomic_write_bytes(str(tmp_path / "a" / "x.bin"), b"data")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "a" / "x.bin").st_mode & 0o777) == 0o600
