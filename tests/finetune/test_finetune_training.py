"""Optimizer steps match HF PEFT + torch optimizers; resume continues exactly; versions serve."""

import json

import pytest
import torch
from finetune_helpers import copy_into_peft, engine_model, peft_loss_sum, peft_model, write_dataset
from transformers import get_cosine_schedule_with_warmup

from flexllm.worker.finetune.data import SequenceStream
from flexllm.worker.finetune.runner import FinetuneRunner, train
from flexllm.worker.finetune.spec import FinetuneJobSpec
from flexllm.worker.finetune.work import whole_budget

BUDGET = 16


def job_spec(dataset, optimizer="adamw", steps=20, use_rslora=False) -> FinetuneJobSpec:
    return FinetuneJobSpec.model_validate(
        {
            "inferenceService": "tiny",
            "dataset": {"source": f"file://{dataset}", "format": "prompt-completion"},
            "lora": {"rank": 4, "alpha": 8, "useRslora": use_rslora,
                     "targetModules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
            "training": {
                "maxSteps": steps,
                "learningRate": 2e-3 if optimizer == "adamw" else 0.5,
                "optimizer": optimizer,
                "batchTokens": 64,
                "gradientAccumulation": 2,
                "maxSeqLen": 40,
                "seed": 3,
                "warmupSteps": 3,
                "maxGradNorm": 0.5,
            },
            "publish": {"everySteps": 5, "keepVersions": 3},
        }
    )


def run_collecting_losses(runner: FinetuneRunner) -> list[float]:
    losses = []
    budget = whole_budget(runner.model.args, BUDGET)  # what ``train`` gives units of BUDGET tokens
    while not runner.done:
        done = runner.run_work(budget)
        assert 0 < done.tokens <= budget
        if done.step_finished:
            losses.append(done.loss)
    return losses


def hf_reference_losses(folder, job: FinetuneJobSpec, tokenizer, initial_lora) -> list[float]:
    """The same steps with HF PEFT, torch's optimizer, HF's cosine schedule and clip_grad_norm_."""
    peft = peft_model(folder, job.lora)
    copy_into_peft(peft, initial_lora)
    params = [p for p in peft.parameters() if p.requires_grad]
    t = job.training
    optimizer = (
        torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=0.0)
        if t.optimizer == "adamw"
        else torch.optim.SGD(params, lr=t.learning_rate)
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    stream = SequenceStream(job.dataset.resolve(), job.dataset.format, tokenizer, t.max_seq_len)
    losses = []
    for _ in range(t.max_steps):
        seqs = [s for _ in range(t.gradient_accumulation) for s in stream.micro_batch(t.batch_tokens)]
        loss = peft_loss_sum(peft, seqs) / sum(s.num_targets for s in seqs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    """An uninterrupted 20-step AdamW run: (model, tokenizer, job, runner, losses, initial LoRA)."""
    tmp = tmp_path_factory.mktemp("ft")
    job = job_spec(write_dataset(tmp / "data.jsonl", bad=("not json", '{"prompt": 3}')))
    model, tokenizer = engine_model(tiny_llama_dir)
    runner = FinetuneRunner(
        model, tokenizer, job, tmp / "adapters", "tiny-job", base_model=str(tiny_llama_dir)
    )
    initial = runner.lora.peft_state_dict()
    losses = run_collecting_losses(runner)
    return model, tokenizer, job, runner, losses, initial


def test_adamw_loss_curve_matches_hf_peft(trained, tiny_llama_dir):
    model, tokenizer, job, runner, losses, initial = trained
    reference_lora = FinetuneRunner(
        model, tokenizer, job, runner.store.root / "unused", "x", resume=False
    ).lora
    reference_lora.load_peft_state_dict(initial)
    reference = hf_reference_losses(tiny_llama_dir, job, tokenizer, reference_lora)
    assert len(losses) == 20
    assert losses == pytest.approx(reference, rel=1e-3)
    assert losses[-1] < losses[0] - 0.5  # it learns
    assert runner.stream.stats.bad >= 2  # the two bad lines were counted and skipped


def test_sgd_steps_match_hf_peft(tiny_llama_dir, tmp_path):
    job = job_spec(write_dataset(tmp_path / "data.jsonl"), optimizer="sgd", steps=4)
    model, tokenizer = engine_model(tiny_llama_dir)
    runner = FinetuneRunner(model, tokenizer, job, tmp_path / "adapters", "sgd")
    reference = hf_reference_losses(tiny_llama_dir, job, tokenizer, runner.lora)
    assert run_collecting_losses(runner) == pytest.approx(reference, rel=1e-3)


def test_versions_are_published_and_pruned(trained):
    runner = trained[3]
    assert runner.store.versions(runner.adapter) == [2, 3, 4]  # every 5 of 20 steps, keepVersions=3
    meta = json.loads((runner.latest_folder() / "metadata.json").read_text())
    assert runner.latest_folder().name == "v4" and meta["step"] == 20 and meta["loss"] == pytest.approx(trained[4][-1])
    assert meta["tokens"] == runner.tokens > 0
    assert not [p for p in runner.store.root.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_interrupted_run_resumes_exactly(trained, tiny_llama_dir, tmp_path):
    model, tokenizer, job, runner, losses, _ = trained
    first = train(model, tokenizer, job, tmp_path, "tiny-job", token_budget=BUDGET, until_step=10)
    assert first.step == 10 and first.latest_version == 2
    resumed = FinetuneRunner(model, tokenizer, job, tmp_path, "tiny-job")
    assert resumed.step == 10
    assert run_collecting_losses(resumed) == pytest.approx(losses[10:], rel=1e-6)
    for key, weight in resumed.lora.peft_state_dict().items():
        torch.testing.assert_close(weight, runner.lora.peft_state_dict()[key], rtol=1e-5, atol=1e-7)


def served_logits(model, folder, ids: list[int]) -> torch.Tensor:
    """The engine's serving forward of ``ids`` [n] with the adapter in ``folder`` -> logits [n, V]."""
    from flexllm.worker.engine.context import LoRABatch, StepContext
    from flexllm.worker.engine.lora import LoRAManager

    manager = LoRAManager(model, max_loras=2, max_lora_rank=8)
    manager.register("tiny-job@v4", folder)
    slot = manager.acquire("tiny-job@v4")
    n, block = len(ids), 16
    blocks = -(-n // block)
    args = model.args
    for layer in model.layers:  # a private KV cache for this one prefill
        layer.self_attn.k_cache = torch.zeros(blocks, block, args.num_kv_heads, args.head_dim)
        layer.self_attn.v_cache = torch.zeros_like(layer.self_attn.k_cache)
    ctx = StepContext(
        positions=torch.arange(n),
        slot_mapping=torch.arange(n),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None],
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        context_lens=torch.tensor([n], dtype=torch.int32),
        lora=LoRABatch(torch.full((n,), slot)),
    )
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), ctx))


