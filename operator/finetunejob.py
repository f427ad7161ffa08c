"""FinetuneJob handlers: validate, queue on the service's Redis stream, sync progress, cancel on delete."""

from __future__ import annotations

from typing import Any

import kopf

from flexllm.operator import status as st
from flexllm.operator.builders import service_key
from flexllm.operator.config import CONFIG
from flexllm.operator.handling import mark_not_ready, require_names, validate
from flexllm.operator.kube import GROUP
from flexllm.operator.models import FinetuneJobSpec, InferenceServiceSpec
from flexllm.operator.store import transient_redis_errors
from flexllm.worker.names import is_valid_name
from flexllm.worker.protocol import TERMINAL_PHASES, JobSubmission

PLURAL = "finetunejobs"


def post_phase_event(body: kopf.Body, phase: str, message: str) -> None:
    """One Kubernetes Event per phase change (Warning for Failed)."""
    kopf.event(body, type="Warning" if phase == "Failed" else "Normal", reason=phase, message=message)


@kopf.on.resume(GROUP, PLURAL, backoff=CONFIG.retry_delay_s)
@kopf.on.create(GROUP, PLURAL, backoff=CONFIG.retry_delay_s)
def submit(spec: kopf.Spec, name: str, namespace: str, body: kopf.Body, meta: kopf.Meta, status: kopf.Status,
           patch: kopf.Patch, memo: kopf.Memo, retry: int, **_: Any) -> None:
    """Validates the job against its InferenceService and queues it once."""
    if status.get("phase") not in (None, "Pending"):
        return  # queued before (e.g. an operator restart): the timer follows it from here
    generation = meta.get("generation")
    job = validate(FinetuneJobSpec, spec, patch, status, generation, phase="Failed", terminal=True)
    require_names(patch, status, generation, "Failed", [("job", name), ("namespace", namespace),
                                                        ("InferenceService", job.inference_service)], terminal=True)
    service = memo.kube.inference_service(namespace, job.inference_service)
    if service is None:
        message = (f"InferenceService {job.inference_service!r} not found in namespace {namespace!r}; "
                   "the job is queued once it exists")
        mark_not_ready(patch, status, generation, "Pending", "InferenceServiceNotFound", message)
        if retry == 0:
            post_phase_event(body, "Pending", message)
        raise kopf.TemporaryError(message, delay=memo.config.retry_delay_s)
    try:
        job.check_fits(InferenceServiceSpec.model_validate(service.get("spec", {})))
    except ValueError as error:
        mark_not_ready(patch, status, generation, "Failed", "DoesNotFit", str(error), terminal=True)
        post_phase_event(body, "Failed", str(error))
        raise kopf.PermanentError(str(error)) from error
    with transient_redis_errors(memo.config.retry_delay_s):
        memo.store.jobs(service_key(namespace, job.inference_service)).submit(
            JobSubmission(name, namespace, dict(spec)))
    message = f"queued on InferenceService {job.inference_service!r}"
    ready = st.condition("Ready", True, "Queued", message, generation)
    patch.status.update(phase="Queued", message=message, observedGeneration=generation,
                        conditions=st.merge_conditions(status.get("conditions", []), ready))
    post_phase_event(body, "Queued", message)


@kopf.timer(GROUP, PLURAL, interval=CONFIG.sync_interval_s, backoff=CONFIG.retry_delay_s)
def sync_progress(spec: kopf.Spec, name: str, namespace: str, body: kopf.Body, meta: kopf.Meta,
                  status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Copies the worker's progress (at most every status_interval_s) and published adapter versions
    from Redis into the status."""
    if status.get("phase") in (None, "Pending") or status.get("completionTime"):
        return
    jobs = memo.store.jobs(service_key(namespace, spec["inferenceService"]))
    with transient_redis_errors(memo.config.retry_delay_s):
        progress, versions = jobs.progress(name), jobs.versions(name)
    if progress.phase is None:
        return  # no progress hash (yet)
    keep = int(spec.get("publish", {}).get("keepVersions", 5))
    new = st.job_status(name, meta.get("generation"), status, progress, versions, keep, st.utc_now(),
                        memo.config.status_interval_s)
    patch.status.update(st.changed_fields(status, new))
    if new["phase"] != status.get("phase"):
        post_phase_event(body, new["phase"], new["message"] or f"job is {new['phase'].lower()}")


@kopf.on.delete(GROUP, PLURAL, backoff=CONFIG.retry_delay_s)
def cancel(spec: kopf.Spec, name: str, namespace: str, body: kopf.Body, memo: kopf.Memo, runtime: Any,
           **_: Any) -> None:
    """Raises the cancel flag, waits (bounded) for a running job to stop, then cleans its Redis state."""
    if not (is_valid_name(name) and is_valid_name(spec.get("inferenceService"))):
        return  # rejected at creation: never queued, nothing in Redis
    jobs = memo.store.jobs(service_key(namespace, spec.get("inferenceService", "")))
    with transient_redis_errors(memo.config.retry_delay_s):
        phase = jobs.progress(name).phase
        if phase is None:
            return  # never queued (invalid, or its service never appeared): nothing in Redis
        jobs.cancel(name, "the FinetuneJob was deleted")
    if phase == "Running" and runtime.total_seconds() < memo.config.cancel_wait_s:
        raise kopf.TemporaryError("waiting for the engine to stop the job", delay=1)
    with transient_redis_errors(memo.config.retry_delay_s):
        jobs.delete(name, namespace)  # the cancel flag stays (its TTL): a replica still training sees it
    if phase not in TERMINAL_PHASES:
        post_phase_event(body, "Cancelled", "deleted: cancel flag raised, Redis state cleaned")
