"""One service's FinetuneJobs in Redis: the job stream (consumer group ``engines``), progress hashes,
cancel flags and published versions, written and read as ``protocol``'s messages. The worker, the CLI
and the operator all go through ``JobQueue`` (torch-free)."""

from __future__ import annotations

import time
from typing import Any

import redis

from flexllm.worker import protocol
from flexllm.worker.protocol import AdapterVersion, JobCancel, JobProgress, JobSubmission
from flexllm.worker.queue.connection import ensure_group, hand_back
from flexllm.worker.queue.deadletter import screen


class JobQueue:
    """One service's job stream, progress, cancel flags and versions."""

    def __init__(self, client: redis.Redis, service: str, max_deliveries: int = protocol.MAX_DELIVERIES):
        self.client, self.service, self.max_deliveries = client, service, max_deliveries
        self.stream = protocol.job_stream(service)

    def submit(self, job: JobSubmission) -> bool:
        """Queue a job unless one of that name exists; True if queued now (idempotent: an operator restart
        submits again)."""
        if not self.client.hsetnx(protocol.job_progress(self.service, job.name), "phase", "Queued"):
            return False
        self.write_progress(job.name, JobProgress(step=0))
        self.client.delete(protocol.job_cancel_flag(self.service, job.name))
        self.client.xadd(self.stream, {"data": job.to_json()})
        return True

    def ensure_group(self) -> None:
        ensure_group(self.client, self.stream)

    def claim(self, consumer: str, count: int = 8, reclaim_idle_ms: int = 60_000, held: list[str] | None = None
              ) -> list[tuple[str, JobSubmission]]:
        """Jobs of dead replicas (pending and idle for ``reclaim_idle_ms``), then new entries. An unreadable
        entry, one whose name breaks the naming rule, and a poison one are dead-lettered here instead.
        ``held``: the entries of the jobs ``consumer`` trains, refreshed first so it never takes its own."""
        try:
            self.heartbeat(consumer, held or [])
            _, stale, _ = self.client.xautoclaim(self.stream, protocol.ENGINE_GROUP, consumer, reclaim_idle_ms,
                                                 "0-0", count=count)
            reply = self.client.xreadgroup(protocol.ENGINE_GROUP, consumer, {self.stream: ">"}, count=count)
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            self.ensure_group()  # Redis came back empty (no persistence): start over
            return []
        fresh = [e for _, entries in reply or [] for e in entries]
        entries = [*((eid, f, True) for eid, f in stale), *((eid, f, False) for eid, f in fresh)]

        def fail(job: JobSubmission, error: str) -> None:
            self.set_progress(job.name, phase="Failed", message=error)

        claimed = []
        for entry_id, job, reclaimed in screen(self.client, self.service, self.stream, entries,
                                               JobSubmission.from_json, "job", self.max_deliveries, fail):
            job.reclaimed = reclaimed
            claimed.append((entry_id, job))
        return claimed

    def heartbeat(self, consumer: str, entry_ids: list[str]) -> None:
        """Keep our jobs' pending entries fresh so no other replica reclaims a job still training."""
        if entry_ids:
            self.client.xclaim(self.stream, protocol.ENGINE_GROUP, consumer, 0, entry_ids, justid=True)

    def hand_back(self, consumer: str, entry_ids: list[str]) -> None:
        """Give jobs back: another engine reclaims them at once and resumes each from its latest version."""
        hand_back(self.client, self.stream, consumer, entry_ids)

    def ack(self, entry_id: str) -> None:
        self.client.xack(self.stream, protocol.ENGINE_GROUP, entry_id)

    def depth(self) -> int:
        """Job entries not yet taken by any engine."""
        if not self.client.exists(self.stream):
            return 0
        groups = {g["name"]: g for g in self.client.xinfo_groups(self.stream)}
        group = groups.get(protocol.ENGINE_GROUP)
        return self.client.xlen(self.stream) if group is None else int(group.get("lag") or 0)

    def write_progress(self, job: str, progress: JobProgress) -> None:
        """Set the fields of ``progress`` that are set (``updated`` is set here)."""
        mapping = progress.to_redis() | {"updated": int(time.time())}
        self.client.hset(protocol.job_progress(self.service, job), mapping=mapping)

    def set_progress(self, job: str, **fields: Any) -> None:
        """``write_progress`` of ``JobProgress(**fields)`` (an unknown field is a ``TypeError``)."""
        self.write_progress(job, JobProgress(**fields))

    def progress(self, job: str) -> JobProgress:
        """The job's progress; every field unset when the job does not exist."""
        return JobProgress.from_redis(self.client.hgetall(protocol.job_progress(self.service, job)))

    def cancellation(self, job: str) -> JobCancel | None:
        """The job's cancel flag, None unless it was cancelled."""
        raw = self.client.get(protocol.job_cancel_flag(self.service, job))
        return None if raw is None else JobCancel.from_json(raw)

    def is_cancelled(self, job: str) -> bool:
        return self.cancellation(job) is not None

    def cancel(self, job: str, reason: str = JobCancel.reason) -> None:
        """Raise the job's cancel flag (``reason`` becomes its message); it outlives the job's other keys for
        ``CANCEL_FLAG_TTL_S``."""
        self.client.set(protocol.job_cancel_flag(self.service, job), JobCancel(reason).to_json(),
                        ex=protocol.CANCEL_FLAG_TTL_S)

    def delete(self, job: str, namespace: str | None = None) -> None:
        """Remove a job's progress and versions, and its stream entry if no engine took it yet (of
        ``namespace`` only, when given). A job that may be running is cancelled first (``cancel``)."""
        self.client.delete(protocol.job_progress(self.service, job), protocol.job_versions(self.service, job))
        for entry_id, fields in self.client.xrange(self.stream):
            try:
                entry = JobSubmission.from_json(fields.get("data", ""))
            except (ValueError, KeyError, TypeError):
                continue  # unreadable: dead-lettered when an engine claims it
            if entry.name == job and namespace in (None, entry.namespace):
                self.client.xdel(self.stream, entry_id)

    def versions(self, job: str) -> list[AdapterVersion]:
        """The versions the job published, oldest first (including those garbage-collected since)."""
        raw = self.client.lrange(protocol.job_versions(self.service, job), 0, -1)
        return [AdapterVersion.from_json(version) for version in raw]

    def latest_version(self, job: str) -> AdapterVersion | None:
        last = self.client.lindex(protocol.job_versions(self.service, job), -1)
        return AdapterVersion.from_json(last) if last else None


def list_jobs(client: redis.Redis, service: str | None) -> list[tuple[str, str]]:
    """(service, job) of every progress hash, for one service or (``None``) all of them."""
    prefix = f"{protocol.PREFIX}:"
    found = []
    for key in client.scan_iter(match=protocol.job_pattern(service or "*"), count=500):
        svc, _, rest = key.removeprefix(prefix).partition(":job:")
        if rest and ":" not in rest:
            found.append((svc, rest))
    return sorted(found)
