"""The real operator process against the Kubernetes emulator, a real Valkey server, and real kubectl.

Nothing is simulated on the kopf side. No worker runs here: test_operator_worker.py runs a real one
(progress, loss, adapter versions, served adapters, cancel on delete). The tests named
``..._written_by_test`` write into Redis, through the shared protocol helpers, what a real worker
cannot easily be made to produce (a failed adapter hot-load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flexllm.worker import protocol

from .conftest import apply, example
from .pods import status_of

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("operator_process")]

REPO = Path(__file__).resolve().parents[2]
SERVICE_KEY = "default.smollm2"  # the worker's --service: <namespace>.<name>


def get(kubectl, *args: str) -> dict[str, Any]:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def test_inferenceservice_creates_worker_deployment_and_service(kubectl, api_server, tmp_path, wait_for):
    kubectl("apply", "--validate=false", "-f", str(REPO / "examples" / "inferenceservice.yaml"))
    deployment = wait_for(lambda: api_server.objects("deployments").get("smollm2-worker"), what="Deployment")
    service = wait_for(lambda: api_server.objects("services").get("smollm2"), what="Service")
    owner = get(kubectl, "inferenceservices.flexllm.ai", "smollm2")

    assert deployment["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["args"][container["args"].index("--service") + 1] == SERVICE_KEY
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    password = next(e for e in container["env"] if e["name"] == "REDIS_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"]["name"] == "flexllm-redis"
    assert {"name": "adapters", "persistentVolumeClaim": {"claimName": "flexllm-adapters"}} in pod["volumes"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    status = wait_for(lambda: status_of(kubectl, "inferenceservices.flexllm.ai", "smollm2").get("endpoint") and
                      status_of(kubectl, "inferenceservices.flexllm.ai", "smollm2"), what="status")
    assert status["endpoint"] == "http://smollm2.default.svc:8000/v1"


def test_spec_change_rolls_the_deployment(kubectl, api_server, tmp_path, wait_for):
    manifest = example("inferenceservice.yaml")
    manifest["spec"]["replicas"] = 2
    manifest["spec"]["engine"]["maxTokensPerBatch"] = 1024
    apply(kubectl, tmp_path, manifest)

    def rolled() -> dict[str, Any] | None:
        deployment = api_server.objects("deployments")["smollm2-worker"]
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        return deployment if args[args.index("--max-tokens-per-batch") + 1] == "1024" else None

    assert wait_for(rolled, what="rolled Deployment")["spec"]["replicas"] == 2
    wait_for(lambda: status_of(kubectl, "inferenceservices.flexllm.ai", "smollm2").get("observedGeneration") == 2,
             what="observedGeneration 2")


def test_finetunejob_is_queued_on_the_services_redis_stream(kubectl, api_server, redis_client, wait_for):
    kubectl("apply", "--validate=false", "-f", str(REPO / "examples" / "finetunejob.yaml"))
    entries = wait_for(lambda: redis_client.xrange(protocol.job_stream(SERVICE_KEY)), what="stream entry")

    data = json.loads(entries[0][1]["data"])
    assert (data["name"], data["namespace"]) == ("tiny-lora", "default")
    assert data["spec"] == example("finetunejob.yaml")["spec"]
    assert redis_client.hget(protocol.job_progress(SERVICE_KEY, "tiny-lora"), "phase") == "Queued"
    wait_for(lambda: status_of(kubectl, "finetunejobs", "tiny-lora").get("phase") == "Queued", what="Queued")
    events = wait_for(lambda: [e for e in api_server.objects("events").values() if e.get("reason") == "Queued"],
                      what="Queued event")
    assert events[0]["involvedObject"]["name"] == "tiny-lora"


def test_failed_hot_load_written_by_test_shows_in_a_condition(kubectl, redis_client, wait_for):
    redis_client.hset(protocol.replica_state(SERVICE_KEY, "smollm2-worker-abc"),
                      "failed", json.dumps({"tiny-lora@v3": "CUDA out of memory"}))

    def adapters_condition() -> dict[str, Any] | None:
        conditions = status_of(kubectl, "inferenceservices.flexllm.ai", "smollm2").get("conditions", [])
        found = next((c for c in conditions if c["type"] == "AdaptersLoaded"), None)
        return found if found and found["status"] == "False" else None

    condition = wait_for(adapters_condition, what="AdaptersLoaded=False")
    assert condition["reason"] == "HotLoadFailed"
    assert "tiny-lora@v3: CUDA out of memory" in condition["message"]


def test_job_for_a_missing_service_waits_then_queues_when_it_appears(kubectl, tmp_path, redis_client, wait_for):
    job = example("finetunejob.yaml")
    job["metadata"]["name"] = "early-job"
    job["spec"]["inferenceService"] = "late-service"
    apply(kubectl, tmp_path, job)

    def not_found() -> dict[str, Any] | None:
        status = status_of(kubectl, "finetunejobs", "early-job")
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
        return status if ready.get("reason") == "InferenceServiceNotFound" else None

    status = wait_for(not_found, what="InferenceServiceNotFound")
    assert status["phase"] == "Pending"
    assert "'late-service' not found" in status["message"]

    service = example("inferenceservice.yaml")
    service["metadata"]["name"] = "late-service"
    apply(kubectl, tmp_path, service)
    wait_for(lambda: status_of(kubectl, "finetunejobs", "early-job").get("phase") == "Queued", what="Queued")
    assert redis_client.xlen(protocol.job_stream("default.late-service")) == 1


@pytest.mark.parametrize(("name", "edit", "reason", "words"), [
    ("bad-optimizer", lambda spec: spec["training"].update(optimizer="adam"), "InvalidSpec", "optimizer"),
    ("negative-rank", lambda spec: spec["lora"].update(rank=-4), "InvalidSpec", "lora.rank"),
    ("too-large-rank", lambda spec: spec["lora"].update(rank=128), "DoesNotFit", "maxLoraRank=64"),
])
def test_invalid_job_fails_with_a_clear_message(kubectl, tmp_path, name, edit, reason, words, wait_for):
    """The emulator, unlike a real API server, does not enforce the CRD schema: the operator's own checks."""
    job = example("finetunejob.yaml")
    job["metadata"]["name"] = name
    edit(job["spec"])
    apply(kubectl, tmp_path, job)

    status = wait_for(lambda: status_of(kubectl, "finetunejobs", name).get("phase") == "Failed"
                      and status_of(kubectl, "finetunejobs", name), what="Failed")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", reason)
    assert words in status["message"]


def test_deleting_a_never_queued_job_leaves_nothing_in_redis(kubectl, api_server, redis_client, wait_for):
    kubectl("delete", "finetunejob", "bad-optimizer", "--wait=false")
    wait_for(lambda: "bad-optimizer" not in api_server.objects("finetunejobs"), what="job deleted")
    assert redis_client.keys("*bad-optimizer*") == []


def test_kopf_state_lives_in_annotations_that_structural_pruning_keeps(kubectl, structural_prune, wait_for):
    """kopf's progress and diff-base are annotations; everything the operator put in .status is in the schema."""
    for kind, name in (("inferenceservices.flexllm.ai", "smollm2"), ("finetunejobs", "early-job")):
        obj = get(kubectl, kind, name)
        annotations = obj["metadata"].get("annotations", {})
        assert "flexllm.ai/last-handled-configuration" in annotations
        assert "kopf" not in obj.get("status", {})
        assert structural_prune(obj)["status"] == obj["status"]
