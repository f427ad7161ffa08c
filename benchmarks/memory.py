"""Saved-activation bytes per training token: FlexLLM fine-tuning vs HF PEFT (paper Fig. "memory").

Measured, not estimated: every tensor autograd saves for backward passes through
``torch.autograd.graph.saved_tensors_hooks``; bytes of distinct storages are summed, frozen and
LoRA parameters excluded. Each (model, LoRA targets) configuration runs in its own subprocess.
Variants at one sequence length (bf16 by default, as the paper's GPUs run):

- ``hf_peft``: the paper's baseline, HF model + PEFT LoRA with eager attention (autograd keeps the
  fp32 attention probabilities and their bf16 copy, the fp32 upcasts of the RMS norms, the fp32
  logits and log-softmax); ``hf_peft_sdpa``: the same with SDPA attention; ``hf_peft_gc``: SDPA
  with gradient checkpointing (forward-time saves only; its backward rebuilds one layer's graph
  over the whole sequence, not counted);
- ``pruned``: FlexLLM's pruned graph over the whole sequence in one chunk: with frozen base weights
  only what the backward needs (LoRA inputs, norm inputs, q/k/v/out/lse of attention, gate/up of
  the MLP, logits of loss tokens); no rematerialization;
- ``flexllm``: token-level forward (no graph) + split backward with rematerialization: the layer
  inputs, the sequence's K/V and dK/dV buffers, plus the largest graph any backward unit builds.

Also what a co-served FinetuneJob adds to a serving replica against a separate fine-tuning process
(``job_memory.py``: ``coserved_job_memory_vs_separate``).

Run: ``python benchmarks/memory.py`` (about 5 minutes on 2 CPU cores; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from common import write_json
from job_memory import job_memory

from flexllm.worker.engine.fused import run_alone
from flexllm.worker.engine.llm_engine import build_model
from flexllm.worker.engine.lora_targets import LORA_TARGETS
from flexllm.worker.engine.model import CausalLM, ModelArgs
from flexllm.worker.finetune.data import TrainingSequence
from flexllm.worker.finetune.layer import ChunkInput, decoder_layer, loss_sum
from flexllm.worker.finetune.lora_params import LoRAWeights
from flexllm.worker.finetune.spec import LoraSpec
from flexllm.worker.finetune.work import BatchWork

TARGETS = {
    "qv": ("q_proj", "v_proj"),
    "all": LORA_TARGETS,
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


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
    """Saved bytes of one HF PEFT training forward with labels (what a Trainer keeps for backward)."""
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
    chunk = ChunkInput(cos, sin, [(0, 0, n)], None)
    empty = model.embed_tokens.weight.new_zeros(0, args.num_kv_heads, args.head_dim)
    with SavedBytes(_pointers(model, lora)) as saved:
        x = model.embed_tokens(ids)
        for layer in range(args.num_layers):
            x, _, _ = run_alone(decoder_layer(model, lora, layer, x, chunk, empty, empty))
        loss_sum(model, x, torch.roll(ids, -1))
    return saved.total


def flexllm_bytes(model: CausalLM, lora: LoRAWeights, ids: torch.Tensor, window: int, budget: int):
    """-> (bytes kept across the sequence's work: layer inputs, K/V, dK/dV; largest unit graph).

    Forward units of ``window`` tokens; backward units costing at most ``budget`` tokens (spans of
    ``window`` tokens cut into layer blocks).
    """
    seq = TrainingSequence(tuple(ids.tolist()), (True,) * ids.shape[0], 1)
    work = BatchWork(model, lora, [seq], 1.0 / seq.num_targets, window=window)
    buffers = (work.checkpoints, work.k, work.v, work.dk, work.dv)
    kept = sum(t.untyped_storage().nbytes() for t in buffers)
    exclude = _pointers(model, lora) | {t.untyped_storage().data_ptr() for t in buffers}
    largest = 0
    while not work.finished:
        with SavedBytes(exclude) as saved:
            work.unit(budget if work.next_is_backward else window)
        largest = max(largest, saved.total)
    return kept, largest


def llama8b_shaped(num_layers: int, vocab: int):
    """Llama-3.1-8B's layer shapes with ``num_layers`` layers and a ``vocab``-token vocabulary."""
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
    hf = LlamaForCausalLM(config).eval()  # in the default dtype (set by the caller)
    model = CausalLM(ModelArgs.from_hf_config(config), config)
    model.load_hf_state_dict(hf.state_dict())
    return model.requires_grad_(False).eval(), hf


def bundled(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model, _, _, path = build_model("smollm2-135m", dtype, torch.device("cpu"))
    return model, AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def measure(args: argparse.Namespace) -> dict:
    """One configuration (``args.model``, ``args.targets``), all variants."""
    dtype = DTYPES[args.dtype]
    torch.set_default_dtype(dtype)
    eight_b = args.model == "llama-3.1-8b-shaped"
    model, hf = llama8b_shaped(args.layers_8b, args.vocab_8b) if eight_b else bundled(dtype)
    spec = LoraSpec(rank=16, alpha=32, target_modules=TARGETS[args.targets])
    seq_len = args.seq_len
    ids = torch.randint(100, model.args.vocab_size, (seq_len,), generator=torch.Generator().manual_seed(0))
    lora = LoRAWeights(model, spec, seed=0)
    hf_eager = hf_peft_bytes(hf, spec, ids, checkpointing=False, attention="eager")
    hf_sdpa = hf_peft_bytes(hf, spec, ids, checkpointing=False, attention="sdpa")
    hf_gc = hf_peft_bytes(hf, spec, ids, checkpointing=True, attention="sdpa")
    del hf
    pruned = pruned_bytes(model, lora, ids)
    kept, unit = flexllm_bytes(model, lora, ids, args.window, args.budget)
    flex = kept + unit
    return {
        "model": f"{args.model}-{args.layers_8b}L" if eight_b else args.model,
        "vocab": model.args.vocab_size,
        "seq_len": seq_len,
        "layers": model.args.num_layers,
        "dtype": args.dtype,
        "baseline": "HF transformers + PEFT, eager attention, one training forward with labels",
        "target_modules": list(spec.target_modules),
        "rank": spec.rank,
        "backward_window": args.window,
        "backward_budget": args.budget,
        "hf_peft_bytes_per_token": hf_eager / seq_len,
        "hf_peft_sdpa_bytes_per_token": hf_sdpa / seq_len,
        "hf_peft_gc_bytes_per_token": hf_gc / seq_len,
        "pruned_bytes_per_token": pruned / seq_len,
        "flexllm_bytes_per_token": flex / seq_len,
        "flexllm_kept_bytes_per_token": kept / seq_len,
        "flexllm_unit_bytes_per_token": unit / seq_len,
        "pruned_reduction_vs_hf_peft": 1 - pruned / hf_eager,
        "reduction_vs_hf_peft": 1 - flex / hf_eager,
        "pruned_reduction_vs_hf_peft_sdpa": 1 - pruned / hf_sdpa,
        "reduction_vs_hf_peft_sdpa": 1 - flex / hf_sdpa,
    }


def run_isolated(args: argparse.Namespace, model: str, targets: str) -> dict:
    """``measure`` in a fresh interpreter, so each configuration's memory is freed after it."""
    skip = ("quick", "one", "model", "targets")
    options = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in skip]
    out = subprocess.run(
        [sys.executable, __file__, *options, f"--model={model}", f"--targets={targets}", "--one"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    columns = ("hf_peft", "hf_peft_sdpa", "hf_peft_gc", "pruned", "flexllm")
    print(
        f"{'model':28} {'targets':7} {'HF eager':>9} {'HF sdpa':>9} {'HF+GC':>9} {'pruned':>9} {'FlexLLM':>9}"
        f" {'prune%':>7} {'total%':>7}   (KiB saved per token; % saved vs HF PEFT eager)"
    )
    for r in rows:
        kib = " ".join(f"{r[c + '_bytes_per_token'] / 1024:9.1f}" for c in columns)
        print(
            f"{r['model']:28} {len(r['target_modules']):7d} {kib}"
            f" {100 * r['pruned_reduction_vs_hf_peft']:6.1f}% {100 * r['reduction_vs_hf_peft']:6.1f}%"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--window", type=int, default=64, help="token span of forward and backward units")
    parser.add_argument("--budget", type=int, default=16, help="token budget of one backward unit")
    parser.add_argument("--layers-8b", type=int, default=4)
    parser.add_argument("--vocab-8b", type=int, default=32000, help="smaller than Llama-3's 128256 to fit RAM")
    parser.add_argument("--quick", action="store_true", help="bundled model, 128 tokens only")
    parser.add_argument("--model", default="smollm2-135m", help="with --one: the configuration to measure")
    parser.add_argument("--targets", choices=sorted(TARGETS), default="qv")
    parser.add_argument("--one", action="store_true", help="measure one configuration, print its JSON")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.one:
        print(json.dumps(measure(args)))
        return
    if args.quick:
        args.seq_len = 128
    models = ["smollm2-135m"] if args.quick else ["smollm2-135m", "llama-3.1-8b-shaped"]
    rows = [run_isolated(args, model, targets) for model in models for targets in TARGETS]
    print_table(rows)
    headline = next(r for r in rows if r["model"].startswith(models[-1]) and len(r["target_modules"]) == 2)
    jobs = job_memory(headline["flexllm_bytes_per_token"] / 1024)
    print(f"a co-served job's memory vs a separate fine-tuning process: {jobs['coserved_job_memory_vs_separate']:.3f}")
    print(f"wrote {write_json('memory', {**headline, **jobs, 'runs': rows})}")


if __name__ == "__main__":
    main()
