"""The few Kubernetes API calls the handlers make (kopf itself watches and patches the CRs)."""

from __future__ import annotations

from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

GROUP, VERSION = "flexllm.ai", "v1alpha1"
FIELD_MANAGER = "flexllm-operator"


def load_client_config() -> None:
    """In-cluster service account when there is one, else the local kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


class Kube:
    """Server-side apply of owned children, and reads of InferenceServices and Deployments."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.apps = kubernetes.client.AppsV1Api(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def apply(self, manifest: dict[str, Any]) -> None:
        """Server-side apply (create or update, removing fields we no longer set)."""
        meta = manifest["metadata"]
        method = {"Deployment": self.apps.patch_namespaced_deployment,
                  "Service": self.core.patch_namespaced_service}[manifest["kind"]]
        method(meta["name"], meta["namespace"], manifest, field_manager=FIELD_MANAGER, force=True,
               _content_type="application/apply-patch+yaml")

    def inference_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "inferenceservices", name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def ready_replicas(self, namespace: str, name: str) -> int:
        """Ready pods of a Deployment (0 while it does not exist yet)."""
        try:
            deployment = self.apps.read_namespaced_deployment(name, namespace)
        except ApiException as error:
            if error.status == 404:
                return 0
            raise
        return (deployment.status.ready_replicas if deployment.status else 0) or 0
