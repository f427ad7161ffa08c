"""The worker's settings and their defaults: one source, torch-free.

``flexllm serve``/``worker`` (cli.py) take their flags' defaults from ``WorkerOptions``, ``SLO`` and
``EngineConfig`` (engine/config.py), and so do the operator's InferenceService model
(operator/models.py) and, through tests/operator/test_operator_spec_sync.py, the CRD.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flexllm.worker import protocol

POLICIES = ("coserve", "temporal", "inference-only", "finetune-only")  # see coserve/policy.py


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 5.0
    tpot_s: float = 0.075

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ValueError("SLOs must be > 0")

    def met(self, ttft_s: float, tpot_s: float | None) -> bool:
        """Both must hold; a one-token output has no TPOT."""
        return ttft_s <= self.ttft_s and (tpot_s is None or tpot_s <= self.tpot_s)


@dataclass
class WorkerOptions:
    """Where an engine loop gets its work and adapters, who it is, and how it co-serves."""

    redis_url: str
    service: str = "default"
    replica: str = "local"  # the pod name in a cluster: the key of its replica hash
    adapter_dir: str | None = None
    reclaim_idle_ms: int = 30_000
    max_deliveries: int = protocol.MAX_DELIVERIES  # of a request or job entry, then it is dead-lettered
    redis_outage_s: float = 30.0  # Redis unreachable this long: the engine loop stops, the process exits
    slo: SLO = SLO()
    policy: str = "coserve"  # one of POLICIES
    max_finetune_tokens: int = 256
    data_dirs: list[str] = field(default_factory=list)  # FinetuneJob datasets only from under these (none: none)
    pinned_adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT folder, served from start
    drain_s: float = 30.0  # on stop: how long to finish requests in flight and jobs' current steps
