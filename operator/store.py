"""The operator's side of the Redis protocol (flexllm.worker.protocol), through the worker's ``JobQueue``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import kopf
import redis

from flexllm.worker import protocol
from flexllm.worker.protocol import ReplicaState
from flexllm.worker.queue.jobs import JobQueue


@contextmanager
def transient_redis_errors(delay: float) -> Iterator[None]:
    """Redis down or unreachable is transient: kopf retries the handler with backoff."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise kopf.TemporaryError(f"Redis unavailable: {error}", delay=delay) from error


class JobStore:
    """The operator's Redis: each service's jobs (``JobQueue``, the worker's own) and its replica states."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @classmethod
    def connect(cls, url: str, password: str | None) -> JobStore:
        return cls(redis.Redis.from_url(url, password=password, decode_responses=True, socket_timeout=5))

    def jobs(self, service: str) -> JobQueue:
        """Submits, reads, cancels and cleans the FinetuneJobs of one service (its ``service_key``)."""
        return JobQueue(self.client, service)

    def replicas(self, service: str) -> dict[str, ReplicaState]:
        """Replica id -> its state, for every live (not yet expired) replica of the service."""
        prefix = protocol.replica_state(service, "")
        keys = sorted(self.client.scan_iter(match=protocol.replica_pattern(service)))
        return {key.removeprefix(prefix): ReplicaState.from_redis(self.client.hgetall(key)) for key in keys}
