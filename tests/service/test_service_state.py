"""Adapter store, model resolution, job intake, Redis connection handling and the CLI (no HTTP)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flexllm.worker import protocol
from flexllm.worker.adapters.registry import AdapterRegistry, UnknownModelError, resolve_model
from flexllm.worker.adapters.store import AdapterStore
from flexllm.worker.finetune.spec import FinetuneJobSpec
from flexllm.worker.queue.connection import connect, redacted, with_backoff
from flexllm.worker.queue.intake import JobIntake
from flexllm.worker.queue.jobs import JobQueue, JobSubmission

from .conftest import RecordingJobHandler, free_port, unique_service

REPO = Path(__file__).resolve().parents[2]


def copy_into(source: Path):
    return lambda folder: shutil.copytree(source, folder, dirs_exist_ok=True)


def test_store_publishes_atomically_numbers_versions_and_collects_garbage(tmp_path, peft_adapter):
    store = AdapterStore(tmp_path)
    versions = [store.publish("chat", copy_into(peft_adapter), step=s) for s in (5, 10, 15)]
    assert [v.name for v in versions] == ["chat@v1", "chat@v2", "chat@v3"]
    assert (versions[-1].path / "adapter_model.safetensors").exists() and versions[-1].step == 15
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    with pytest.raises(ValueError, match="adapter_config.json"):
        store.publish("chat", lambda folder: (folder / "half-written").write_text("x"))
    assert store.versions("chat") == [1, 2, 3] and store.adapters() == ["chat"]
    assert store.gc("chat", keep=2) == [1]
    assert store.versions("chat") == [2, 3]
    for bad in ("../escape", "a/b", ".hidden", "x@v1"):
        with pytest.raises(ValueError):
            store.folder(bad, 1)


def test_model_resolution_pins_the_latest_version(tmp_path, redis_client):
    store, registry = AdapterStore(tmp_path), AdapterRegistry(redis_client, unique_service())
    for version in (1, 2):
        registry.register(store.describe("chat", version))
    versions = registry.versions()
    assert resolve_model("base", "base", versions) is None
    assert resolve_model("chat", "base", versions) == "chat@v2"
    assert resolve_model("chat@v1", "base", versions) == "chat@v1"
    for unknown in ("chat@v9", "other", "other@v1"):
        with pytest.raises(UnknownModelError):
            resolve_model(unknown, "base", versions)
    history = redis_client.lrange(protocol.job_versions(registry.service, "chat"), 0, -1)
    assert [json.loads(h)["version"] for h in history] == [1, 2]


def test_job_intake_validates_and_respects_cancel(redis_client):
    spec = yaml.safe_load((REPO / "examples" / "finetunejob.yaml").read_text())["spec"]
    queue = JobQueue(redis_client, unique_service())
    queue.ensure_group()
    assert queue.submit(JobSubmission("good", "default", spec))
    assert not queue.submit(JobSubmission("good", "default", spec))  # idempotent by name
    queue.submit(JobSubmission("bad", "default", spec | {"training": {"learningRate": -1}}))
    queue.submit(JobSubmission("gone", "default", spec))
    queue.cancel("gone")
    handler = RecordingJobHandler()
    assert JobIntake(queue, "engine-1", handler, FinetuneJobSpec.model_validate).poll() == 3
    assert [name for name, _ in handler.accepted] == ["good"] and handler.reclaimed == [False]
    assert queue.progress("good").phase == "Queued"
    pending = redis_client.xpending(queue.stream, protocol.ENGINE_GROUP)
    assert pending["pending"] == 1, "an accepted job stays pending until it ends"
    # a replica that dies with the job is replaced: after the idle time another one reclaims it
    other = RecordingJobHandler()
    assert JobIntake(queue, "engine-2", other, FinetuneJobSpec.model_validate, reclaim_idle_ms=0).poll() == 1
    assert other.accepted == handler.accepted and other.reclaimed == [True]
    assert queue.progress("bad").phase == "Failed" and "invalid spec" in queue.progress("bad").message
    assert queue.progress("gone").phase == "Cancelled"
    assert queue.depth() == 0


def test_unreachable_redis_is_a_clear_error_after_backoff(monkeypatch):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    assert "hunter2" not in redacted(url)
    with pytest.raises(ConnectionError, match="unreachable") as error:
        with_backoff(connect(url).ping, "test", url, attempts=2)
    assert "hunter2" not in str(error.value)
    monkeypatch.setenv("REDIS_PASSWORD", "from-env")
    assert connect("rediss://redis.example:6380/0").connection_pool.connection_kwargs["password"] == "from-env"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexllm.worker.cli", *args], capture_output=True, text=True,
                          timeout=120, env=os.environ | (env or {}))


def test_cli_generate_submit_and_jobs(tiny_llama_dir, peft_adapter, redis_url, tmp_path):
    out = run_cli("generate", "--model", str(tiny_llama_dir), "--prompt", "Hello", "--max-tokens", "5",
                  "--lora", f"mine={peft_adapter}")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    manifest = yaml.safe_load((REPO / "examples" / "finetunejob.yaml").read_text())
    manifest["metadata"]["name"] = "cli-job"
    manifest["spec"]["inferenceService"] = service = unique_service()
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(manifest))
    submitted = run_cli("submit", "-f", str(tmp_path / "job.yaml"), "--redis-url", redis_url)
    assert submitted.returncode == 0 and "queued" in submitted.stdout, submitted.stderr
    again = run_cli("submit", "-f", str(tmp_path / "job.yaml"), "--redis-url", redis_url)
    assert again.returncode != 0 and "already exists" in again.stderr
    table = run_cli("jobs", "--service", service, env={"FLEXLLM_REDIS_URL": redis_url, "COLUMNS": "200"})
    assert "cli-job" in table.stdout and "Queued" in table.stdout, table.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(manifest | {"spec": {"dataset": {}}}))
    assert "invalid spec" in run_cli("submit", "-f", str(bad), "--redis-url", redis_url).stderr
