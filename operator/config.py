"""Operator settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorConfig:
    """What the operator needs to know that is not in any custom resource."""

    redis_url: str = "redis://flexllm-redis:6379/0"
    redis_password: str | None = None
    redis_secret: str = ""  # Secret (in the InferenceService's namespace) holding the password
    redis_secret_key: str = "redis-password"
    hf_token_secret: str = ""  # Secret (in the InferenceService's namespace) holding HF_TOKEN for hf:// sources
    hf_token_secret_key: str = "token"
    worker_image: str = "ghcr.io/flexllm/flexllm-worker:0.1.0"
    worker_service_account: str = ""
    adapter_pvc: str = ""  # shared adapter store; empty: an emptyDir per pod (one-replica dev setups)
    dataset_pvc: str = ""  # FinetuneJob datasets, mounted read-only at /data in worker pods; empty: none
    data_dirs: tuple[str, ...] = ("examples",)  # data roots in the worker image (relative: to its workdir)
    sync_interval_s: float = 5.0  # how often Redis is polled for job progress and replica states
    status_interval_s: float = 5.0  # a FinetuneJob's progress in its status changes at most this often
    retry_delay_s: float = 10.0
    cancel_wait_s: float = 60.0
    peering: str = "flexllm"  # empty: standalone (a single replica, no peering CRD needed)
    liveness: str = "http://0.0.0.0:8080/healthz"  # kopf's liveness endpoint; empty: none

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorConfig:
        """Builds the config from FLEXLLM_* variables (and REDIS_PASSWORD)."""
        env = dict(os.environ if env is None else env)
        default = cls()
        return cls(
            redis_url=env.get("FLEXLLM_REDIS_URL", default.redis_url),
            redis_password=env.get("REDIS_PASSWORD") or None,
            redis_secret=env.get("FLEXLLM_REDIS_SECRET", default.redis_secret),
            redis_secret_key=env.get("FLEXLLM_REDIS_SECRET_KEY", default.redis_secret_key),
            hf_token_secret=env.get("FLEXLLM_HF_TOKEN_SECRET", default.hf_token_secret),
            hf_token_secret_key=env.get("FLEXLLM_HF_TOKEN_SECRET_KEY", default.hf_token_secret_key),
            worker_image=env.get("FLEXLLM_WORKER_IMAGE", default.worker_image),
            worker_service_account=env.get("FLEXLLM_WORKER_SERVICE_ACCOUNT", default.worker_service_account),
            adapter_pvc=env.get("FLEXLLM_ADAPTER_PVC", default.adapter_pvc),
            dataset_pvc=env.get("FLEXLLM_DATASET_PVC", default.dataset_pvc),
            data_dirs=tuple(d for d in env["FLEXLLM_DATA_DIRS"].split(",") if d) if "FLEXLLM_DATA_DIRS" in env
            else default.data_dirs,
            sync_interval_s=float(env.get("FLEXLLM_SYNC_INTERVAL_S", default.sync_interval_s)),
            status_interval_s=float(env.get("FLEXLLM_STATUS_INTERVAL_S", default.status_interval_s)),
            retry_delay_s=float(env.get("FLEXLLM_RETRY_DELAY_S", default.retry_delay_s)),
            cancel_wait_s=float(env.get("FLEXLLM_CANCEL_WAIT_S", default.cancel_wait_s)),
            peering=env.get("FLEXLLM_PEERING", default.peering),
            liveness=env.get("FLEXLLM_LIVENESS", default.liveness),
        )


CONFIG = OperatorConfig.from_env()
