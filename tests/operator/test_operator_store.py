"""The operator's Redis side against a real Valkey server (the protocol in flexllm.worker.protocol, through
the worker's own JobQueue)."""

from __future__ import annotations

import json

import kopf
import pytest
import redis

from flexllm.operator.store import JobStore, transient_redis_errors
from flexllm.worker import protocol
from flexllm.worker.protocol import JobCancel, JobProgress, JobSubmission, ReplicaState

pytestmark = pytest.mark.timeout(60)
SERVICE = "ns.store-test"


@pytest.fixture()
def store(redis_client: redis.Redis) -> JobStore:
    redis_client.flushdb()
    return JobStore(redis_client)


def test_submit_queues_once(store, redis_client):
    jobs = store.jobs(SERVICE)
    assert jobs.submit(JobSubmission("job", "ns", {"lora": {"rank": 8}})) is True
    assert jobs.submit(JobSubmission("job", "ns", {"lora": {"rank": 8}})) is False  # an operator restart
    (entry_id, fields), = redis_client.xrange(protocol.job_stream(SERVICE))
    assert json.loads(fields["data"]) == {"name": "job", "namespace": "ns", "spec": {"lora": {"rank": 8}}}
    progress = jobs.progress("job")
    assert (progress.phase, progress.step) == ("Queued", 0) and progress.updated is not None


def test_cleanup_keeps_only_the_cancel_flag_and_other_jobs(store, redis_client):
    jobs = store.jobs(SERVICE)
    jobs.submit(JobSubmission("job", "ns", {}))
    jobs.submit(JobSubmission("other", "ns", {}))
    redis_client.rpush(protocol.job_versions(SERVICE, "job"), "{}")
    jobs.cancel("job", "the FinetuneJob was deleted")
    jobs.delete("job", "ns")
    assert jobs.progress("job") == JobProgress() and jobs.versions("job") == []
    assert [json.loads(f["data"])["name"] for _, f in redis_client.xrange(protocol.job_stream(SERVICE))] == ["other"]
    assert jobs.cancellation("job") == JobCancel("the FinetuneJob was deleted")
    assert 0 < redis_client.ttl(protocol.job_cancel_flag(SERVICE, "job")) <= protocol.CANCEL_FLAG_TTL_S


def test_replicas_lists_live_replica_hashes(store, redis_client):
    redis_client.hset(protocol.replica_state(SERVICE, "pod-a"), mapping={"ready": "1", "adapters": "[]"})
    redis_client.hset(protocol.replica_state("ns.other", "pod-b"), mapping={"ready": "1"})
    assert store.replicas(SERVICE) == {"pod-a": ReplicaState((), ready=True)}


def test_redis_down_is_a_temporary_error():
    down = JobStore.connect("redis://127.0.0.1:1/0", None)
    with pytest.raises(kopf.TemporaryError, match="Redis unavailable") as error, transient_redis_errors(3):
        down.jobs(SERVICE).progress("job")
    assert error.value.delay == 3
