"""The Redis contract (flexllm.worker.protocol): each message survives its trip through a real Redis, and
the operator (with the worker modules it and the CLI's parser share) imports without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import fields
from pathlib import Path

import pytest

from flexllm.worker import protocol
from flexllm.worker.protocol import (
    AdapterAnnouncement,
    AdapterVersion,
    JobCancel,
    JobProgress,
    JobSubmission,
    ReplicaState,
)
from flexllm.worker.queue.connection import connect
from flexllm.worker.queue.jobs import JobQueue
from flexllm.worker.redis_server import EmbeddedRedis

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)

# Fails the import of torch (and of what pulls it in) the way a machine without it would.
BLOCK_TORCH = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "transformers", "peft", "triton"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the operator must not need it)")
        return None

sys.meta_path.insert(0, NoTorch())
"""
TORCH_FREE_WORKER_MODULES = ["protocol", "options", "names", "engine.config", "finetune.spec", "queue.jobs",
                             "metrics", "cli"]


@pytest.fixture(scope="module")
def queue():
    with EmbeddedRedis() as url:
        yield JobQueue(connect(url), f"svc-{uuid.uuid4().hex[:8]}")


def test_every_operator_module_imports_without_torch():
    modules = [f"flexllm.operator.{path.stem}" for path in sorted((REPO / "operator").glob("*.py"))]
    modules += [f"flexllm.worker.{name}" for name in TORCH_FREE_WORKER_MODULES]
    script = BLOCK_TORCH + f"""
import importlib
for name in {modules!r}:
    importlib.import_module(name)
from flexllm.worker.cli import build_parser
build_parser().parse_args(["serve"])
blocked = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "transformers", "peft", "triton"))
assert not blocked, blocked
print("imported", len({modules!r}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90, env=env,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"imported {len(modules)}"


def test_the_torch_block_itself_works():
    """The check above could pass vacuously if the finder did not block: an import of torch must fail."""
    script = BLOCK_TORCH + "import torch\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "blocked" in result.stderr


def test_job_submission_round_trips_through_the_job_stream(queue):
    job = JobSubmission("tiny-lora", "team-a", {"dataset": {"source": "file:///data/x.jsonl"}, "lora": {"rank": 8}})
    assert queue.submit(job)
    (_, entry), = queue.client.xrange(queue.stream)
    assert json.loads(entry["data"]) == {"name": "tiny-lora", "namespace": "team-a", "spec": job.spec}
    assert JobSubmission.from_json(entry["data"]) == job
    assert queue.progress("tiny-lora").phase == "Queued"


def test_job_progress_round_trips_through_its_hash(queue):
    sent = JobProgress(phase="Running", step=30, total_steps=200, loss=0.123456789, tokens_per_second=1234.5,
                       eta_seconds=3725, message="started")
    queue.write_progress("p", sent)
    got = queue.progress("p")
    assert got.updated is not None and got == JobProgress(**{**vars(sent), "updated": got.updated})
    assert (got.percent, got.display, got.eta) == (15, "30/200 (15%)", "1h2m")
    assert sorted(queue.client.hgetall(protocol.job_progress(queue.service, "p"))) == sorted(protocol.PROGRESS_FIELDS)


def test_a_progress_write_leaves_unset_fields_as_they_are(queue):
    queue.write_progress("partial", JobProgress(phase="Running", step=3, total_steps=4, loss=1.5))
    queue.set_progress("partial", phase="Failed", message="NaN loss")
    got = queue.progress("partial")
    assert (got.phase, got.step, got.total_steps, got.loss, got.message) == ("Failed", 3, 4, 1.5, "NaN loss")
    with pytest.raises(TypeError):
        queue.set_progress("partial", totalSteps=3)  # one naming: the field names, snake_case


def test_progress_reads_bad_numbers_as_unset():
    got = JobProgress.from_redis({"step": "", "loss": "nan", "tokens_per_second": "inf", "eta_seconds": "soon"})
    assert got == JobProgress() and (got.percent, got.display, got.eta) == (None, "0", "")
    assert JobProgress(step=250, total_steps=200).percent == 100


def test_cancel_round_trips_through_its_flag(queue):
    assert queue.cancellation("c") is None and not queue.is_cancelled("c")
    queue.cancel("c", "the FinetuneJob was deleted")
    assert queue.cancellation("c") == JobCancel("the FinetuneJob was deleted") and queue.is_cancelled("c")
    assert 0 < queue.client.ttl(protocol.job_cancel_flag(queue.service, "c")) <= protocol.CANCEL_FLAG_TTL_S
    queue.client.set(protocol.job_cancel_flag(queue.service, "old"), "1")  # an older writer's flag
    assert queue.cancellation("old") == JobCancel()


def test_adapter_versions_round_trip_through_the_versions_list(queue):
    published = [AdapterVersion("v", n, f"file:///adapters/v/v{n}", step=5 * n, loss=1 / n) for n in (1, 2)]
    for version in published:
        queue.client.rpush(protocol.job_versions(queue.service, "v"), version.to_json())
    assert queue.versions("v") == published and queue.latest_version("v") == published[-1]
    assert published[-1].name == "v@v2" and published[-1].path == Path("/adapters/v/v2")
    assert {f.name for f in fields(AdapterVersion)} == set(json.loads(published[0].to_json()))


def test_adapter_announcements_round_trip():
    version = AdapterVersion("a", 3, "file:///adapters/a/v3", step=9, loss=0.5)
    for sent in (AdapterAnnouncement(version), AdapterAnnouncement(version, removed=True)):
        got = AdapterAnnouncement.from_json(sent.to_json())
        assert (got.version.adapter, got.version.version, got.version.uri, got.removed) == (
            "a", 3, "file:///adapters/a/v3", sent.removed)
    assert AdapterAnnouncement.from_json(AdapterAnnouncement().to_json()) == AdapterAnnouncement()


def test_replica_state_round_trips_through_its_hash(queue):
    key = protocol.replica_state(queue.service, "pod-a")
    sent = ReplicaState(("b@v1", "a@v2"), ready=True, updated=1_700_000_000, failed={"c@v1": "CUDA out of memory"})
    queue.client.hset(key, mapping=sent.to_redis())
    got = ReplicaState.from_redis(queue.client.hgetall(key))
    assert got == ReplicaState(("a@v2", "b@v1"), True, 1_700_000_000, {"c@v1": "CUDA out of memory"})
    assert ReplicaState.from_redis({}) == ReplicaState()
