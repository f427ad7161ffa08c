"""The CRDs on a real kube-apiserver: the schema is the first line of defence.

Malformed custom resources are rejected at `kubectl apply` with 422 (Invalid) and a message that
names the field; a valid one is stored with the CRD's defaults, which are the pydantic models'; the
CEL transition rules make a FinetuneJob's spec immutable; unknown fields are pruned (or, with
kubectl's default strict validation, rejected); and every status field the operator writes survives
the status subresource and fills the printer columns. No operator runs here.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flexllm.operator import status as st
from flexllm.operator.models import FinetuneJobSpec, InferenceServiceSpec
from flexllm.worker.protocol import AdapterVersion, JobProgress, ReplicaState

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "schema-test"
CRDS = {"finetunejobs.flexllm.ai": REPO / "crds" / "flexllm.ai_finetunejobs.yaml",
        "inferenceservices.flexllm.ai": REPO / "crds" / "flexllm.ai_inferenceservices.yaml"}


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "examples" / name).read_text())


@pytest.fixture(scope="module")
def kube(control_plane) -> Iterator[Any]:
    """The control plane with the CRDs installed and Established, and a namespace of this module's own.

    Afterwards the namespace goes, and so do the CRDs this module installed (not ones found in place).
    """
    existing = set(control_plane.kubectl("get", "crd", "-o", "name").stdout.split())
    installed = [name for name in CRDS if f"customresourcedefinition.apiextensions.k8s.io/{name}" not in existing]
    for path in CRDS.values():
        control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in CRDS))
    control_plane.kubectl("create", "namespace", NAMESPACE)
    try:
        yield control_plane
    finally:
        control_plane.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        for name in installed:
            control_plane.kubectl("delete", "crd", name, "--timeout=60s", check=False)


def manifest(example_name: str, name: str, edit: Any = None) -> dict[str, Any]:
    obj = example(example_name)
    obj["metadata"] = {"name": name, "namespace": NAMESPACE}
    if edit is not None:
        edit(obj["spec"])
    return obj


def create(kube, obj: dict[str, Any], *flags: str):
    """`kubectl create` (verbose enough to log the HTTP status of the POST)."""
    return kube.kubectl("create", "-v=6", *flags, "-f", "-", input=json.dumps(obj), check=False)


def rejected(result) -> str:
    """The API server's message for a create refused with 422 Unprocessable Entity (reason Invalid)."""
    assert result.returncode != 0, f"accepted:\n{result.stdout}"
    assert "422 Unprocessable Entity" in result.stderr, result.stderr[-3000:]
    return result.stderr[result.stderr.index(" is invalid: "):]


def nested(path: str, value: Any):
    """An edit that sets spec.<path> to value, or deletes it for None."""
    def edit(spec: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return edit


BAD_JOBS = [  # (edit of examples/finetunejob.yaml's spec, what the message must say)
    (nested("inferenceService", None), "spec.inferenceService: Required value"),
    (nested("inferenceService", "My_Service"), 'spec.inferenceService: Invalid value: "My_Service"'),
    (nested("dataset.source", "pvc://data/train.jsonl"), "spec.dataset.source: Invalid value"),
    (nested("dataset.format", "csv"), 'spec.dataset.format: Unsupported value: "csv"'),
    (nested("lora.rank", 0), "spec.lora.rank: Invalid value: 0"),
    (nested("lora.rank", 512), "spec.lora.rank: Invalid value: 512"),
    (nested("lora.rank", "eight"), "spec.lora.rank: Invalid value: \"string\""),
    (nested("lora.dropout", 1), "spec.lora.dropout: Invalid value: 1"),
    (nested("lora.targetModules", ["q_proj", "lm_head"]), 'spec.lora.targetModules[1]: Unsupported value: "lm_head"'),
    (nested("training.optimizer", "adam"), 'spec.training.optimizer: Unsupported value: "adam"'),
    (nested("training.learningRate", 0), "spec.training.learningRate: Invalid value: 0"),
    (nested("training.maxGradNorm", -1), "spec.training.maxGradNorm: Invalid value: -1"),
    (nested("training.epochs", 2), "spec.training: Invalid value: set exactly one of maxSteps and epochs"),
    (nested("training.maxSteps", None), "spec.training: Invalid value: set exactly one of maxSteps and epochs"),
    (nested("publish.everySteps", 0), "spec.publish.everySteps: Invalid value: 0"),
]


@pytest.mark.parametrize(("edit", "message"), BAD_JOBS, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in
                                                                enumerate(BAD_JOBS)])
