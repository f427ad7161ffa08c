"""InferenceService handlers: worker Deployment + Service, status from the Deployment and Redis."""

from __future__ import annotations

from typing import Any

import kopf

from flexllm.operator import builders
from flexllm.operator import status as st
from flexllm.operator.config import CONFIG
from flexllm.operator.handling import require_names, validate
from flexllm.operator.kube import GROUP
from flexllm.operator.models import InferenceServiceSpec
from flexllm.operator.store import transient_redis_errors

PLURAL = "inferenceservices"


@kopf.on.resume(GROUP, PLURAL, backoff=CONFIG.retry_delay_s)
@kopf.on.create(GROUP, PLURAL, backoff=CONFIG.retry_delay_s)
@kopf.on.update(GROUP, PLURAL, field="spec", backoff=CONFIG.retry_delay_s)
def reconcile(spec: kopf.Spec, name: str, namespace: str, body: kopf.Body, meta: kopf.Meta,
              status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Applies the worker Deployment and the Service; a spec change rolls the Deployment."""
    # pinned adapter names follow the name rule in the spec model itself (and in the CRD)
    service = validate(InferenceServiceSpec, spec, patch, status, meta.get("generation"), phase="Failed")
    require_names(patch, status, meta.get("generation"), "Failed",
                  [("InferenceService", name), ("namespace", namespace)])
    children = [builders.build_deployment(name, namespace, service, memo.config),
                builders.build_service(name, namespace)]
    kopf.adopt(children, owner=body)
    for child in children:
        memo.kube.apply(child)
    logger.info(f"applied {builders.deployment_name(name)} ({service.replicas} replicas) and Service {name}")
    patch.status.update(endpoint=builders.endpoint(namespace, name), observedGeneration=meta.get("generation"))
    if not status.get("phase") or status.get("phase") == "Failed":
        patch.status.update(phase="Pending", message="")


@kopf.timer(GROUP, PLURAL, interval=CONFIG.sync_interval_s, backoff=CONFIG.retry_delay_s)
def sync_status(spec: kopf.Spec, name: str, namespace: str, meta: kopf.Meta, status: kopf.Status,
                patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Ready replicas from the Deployment; loaded adapters from what each replica reports in Redis."""
    if status.get("phase") == "Failed":
        return
    service = InferenceServiceSpec.model_validate(dict(spec))
    ready = memo.kube.ready_replicas(namespace, builders.deployment_name(name))
    with transient_redis_errors(memo.config.retry_delay_s):
        replicas = memo.store.replicas(builders.service_key(namespace, name))
    entries = [st.replica_entry(replica, state) for replica, state in replicas.items()]
    new = st.service_status(meta.get("generation"), status, service.replicas, ready, entries,
                            [adapter.name for adapter in service.adapters], builders.endpoint(namespace, name))
    patch.status.update(st.changed_fields(status, new))
