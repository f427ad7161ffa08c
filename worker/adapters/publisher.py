"""Publishing a new adapter version: store it, register and announce it, garbage-collect old ones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flexllm.worker.adapters.registry import AdapterRegistry
from flexllm.worker.adapters.store import AdapterStore, AdapterVersion


class AdapterPublisher:
    """The one way fine-tuning publishes versions: ``publish(job, peft_model.save_pretrained, step, loss, keep)``."""

    def __init__(self, store: AdapterStore, registry: AdapterRegistry):
        self.store, self.registry = store, registry

    def publish(self, adapter: str, write: Callable[[Path], None], step: int, loss: float,
                keep_versions: int) -> AdapterVersion:
        version = self.store.publish(adapter, write, step=step, loss=loss)
        self.registry.register(version)
        removed = self.store.gc(adapter, keep_versions)
        self.registry.retire([self.store.describe(adapter, v) for v in removed])
        return version
