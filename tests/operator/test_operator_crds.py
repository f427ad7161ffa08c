"""The CRDs' structural schemas, with a JSON-schema validator (the emulator does not enforce them).

OpenAPI v3.0 schemas (boolean exclusiveMinimum) are JSON Schema draft 4, so Draft4Validator checks
CRs against the schema keywords here. The CEL rules (x-kubernetes-validations) and list-map keys only
a real API server evaluates: tests/k8s/test_k8s_schema.py applies malformed CRs to one.
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import jsonschema
import kopf
import pytest
import yaml

from flexllm.operator import handling
from flexllm.operator import status as st
from flexllm.worker.protocol import AdapterVersion, JobProgress, ReplicaState

REPO = Path(__file__).resolve().parents[2]


def crd(plural: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "crds" / f"flexllm.ai_{plural}.yaml").read_text())


def validator(plural: str) -> jsonschema.Draft4Validator:
    schema = crd(plural)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "examples" / name).read_text())


def errors(plural: str, obj: dict[str, Any]) -> list[str]:
    return [error.message for error in validator(plural).iter_errors(obj)]


def test_examples_are_valid():
    assert errors("inferenceservices", example("inferenceservice.yaml")) == []
    assert errors("finetunejobs", example("finetunejob.yaml")) == []


def edited(name: str, path: str, value: Any) -> dict[str, Any]:
    """The example with spec.<path> set to value (or removed when value is None)."""
    obj = copy.deepcopy(example(name))
    *parents, leaf = path.split(".")
    node = obj["spec"]
    for key in parents:
        node = node[key]
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    return obj


@pytest.mark.parametrize(("path", "value", "message"), [
    ("inferenceService", None, "'inferenceService' is a required property"),
    ("lora.rank", -1, "-1 is less than the minimum of 1"),
    ("lora.rank", 0, "0 is less than the minimum of 1"),
    ("training.optimizer", "adam", "'adam' is not one of ['adamw', 'sgd']"),
    ("training.learningRate", 0, "less than or equal to the minimum of 0"),
    ("inferenceService", "My_Service", "does not match"),
    ("dataset.source", "pvc://data/train.jsonl", "does not match"),
    ("lora.targetModules", ["q_proj", "lm_head"], "'lm_head' is not one of"),
    ("training.maxSeqLen", 1, "1 is less than the minimum of 2"),
    ("training.maxGradNorm", 0, "less than or equal to the minimum of 0"),
    ("dataset.format", "csv", "'csv' is not one of"),
    ("lora.dropout", 1, "greater than or equal to the maximum of 1"),
    ("publish.everySteps", 0, "0 is less than the minimum of 1"),
])
def test_bad_finetunejobs_are_rejected(path, value, message):
    assert any(message in error for error in errors("finetunejobs", edited("finetunejob.yaml", path, value)))


@pytest.mark.parametrize(("path", "value", "message"), [
    ("model", None, "'model' is a required property"),
    ("slo.ttftMs", 0, "less than or equal to the minimum of 0"),
    ("slo.tpotMs", -5, "less than or equal to the minimum of 0"),
    ("replicas", -1, "-1 is less than the minimum of 0"),
    ("engine.kvCacheFraction", 1.5, "1.5 is greater than the maximum of 1"),
    ("engine.maxLoraRank", 0, "0 is less than the minimum of 1"),
    ("engine.policy", "fastest", "'fastest' is not one of"),
    ("engine.maxFinetuneTokens", 0, "0 is less than the minimum of 1"),
    ("model.dtype", "int3", "'int3' is not one of"),
])
def test_bad_inferenceservices_are_rejected(path, value, message):
    assert any(message in error for error in errors("inferenceservices", edited("inferenceservice.yaml", path, value)))


def test_printer_columns_short_names_and_category():
    def columns(plural: str) -> list[str]:
        return [c["name"].upper() for c in crd(plural)["spec"]["versions"][0]["additionalPrinterColumns"]]

    assert columns("finetunejobs") == ["SERVICE", "PHASE", "PROGRESS", "LOSS", "ADAPTER", "ETA", "AGE"]
    assert columns("inferenceservices") == ["MODEL", "READY", "ENDPOINT", "ADAPTERS", "AGE"]
    for plural in ("finetunejobs", "inferenceservices"):
        names = crd(plural)["spec"]["names"]
        assert "isvc" not in names["shortNames"]  # KServe's
        assert names["categories"] == ["flexllm"]
        assert crd(plural)["spec"]["versions"][0]["subresources"] == {"status": {}}


def test_every_status_field_the_operator_writes_is_declared():
    """Undeclared status fields would be pruned by the API server (and a value out of bounds rejects the
    whole patch): every status the operator writes validates against the schema made strict."""
    now = datetime.datetime.now(datetime.UTC)
    progress = JobProgress(phase="Running", step=3, total_steps=6, loss=1.5, tokens_per_second=9, eta_seconds=4,
                           message="m")
    job = st.job_status("j", 2, {}, progress, [AdapterVersion("j", 1, "u", 3, 1.5, "t")], 2, now, 5)
    service = st.service_status(1, {}, 1, 1, [st.replica_entry("r", ReplicaState(("j@v1",), True))],
                                [], "http://x")
    invalid_job, invalid_service = kopf.Patch(), kopf.Patch()
    handling.mark_not_ready(invalid_job, {}, 1, "Failed", "InvalidSpec", "lora.rank: too big", terminal=True)
    handling.mark_not_ready(invalid_service, {}, 1, "Failed", "InvalidSpec", "replicas: below 0")
    for plural, status in (("finetunejobs", job), ("finetunejobs", invalid_job["status"]),
                           ("inferenceservices", service), ("inferenceservices", invalid_service["status"])):
        obj = {"apiVersion": "flexllm.ai/v1alpha1", "kind": "X", "metadata": {}, "spec": example(
            "finetunejob.yaml" if plural == "finetunejobs" else "inferenceservice.yaml")["spec"], "status": status}
        schema = crd(plural)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert list(jsonschema.Draft4Validator(make_strict(schema)).iter_errors(obj)) == []


def make_strict(schema: Any) -> Any:
    """The schema with additionalProperties: false wherever properties are listed."""
    if isinstance(schema, dict):
        strict = {key: make_strict(value) for key, value in schema.items()}
        if "properties" in schema and "x-kubernetes-preserve-unknown-fields" not in schema:
            strict["additionalProperties"] = False
        return strict
    if isinstance(schema, list):
        return [make_strict(item) for item in schema]
    return schema
