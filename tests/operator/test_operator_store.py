"""The operator's Redis side against a real Valkey server (the protocol in flexllm.worker.protocol)."""

from __future__ import annotations

import json

import kopf
import pytest
import redis

from flexllm.operator.store import JobStore, transient_redis_errors
from flexllm.worker import protocol

pytestmark = pytest.mark.timeout(60)
SERVICE = "ns.store-test"


@pytest.fixture()
def store(redis_client: redis.Redis) -> JobStore:
    redis_client.flushdb()
    return JobStore(redis_client)


def test_submit_queues_once(store, redis_client):
    assert store.submit(SERVICE, "job", "ns", {"lora": {"rank": 8}}) is True
    assert store.submit(SERVICE, "job", "ns", {"lora": {"rank": 8}}) is False  # an operator restart
    (entry_id, fields), = redis_client.xrange(protocol.job_stream(SERVICE))
    assert json.loads(fields["data"]) == {"name": "job", "namespace": "ns", "spec": {"lora": {"rank": 8}}}
    assert store.progress(SERVICE, "job")["phase"] == "Queued"


def test_cleanup_keeps_only_the_cancel_flag_and_other_jobs(store, redis_client):
    store.submit(SERVICE, "job", "ns", {})
    store.submit(SERVICE, "other", "ns", {})
    redis_client.rpush(protocol.job_versions(SERVICE, "job"), "{}")
    store.cancel(SERVICE, "job")
    store.cleanup(SERVICE, "job", "ns")
    assert store.progress(SERVICE, "job") == {} and store.versions(SERVICE, "job") == []
    assert [json.loads(f["data"])["name"] for _, f in redis_client.xrange(protocol.job_stream(SERVICE))] == ["other"]
    assert redis_client.get(protocol.job_cancel_flag(SERVICE, "job")) == "1"
    assert 0 < redis_client.ttl(protocol.job_cancel_flag(SERVICE, "job")) <= protocol.CANCEL_FLAG_TTL_S


def test_replicas_lists_live_replica_hashes(store, redis_client):
    redis_client.hset(protocol.replica_state(SERVICE, "pod-a"), mapping={"ready": "1", "adapters": "[]"})
    redis_client.hset(protocol.replica_state("ns.other", "pod-b"), mapping={"ready": "1"})
    assert store.replicas(SERVICE) == {"pod-a": {"ready": "1", "adapters": "[]"}}


def test_redis_down_is_a_temporary_error():
    down = JobStore.connect("redis://127.0.0.1:1/0", None)
    with pytest.raises(kopf.TemporaryError, match="Redis unavailable") as error, transient_redis_errors(3):
        down.progress(SERVICE, "job")
    assert error.value.delay == 3
