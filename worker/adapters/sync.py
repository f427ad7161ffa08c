"""Per-replica hot-loading: keep the engine's adapters equal to the registry, report what is served."""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

import redis

from flexllm.worker import protocol
from flexllm.worker.adapters.registry import AdapterRegistry
from flexllm.worker.protocol import ReplicaState
from flexllm.worker.queue.connection import TRANSIENT_ERRORS

log = logging.getLogger(__name__)


class LoraEngine(Protocol):
    def add_lora(self, name: str, folder) -> None: ...
    def remove_lora(self, name: str) -> None: ...
    def list_loras(self) -> list[str]: ...


class AdapterSync:
    """Reconciles an engine with the registry on every announcement (and every ``resync_s`` anyway).

    ``reconcile`` runs on the engine's thread; a subscriber thread only marks the state dirty. A load
    that fails is retried with exponential backoff and reported in the replica hash's ``failed`` field;
    the versions already loaded keep being served.
    """

    def __init__(self, client: redis.Redis, service: str, replica: str, engine: LoraEngine,
                 resync_s: float = 10.0, max_backoff_s: float = 60.0):
        self.client, self.service, self.replica, self.engine = client, service, replica, engine
        self.registry = AdapterRegistry(client, service)
        self.resync_s, self.max_backoff_s = resync_s, max_backoff_s
        self.failed: dict[str, str] = {}
        self._attempts: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._dirty = threading.Event()
        self._dirty.set()
        self._next_resync = self._next_report = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- announcements ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._listen, name="adapter-announcements", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.client.delete(protocol.replica_state(self.service, self.replica))
        except TRANSIENT_ERRORS:
            log.warning("could not remove the replica state of %s (Redis unreachable)", self.replica)

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(protocol.adapter_channel(self.service))
                self._dirty.set()  # announcements may have been missed while (re)connecting
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=0.5) is not None:
                        self._dirty.set()
            except TRANSIENT_ERRORS as error:
                log.warning("adapter announcements: Redis unreachable (%s); resubscribing", error)
                self._stop.wait(1.0)
            finally:
                pubsub.close()

    # -- on the engine thread -----------------------------------------------------------------
    def reconcile(self) -> None:
        """Load new versions, drop retired ones, retry due failures; refresh the replica hash."""
        now = time.monotonic()
        retry_due = any(t <= now for t in self._retry_at.values())
        if self._dirty.is_set() or retry_due or now >= self._next_resync:
            self._dirty.clear()
            self._next_resync = now + self.resync_s
            self._apply(self.registry.versions(), now)
            self._next_report = 0.0
        if now >= self._next_report:
            self.report()
            self._next_report = now + protocol.REPLICA_TTL_S / 3

    def _apply(self, desired: dict, now: float) -> None:
        loaded = set(self.engine.list_loras())
        for name in sorted(loaded - set(desired)):
            self.engine.remove_lora(name)
            log.info("adapter %s retired", name)
        for name in sorted(set(desired) - loaded):
            if self._retry_at.get(name, 0.0) <= now:
                self._load(name, desired[name].path, now)
        for name in list(self.failed):
            if name not in desired:
                self._forget(name)

    def _load(self, name: str, folder, now: float) -> bool:
        try:
            self.engine.add_lora(name, folder)
        except Exception as error:  # a bad or missing folder must not stop the replica
            attempts = self._attempts.get(name, 0) + 1
            delay = min(self.max_backoff_s, 2.0 ** (attempts - 1))
            self._attempts[name], self._retry_at[name] = attempts, now + delay
            self.failed[name] = f"{type(error).__name__}: {error}"
            log.error("hot-loading adapter %s failed (attempt %d, retry in %.0f s): %s", name, attempts, delay, error)
            return False
        self._forget(name)
        log.info("adapter %s loaded from %s", name, folder)
        return True

    def _forget(self, name: str) -> None:
        self.failed.pop(name, None)
        self._attempts.pop(name, None)
        self._retry_at.pop(name, None)

    def ensure(self, name: str) -> bool:
        """Load ``name`` now if it is registered but not loaded yet (a request raced the announcement)."""
        if name in self.engine.list_loras():
            return True
        version = self.registry.versions().get(name)
        return version is not None and self._load(name, version.path, time.monotonic())

    def report(self, ready: bool = True) -> None:
        """Write what this replica really serves into its replica hash (expires unless refreshed)."""
        key = protocol.replica_state(self.service, self.replica)
        pipe = self.client.pipeline(transaction=True)
        state = ReplicaState(tuple(self.engine.list_loras()), ready, int(time.time()), dict(self.failed))
        pipe.hset(key, mapping=state.to_redis())
        pipe.expire(key, protocol.REPLICA_TTL_S)
        pipe.execute()
