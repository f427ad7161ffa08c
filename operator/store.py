"""The operator's side of the Redis protocol (flexllm.worker.protocol): queue, progress, cancel."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import kopf
import redis

from flexllm.worker import protocol
from flexllm.worker.queue.jobs import JobQueue


@contextmanager
def transient_redis_errors(delay: float) -> Iterator[None]:
    """Redis down or unreachable is transient: kopf retries the handler with backoff."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise kopf.TemporaryError(f"Redis unavailable: {error}", delay=delay) from error


class JobStore:
    """Submits, reads, cancels and cleans FinetuneJobs and reads replica states in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @classmethod
    def connect(cls, url: str, password: str | None) -> JobStore:
        return cls(redis.Redis.from_url(url, password=password, decode_responses=True, socket_timeout=5))

    def submit(self, service: str, job: str, namespace: str, spec: Mapping[str, Any]) -> bool:
        """Queues the job once (idempotent across operator restarts); True if it was queued now."""
        progress = protocol.job_progress(service, job)
        if not self.client.hsetnx(progress, "phase", "Queued"):
            return False
        self.client.hset(progress, mapping={"step": 0, "updated": int(time.time())})
        self.client.delete(protocol.job_cancel_flag(service, job))
        payload = json.dumps({"name": job, "namespace": namespace, "spec": dict(spec)})
        self.client.xadd(protocol.job_stream(service), {"data": payload})
        return True

    def progress(self, service: str, job: str) -> dict[str, str]:
        return self.client.hgetall(protocol.job_progress(service, job))

    def versions(self, service: str, job: str) -> list[str]:
        return self.client.lrange(protocol.job_versions(service, job), 0, -1)

    def cancel(self, service: str, job: str) -> None:
        """Raises the cancel flag the engines check; it outlives the cleanup for a while."""
        self.client.set(protocol.job_cancel_flag(service, job), "1", ex=protocol.CANCEL_FLAG_TTL_S)

    def cleanup(self, service: str, job: str, namespace: str) -> None:
        """Deletes the job's progress, versions and its not-yet-processed stream entry."""
        JobQueue(self.client, service).delete(job, namespace)

    def replicas(self, service: str) -> dict[str, dict[str, str]]:
        """Replica id -> its hash, for every live (not yet expired) replica of the service."""
        prefix = protocol.replica_state(service, "")
        keys = sorted(self.client.scan_iter(match=protocol.replica_pattern(service)))
        return {key.removeprefix(prefix): self.client.hgetall(key) for key in keys}
