"""Shared builders for the fine-tuning tests: engine model, HF PEFT twin, LoRA weights, batches."""

from __future__ import annotations

from pathlib import Path

import torch

from flexllm.worker.engine.llm_engine import build_model
from flexllm.worker.finetune.data import TrainingSequence
from flexllm.worker.finetune.lora_params import LoRAWeights
from flexllm.worker.finetune.spec import LoraSpec

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def engine_model(folder: Path):
    model, tokenizer, _, _ = build_model(str(folder), torch.float32, torch.device("cpu"))
    return model, tokenizer


def peft_model(folder: Path, spec: LoraSpec):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        use_rslora=spec.use_rslora,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def random_lora(model, spec: LoraSpec, seed: int = 1) -> LoRAWeights:
    """LoRA weights with non-zero B (so every gradient is non-trivial)."""
    lora = LoRAWeights(model, spec, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return lora


def copy_into_peft(peft, lora: LoRAWeights) -> None:
    state = {k.replace(".weight", ".default.weight"): v for k, v in lora.peft_state_dict().items()}
    missing = set(state) - set(dict(peft.named_parameters()))
    assert not missing, sorted(missing)[:3]
    with torch.no_grad():
        params = dict(peft.named_parameters())
        for k, v in state.items():
            params[k].copy_(v)


def peft_grads(peft, lora: LoRAWeights) -> dict[str, torch.Tensor]:
    params = dict(peft.named_parameters())
    return {k: params[k.replace(".weight", ".default.weight")].grad for k in lora.peft_state_dict()}


def our_grads(lora: LoRAWeights) -> dict[str, torch.Tensor]:
    keys = list(lora.peft_state_dict())
    grads = [p.grad for layer in range(lora.num_layers) for pair in lora.pairs(layer).values() for p in pair]
    return dict(zip(keys, grads, strict=True))


def peft_loss_sum(peft, seqs: list[TrainingSequence]) -> torch.Tensor:
    """Summed token cross-entropy of the sequences (one forward each, no padding)."""
    total = 0
    for seq in seqs:
        ids = torch.tensor([seq.token_ids])
        labels = torch.tensor([[t if m else -100 for t, m in zip(seq.token_ids, seq.is_target, strict=True)]])
        logits = peft(input_ids=ids).logits.float()[0, :-1]
        total = total + torch.nn.functional.cross_entropy(
            logits, labels[0, 1:], ignore_index=-100, reduction="sum"
        )
    return total


def random_sequences(vocab: int, lengths: list[int], seed: int = 0) -> list[TrainingSequence]:
    generator = torch.Generator().manual_seed(seed)
    seqs = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
        is_target = [j >= n // 3 for j in range(n)]  # a prompt third without loss
        seqs.append(TrainingSequence(tuple(ids), tuple(is_target), i + 1))
    return seqs


def max_rel_error(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max(float((ours[k] - ref[k]).norm() / ref[k].norm()) for k in ref)


def write_dataset(path: Path, lines: int = 24, bad: tuple[str, ...] = ()) -> Path:
    """A prompt/completion JSONL file (plus the given bad lines, placed after the first line)."""
    import json

    rows = [
        json.dumps(
            {
                "prompt": f"Question {i}: what is {i} plus {i % 5}?",
                "completion": f" The answer is {i + i % 5}.",
            }
        )
        for i in range(lines)
    ]
    path.write_text("\n".join(rows[:1] + list(bad) + rows[1:]) + "\n")
    return path
