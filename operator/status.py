"""Plain functions that map observed state (Redis, the Deployment) to the resources' .status."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from flexllm.worker.protocol import TERMINAL_PHASES, AdapterVersion, JobProgress, ReplicaState

Status = dict[str, Any]
MAX_CONDITION_MESSAGE = 32768  # metav1.Condition's bound, in the CRDs


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def now_iso(now: datetime.datetime | None = None) -> str:
    return (now or utc_now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, ok: bool, reason: str, message: str = "", generation: int | None = None) -> Status:
    """A Kubernetes-convention condition (lastTransitionTime comes from merge_conditions)."""
    result: Status = {"type": type_, "status": "True" if ok else "False", "reason": reason,
                      "message": message[:MAX_CONDITION_MESSAGE]}
    if generation is not None:
        result["observedGeneration"] = generation
    return result


def merge_conditions(existing: Sequence[Mapping[str, Any]], new: Mapping[str, Any]) -> list[Status]:
    """Replaces the condition of new's type; lastTransitionTime moves only when its status changes."""
    old = next((c for c in existing if c.get("type") == new["type"]), None)
    changed = old is None or old.get("status") != new["status"]
    merged = {**new, "lastTransitionTime": now_iso() if changed else old.get("lastTransitionTime", now_iso())}
    return [dict(c) for c in existing if c.get("type") != new["type"]] + [merged]


def progress_status(job: JobProgress) -> Status:
    """The worker's progress as status.progress (the CRD's camelCase names)."""
    progress: Status = {"step": job.step or 0}
    if job.total_steps:
        progress.update(totalSteps=job.total_steps, percent=job.percent, display=job.display)
    for field, value in (("loss", job.loss), ("tokensPerSecond", job.tokens_per_second)):
        if value is not None:
            progress[field] = round(value, 4)
    if job.eta_seconds is not None:
        progress.update(etaSeconds=job.eta_seconds, eta=job.eta)
    return progress


def trainer_status(progress: Mapping[str, Any], now: datetime.datetime) -> Status:
    """status.progress as Kubeflow Trainer's trainerStatus (KEP-2779): what its dashboards read.

    Metric values are strings there; names follow its camelCase (currentStep, totalSteps).
    """
    metrics = [{"name": name, "value": str(progress[field])}
               for name, field in (("loss", "loss"), ("tokensPerSecond", "tokensPerSecond"),
                                   ("currentStep", "step"), ("totalSteps", "totalSteps"))
               if field in progress]
    result: Status = {"metrics": metrics, "lastUpdatedTime": now_iso(now)}
    if "percent" in progress:
        result["progressPercentage"] = progress["percent"]
    if "etaSeconds" in progress:
        result["estimatedRemainingSeconds"] = max(progress["etaSeconds"], 0)
    return result


def progress_due(old: Mapping[str, Any], phase: str, now: datetime.datetime, interval_s: float) -> bool:
    """Progress is rewritten at most every interval_s; a phase change always shows its latest progress."""
    last = old.get("trainerStatus", {}).get("lastUpdatedTime")
    if phase != old.get("phase") or not last:
        return True
    return (now - datetime.datetime.fromisoformat(last)).total_seconds() >= interval_s


def adapter_status(job: str, published: Sequence[AdapterVersion], keep: int) -> Status | None:
    """The job's published versions (oldest first) as status.adapter; None before the first one."""
    versions = [{"version": f"v{v.version}", "step": v.step, "loss": v.loss, "uri": v.uri, "time": v.time}
                for v in published]
    if not versions:
        return None
    latest = versions[-1]["version"]
    return {"name": job, "latestVersion": latest, "latest": f"{job}@{latest}", "versions": versions[-keep:]}


