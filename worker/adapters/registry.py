"""The Redis registry of servable adapter versions and how a request's ``model`` resolves to one."""

from __future__ import annotations

import redis

from flexllm.worker import protocol
from flexllm.worker.adapters.store import AdapterStore
from flexllm.worker.names import split_version
from flexllm.worker.protocol import AdapterAnnouncement, AdapterVersion


class UnknownModelError(KeyError):
    """The ``model`` of a request is neither the base model nor a registered adapter (version)."""

    def __str__(self) -> str:
        return str(self.args[0])


def parse_versions(raw: dict[str, str]) -> dict[str, AdapterVersion]:
    """The registry hash (``name@vN`` -> JSON) -> versions by name."""
    return {name: AdapterVersion.from_json(data) for name, data in raw.items()}


def latest_versions(versions: dict[str, AdapterVersion]) -> dict[str, AdapterVersion]:
    """Adapter name -> its newest version."""
    latest: dict[str, AdapterVersion] = {}
    for v in versions.values():
        if v.adapter not in latest or v.version > latest[v.adapter].version:
            latest[v.adapter] = v
    return latest


def resolve_model(model: str, base: str, versions: dict[str, AdapterVersion]) -> str | None:
    """``model`` -> the concrete version to serve (``adapter@vN``), or None for the base model.

    ``<adapter>`` means its latest version at the time of the request, pinned for the whole request.
    A ``model`` that breaks the naming rule raises ``InvalidNameError``.
    """
    if model == base:
        return None
    adapter, version = split_version(model)
    if version is not None and model in versions:
        return model
    latest = latest_versions(versions).get(adapter) if version is None else None
    if latest is None:
        raise UnknownModelError(f"The model `{model}` does not exist.")
    return latest.name


class AdapterRegistry:
    """Writes and reads a service's registered versions; every change is announced on pub/sub."""

    def __init__(self, client: redis.Redis, service: str):
        self.client, self.service = client, service
        self.key = protocol.adapter_versions(service)

    def register(self, version: AdapterVersion) -> None:
        """Make a version servable: registry hash, the job's versions list, announcement — in one go."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.key, version.name, version.to_json())
        pipe.rpush(protocol.job_versions(self.service, version.adapter), version.to_json())
        pipe.publish(protocol.adapter_channel(self.service), AdapterAnnouncement(version).to_json())
        pipe.execute()

    def retire(self, versions: list[AdapterVersion]) -> None:
        """Stop serving versions (garbage-collected); the job's versions list keeps their history."""
        if not versions:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self.key, *(v.name for v in versions))
        for v in versions:
            pipe.publish(protocol.adapter_channel(self.service), AdapterAnnouncement(v, removed=True).to_json())
        pipe.execute()

    def versions(self) -> dict[str, AdapterVersion]:
        return parse_versions(self.client.hgetall(self.key))

    def sync_from_store(self, store: AdapterStore) -> list[AdapterVersion]:
        """Register versions found in the store but not in Redis (a fresh Redis, pre-seeded adapters)."""
        known = self.versions()
        added = [store.describe(adapter, version) for adapter in store.adapters()
                 for version in store.versions(adapter) if f"{adapter}@v{version}" not in known]
        for version in added:
            self.client.hset(self.key, version.name, version.to_json())
        if added:
            self.client.publish(protocol.adapter_channel(self.service), AdapterAnnouncement().to_json())
        return added
