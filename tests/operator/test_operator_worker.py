"""End to end with a real worker: kubectl apply -> operator -> Deployment -> a real engine trains the job.

The emulator has no scheduler or kubelet, so the worker Deployment the operator renders never runs a
pod. The test stands in for the pod: it starts the Deployment's own container command (``flexllm``
plus the rendered args) as a subprocess, with the container's env resolved the way the kubelet
would (``$(VAR)`` in args, ``fieldRef`` metadata.name for POD_NAME, the Redis password from the
Secret's value). The only substitutions are what a pod gets from its mounts and network: the
adapter store (``/adapters``, the PVC) is a temporary folder and the port is a free local one. The
model is real but tiny (``tiny_llama_dir``: a random two-layer Llama with the bundled tokenizer),
named by the InferenceService as ``file://`` so the rendered ``--model`` needs no change. The
subprocess runs the API and the co-serving engine loop against the same real Valkey as the
operator; the Deployment's readyReplicas, which a kubelet would report, mirrors the worker's /readyz.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flexllm.worker import protocol
from flexllm.worker.protocol import JobCancel
from flexllm.worker.queue.jobs import JobQueue

from .conftest import REDIS_PASSWORD, apply, example, poll
from .pods import Replica, status_of, table, worker_pod

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("operator_process")]

REPO = Path(__file__).resolve().parents[2]
NAME = "tiny"
SERVICE_KEY = f"default.{NAME}"  # the worker's --service: <namespace>.<name>
DATASET = REPO / "examples" / "data" / "tiny.jsonl"


@pytest.fixture(scope="module")
def replica(kubectl, api_server, tiny_llama_dir, tmp_path_factory) -> Iterator[Replica]:
    """Applies the InferenceService, waits for its Deployment, runs the Deployment's container command."""
    folder = tmp_path_factory.mktemp("worker")
    service = example("inferenceservice.yaml")
    service["metadata"]["name"] = NAME
    service["spec"]["model"] = {"uri": f"file://{tiny_llama_dir}", "dtype": "float32"}
    service["spec"]["resources"] = {"gpus": 0}
    service["spec"]["engine"].update(maxTokensPerBatch=256, kvCacheFraction=0.05)  # CPU: a small KV cache
    apply(kubectl, folder, service)
    deployment = poll(lambda: api_server.objects("deployments").get(f"{NAME}-worker"), what="Deployment")
    poll(lambda: api_server.objects("services").get(NAME), what="Service")

    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][container["args"].index("--model") + 1] == str(tiny_llama_dir)
    secrets = {("flexllm-redis", "redis-password"): REDIS_PASSWORD}
    with worker_pod(container, f"{NAME}-worker-7d9f8-x2k4q", secrets, folder, folder / "adapters",
                    ["--max-finetune-tokens", "64", "--log-level", "info"]) as running:
        kubectl("patch", "deployment", f"{NAME}-worker", "--subresource=status", "--type=merge",
                "-p", '{"status": {"replicas": 1, "readyReplicas": 1}}')  # the kubelet's report
        yield running


def finetunejob(name: str, max_steps: int, every_steps: int) -> dict[str, Any]:
    job = example("finetunejob.yaml")
    job["metadata"]["name"] = name
    job["spec"]["inferenceService"] = NAME
    job["spec"]["dataset"]["source"] = f"file://{DATASET}"
    job["spec"]["lora"].update(rank=4, alpha=8)
    job["spec"]["training"].update(maxSteps=max_steps, batchTokens=64, maxSeqLen=32, learningRate=0.01)
    job["spec"]["publish"].update(everySteps=every_steps, keepVersions=3)
    return job


def reasons_of(api_server, name: str) -> set[str]:
    """The reasons of the Events posted about one object (one per phase change for FinetuneJobs)."""
    return {e["reason"] for e in api_server.objects("events").values() if e["involvedObject"]["name"] == name}


