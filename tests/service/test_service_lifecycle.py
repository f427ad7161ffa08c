"""A clean start and a clean stop of `flexllm serve` and `flexllm worker`, as real processes on loopback with
a real Redis: 503s while loading, SIGTERM drains (requests finished or handed back, a job checkpointed and
handed back, the embedded Redis stopped), an engine that cannot start exits non-zero with its reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from transformers import AutoTokenizer

from flexllm.worker import protocol
from flexllm.worker.api.app import ApiConfig, create_app
from flexllm.worker.engine.llm_engine import LLMEngine
from flexllm.worker.engine.sampling import SamplingParams
from flexllm.worker.net import free_port
from flexllm.worker.queue.jobs import JobQueue, JobSubmission

from .conftest import ServerThread, unique_service
from .test_service_finetune import dataset, job_spec, versions, wait_for  # noqa: F401 - dataset is a fixture

START_S = 240  # a process start on a loaded 2-core machine: imports, model load, profiling


def flexllm(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    """`flexllm ARGS` in its own cache folder and TMPDIR (so its embedded Redis can be found), logging to a file."""
    log = tmp_path / f"{name}.log"
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = os.environ | {"FLEXLLM_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path / "tmp"),
                        "POD_NAME": name, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "flexllm.worker.cli", *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT), log


def embedded_valkeys(tmp_path: Path) -> list[psutil.Process]:
    """valkey-server processes whose data folder is under the test's TMPDIR."""
    found = []
    for process in psutil.process_iter(["name"]):
        try:
            if "valkey" in (process.info["name"] or "") and Path(process.cwd()).is_relative_to(tmp_path):
                found.append(process)
        except psutil.Error:
            continue
    return found


def wait_ready(base_url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_S
    while True:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the server never became ready"
        try:
            if httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


def test_loading_and_draining_answer_503_with_retry_after(tiny_llama_dir, redis_url):
    app = create_app(ApiConfig(redis_url=redis_url, service=unique_service(), model_name="tiny"))
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    with ServerThread(app, None) as base_url:
        for reply in (httpx.get(f"{base_url}/v1/models"), httpx.post(f"{base_url}/v1/completions", json=body),
                      httpx.post(f"{base_url}/v1/chat/completions",
                                 json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})):
            assert reply.status_code == 503 and int(reply.headers["retry-after"]) > 0
            assert reply.json()["error"] == {"message": "the model is still loading; retry shortly",
                                             "type": "ServiceUnavailableError", "param": None, "code": "loading"}
        assert httpx.get(f"{base_url}/readyz").json() == {"ready": False, "model": False, "redis": True,
                                                          "draining": False}
        app.state.api.attach_model(AutoTokenizer.from_pretrained(tiny_llama_dir), 256)
        assert httpx.get(f"{base_url}/readyz").status_code == 200
        assert httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"] == "tiny"
        app.state.api.draining = True
        assert httpx.get(f"{base_url}/readyz").status_code == 503
        reply = httpx.post(f"{base_url}/v1/completions", json=body)
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "shutting_down"
        assert "retry-after" in reply.headers


@pytest.mark.slow
def test_serve_sigterm_mid_stream_finishes_the_request_and_exits_0(tiny_llama_dir, tmp_path):
    port = free_port()
    process, log = flexllm(tmp_path, "serve", "serve", "--model", str(tiny_llama_dir), "--host", "127.0.0.1",
                           "--port", str(port), "--max-model-len", "256")
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, process, log)
        assert len(embedded_valkeys(tmp_path)) == 1
        assert [p.name for p in (tmp_path / "cache" / "embedded-redis").iterdir()] == [f"smollm2-{port}.json"]
        body = {"model": str(tiny_llama_dir), "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0,
                "stream": True, "ignore_eos": True}
        chunks, readiness = [], []
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as reply:
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunks.append(json.loads(line[6:])["choices"][0])
                if len(chunks) == 1:
                    process.send_signal(signal.SIGTERM)
                    readiness = [wait_for(lambda: httpx.get(f"{base_url}/readyz").status_code == 503 or None,
                                          10, "/readyz to fail while draining")]
        assert process.wait(timeout=120) == 0, log.read_text()
    finally:
        stop(process)
    assert readiness == [True]
    assert len("".join(c["text"] for c in chunks)) > 0 and chunks[-1]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["text"]) == 32  # the request in flight was finished, not cut
    assert embedded_valkeys(tmp_path) == []  # the embedded Redis was stopped, not orphaned
    assert list((tmp_path / "cache" / "embedded-redis").iterdir()) == []  # and its state file removed


