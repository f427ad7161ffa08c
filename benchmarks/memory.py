"""Saved-activation bytes per training token: FlexLLM fine-tuning vs HF PEFT (paper Fig. "memory").

Measured, not estimated: every tensor autograd saves for backward passes through
``torch.autograd.graph.saved_tensors_hooks``; bytes of distinct storages are summed, frozen and
LoRA parameters excluded. Variants at one sequence length:

- ``hf_peft``: HF model + PEFT LoRA, full forward (what a Trainer keeps for backward), SDPA
  attention (``hf_peft_eager``: eager attention, which keeps the [heads, T, T] probabilities);
  ``hf_peft_gc``: the same with gradient checkpointing (forward-time saves only; its backward
  additionally rebuilds one layer's graph over the whole sequence, not counted here);
- ``pruned``: FlexLLM's pruned graph over the whole sequence in one chunk (no rematerialization);
- ``flexllm``: token-level forward (no graph) + split backward: the layer-input checkpoints, the
  sequence's K/V and dK/dV buffers, plus the largest graph any backward unit builds.

Run: ``python benchmarks/memory.py`` (about 5 minutes on 2 CPU cores; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flexllm.worker.engine.llm_engine import build_model
from flexllm.worker.engine.model import CausalLM, ModelArgs
from flexllm.worker.finetune.data import TrainingSequence
from flexllm.worker.finetune.layer import ChunkInput, decoder_layer, loss_sum
from flexllm.worker.finetune.lora_params import LoRAWeights
from flexllm.worker.finetune.spec import LoraSpec
from flexllm.worker.finetune.work import SequenceWork

RESULTS = Path(__file__).parent / "results"


class SavedBytes:
    """Context manager: bytes of distinct storages saved for backward (``exclude``: storage pointers)."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.storages = exclude, {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _pointers(*modules) -> set[int]:
    return {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}


def hf_peft_bytes(hf_model, spec: LoraSpec, ids: torch.Tensor, checkpointing: bool, attention: str) -> int:
    from peft import LoraConfig, get_peft_model

    hf_model.set_attn_implementation(attention)
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules), task_type="CAUSAL_LM"
    )
    peft = get_peft_model(hf_model, config)
    if checkpointing:
        peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft.enable_input_require_grads()
    peft.train()
    with SavedBytes(_pointers(peft)) as saved:
        peft(input_ids=ids[None], labels=ids[None])
    if checkpointing:
        peft.gradient_checkpointing_disable()
    peft.unload()  # back to the plain base model for the next variant
    return saved.total


def pruned_bytes(model: CausalLM, lora: LoRAWeights, ids: torch.Tensor) -> int:
    """One autograd graph over the whole sequence, built from FlexLLM's pruned functions."""
    args, n = model.args, ids.shape[0]
    cos, sin = model.rotary.cos_sin(torch.arange(n), model.embed_tokens.weight.dtype)
    chunk = ChunkInput(0, cos, sin, None)
    empty = model.embed_tokens.weight.new_zeros(0, args.num_kv_heads, args.head_dim)
    with SavedBytes(_pointers(model, lora)) as saved:
        x = model.embed_tokens(ids)
        for layer in range(args.num_layers):
            x, _, _ = decoder_layer(model, lora, layer, x, chunk, empty, empty)
        loss_sum(model, x, torch.roll(ids, -1))
    return saved.total


def flexllm_bytes(model: CausalLM, lora: LoRAWeights, ids: torch.Tensor, window: int, budget: int):
    """-> (bytes kept across the sequence's work: checkpoints, K/V, dK/dV; largest unit graph).

    Backward windows of ``window`` tokens, cut into layer blocks costing at most ``budget`` tokens.
    """
    seq = TrainingSequence(tuple(ids.tolist()), (True,) * ids.shape[0], 1)
    work = SequenceWork(model, lora, seq, 1.0 / seq.num_targets, backward_window=window)
    while not work.forward_done:
        work.forward_chunk(window)
    buffers = (work.checkpoints, work.k, work.v, work.dk, work.dv)
    kept = sum(t.untyped_storage().nbytes() for t in buffers)
    exclude = _pointers(model, lora) | {t.untyped_storage().data_ptr() for t in buffers}
    largest = 0
    while not work.finished:
        with SavedBytes(exclude) as saved:
            work.backward_unit(budget)
        largest = max(largest, saved.total)
    return kept, largest