class PhaseRecorder:
    """Every phase a job's Redis progress hash goes through (None once deleted), polled every 20 ms."""

    def __init__(self, client, job: str) -> None:
        self.client, self.key = client, protocol.job_progress(SERVICE_KEY, job)
        self.phases: list[str | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            phase = self.client.hget(self.key, "phase")
            if not self.phases or self.phases[-1] != phase:
                self.phases.append(phase)

    def __enter__(self) -> PhaseRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_real_worker_trains_the_job_and_kubectl_shows_progress_loss_and_adapter(
        kubectl, api_server, replica, redis_client, tmp_path):
    service_row = table(kubectl, "inferenceservices.flexllm.ai")[NAME]
    assert service_row["MODEL"].startswith("file://")
    apply(kubectl, tmp_path, finetunejob("tiny-lora", max_steps=6, every_steps=2))

    seen: list[dict[str, str]] = []

    def finished() -> dict[str, str] | None:
        row = table(kubectl, "finetunejobs").get("tiny-lora", {})
        if row and (not seen or seen[-1] != row):
            seen.append(row)
        assert row.get("PHASE") != "Failed", f"{row}\n{replica.log_text()}"
        return row if row.get("PHASE") == "Succeeded" and row.get("ADAPTER") == "tiny-lora@v3" else None

    row = poll(finished, timeout=150, interval=0.3, what="the job to succeed with tiny-lora@v3")
    assert row["SERVICE"] == NAME
    assert row["PROGRESS"] == "6/6 (100%)"
    assert float(row["LOSS"]) > 0
    # Every row kubectl showed on the way (Queued, then Running rows unless the job outran the 0.5 s sync):
    # the step never goes back and ADAPTER only ever names one of the job's versions.
    steps = [int(r["PROGRESS"].split("/")[0]) for r in seen if r["PROGRESS"] not in ("", "<none>")]
    assert steps == sorted(steps), seen
    # (no PHASE yet in a row read before the operator's submit handler wrote the first status)
    assert {r["PHASE"] for r in seen} <= {"", "<none>", "Queued", "Running", "Succeeded"}, seen
    assert {r["ADAPTER"] for r in seen} <= {"", "<none>", "tiny-lora@v1", "tiny-lora@v2", "tiny-lora@v3"}, seen

    status = status_of(kubectl, "finetunejobs", "tiny-lora")
    versions = status["adapter"]["versions"]
    assert [(v["version"], v["step"]) for v in versions] == [("v1", 2), ("v2", 4), ("v3", 6)]
    assert all(Path(v["uri"].removeprefix("file://")).is_relative_to(replica.adapter_dir) for v in versions)
    assert status["progress"]["totalSteps"] == 6 and status["progress"]["tokensPerSecond"] > 0
    assert status["startTime"] and status["completionTime"]
    trainer = status["trainerStatus"]  # Kubeflow Trainer's shape, from the same worker progress
    metrics = {m["name"]: m["value"] for m in trainer["metrics"]}
    assert trainer["progressPercentage"] == 100 and metrics["currentStep"] == metrics["totalSteps"] == "6"
    assert float(metrics["loss"]) == float(row["LOSS"]) and trainer["lastUpdatedTime"]
    poll(lambda: {"Queued", "Succeeded"} <= reasons_of(api_server, "tiny-lora"), what="phase events")

    # The InferenceService shows what the replica really serves (its own replica hash), and it answers.
    served = json.loads(redis_client.hget(protocol.replica_state(SERVICE_KEY, replica.name), "adapters"))
    assert "tiny-lora@v3" in served

    def service_row_serving() -> dict[str, str] | None:
        row = table(kubectl, "inferenceservices.flexllm.ai")[NAME]
        return row if "tiny-lora@v3" in row["ADAPTERS"].split(",") else None

    service_row = poll(service_row_serving, what="ADAPTERS with tiny-lora@v3")
    assert service_row["READY"] == "1/1"
    served = json.loads(redis_client.hget(protocol.replica_state(SERVICE_KEY, replica.name), "adapters"))
    assert service_row["ADAPTERS"] == ",".join(sorted(served))
    loaded = status_of(kubectl, "inferenceservices.flexllm.ai", NAME)["loadedAdapters"]
    assert [(e["replica"], e["ready"], e["failed"]) for e in loaded] == [(replica.name, True, [])]
    body = {"model": "tiny-lora@v3", "prompt": "What is 2 + 2?", "max_tokens": 3, "temperature": 0}
    reply = httpx.post(f"{replica.base_url}/v1/completions", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "tiny-lora@v3"


def test_kubectl_delete_cancels_the_running_job_and_cleans_its_redis_state(
        kubectl, api_server, replica, redis_client, tmp_path):
    apply(kubectl, tmp_path, finetunejob("long-lora", max_steps=100_000, every_steps=100_000))

    def running() -> dict[str, str] | None:
        row = table(kubectl, "finetunejobs").get("long-lora", {})
        return row if row.get("PHASE") == "Running" and re.fullmatch(r"[1-9]\d*/100000 \(0%\)",
                                                                     row.get("PROGRESS", "")) else None

    row = poll(running, timeout=60, interval=0.3, what="long-lora running with progress")
    assert float(row["LOSS"]) > 0 and row["ETA"] not in ("", "<none>")
    assert row["ADAPTER"] in ("", "<none>")  # nothing published yet
    cancel_flag = protocol.job_cancel_flag(SERVICE_KEY, "long-lora")
    with PhaseRecorder(redis_client, "long-lora") as recorder:
        started = time.monotonic()
        kubectl("delete", "finetunejob", "long-lora", "--timeout=30s")  # waits for the operator's finalizer
        took = time.monotonic() - started
    assert "long-lora" not in api_server.objects("finetunejobs")
    # The engine stopped the job (Cancelled) before the operator cleaned up: then the hash is gone.
    assert recorder.phases[-2:] == ["Cancelled", None], recorder.phases
    assert took < 15
    assert "job long-lora cancelled: the FinetuneJob was deleted" in replica.log_text()
    assert not redis_client.exists(protocol.job_progress(SERVICE_KEY, "long-lora"))
    assert not redis_client.exists(protocol.job_versions(SERVICE_KEY, "long-lora"))
    entries = redis_client.xrange(protocol.job_stream(SERVICE_KEY))
    assert [json.loads(fields["data"])["name"] for _, fields in entries] == ["tiny-lora"]
    pending = redis_client.xpending(protocol.job_stream(SERVICE_KEY), protocol.ENGINE_GROUP)
    assert pending["pending"] == 0, "the worker still holds a job entry"
    assert JobQueue(redis_client, SERVICE_KEY).cancellation("long-lora") == JobCancel("the FinetuneJob was deleted")
    assert redis_client.ttl(cancel_flag) > 0
    assert {"Queued", "Running"} <= reasons_of(api_server, "long-lora")

    # The replica keeps serving: the finished job's adapter is still there, and the base model answers.
    body = {"model": "tiny-lora", "prompt": "Name a primary color.", "max_tokens": 2}
    assert httpx.post(f"{replica.base_url}/v1/completions", json=body, timeout=30).status_code == 200