def job_status(job: str, generation: int | None, old: Mapping[str, Any], reported: JobProgress,
               versions: Sequence[AdapterVersion], keep_versions: int, now: datetime.datetime,
               interval_s: float) -> Status:
    """The FinetuneJob status patch for the worker's progress hash and published versions.

    progress and trainerStatus are left out while the last ones are younger than interval_s (see
    progress_due), so the API server and the dashboards watching it get one update per interval, and
    while the progress has not changed (no new lastUpdatedTime, no watch event, for a step in progress).
    """
    phase = reported.phase or old.get("phase") or "Queued"
    message = reported.message or ""
    status: Status = {"phase": phase, "message": message, "observedGeneration": generation}
    progress = progress_status(reported)
    if progress != old.get("progress") and progress_due(old, phase, now, interval_s):
        status["progress"] = progress
        status["trainerStatus"] = trainer_status(progress, now)
    adapter = adapter_status(job, versions, keep_versions)
    if adapter is not None:
        status["adapter"] = adapter
    if phase == "Running" and not old.get("startTime"):
        status["startTime"] = now_iso(now)
    if phase in TERMINAL_PHASES and not old.get("completionTime"):
        status["completionTime"] = now_iso(now)
    ok = phase != "Failed"
    ready = condition("Ready", ok, phase, message or f"job is {phase.lower()}", generation)
    status["conditions"] = merge_conditions(old.get("conditions", []), ready)
    return status


def replica_entry(replica: str, state: ReplicaState) -> Status:
    """One replica's state (what it really serves) as a status.loadedAdapters entry."""
    return {
        "replica": replica,
        "ready": state.ready,
        "adapters": list(state.adapters),
        "failed": [f"{adapter}: {error}" for adapter, error in sorted(state.failed.items())],
    }


def served_summary(entries: Sequence[Mapping[str, Any]]) -> str:
    """'a@v2,b@v1 (1/2)': adapters on the ready replicas, with a count where not on all of them."""
    ready = [entry for entry in entries if entry["ready"]]
    names = sorted({adapter for entry in ready for adapter in entry["adapters"]})
    parts = []
    for adapter in names:
        count = sum(adapter in entry["adapters"] for entry in ready)
        parts.append(adapter if count == len(ready) else f"{adapter} ({count}/{len(ready)})")
    return ",".join(parts)


def adapters_condition(entries: Sequence[Mapping[str, Any]], pinned: Sequence[str],
                       generation: int | None = None) -> Status:
    """AdaptersLoaded: False on a failed hot-load, or while a pinned adapter is not on every ready replica."""
    failures = [f"{entry['replica']}: {', '.join(entry['failed'])}" for entry in entries if entry["failed"]]
    if failures:
        return condition("AdaptersLoaded", False, "HotLoadFailed", "hot-load failed on " + "; ".join(failures),
                         generation)
    ready = [entry for entry in entries if entry["ready"]]
    missing = sorted(
        name for name in pinned
        if not all(any(a == name or a.startswith(f"{name}@") for a in entry["adapters"]) for entry in ready)
    )
    if missing:
        return condition("AdaptersLoaded", False, "Loading", "not yet on every ready replica: " + ", ".join(missing),
                         generation)
    return condition("AdaptersLoaded", True, "Loaded", "every ready replica serves its adapters", generation)


def service_status(generation: int | None, old: Mapping[str, Any], desired: int, ready: int,
                   entries: Sequence[Mapping[str, Any]], pinned: Sequence[str], url: str) -> Status:
    """The InferenceService status patch from the Deployment's ready count and the replica hashes."""
    phase = "Ready" if ready >= desired else ("Degraded" if ready else "Pending")
    ready_cond = condition("Ready", phase == "Ready", phase, f"{ready}/{desired} worker replicas ready", generation)
    conditions = merge_conditions(old.get("conditions", []), ready_cond)
    conditions = merge_conditions(conditions, adapters_condition(entries, pinned, generation))
    return {
        "phase": phase,
        "observedGeneration": generation,
        "replicas": desired,
        "readyReplicas": ready,
        "readyDisplay": f"{ready}/{desired}",
        "endpoint": url,
        "loadedAdapters": list(entries),
        "servedAdapters": served_summary(entries),
        "conditions": conditions,
    }


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> Status:
    """The top-level fields of new that differ from old: no status patch (and no watch event) for no change."""
    return {key: value for key, value in new.items() if old.get(key) != value}
