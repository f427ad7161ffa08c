"""Plain functions that build the Kubernetes objects of one InferenceService."""

from __future__ import annotations

from typing import Any

from flexllm.operator.config import OperatorConfig
from flexllm.operator.kube import GROUP
from flexllm.operator.models import InferenceServiceSpec
from flexllm.worker.options import WorkerOptions

PORT = 8000
ADAPTER_DIR = "/adapters"
MODEL_DIR = "/models"
# `flexllm serve --drain-seconds` (its default): finish requests in flight and jobs' current steps on SIGTERM
DRAIN_S = round(WorkerOptions.drain_s)
PRESTOP_S = 5  # the preStop sleep: endpoints drop the pod before SIGTERM stops its admission
# preStop, drain, the API's 5 s to close its connections, and a margin before SIGKILL
GRACE_S = PRESTOP_S + DRAIN_S + 5 + 10
PINNED_DIR = "/pinned"  # pinned adapters' PVCs: pvc://<claim>/<path> at /pinned/<claim>/<path>
DATASET_DIR = "/data"  # the datasets' PVC: a FinetuneJob names file:///data/<path>
SERVICE_LABEL = f"{GROUP}/inference-service"
Manifest = dict[str, Any]


def service_key(namespace: str, name: str) -> str:
    """The worker's --service: names the service's Redis keys, unique across namespaces."""
    return f"{namespace}.{name}"


def deployment_name(name: str) -> str:
    return f"{name}-worker"


def endpoint(namespace: str, name: str) -> str:
    """The OpenAI-compatible base URL of the service inside the cluster."""
    return f"http://{name}.{namespace}.svc:{PORT}/v1"


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "flexllm-worker", "app.kubernetes.io/instance": name}


def labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), "app.kubernetes.io/managed-by": "flexllm-operator", SERVICE_LABEL: name}


def model_location(uri: str) -> tuple[str, Manifest | None]:
    """Maps the model URI to the worker's --model argument and, for pvc://, a read-only volume."""
    if uri.startswith("pvc://"):
        claim, _, path = uri.removeprefix("pvc://").partition("/")
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        return f"{MODEL_DIR}/{path}".rstrip("/"), volume
    if uri.startswith("file://"):
        return uri.removeprefix("file://"), None
    return uri, None


def pinned_claims(spec: InferenceServiceSpec) -> list[str]:
    """The PVCs the pinned adapters live on, in first-use order (one read-only volume each)."""
    claims: list[str] = []
    for adapter in spec.adapters:
        if adapter.uri.startswith("pvc://"):
            claim = adapter.uri.removeprefix("pvc://").partition("/")[0]
            if claim not in claims:
                claims.append(claim)
    return claims


def pinned_location(uri: str) -> str:
    """A pinned adapter's URI as the folder the worker reads (its PVC mounted under /pinned)."""
    if uri.startswith("pvc://"):
        return f"{PINNED_DIR}/{uri.removeprefix('pvc://')}".rstrip("/")
    return uri.removeprefix("file://")


def worker_args(name: str, namespace: str, spec: InferenceServiceSpec) -> list[str]:
    """`flexllm serve` flags: model, Redis, adapter store, engine limits and SLOs."""
    model_arg, _ = model_location(spec.model.uri)
    engine, slo = spec.engine, spec.slo
    args = [
        "serve",
        "--model", model_arg,
        "--dtype", spec.model.dtype,
        "--service", service_key(namespace, name),
        "--redis-url", "$(FLEXLLM_REDIS_URL)",
        "--adapter-dir", ADAPTER_DIR,
        "--port", str(PORT),
        "--max-tokens-per-batch", str(engine.max_tokens_per_batch),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--enable-prefix-caching" if engine.enable_prefix_caching else "--no-enable-prefix-caching",
        "--kv-cache-fraction", str(engine.kv_cache_fraction),
        "--max-loras", str(engine.max_loras),
        "--max-lora-rank", str(engine.max_lora_rank),
        "--ttft-ms", f"{slo.ttft_ms:g}",
        "--tpot-ms", f"{slo.tpot_ms:g}",
        "--policy", engine.policy,
        "--max-finetune-tokens", str(engine.max_finetune_tokens),
        "--drain-seconds", str(DRAIN_S),
    ]
    for adapter in spec.adapters:
        args += ["--adapter", f"{adapter.name}={pinned_location(adapter.uri)}"]
    return args


