"""Spec validation with the pydantic models: clear messages, cross-field rules, config from env."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flexllm.operator.config import OperatorConfig
from flexllm.operator.models import FinetuneJobSpec, InferenceServiceSpec, describe

REPO = Path(__file__).resolve().parents[2]


def example(name: str) -> dict:
    return yaml.safe_load((REPO / "examples" / name).read_text())["spec"]


def test_examples_parse():
    job = FinetuneJobSpec.model_validate(example("finetunejob.yaml"))
    assert (job.lora.rank, job.training.optimizer, job.training.epochs) == (8, "adamw", None)
    assert job.training.max_steps == example("finetunejob.yaml")["training"]["maxSteps"]
    service = InferenceServiceSpec.model_validate(example("inferenceservice.yaml"))
    assert service.engine.max_lora_rank == 64


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s["training"].update(optimizer="adam"), "training.optimizer: Input should be 'adamw' or 'sgd'"),
    (lambda s: s["lora"].update(rank=-1), "lora.rank: Input should be greater than or equal to 1"),
    (lambda s: s["training"].update(learningRate=0), "training.learningRate: Input should be greater than 0"),
    (lambda s: s["training"].update(epochs=2), "set exactly one of training.maxSteps and training.epochs"),
    (lambda s: s.pop("inferenceService"), "inferenceService: Field required"),
    (lambda s: s.update(unknown=1), "unknown: Extra inputs are not permitted"),
])
def test_invalid_job_specs_have_clear_messages(edit, message):
    spec = example("finetunejob.yaml")
    edit(spec)
    with pytest.raises(ValidationError) as error:
        FinetuneJobSpec.model_validate(spec)
    assert message in describe(error.value)


def test_rank_above_the_services_limit_does_not_fit():
    job = FinetuneJobSpec.model_validate({**example("finetunejob.yaml"), "lora": {"rank": 128}})
    with pytest.raises(ValueError, match="lora.rank=128 exceeds engine.maxLoraRank=64"):
        job.check_fits(InferenceServiceSpec.model_validate(example("inferenceservice.yaml")))


def test_more_pinned_adapters_than_slots_is_invalid():
    adapters = [{"name": f"a{i}", "uri": "pvc://x"} for i in range(5)]
    with pytest.raises(ValidationError, match="exceed engine.maxLoras=4"):
        InferenceServiceSpec.model_validate({**example("inferenceservice.yaml"), "adapters": adapters})


def test_config_from_env():
    config = OperatorConfig.from_env({"FLEXLLM_REDIS_URL": "redis://x:1/2", "REDIS_PASSWORD": "pw",
                                      "FLEXLLM_SYNC_INTERVAL_S": "0.5", "FLEXLLM_PEERING": ""})
    assert (config.redis_url, config.redis_password, config.sync_interval_s, config.peering) == (
        "redis://x:1/2", "pw", 0.5, "")
    assert OperatorConfig.from_env({}).redis_password is None
