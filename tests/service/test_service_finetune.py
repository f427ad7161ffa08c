"""FinetuneJobs through the worker: trained inside the serving loop, versions hot-loaded and served, and a
worker killed mid-job replaced by another that resumes from the last published version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from flexllm.worker import protocol
from flexllm.worker.adapters.publisher import AdapterPublisher
from flexllm.worker.adapters.registry import AdapterRegistry
from flexllm.worker.adapters.store import AdapterStore
from flexllm.worker.coserve.engine import CoServingEngine
from flexllm.worker.coserve.jobs import CoServingJobs
from flexllm.worker.coserve.policy import SLO
from flexllm.worker.engine.llm_engine import LLMEngine
from flexllm.worker.finetune.spec import FinetuneJobSpec
from flexllm.worker.queue.jobs import JobQueue, JobSubmission
from flexllm.worker.queue.messages import InferenceRequest
from flexllm.worker.queue.requests import RequestConsumer
from flexllm.worker.serving import ServingLoop

from .conftest import unique_service


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": f"Q{i}: {i} + 1 =", "completion": f" {i + 1}"} for i in range(24)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json}\n")
    return path


def job_spec(dataset, max_steps: int, every: int) -> dict:
    return {"dataset": {"source": f"file://{dataset}", "format": "prompt-completion"},
            "lora": {"rank": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
            "training": {"maxSteps": max_steps, "learningRate": 0.01, "batchTokens": 64, "maxSeqLen": 32},
            "publish": {"everySteps": every, "keepVersions": 2}}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def versions(redis_client, service: str, job: str) -> list[dict]:
    return [json.loads(v) for v in redis_client.lrange(protocol.job_versions(service, job), 0, -1)]


def test_job_trains_in_the_serving_loop_and_is_served(server, redis_client, dataset):
    queue = JobQueue(redis_client, server.service)
    assert queue.submit(JobSubmission("math", "default", job_spec(dataset, max_steps=4, every=2)))
    wait_for(lambda: queue.progress("math").phase == "Succeeded", 120, "the job to succeed")
    progress = queue.progress("math")
    assert progress.step == progress.total_steps == 4 and progress.loss > 0
    assert [v["step"] for v in versions(redis_client, server.service, "math")] == [2, 4]
    body = {"model": "math", "prompt": "Q3: 3 + 1 =", "max_tokens": 3, "temperature": 0}
    reply = wait_for(lambda: (r := httpx.post(f"{server.base_url}/v1/completions", json=body)).status_code == 200
                     and r, 30, "the adapter to be hot-loaded")
    assert reply.json()["model"] == "math"
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'flexllm_tokens_total{kind="finetune"}' in metrics


def test_broken_dataset_fails_the_job_not_the_worker(server, redis_client, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n{\"nope\": 1}\n")
    queue = JobQueue(redis_client, server.service)
    queue.submit(JobSubmission("broken", "default", job_spec(bad, max_steps=2, every=1)))
    wait_for(lambda: queue.progress("broken").phase == "Failed", 60, "the job to fail")
    assert "bad.jsonl" in queue.progress("broken").message
    body = {"model": "tiny", "prompt": "still serving?", "max_tokens": 2}
    assert httpx.post(f"{server.base_url}/v1/completions", json=body).status_code == 200


def start_worker(model_dir, redis_url, service, adapter_dir, data_dir) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flexllm.worker.cli", "worker", "--model", str(model_dir), "--redis-url", redis_url,
         "--service", service, "--adapter-dir", str(adapter_dir), "--data-dir", str(data_dir),
         "--reclaim-idle-ms", "1500",
         "--max-finetune-tokens", "64", "--log-level", "warning"],
        env=os.environ | {"POD_NAME": f"worker-{time.monotonic_ns()}"}, start_new_session=True)


def test_killed_worker_mid_job_is_resumed_from_the_last_version(tiny_llama_dir, redis_url, redis_client,
                                                                  dataset, tmp_path):
    service = unique_service()
    queue = JobQueue(redis_client, service)
    queue.submit(JobSubmission("resumable", "default", job_spec(dataset, max_steps=30, every=3)))
    first = start_worker(tiny_llama_dir, redis_url, service, tmp_path, dataset.parent)
    second = None
    try:
        wait_for(lambda: versions(redis_client, service, "resumable"), 120, "a first version")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        killed_at = queue.progress("resumable").step
        assert killed_at < 30, "the job finished before the kill"
        second = start_worker(tiny_llama_dir, redis_url, service, tmp_path, dataset.parent)
        wait_for(lambda: queue.progress("resumable").phase == "Succeeded", 180, "the resumed job to finish")
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
    steps = [v["step"] for v in versions(redis_client, service, "resumable")]
    assert steps == list(range(3, 31, 3)), f"a version was trained twice or skipped: {steps}"


def stream_gaps(loop, redis_client, service: str, request_id: str, tokens: int, after_iteration=None) -> list[tuple]:
    """Stream one greedy request for ``tokens`` tokens through ``loop`` (its iterations run here): for each of
    its tokens after the first, (when it came, the gap since the previous one, what ``after_iteration(tokens
    so far)`` returned after the iteration that made it); that returning None stops the measurement."""
    request = InferenceRequest(request_id, [101] * 8, {"max_tokens": tokens, "temperature": 0, "ignore_eos": True})
    redis_client.xadd(protocol.request_stream(service), {"data": request.to_json()})
    times, tags = [], []
    deadline = time.monotonic() + 120
    while not times or request_id in loop.active:
        assert time.monotonic() < deadline, "the stream did not finish"
        outputs = [out for out in loop.run_once() if out.request_id == request_id]
        tag = after_iteration(len(times) + len(outputs)) if after_iteration is not None else True
        if tag is None:
            break
        times += [time.monotonic()] * len(outputs)
        tags += [tag] * len(outputs)
    return [(t, t - before, tag) for before, t, tag in zip(times, times[1:], tags[1:])]


def test_a_job_with_a_large_dataset_is_prepared_beside_a_running_stream(tiny_llama_dir, redis_client, tmp_path):
    """Accepting a job reads and counts its whole dataset (no maxSteps: its length sets the steps); that
    happens on a builder thread, so a running stream keeps its pace: the longest gap between its tokens
    while the job is prepared is bounded by the longest gap without a job (plus noise on a shared
    machine), far below the preparation time that a build on the engine thread would stall it for."""
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}? " * 3,
                                       "completion": f" It is {2 * i}."}) + "\n" for i in range(20000)))
    service = unique_service()
    engine = LLMEngine(model=str(tiny_llama_dir), max_model_len=256, num_kv_blocks=64)
    coserve = CoServingEngine(engine, SLO(ttft_s=60, tpot_s=1.0))
    queue = JobQueue(redis_client, service)
    store = AdapterStore(tmp_path / "adapters")
    jobs = CoServingJobs(queue, coserve, AdapterPublisher(store, AdapterRegistry(redis_client, service)), "engine-a",
                         FinetuneJobSpec.model_validate, data_roots=[tmp_path])
    loop = ServingLoop(coserve, RequestConsumer(redis_client, service, "engine-a"), jobs=jobs, idle_block_ms=20)
    loop.requests.ensure_group()
    queue.ensure_group()
    alone = max(gap for _, gap, _ in stream_gaps(loop, redis_client, service, "alone", 40))

    spec = job_spec(big, max_steps=1, every=1)
    spec["training"] = {"epochs": 1, "learningRate": 0.01, "batchTokens": 64, "maxSeqLen": 64}

    def preparing(tokens: int) -> bool | None:
        """Submit the job after 5 tokens; True while it is being prepared, None once it trains."""
        if tokens >= 5 and queue.progress("big").phase is None:
            queue.submit(JobSubmission("big", "default", spec))
        return None if "big" in coserve.jobs else "big" in jobs.builds

    during = [(t, gap) for t, gap, tag in stream_gaps(loop, redis_client, service, "beside", 240, preparing) if tag]
    assert len(during) >= 5, "the stream stalled while the job was prepared, or the dataset is too small"
    longest, prepared_s = max(gap for _, gap in during), during[-1][0] - during[0][0]
    print(f"longest gap: alone {alone:.3f} s, while preparing the job {longest:.3f} s "
          f"({len(during)} tokens in {prepared_s:.2f} s of preparation)")
    assert prepared_s > 1.0, "the dataset is too small to show anything"
    assert longest < min(3 * alone + 0.25, prepared_s / 3)
    deadline = time.monotonic() + 120
    while "big" not in coserve.jobs:  # the job starts once prepared, with the steps its dataset makes
        assert time.monotonic() < deadline, "the job did not start"
        loop.run_once()
    assert coserve.jobs["big"].runner.total_steps > 1
    loop.hand_back()
    jobs.hand_back()
