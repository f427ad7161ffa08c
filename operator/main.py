"""The operator's kopf entry module: settings, clients, and the handlers of both kinds.

Run it with ``python -m flexllm.operator`` (see __main__.py for the peering/liveness flags).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
import kubernetes

from flexllm.operator import finetunejob, inferenceservice  # noqa: F401  (registers the handlers)
from flexllm.operator.config import CONFIG
from flexllm.operator.kube import GROUP, Kube, load_client_config
from flexllm.operator.store import JobStore


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """kopf keeps its state in annotations, so the CRDs' structural pruning cannot drop it."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 8


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure_settings(settings)
    load_client_config()
    memo.config = CONFIG
    memo.kube = Kube(kubernetes.client.ApiClient())
    memo.store = JobStore.connect(CONFIG.redis_url, CONFIG.redis_password)
