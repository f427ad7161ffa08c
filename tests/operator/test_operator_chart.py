"""The Helm chart with the project's helm binary (.cache/bin/helm, from scripts/install_kube_tools.sh)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ..conftest import kube_tool

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "flexllm"
K8S_VERSION = "1.30.0"


def helm(*args: str) -> str:
    result = subprocess.run([str(kube_tool("helm")), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(*values: str) -> list[dict[str, Any]]:
    sets = [arg for value in values for arg in ("--set", value)]
    out = helm("template", "flex", str(CHART), "--namespace", "flexllm", "--include-crds", *sets)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def test_chart_lints():
    assert "0 chart(s) failed" in helm("lint", str(CHART), "--strict")


@pytest.mark.parametrize("values", [(), ("redis.enabled=false", "externalRedis.url=redis://r:6379/0",
                                         "externalRedis.existingSecret=ext", "adapters.existingClaim=shared",
                                         "operator.peering=")])
def test_rendered_manifests_validate_against_the_kubernetes_schemas(values):
    docs = render(*values)
    for doc in docs:
        if doc["kind"] == "ClusterKopfPeering":
            continue  # a custom resource: no built-in schema
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_chart_crds_are_the_repository_crds():
    """charts/flexllm/crds is a link to crds/, so the chart never carries a diverging copy."""
    chart_crds = {path.name: path.read_bytes() for path in (CHART / "crds").glob("*.yaml")}
    repo_crds = {path.name: path.read_bytes() for path in (REPO / "crds").glob("*.yaml")}
    assert chart_crds == repo_crds
    rendered = {doc["metadata"]["name"] for doc in by_kind(render(), "CustomResourceDefinition")}
    assert rendered == {"inferenceservices.flexllm.ai", "finetunejobs.flexllm.ai", "clusterkopfpeerings.kopf.dev"}


def test_every_pod_runs_as_non_root_without_privilege_escalation():
    for deployment in by_kind(render("redis.persistence.enabled=true"), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_operator_gets_redis_auth_from_the_generated_secret():
    docs = render()
    secret = by_kind(docs, "Secret")[0]
    operator = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "flex-flexllm-operator")
    env = {e["name"]: e for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                                                   "key": "redis-password"}
    assert env["FLEXLLM_REDIS_SECRET"]["value"] == secret["metadata"]["name"]
    assert env["FLEXLLM_REDIS_URL"]["value"] == "redis://flex-flexllm-redis.flexllm.svc:6379/0"
    assert env["FLEXLLM_ADAPTER_PVC"]["value"] == by_kind(docs, "PersistentVolumeClaim")[0]["metadata"]["name"]
    assert (env["FLEXLLM_DATASET_PVC"]["value"], env["FLEXLLM_DATA_DIRS"]["value"]) == ("", "examples")


def test_external_redis_deploys_no_redis():
    docs = render("redis.enabled=false", "externalRedis.url=redis://r:6379/0")
    names = {doc["metadata"]["name"] for doc in docs}
    assert "flex-flexllm-redis" not in names
    assert not by_kind(docs, "Secret")


def test_operator_rbac_is_least_privilege():
    rules = by_kind(render(), "ClusterRole")[0]["rules"]
    verbs = {(group, resource): set(rule["verbs"])
             for rule in rules for group in rule["apiGroups"] for resource in rule["resources"]}
    assert verbs[("apps", "deployments")] == {"get", "create", "patch"}
    assert not any("delete" in v or "*" in v for v in verbs.values())
    assert not any(resource == "secrets" for _, resource in verbs)


def test_kube_tools_are_the_projects_own_and_a_missing_one_fails_on_ci(monkeypatch):
    """kubectl and helm come from .cache/bin (scripts/install_kube_tools.sh), never from PATH; a missing
    one skips a test with the install command, except on CI, where it fails it."""
    for tool in ("kubectl", "helm"):
        assert kube_tool(tool) == REPO / ".cache" / "bin" / tool
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="run scripts/install_kube_tools.sh"):
        kube_tool("no-such-tool")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no no-such-tool at"):
        kube_tool("no-such-tool")


def test_operator_names_the_hugging_face_token_secret_for_the_workers():
    def operator_env(*values: str) -> dict[str, Any]:
        docs = by_kind(render(*values), "Deployment")
        operator = next(d for d in docs if d["metadata"]["name"] == "flex-flexllm-operator")
        return {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}

    env = operator_env("worker.huggingface.tokenSecret=hf-auth")
    assert (env["FLEXLLM_HF_TOKEN_SECRET"], env["FLEXLLM_HF_TOKEN_SECRET_KEY"]) == ("hf-auth", "token")
    assert "FLEXLLM_HF_TOKEN_SECRET" not in operator_env()
