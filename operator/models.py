"""Pydantic models of the custom resources' specs: the operator's own validation.

The CRD schemas reject most bad input at ``kubectl apply``; these models repeat the checks
(clusters may run with validation off, or an old CRD) and add the cross-field rules.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel


class SpecModel(BaseModel):
    """camelCase in YAML, snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ModelSource(SpecModel):
    uri: str = Field(min_length=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"


class WorkerResources(SpecModel):
    gpus: int = Field(default=1, ge=0)
    cpu: str | None = None
    memory: str | None = None


class Slo(SpecModel):
    ttft_ms: float = Field(default=5000, gt=0)
    tpot_ms: float = Field(default=75, gt=0)


class EngineLimits(SpecModel):
    max_tokens_per_batch: int = Field(default=2048, ge=1)
    kv_cache_fraction: float = Field(default=0.5, gt=0, le=1)
    max_loras: int = Field(default=4, ge=1)
    max_lora_rank: int = Field(default=64, ge=1)


class PinnedAdapter(SpecModel):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    uri: str = Field(min_length=1)


class InferenceServiceSpec(SpecModel):
    model: ModelSource
    image: str | None = None
    replicas: int = Field(default=1, ge=0)
    resources: WorkerResources = WorkerResources()
    slo: Slo = Slo()
    engine: EngineLimits = EngineLimits()
    adapters: list[PinnedAdapter] = []

    @model_validator(mode="after")
    def _pinned_adapters_fit(self) -> InferenceServiceSpec:
        if len(self.adapters) > self.engine.max_loras:
            raise ValueError(
                f"{len(self.adapters)} pinned adapters exceed engine.maxLoras={self.engine.max_loras}"
            )
        return self


class Dataset(SpecModel):
    source: str = Field(min_length=1)
    format: Literal["text", "prompt-completion", "chat"] = "prompt-completion"


class LoraConfig(SpecModel):
    rank: int = Field(default=8, ge=1, le=256)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default=["q_proj", "v_proj"], min_length=1)


class Training(SpecModel):
    max_steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    learning_rate: float = Field(default=2e-4, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    batch_tokens: int = Field(default=2048, ge=1)
    gradient_accumulation: int = Field(default=1, ge=1)
    max_seq_len: int = Field(default=512, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one_length(self) -> Training:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of training.maxSteps and training.epochs")
        return self


class Publish(SpecModel):
    every_steps: int = Field(default=50, ge=1)
    keep_versions: int = Field(default=5, ge=1)


class FinetuneJobSpec(SpecModel):
    inference_service: str = Field(min_length=1)
    dataset: Dataset
    lora: LoraConfig = LoraConfig()
    training: Training
    publish: Publish = Publish()

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