def worker_env(config: OperatorConfig) -> list[Manifest]:
    env: list[Manifest] = [
        {"name": "FLEXLLM_REDIS_URL", "value": config.redis_url},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "HOME", "value": "/tmp"},
        # The worker's data roots: FinetuneJob datasets are read from nowhere else (set and empty: from nowhere).
        {"name": "FLEXLLM_DATA_DIR",
         "value": ":".join([*config.data_dirs, *([DATASET_DIR] if config.dataset_pvc else [])])},
    ]
    if config.redis_secret:
        ref = {"name": config.redis_secret, "key": config.redis_secret_key}
        env.append({"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": ref}})
    if config.hf_token_secret:
        ref = {"name": config.hf_token_secret, "key": config.hf_token_secret_key}
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    return env


def worker_resources(spec: InferenceServiceSpec) -> Manifest:
    requests = {key: value for key, value in (("cpu", spec.resources.cpu), ("memory", spec.resources.memory))
                if value}
    limits: dict[str, Any] = {}
    if spec.resources.gpus:
        limits["nvidia.com/gpu"] = str(spec.resources.gpus)
    if spec.resources.memory:
        limits["memory"] = spec.resources.memory
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def http_probe(path: str, period_s: int, failures: int) -> Manifest:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period_s, "failureThreshold": failures}


def worker_volumes(spec: InferenceServiceSpec, config: OperatorConfig) -> tuple[list[Manifest], list[Manifest]]:
    """(volumes, mounts): adapter store, datasets' PVC, model PVC, pinned adapters' PVCs, scratch /tmp, a RAM
    /dev/shm."""
    adapters: Manifest = (
        {"name": "adapters", "persistentVolumeClaim": {"claimName": config.adapter_pvc}}
        if config.adapter_pvc else {"name": "adapters", "emptyDir": {}}
    )
    volumes = [adapters, {"name": "tmp", "emptyDir": {}}, {"name": "shm", "emptyDir": {"medium": "Memory"}}]
    mounts = [
        {"name": "adapters", "mountPath": ADAPTER_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    if config.dataset_pvc:
        volumes.append({"name": "datasets", "persistentVolumeClaim": {"claimName": config.dataset_pvc,
                                                                       "readOnly": True}})
        mounts.append({"name": "datasets", "mountPath": DATASET_DIR, "readOnly": True})
    _, model_volume = model_location(spec.model.uri)
    if model_volume is not None:
        volumes.append(model_volume)
        mounts.append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})
    for index, claim in enumerate(pinned_claims(spec)):
        volume = f"pinned-{index}"  # claim names may hold dots; volume names are DNS labels
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": volume, "mountPath": f"{PINNED_DIR}/{claim}", "readOnly": True})
    return volumes, mounts


def worker_container(name: str, namespace: str, spec: InferenceServiceSpec, config: OperatorConfig,
                     mounts: list[Manifest]) -> Manifest:
    return {
        "name": "worker",
        "image": spec.image or config.worker_image,
        "command": ["flexllm"],
        "args": worker_args(name, namespace, spec),
        "env": worker_env(config),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": worker_resources(spec),
        "volumeMounts": mounts,
        # Loading a large checkpoint can take minutes: the startup probe covers it (up to 20 min).
        "startupProbe": http_probe("/healthz", period_s=10, failures=120),
        "livenessProbe": http_probe("/healthz", period_s=10, failures=3),
        "readinessProbe": http_probe("/readyz", period_s=5, failures=3),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_S)]}}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def build_deployment(name: str, namespace: str, spec: InferenceServiceSpec, config: OperatorConfig) -> Manifest:
    """The worker Deployment; any spec change changes the pod template, so it rolls."""
    volumes, mounts = worker_volumes(spec, config)
    pod_spec: Manifest = {
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [worker_container(name, namespace, spec, config, mounts)],
        "volumes": volumes,
        "terminationGracePeriodSeconds": GRACE_S,
    }
    if config.worker_service_account:
        pod_spec["serviceAccountName"] = config.worker_service_account
    if spec.resources.gpus:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": deployment_name(name), "namespace": namespace, "labels": labels(name)},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(name)},
            "template": {"metadata": {"labels": labels(name)}, "spec": pod_spec},
        },
    }


def build_service(name: str, namespace: str) -> Manifest:
    """A ClusterIP Service named like the InferenceService: the OpenAI-compatible endpoint."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name)},
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