def training_logits(model, lora, ids: list[int]) -> torch.Tensor:
    """The training forward (the same decoder layer, its training backend) of ``ids`` [n] -> logits [n, V]."""
    from flexllm.worker.engine.fused import run_alone
    from flexllm.worker.finetune.functions import rms_norm
    from flexllm.worker.finetune.layer import ChunkInput, decoder_layer

    n, args = len(ids), model.args
    chunk = ChunkInput(*model.rotary.cos_sin(torch.arange(n), torch.float32), [(0, 0, n)], None)
    empty = torch.zeros(0, args.num_kv_heads, args.head_dim)
    with torch.no_grad():
        x = model.embed_tokens(torch.tensor(ids))
        for layer in range(args.num_layers):
            x, _, _ = run_alone(decoder_layer(model, lora, layer, x, chunk, empty, empty))
        return model.compute_logits(rms_norm(x, model.norm, args.rms_norm_eps))


def test_published_version_serves_same_logits_in_peft_and_engine(trained, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer, _, runner, _, _ = trained
    folder = runner.latest_folder()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, folder).eval()
    ids = tokenizer.encode("Question 7: what is 7 plus 2? The answer is")
    with torch.no_grad():
        expected = peft(input_ids=torch.tensor([ids])).logits[0]

    served = served_logits(model, folder, ids)
    torch.testing.assert_close(served, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), peft.disable_adapter():
        assert not torch.allclose(peft(input_ids=torch.tensor([ids])).logits[0], expected, atol=1e-3)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_scaling_is_one_rule_pefts(tiny_llama_dir, tmp_path, use_rslora):
    """Training (LoraSpec) and serving (AdapterConfig) scale by ``lora_scaling``, which is PEFT's rule."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from flexllm.worker.engine.lora import AdapterConfig
    from flexllm.worker.engine.lora_targets import lora_scaling
    from flexllm.worker.finetune.spec import LoraSpec

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=9, lora_alpha=6, use_rslora=use_rslora, target_modules=["q_proj"]))
    expected = peft.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    peft.save_pretrained(tmp_path)
    spec = LoraSpec(rank=9, alpha=6, use_rslora=use_rslora, target_modules=("q_proj",))
    assert lora_scaling(6, 9, use_rslora) == spec.scaling == AdapterConfig.read(tmp_path).scaling == expected
    assert expected == (2.0 if use_rslora else 6 / 9)


def test_rslora_job_trains_like_peft_and_serves_identically(tiny_llama_dir, tmp_path):
    """An rsLoRA job: its steps match HF PEFT's with use_rslora; the adapter it publishes says so, and
    its logits are the same in the training forward, in the engine's serving path and in PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job = job_spec(write_dataset(tmp_path / "data.jsonl"), optimizer="sgd", steps=4, use_rslora=True)
    model, tokenizer = engine_model(tiny_llama_dir)
    runner = FinetuneRunner(model, tokenizer, job, tmp_path / "adapters", "rs-job", base_model=str(tiny_llama_dir))
    assert runner.lora.scaling == 4.0  # alpha 8 / sqrt(rank 4), not 8 / 4
    reference = hf_reference_losses(tiny_llama_dir, job, tokenizer, runner.lora)
    assert run_collecting_losses(runner) == pytest.approx(reference, rel=1e-3)

    folder = runner.latest_folder()
    assert json.loads((folder / "adapter_config.json").read_text())["use_rslora"] is True
    ids = tokenizer.encode("Question 7: what is 7 plus 2? The answer is")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), folder)
    with torch.no_grad():
        expected = peft.eval()(input_ids=torch.tensor([ids])).logits[0]
    trained_here = training_logits(model, runner.lora, ids)
    torch.testing.assert_close(trained_here, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(served_logits(model, folder, ids), trained_here, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), peft.disable_adapter():
        assert not torch.allclose(peft(input_ids=torch.tensor([ids])).logits[0], expected, atol=1e-3)


def test_a_job_leaves_torch_global_rng_alone(tiny_llama_dir, tmp_path):
    """Starting, training (with LoRA dropout), publishing and resuming a job neither draws from nor reseeds
    torch's global RNG, which the unseeded sampling of other users' requests draws from."""
    job = job_spec(write_dataset(tmp_path / "data.jsonl"), steps=6)
    job = job.model_copy(update={"lora": job.lora.model_copy(update={"dropout": 0.1})})
    model, tokenizer = engine_model(tiny_llama_dir)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = train(model, tokenizer, job, tmp_path, "rng", token_budget=BUDGET, until_step=5)
    assert first.latest_version == 1  # published at step 5
    resumed = FinetuneRunner(model, tokenizer, job, tmp_path, "rng")
    assert resumed.step == 5
    run_collecting_losses(resumed)
    assert resumed.step == 6
    assert torch.equal(torch.get_rng_state(), state)
