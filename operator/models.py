"""Pydantic models of the custom resources' specs: the operator's own validation.

The CRD schemas reject bad input at ``kubectl apply``; these models repeat the checks (an old CRD
may still be installed) and add the one rule no schema can hold (a job's rank against its
service's limit). Fields, types, defaults, bounds and cross-field rules are the CRDs':
tests/operator/test_operator_spec_sync.py compares both ways. The engine and SLO defaults are taken
from the worker's own (EngineConfig, SLO, WorkerOptions: torch-free modules), so the CRD's must match them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from flexllm.worker.engine.config import EngineConfig
from flexllm.worker.finetune.spec import FinetuneJobSpec as WorkerJobSpec
from flexllm.worker.names import MAX_NAME_LEN, NAME
from flexllm.worker.options import POLICIES, SLO, WorkerOptions

DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # an InferenceService's name is its Service's: DNS-1035
URI_MAX = 4096


class SpecModel(BaseModel):
    """camelCase in YAML, snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ModelSource(SpecModel):
    uri: str = Field(min_length=1, max_length=URI_MAX)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = EngineConfig.dtype


class WorkerResources(SpecModel):
    gpus: int = Field(default=1, ge=0)
    cpu: str | None = Field(default=None, pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    memory: str | None = Field(default=None, pattern=r"^[0-9]+(\.[0-9]+)?([KMGT]i?)?$")


class Slo(SpecModel):
    ttft_ms: float = Field(default=SLO.ttft_s * 1000, gt=0)
    tpot_ms: float = Field(default=SLO.tpot_s * 1000, gt=0)


class EngineLimits(SpecModel):
    max_tokens_per_batch: int = Field(default=EngineConfig.max_tokens_per_batch, ge=1)
    max_num_seqs: int = Field(default=EngineConfig.max_num_seqs, ge=1)
    enable_prefix_caching: bool = EngineConfig.enable_prefix_caching
    kv_cache_fraction: float = Field(default=EngineConfig.kv_cache_fraction, gt=0, le=1)
    max_loras: int = Field(default=EngineConfig.max_loras, ge=1)
    max_lora_rank: int = Field(default=EngineConfig.max_lora_rank, ge=1)
    policy: Literal[POLICIES] = WorkerOptions.policy
    max_finetune_tokens: int = Field(default=WorkerOptions.max_finetune_tokens, ge=1)


class PinnedAdapter(SpecModel):
    name: str = Field(max_length=MAX_NAME_LEN, pattern=f"^{NAME.pattern}$")  # worker/names.py's rule
    uri: str = Field(min_length=1, max_length=URI_MAX)


class InferenceServiceSpec(SpecModel):
    model: ModelSource
    image: str | None = Field(default=None, min_length=1)
    replicas: int = Field(default=1, ge=0)
    resources: WorkerResources = WorkerResources()
    slo: Slo = Slo()
    engine: EngineLimits = EngineLimits()
    adapters: list[PinnedAdapter] = []

    @model_validator(mode="after")
    def _pinned_adapters_fit(self) -> InferenceServiceSpec:
        names = [adapter.name for adapter in self.adapters]
        if len(set(names)) < len(names):
            raise ValueError(f"pinned adapter names must be unique: {names}")
        if len(self.adapters) > self.engine.max_loras:
            raise ValueError(
                f"{len(self.adapters)} pinned adapters exceed engine.maxLoras={self.engine.max_loras}"
            )
        return self


class FinetuneJobSpec(WorkerJobSpec):
    """The worker's job spec (one definition of the fields and their checks) with the service required."""

    inference_service: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL)

    def check_fits(self, service: InferenceServiceSpec) -> None:
        """Fails early (instead of an OOM on the GPU) when the service cannot host this adapter."""
        if self.lora.rank > service.engine.max_lora_rank:
            raise ValueError(
                f"lora.rank={self.lora.rank} exceeds engine.maxLoraRank={service.engine.max_lora_rank} "
                f"of InferenceService {self.inference_service!r}"
            )


def describe(error: ValidationError) -> str:
    """One line per problem, with camelCase field paths as the user wrote them."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "spec"
        lines.append(f"{where}: {item['msg']}")
    return "; ".join(lines)
