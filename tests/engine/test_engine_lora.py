"""Two PEFT adapters in one batch: each request's output equals HF PEFT on its adapter."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from flexllm.worker.engine.lora import UnknownAdapterError
from flexllm.worker.engine.sampling import SamplingParams

from .conftest import make_engine, prompts_of_mixed_lengths

ADAPTERS = {
    "attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"], use_rslora=True),
}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    dirs = {}
    for i, (name, settings) in enumerate(ADAPTERS.items()):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **settings))
        torch.manual_seed(i)
        with torch.no_grad():  # PEFT initialises B to zero: make both factors matter
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        dirs[name] = tmp_path_factory.mktemp(name)
        peft_model.save_pretrained(dirs[name])
    return dirs


def peft_greedy(model_dir, adapter_dir, prompt, max_new_tokens):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_two_adapters_and_base_in_one_batch_match_hf_peft(tiny_llama_dir, adapter_dirs):
    engine = make_engine(tiny_llama_dir, max_loras=2, max_lora_rank=8)
    for name, folder in adapter_dirs.items():
        engine.add_lora(name, folder)
    prompts = prompts_of_mixed_lengths(6, seed=3)
    loras = ["attn", "all", None, "all", "attn", None]
    params = SamplingParams(max_tokens=10, temperature=0)
    for i, (prompt, lora) in enumerate(zip(prompts, loras)):
        engine.add_request(f"r{i}", prompt, params, lora)
    slots_per_step = []
    schedule = engine.scheduler.schedule

    def spy(budget=None):
        batch = schedule(budget)
        slots_per_step.append({s.lora_slot for s in batch.seqs})
        return batch

    engine.scheduler.schedule = spy
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    assert {-1, 0, 1} in slots_per_step, "base and both adapters never shared a batch"
    for i, (prompt, lora) in enumerate(zip(prompts, loras)):
        expected = peft_greedy(tiny_llama_dir, adapter_dirs.get(lora), prompt, 10)
        assert outputs[f"r{i}"].token_ids == expected, f"request {i} (adapter {lora}) differs from HF PEFT"
    base_only = peft_greedy(tiny_llama_dir, None, prompts[0], 10)
    assert outputs["r0"].token_ids != base_only, "the adapter should change the output"


def test_lru_eviction_when_slots_are_full(tiny_llama_dir, adapter_dirs):
    engine = make_engine(tiny_llama_dir, max_loras=1, max_lora_rank=8)
    for name, folder in adapter_dirs.items():
        engine.add_lora(name, folder)
    prompt = prompts_of_mixed_lengths(1, seed=5)[0]
    params = SamplingParams(max_tokens=6, temperature=0)
    first = engine.generate([prompt], params, lora="attn")[0].token_ids
    engine.generate([prompt], params, lora="all")  # evicts "attn" from the only slot
    assert list(engine.lora_manager.slot_of) == ["all"]
    assert engine.generate([prompt], params, lora="attn")[0].token_ids == first


def test_adapter_errors_are_clear(tiny_llama_dir, adapter_dirs, tmp_path):
    engine = make_engine(tiny_llama_dir, max_loras=1, max_lora_rank=4)
    with pytest.raises(ValueError, match="rank 8 > max_lora_rank 4"):
        engine.add_lora("all", adapter_dirs["all"])
    with pytest.raises(ValueError, match="invalid adapter name"):
        engine.add_lora("../etc", adapter_dirs["attn"])
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        engine.add_lora("empty", tmp_path)
    with pytest.raises(UnknownAdapterError, match="not loaded"):
        engine.add_request("x", [5, 6, 7], SamplingParams(), lora="nope")
