"""The co-serving loop on a real tiny model: fused iterations, SLO accounting, and a fine-tuned
adapter that does not depend on how its work was interleaved with inference."""

import json
import math

import pytest
import torch

from flexllm.worker.coserve.engine import CoServingEngine
from flexllm.worker.coserve.latency import LatencyModel
from flexllm.worker.coserve.policy import SLO, measure_speed
from flexllm.worker.engine.llm_engine import LLMEngine
from flexllm.worker.engine.sampling import SamplingParams
from flexllm.worker.finetune.runner import FinetuneRunner, train
from flexllm.worker.finetune.spec import FinetuneJobSpec
from flexllm.worker.finetune.work import head_cost_in_layers


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = [{"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(16)]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def job(dataset, max_steps: int = 3) -> FinetuneJobSpec:
    return FinetuneJobSpec.model_validate({
        "dataset": {"source": f"file://{dataset}", "format": "prompt-completion"},
        "lora": {"rank": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj", "down_proj"]},
        "training": {"maxSteps": max_steps, "learningRate": 1e-2, "batchTokens": 48, "maxSeqLen": 64, "seed": 3},
        "publish": {"everySteps": 3, "keepVersions": 1},
    })


def engine_for(model_dir) -> LLMEngine:
    return LLMEngine(model=str(model_dir), dtype="float32", device="cpu", num_kv_blocks=128, block_size=4,
                     max_tokens_per_batch=32)


def tight_latency() -> LatencyModel:
    """Priced so that fine-tuning gets a few tokens next to inference, and all of them when idle."""
    model = LatencyModel(refit_every=10**9)
    model.coef = [0.001, 0.001, 0.0, 0.002, 0.004, 0.0, 0.0]
    return model


def test_start_up_timings_compute_every_prompt_token(tiny_llama_dir):
    """``profile`` and ``measure_speed`` time prefills: one served from the prefix cache times work
    that never ran, and every SLO and budget derived from it would be too tight."""
    engine = engine_for(tiny_llama_dir)
    assert engine.block_manager.enable_caching
    CoServingEngine(engine, SLO(ttft_s=60, tpot_s=0.5)).profile()
    measure_speed(engine)
    assert engine.block_manager.query_tokens > 0
    assert engine.block_manager.hit_tokens == 0


def test_coserved_job_matches_the_job_trained_alone(tiny_llama_dir, dataset, tmp_path):
    alone_engine = engine_for(tiny_llama_dir)
    alone = train(alone_engine.model, alone_engine.tokenizer, job(dataset), tmp_path / "alone", "j",
                  token_budget=512, resume=False)

    engine = engine_for(tiny_llama_dir)
    co = CoServingEngine(engine, SLO(ttft_s=60, tpot_s=0.5), max_finetune_tokens=8, latency=tight_latency())
    runner = FinetuneRunner(engine.model, engine.tokenizer, job(dataset), tmp_path / "co", "j", resume=False)
    co.add_job("j", runner)
    for i in range(10):
        engine.add_request(f"r{i}", [100 + i] * (5 + 3 * i), SamplingParams(max_tokens=6 + i, temperature=0))
    fused = idle_ft = 0
    finished = []
    while co.has_work():
        result = co.step()
        finished += [o.request_id for o in result.outputs if o.finished]
        ft_tokens = result.shape.finetune_forward_tokens + result.shape.finetune_backward_tokens
        fused += result.shape.inference_tokens > 0 and ft_tokens > 0
        idle_ft += result.shape.inference_tokens == 0 and ft_tokens > 0
        assert result.shape.inference_tokens <= 32
        assert result.finetune_budget <= 8
    assert sorted(finished) == sorted(f"r{i}" for i in range(10))
    assert fused > 0, "no iteration carried inference and fine-tuning together"
    assert idle_ft > 0, "fine-tuning never ran alone once inference was done"
    assert runner.step == alone.step == 3
    assert runner.loss == pytest.approx(alone.loss, rel=1e-5)
    for a, b in zip(runner.lora.parameters(), alone.lora.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32: other cuts, other rounding
    assert co.slo_tracker.met + co.slo_tracker.missed == 10


def test_two_jobs_share_by_weight(tiny_llama_dir, dataset, tmp_path):
    engine = engine_for(tiny_llama_dir)
    co = CoServingEngine(engine, SLO(ttft_s=60, tpot_s=0.5), max_finetune_tokens=96, latency=tight_latency())
    for name, weight in (("heavy", 3.0), ("light", 1.0)):
        runner = FinetuneRunner(engine.model, engine.tokenizer, job(dataset, max_steps=1000), tmp_path / name,
                                name, resume=False)
        co.add_job(name, runner, weight)
    done = {"heavy": 0, "light": 0}
    least = math.ceil((1 + head_cost_in_layers(engine.model.args)) / engine.model.args.num_layers)
    for _ in range(30):
        result = co.step()
        assert sum(w.tokens for w in result.finetune.values()) <= 96 + 2 * least  # the least unit may overshoot
        for name, work in result.finetune.items():
            done[name] += work.tokens
    assert 2.5 < done["heavy"] / done["light"] < 3.5


def test_a_unit_that_breaks_the_fused_forward_fails_its_job_not_inference(tiny_llama_dir, dataset, tmp_path):
    """A fine-tuning unit whose layer code raises (a stand-in for a bug) fails its job; the inference
    batch of that iteration reruns alone and the requests finish."""
    engine = engine_for(tiny_llama_dir)
    co = CoServingEngine(engine, SLO(ttft_s=60, tpot_s=0.5), max_finetune_tokens=8, latency=tight_latency())
    runner = FinetuneRunner(engine.model, engine.tokenizer, job(dataset), tmp_path / "broken", "j", resume=False)
    plan = runner.plan_work

    def broken_plan(budget):
        unit = plan(budget)

        def layer_steps(layer):
            raise RuntimeError("broken unit")
            yield  # a generator, as layer code is

        unit.layer_steps = layer_steps
        return unit

    runner.plan_work = broken_plan
    co.add_job("j", runner)
    engine.add_request("r", [101] * 6, SamplingParams(max_tokens=5, temperature=0))
    outputs = []
    while co.has_work():
        outputs += co.step().outputs
    assert co.failed == {"j": "RuntimeError: broken unit"}
    assert "j" not in co.jobs
    assert outputs[-1].finished and len(outputs[-1].token_ids) == 5
