"""Service fixtures: an embedded Valkey server, and the API + engine loop on 127.0.0.1 in threads."""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from flexllm.worker.api.app import ApiConfig
from flexllm.worker.engine.config import EngineConfig
from flexllm.worker.net import free_port
from flexllm.worker.options import WorkerOptions
from flexllm.worker.queue.connection import connect
from flexllm.worker.redis_server import EmbeddedRedis
from flexllm.worker.server import api_and_worker
from flexllm.worker.serving import EngineWorker


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with EmbeddedRedis() as url:
        yield url


@pytest.fixture
def redis_client(redis_url):
    client = connect(redis_url)
    yield client
    client.close()


def unique_service() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"


@dataclass
class RunningServer:
    base_url: str
    app: FastAPI
    service: str
    adapter_dir: Path
    redis_url: str
    worker: EngineWorker


class ServerThread:
    """uvicorn in a thread on 127.0.0.1 (a free port) plus an ``EngineWorker`` thread; stopped on exit."""

    def __init__(self, app: FastAPI, worker: EngineWorker | None):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.worker, self.stop = worker, threading.Event()
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> str:
        if self.worker is not None:
            self.threads.append(self.worker.start_thread(self.stop))
        thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        thread.start()
        self.threads.append(thread)
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), f"{thread.name} did not stop"


def wait_ready(base_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{base_url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.05)


def start_server(model_dir: Path, redis_url: str, adapter_dir: Path, data_dirs: list[str] | None = None,
                 **api_overrides):
    """(context manager, RunningServer-to-be) for an API + engine loop on a fresh service; datasets are
    read from under ``data_dirs`` (default: the system's temporary folder, where pytest's folders are)."""
    service = unique_service()
    config = ApiConfig(redis_url=redis_url, service=service, model_name="tiny", **api_overrides)
    engine_config = EngineConfig(model=str(model_dir), max_model_len=256, num_kv_blocks=64, max_num_seqs=16)
    options = WorkerOptions(redis_url, service, f"replica-{service}", str(adapter_dir), reclaim_idle_ms=1000,
                            data_dirs=data_dirs if data_dirs is not None else [tempfile.gettempdir()])
    app, worker = api_and_worker(engine_config, options, config)
    return ServerThread(app, worker), app, service, worker


@pytest.fixture(scope="module")
def server(tiny_llama_dir, redis_url, tmp_path_factory) -> Iterator[RunningServer]:
    adapter_dir = tmp_path_factory.mktemp("adapters")
    threads, app, service, worker = start_server(tiny_llama_dir, redis_url, adapter_dir)
    with threads as base_url:
        wait_ready(base_url)
        yield RunningServer(base_url, app, service, adapter_dir, redis_url, worker)


def write_peft_adapter(model_dir: Path, folder: Path, seed: int = 0, rank: int = 4) -> Path:
    """A real PEFT LoRA adapter (q_proj, v_proj) for the tiny model, with non-zero B so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def peft_adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    return write_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("peft-adapter"))


class RecordingJobHandler:
    """Stands in for the co-serving handler where intake is tested alone (tests/coserve trains for real);
    it takes every job and never ends one, as a replica that stopped would."""

    def __init__(self):
        self.accepted, self.reclaimed = [], []

    def accept(self, job, spec, entry_id):
        self.accepted.append((job.name, entry_id))
        self.reclaimed.append(job.reclaimed)
        return True

    def held_entries(self):
        return []


def stream_completion(base_url: str, prompt: str, max_tokens: int, first_token: threading.Event) -> str:
    """A greedy streamed completion (ignore_eos) through the OpenAI SDK; sets ``first_token`` on the first one."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    parts = []
    for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}):
        parts.append(chunk.choices[0].text)
        first_token.set()
    return "".join(parts)


def run_loop_in_thread(loop) -> tuple[threading.Thread, threading.Event, dict]:
    """A ``ServingLoop`` running in a thread: (thread, its stop event, ``{"error": EngineBroken}`` once it gave up)."""
    from flexllm.worker.serving import EngineBroken

    stop, outcome = threading.Event(), {}

    def run() -> None:
        try:
            loop.run(stop)
        except EngineBroken as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, name="serving-loop")
    thread.start()
    return thread, stop, outcome