def test_malformed_finetunejob_is_rejected_naming_the_field(kube, edit, message):
    result = create(kube, manifest("finetunejob.yaml", "bad-job", edit))
    assert message in rejected(result)


def pinned(count: int, name: str = "a") -> list[dict[str, str]]:
    return [{"name": f"{name}{i}" if count > 1 else name, "uri": f"pvc://adapters/{i}"} for i in range(count)]


BAD_SERVICES = [  # (name, edit of examples/inferenceservice.yaml's spec, what the message must say)
    ("bad-service", nested("model", None), "spec.model: Required value"),
    ("bad-service", nested("model.dtype", "int3"), 'spec.model.dtype: Unsupported value: "int3"'),
    ("bad-service", nested("replicas", -1), "spec.replicas: Invalid value: -1"),
    ("bad-service", nested("resources.memory", "lots"), 'spec.resources.memory: Invalid value: "lots"'),
    ("bad-service", nested("slo.tpotMs", 0), "spec.slo.tpotMs: Invalid value: 0"),
    ("bad-service", nested("engine.kvCacheFraction", 1.5), "spec.engine.kvCacheFraction: Invalid value: 1.5"),
    ("bad-service", nested("engine.policy", "fastest"), 'spec.engine.policy: Unsupported value: "fastest"'),
    ("bad-service", nested("adapters", pinned(1) + pinned(1)), "spec.adapters[1]: Duplicate value"),
    ("bad-service", nested("adapters", pinned(5)), "spec: Invalid value: more pinned adapters than engine.maxLoras"),
    ("bad-service", nested("adapters", [{"name": "Sql", "uri": "pvc://a/b"}]), "spec.adapters[0].name: Invalid"),
    ("svc.with.dots", None, 'metadata.name: Invalid value: "svc.with.dots"'),  # a Service name cannot have dots
]


@pytest.mark.parametrize(("name", "edit", "message"), BAD_SERVICES,
                         ids=[m.split(":")[0] + f"-{i}" for i, (_, _, m) in enumerate(BAD_SERVICES)])
def test_malformed_inferenceservice_is_rejected_naming_the_field(kube, name, edit, message):
    result = create(kube, manifest("inferenceservice.yaml", name, edit))
    assert message in rejected(result)


def get(kube, kind: str, name: str) -> dict[str, Any]:
    return json.loads(kube.kubectl("get", kind, name, "-n", NAMESPACE, "-o", "json").stdout)


def test_valid_resources_are_stored_with_the_models_defaults(kube):
    """Accepted; the API server fills in the CRD's defaults, and they are exactly the pydantic models'."""
    job = manifest("finetunejob.yaml", "valid-job", lambda spec: (spec.pop("lora"), spec.pop("publish")))
    service = manifest("inferenceservice.yaml", "valid-service", lambda spec: spec.pop("engine"))
    for obj, kind, model in ((job, "finetunejobs", FinetuneJobSpec),
                             (service, "inferenceservices.flexllm.ai", InferenceServiceSpec)):
        result = create(kube, obj)
        assert result.returncode == 0, result.stderr[-3000:]
        stored = get(kube, kind, obj["metadata"]["name"])["spec"]
        assert stored == model.model_validate(obj["spec"]).model_dump(mode="json", by_alias=True, exclude_none=True)
    stored = get(kube, "finetunejobs", "valid-job")["spec"]
    assert (stored["lora"]["rank"], stored["training"]["warmupSteps"], stored["training"]["maxGradNorm"]) == (8, 0, 1)
    assert get(kube, "inferenceservices.flexllm.ai", "valid-service")["spec"]["engine"]["maxLoraRank"] == 16


def test_a_null_max_grad_norm_is_kept_and_turns_clipping_off(kube):
    """maxGradNorm is nullable: null survives defaulting (not replaced by 1.0) and means no clipping."""
    job = manifest("finetunejob.yaml", "no-clip-job", lambda spec: spec["training"].update(maxGradNorm=None))
    assert create(kube, job).returncode == 0
    stored = get(kube, "finetunejobs", "no-clip-job")["spec"]
    assert stored["training"]["maxGradNorm"] is None
    assert FinetuneJobSpec.model_validate(stored).training.max_grad_norm is None


