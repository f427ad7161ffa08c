"""``FinetuneJobSpec``: the FinetuneJob custom resource's ``spec`` (camelCase), validated.

Field names, types, defaults and bounds are the CRD's (``crds/flexllm.ai_finetunejobs.yaml``):
tests/operator/test_operator_spec_sync.py compares both ways, so neither can drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from flexllm.worker.engine.lora_targets import LORA_TARGETS, canonical_targets, lora_scaling
from flexllm.worker.finetune.data import dataset_path


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class DatasetSpec(_Spec):
    source: str = Field(min_length=1, max_length=4096, pattern=r"^(file://)?[^:]+$")  # file:///abs, rel or /abs
    format: Literal["text", "prompt-completion", "chat"] = "prompt-completion"

    def resolve(self, roots: Sequence[Path] | None = None) -> Path:
        """The dataset's file; with ``roots`` (a worker's data roots) only under them (``dataset_path``)."""
        return dataset_path(self.source, roots)


class LoraSpec(_Spec):
    rank: int = Field(default=8, ge=1, le=256)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    use_rslora: bool = False  # PEFT's use_rslora: scaling alpha / sqrt(rank) instead of alpha / rank
    target_modules: tuple[Literal[LORA_TARGETS], ...] = Field(
        default=("q_proj", "v_proj"), min_length=1, max_length=len(LORA_TARGETS))

    @field_validator("target_modules", mode="before")
    @classmethod
    def _known_targets(cls, targets: Any) -> Any:
        if not isinstance(targets, list | tuple):
            return targets  # pydantic reports the type
        return canonical_targets(targets)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)


class TrainingSpec(_Spec):
    max_steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    learning_rate: float = Field(default=2e-4, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    batch_tokens: int = Field(default=2048, ge=1)
    gradient_accumulation: int = Field(default=1, ge=1)
    max_seq_len: int = Field(default=512, ge=2)
    seed: int = 0
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)  # None: no clipping
    weight_decay: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _one_length(self) -> TrainingSpec:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of training.maxSteps and training.epochs")
        return self


class PublishSpec(_Spec):
    every_steps: int = Field(default=50, ge=1)
    keep_versions: int = Field(default=5, ge=1)


class FinetuneJobSpec(_Spec):
    """The CR's ``spec``; ``inferenceService`` is only needed by the operator, so optional here."""

    inference_service: str | None = None
    dataset: DatasetSpec
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec
    publish: PublishSpec = PublishSpec()
