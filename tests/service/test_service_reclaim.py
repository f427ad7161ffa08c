"""Killing an engine process mid-stream loses no request: another consumer reclaims and finishes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from flexllm.worker import protocol
from flexllm.worker.api.app import ApiConfig, create_app
from flexllm.worker.engine.llm_engine import LLMEngine
from flexllm.worker.engine.sampling import SamplingParams

from .conftest import ServerThread, stream_completion, unique_service

MAX_TOKENS = 200
PROMPTS = [f"Request number {i} says" for i in range(6)]


def start_worker(name: str, model: Path, redis_url: str, service: str, adapter_dir: Path, log: Path):
    env = os.environ | {"POD_NAME": name, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "flexllm.worker.cli", "worker", "--model", str(model), "--redis-url", redis_url,
               "--service", service, "--adapter-dir", str(adapter_dir), "--reclaim-idle-ms", "1000",
               "--max-model-len", "256", "--max-num-seqs", "8"]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_replica(redis_client, service: str, name: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while not redis_client.exists(protocol.replica_state(service, name)):
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "worker never came up"
        time.sleep(0.1)


@pytest.mark.slow
def test_killed_engine_requests_are_finished_by_another(tiny_llama_dir, redis_url, redis_client, tmp_path):
    service = unique_service()
    app = create_app(ApiConfig(redis_url=redis_url, service=service, model_name="tiny"))
    app.state.api.attach_model(AutoTokenizer.from_pretrained(tiny_llama_dir), 256)
    logs = {name: tmp_path / f"{name}.log" for name in ("worker-a", "worker-b")}
    workers: list[subprocess.Popen] = []
    first_token = threading.Event()

    try:
        with ServerThread(app, None) as base_url:
            workers.append(start_worker("worker-a", tiny_llama_dir, redis_url, service, tmp_path, logs["worker-a"]))
            wait_replica(redis_client, service, "worker-a", workers[0], logs["worker-a"])
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                futures = [pool.submit(stream_completion, base_url, p, MAX_TOKENS, first_token) for p in PROMPTS]
                assert first_token.wait(60), logs["worker-a"].read_text()
                os.kill(workers[0].pid, signal.SIGSTOP)  # freeze it mid-stream, then make sure it was
                pending = redis_client.xpending(protocol.request_stream(service), protocol.ENGINE_GROUP)
                assert pending["pending"] > 0, "worker-a finished everything before it was stopped"
                workers[0].kill()
                workers[0].wait(timeout=10)
                workers.append(start_worker("worker-b", tiny_llama_dir, redis_url, service, tmp_path,
                                            logs["worker-b"]))
                texts = [f.result(timeout=180) for f in futures]
            # read now: once worker-b is killed its replica hash expires (TTL) while the reference runs
            adapters = redis_client.hget(protocol.replica_state(service, "worker-b"), "adapters")
    finally:
        for process in workers:
            process.kill()
            process.wait(timeout=10)

    assert "resuming request" in logs["worker-b"].read_text()
    engine = LLMEngine(model=str(tiny_llama_dir), max_model_len=256, num_kv_blocks=64)
    expected = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    assert texts == [out.text for out in expected]  # nothing lost, nothing repeated
    assert redis_client.xlen(protocol.request_stream(service)) == 0  # all acknowledged and deleted
    assert adapters is not None and json.loads(adapters) == [], logs["worker-b"].read_text()[-5000:]