def test_a_finetunejobs_spec_is_immutable_but_its_labels_and_status_are_not(kube):
    assert create(kube, manifest("finetunejob.yaml", "fixed-job")).returncode == 0

    def refused(change: dict[str, Any]) -> str:
        """The field path and message of the API server's refusal of a spec change."""
        result = kube.kubectl("patch", "finetunejob", "fixed-job", "-n", NAMESPACE, "--type=merge",
                              "-p", json.dumps({"spec": change}), check=False)
        assert result.returncode != 0 and " is invalid: " in result.stderr, result.stdout + result.stderr
        path, _, rest = result.stderr.split(" is invalid: ")[1].partition(": Invalid value: ")
        return f"{path}: {rest.rpartition(': ')[2].strip()}"

    immutable = "is immutable; delete and re-create the FinetuneJob to change it"
    assert refused({"inferenceService": "other"}) == f"spec.inferenceService: {immutable}"
    assert refused({"training": {"maxSteps": 99}}) == f"spec.training: {immutable}"
    assert refused({"lora": {"rank": 16}}) == f"spec.lora: {immutable}"
    assert get(kube, "finetunejobs", "fixed-job")["spec"]["inferenceService"] == "smollm2"
    kube.kubectl("label", "finetunejob", "fixed-job", "-n", NAMESPACE, "team=a")
    status = {"phase": "Queued", "message": "queued"}
    kube.kubectl("patch", "finetunejob", "fixed-job", "-n", NAMESPACE, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": status}))
    assert get(kube, "finetunejobs", "fixed-job")["status"] == status


def test_unknown_fields_are_pruned_or_with_strict_validation_rejected(kube):
    obj = manifest("finetunejob.yaml", "typo-job", nested("lora.rnak", 4))
    obj["spec"]["extra"] = {"anything": 1}
    strict = kube.kubectl("create", "-f", "-", "-n", NAMESPACE, input=json.dumps(obj), check=False)
    assert strict.returncode != 0 and 'unknown field "spec.lora.rnak"' in strict.stderr, strict.stderr
    kube.kubectl("create", "--validate=false", "-f", "-", input=json.dumps(obj))
    stored = get(kube, "finetunejobs", "typo-job")["spec"]
    assert "extra" not in stored and "rnak" not in stored["lora"]
    assert stored["lora"]["rank"] == 8  # the default, not the typo's value


def test_every_status_field_the_operator_writes_survives_and_fills_the_printer_columns(kube):
    """The status subresource keeps all of status.py's output (nothing pruned, nothing out of bounds)."""
    assert create(kube, manifest("finetunejob.yaml", "status-job")).returncode == 0
    assert create(kube, manifest("inferenceservice.yaml", "status-service")).returncode == 0
    progress = JobProgress(phase="Running", step=3, total_steps=6, loss=1.25, tokens_per_second=90.5,
                           eta_seconds=125, message="")
    versions = [AdapterVersion("status-job", 1, "file:///adapters/v1", 2, 1.5, "t")]
    job = st.job_status("status-job", 1, {}, progress, versions, 3, datetime.datetime.now(datetime.UTC), 5)
    entries = [st.replica_entry("status-service-worker-0", ReplicaState(("status-job@v1",), True))]
    service = st.service_status(1, {}, 1, 1, entries, [], "http://status-service.schema-test.svc:8000/v1")
    for kind, name, status in (("finetunejobs", "status-job", job),
                               ("inferenceservices.flexllm.ai", "status-service", service)):
        kube.kubectl("patch", kind, name, "-n", NAMESPACE, "--subresource=status", "--type=merge",
                     "-p", json.dumps({"status": status}))
        assert get(kube, kind, name)["status"] == json.loads(json.dumps(status))

    header, row = kube.kubectl("get", "ftjob", "status-job", "-n", NAMESPACE).stdout.splitlines()
    assert header.split() == ["NAME", "SERVICE", "PHASE", "PROGRESS", "LOSS", "ADAPTER", "ETA", "AGE"]
    assert row.split()[:8] == ["status-job", "smollm2", "Running", "3/6", "(50%)", "1.25", "status-job@v1", "2m5s"]
    header, row = kube.kubectl("get", "flexis", "status-service", "-n", NAMESPACE).stdout.splitlines()
    assert header.split() == ["NAME", "MODEL", "READY", "ENDPOINT", "ADAPTERS", "AGE"]
    assert row.split()[1:5] == ["smollm2-135m", "1/1", service["endpoint"], "status-job@v1"]


def test_the_schema_checks_ran_against_a_structural_schema(kube):
    """A CRD that is not structural would be served without pruning or defaults: Established and no
    NonStructuralSchema condition."""
    for name in CRDS:
        conditions = json.loads(kube.kubectl("get", "crd", name, "-o", "json").stdout)["status"]["conditions"]
        by_type = {c["type"]: c["status"] for c in conditions}
        assert by_type.get("Established") == by_type.get("NamesAccepted") == "True"
        assert "NonStructuralSchema" not in by_type
