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
from flexllm.worker.queue.jobs import JobQueue, JobSubmission

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