@pytest.mark.slow
def test_worker_sigterm_hands_requests_back_to_another_replica(tiny_llama_dir, redis_url, redis_client, tmp_path):
    service = unique_service()
    app = create_app(ApiConfig(redis_url=redis_url, service=service, model_name="tiny"))
    app.state.api.attach_model(AutoTokenizer.from_pretrained(tiny_llama_dir), 256)
    prompts = [f"Request {i} begins with" for i in range(3)]
    common = ["worker", "--model", str(tiny_llama_dir), "--redis-url", redis_url, "--service", service,
              "--adapter-dir", str(tmp_path / "adapters"), "--max-model-len", "256"]
    first_token = []
    processes = []

    def stream(prompt: str) -> str:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        parts = []
        for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True}):
            parts.append(chunk.choices[0].text)
            first_token.append(True)
        return "".join(parts)

    try:
        with ServerThread(app, None) as base_url:
            a, log_a = flexllm(tmp_path, "worker-a", *common, "--drain-seconds", "0")
            processes.append(a)
            wait_for(lambda: redis_client.exists(protocol.replica_state(service, "worker-a")) or a.poll() is not None,
                     START_S, "worker-a to start")
            with ThreadPoolExecutor(len(prompts)) as pool:
                futures = [pool.submit(stream, p) for p in prompts]
                wait_for(lambda: first_token, 120, "a first token")
                a.send_signal(signal.SIGTERM)
                assert a.wait(timeout=60) == 0, log_a.read_text()
                b, log_b = flexllm(tmp_path, "worker-b", *common)
                processes.append(b)
                texts = [f.result(timeout=START_S + 120) for f in futures]
    finally:
        for process in processes:
            stop(process)
    assert "handed back" in log_a.read_text()
    assert not redis_client.exists(protocol.replica_state(service, "worker-a"))  # it said it no longer serves
    engine = LLMEngine(model=str(tiny_llama_dir), max_model_len=256, num_kv_blocks=64)
    expected = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert texts == [out.text for out in expected]  # nothing lost, nothing repeated
    assert redis_client.xlen(protocol.request_stream(service)) == 0


@pytest.mark.slow
def test_worker_sigterm_mid_job_checkpoints_it_and_another_resumes(tiny_llama_dir, redis_url, redis_client,
                                                                    dataset, tmp_path):  # noqa: F811
    service = unique_service()
    queue = JobQueue(redis_client, service)
    queue.submit(JobSubmission("drained", "default", job_spec(dataset, max_steps=20, every=50)))
    common = ["worker", "--model", str(tiny_llama_dir), "--redis-url", redis_url, "--service", service,
              "--adapter-dir", str(tmp_path / "adapters"), "--max-finetune-tokens", "64",
              "--data-dir", str(dataset.parent)]
    processes = []
    try:
        a, log_a = flexllm(tmp_path, "worker-a", *common)
        processes.append(a)
        wait_for(lambda: (queue.progress("drained").step or 0) >= 2 or a.poll() is not None, START_S,
                 "two steps")
        seen = queue.progress("drained").step
        a.send_signal(signal.SIGTERM)
        assert a.wait(timeout=90) == 0, log_a.read_text()
        handed_back = queue.progress("drained")
        drained_at = [v["step"] for v in versions(redis_client, service, "drained")]
        assert handed_back.phase == "Queued" and "handed back by worker-a" in handed_back.message
        assert len(drained_at) == 1 and seen <= drained_at[0] < 20  # every finished step is in that version
        assert handed_back.step == drained_at[0]
        b, log_b = flexllm(tmp_path, "worker-b", *common)
        processes.append(b)
        wait_for(lambda: queue.progress("drained").phase == "Succeeded" or b.poll() is not None,
                 START_S + 180, "the resumed job to finish")
    finally:
        for process in processes:
            stop(process)
    assert queue.progress("drained").phase == "Succeeded", log_b.read_text()
    assert [v["step"] for v in versions(redis_client, service, "drained")] == [drained_at[0], 20]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["serve", "worker"])
def test_an_engine_that_cannot_start_exits_nonzero_with_its_reason(command, tmp_path):
    missing = tmp_path / "no-such-model"
    args = [command, "--model", str(missing)] + (["--port", str(free_port())] if command == "serve" else [])
    began = time.monotonic()
    env = os.environ | {"FLEXLLM_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "flexllm.worker.cli", *args], env=env, capture_output=True,
                         text=True, timeout=START_S)
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"flexllm {command}: error: the engine stopped") and str(missing) in last
    assert time.monotonic() - began < START_S / 2
    assert embedded_valkeys(tmp_path) == [] and list((tmp_path / "cache" / "embedded-redis").iterdir()) == []