def llama8b_shaped(num_layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=vocab,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    model = CausalLM(ModelArgs.from_hf_config(config), config)
    model.load_hf_state_dict(hf.state_dict())
    return model.requires_grad_(False).eval(), hf


def bundled():
    from transformers import AutoModelForCausalLM

    model, _, _, path = build_model("smollm2-135m", torch.float32, torch.device("cpu"))
    return model, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def measure(name: str, model: CausalLM, hf, spec: LoraSpec, seq_len: int, window: int, budget: int) -> dict:
    ids = torch.randint(100, model.args.vocab_size, (seq_len,), generator=torch.Generator().manual_seed(0))
    lora = LoRAWeights(model, spec, seed=0)
    hf_bytes = hf_peft_bytes(hf, spec, ids, checkpointing=False, attention="sdpa")
    hf_eager = hf_peft_bytes(hf, spec, ids, checkpointing=False, attention="eager")
    hf_gc = hf_peft_bytes(hf, spec, ids, checkpointing=True, attention="sdpa")
    pruned = pruned_bytes(model, lora, ids)
    kept, unit = flexllm_bytes(model, lora, ids, window, budget)
    flex = kept + unit
    return {
        "model": name,
        "seq_len": seq_len,
        "layers": model.args.num_layers,
        "dtype": "float32",
        "target_modules": list(spec.target_modules),
        "rank": spec.rank,
        "backward_window": window,
        "backward_budget": budget,
        "hf_peft_bytes_per_token": hf_bytes / seq_len,
        "hf_peft_gc_bytes_per_token": hf_gc / seq_len,
        "pruned_bytes_per_token": pruned / seq_len,
        "flexllm_bytes_per_token": flex / seq_len,
        "flexllm_kept_bytes_per_token": kept / seq_len,
        "flexllm_unit_bytes_per_token": unit / seq_len,
        "hf_peft_eager_bytes_per_token": hf_eager / seq_len,
        "pruning_reduction_vs_hf_peft": 1 - pruned / hf_bytes,
        "reduction_vs_hf_peft": 1 - flex / hf_bytes,
        "pruning_reduction_vs_hf_peft_eager": 1 - pruned / hf_eager,
        "reduction_vs_hf_peft_eager": 1 - flex / hf_eager,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--window", type=int, default=64, help="backward token window")
    parser.add_argument("--budget", type=int, default=16, help="token budget of one backward unit")
    parser.add_argument("--layers-8b", type=int, default=2)
    parser.add_argument(
        "--vocab-8b", type=int, default=32000, help="smaller than Llama-3's 128256 to fit RAM"
    )
    parser.add_argument("--quick", action="store_true", help="bundled model, 128 tokens only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seq_len = 128 if args.quick else args.seq_len
    rows = []
    for targets in (
        ("q_proj", "v_proj"),
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ):
        spec = LoraSpec(rank=16, alpha=32, target_modules=targets)
        rows.append(measure("smollm2-135m", *bundled(), spec, seq_len, args.window, args.budget))
        if not args.quick:
            model, hf = llama8b_shaped(args.layers_8b, args.vocab_8b)
            rows.append(
                measure(
                    f"llama-3.1-8b-shaped-{args.layers_8b}L",
                    model,
                    hf,
                    spec,
                    seq_len,
                    args.window,
                    args.budget,
                )
            )
            del model, hf
    print(
        f"{'model':30} {'targets':8} {'HF PEFT':>10} {'HF eager':>10} {'HF+GC':>10} {'pruned':>10}"
        f" {'FlexLLM':>10} {'prune%':>7} {'total%':>7}   (KiB saved per token; % vs HF PEFT sdpa)"
    )
    columns = ("hf_peft", "hf_peft_eager", "hf_peft_gc", "pruned", "flexllm")
    for r in rows:
        kib = " ".join(f"{r[c + '_bytes_per_token'] / 1024:10.1f}" for c in columns)
        print(
            f"{r['model']:30} {len(r['target_modules']):8d} {kib}"
            f" {100 * r['pruning_reduction_vs_hf_peft']:6.1f}% {100 * r['reduction_vs_hf_peft']:6.1f}%"
        )
    RESULTS.mkdir(exist_ok=True)
    headline = (
        next(r for r in rows if r["model"].startswith("llama") and len(r["target_modules"]) == 2)
        if not args.quick
        else rows[0]
    )
    (RESULTS / "memory.json").write_text(json.dumps({**headline, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
