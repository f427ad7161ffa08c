"""Fine-tuning throughput alone (tokens/s): FlexLLM's runner vs an HF PEFT + Trainer-style loop.

Both train the bundled model (fp32, CPU or GPU) with the same LoRA config, data, AdamW and
number of steps, side by side in one run; ratios are what count on shared machines. Two data
sets: ``uniform`` (synthetic prompt/completion pairs of ~73 tokens, little padding for HF) and
``tiny`` (examples/data/tiny.jsonl, 7-16 tokens: HF pads each micro-batch to its longest).
FlexLLM runs with units of the batch size (fine-tuning alone) and of ``--budget`` tokens (the
co-serving per-iteration cap, its token-level cost).
Run: ``python benchmarks/finetune.py [--steps 8 --budget 256 --threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import write_json

from flexllm.worker.engine.llm_engine import build_model
from flexllm.worker.finetune.data import SequenceStream
from flexllm.worker.finetune.runner import FinetuneRunner
from flexllm.worker.finetune.spec import FinetuneJobSpec
from flexllm.worker.finetune.work import whole_budget

EXAMPLE_DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "tiny.jsonl"
BATCH_TOKENS = 512


def write_dataset(path: Path, lines: int = 64) -> Path:
    rows = [
        json.dumps(
            {
                "prompt": f"Describe the number {i} in a few words.",
                "completion": f" The number {i} is {'even' if i % 2 == 0 else 'odd'}, " * 6,
            }
        )
        for i in range(lines)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def flexllm_tokens_per_second(model, tokenizer, job: FinetuneJobSpec, folder: Path, budget: int) -> float:
    """Units of ``budget`` tokens, groups of whole sequences up to ``budget`` tokens."""
    runner = FinetuneRunner(
        model, tokenizer, job, folder / f"adapters-{budget}", "bench", resume=False, backward_window=budget
    )
    unit = whole_budget(model.args, budget)  # the loss of a unit's tokens included
    runner.run_work(unit)  # warm-up of the first unit is part of the timed busy time anyway
    while not runner.done:
        runner.run_work(unit)
    return runner.progress.tokens_per_second


def hf_peft_tokens_per_second(path: Path, tokenizer, job: FinetuneJobSpec) -> float:
    """Trainer-style: pad each micro-batch, forward with labels, backward, clip, AdamW, schedule."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    t, lora = job.training, job.lora
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    ).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    stream = SequenceStream(job.dataset.resolve(), job.dataset.format, tokenizer, t.max_seq_len)
    tokens, began = 0, time.perf_counter()
    for _ in range(t.max_steps):
        micro = [stream.micro_batch(t.batch_tokens) for _ in range(t.gradient_accumulation)]
        num_targets = sum(s.num_targets for batch in micro for s in batch)
        for batch in micro:
            width = max(len(s) for s in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), -100)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, s in enumerate(batch):
                ids[row, : len(s)] = torch.tensor(s.token_ids)
                labels[row, : len(s)] = torch.where(
                    torch.tensor(s.is_target), torch.tensor(s.token_ids), -100
                )
                mask[row, : len(s)] = 1
                tokens += len(s)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            loss = (
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
                )
                / num_targets
            )
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return tokens / (time.perf_counter() - began)


def job_for(dataset: Path, steps: int) -> FinetuneJobSpec:
    return FinetuneJobSpec.model_validate(
        {
            "dataset": {"source": str(dataset), "format": "prompt-completion"},
            "lora": {"rank": 16, "alpha": 32, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "training": {"maxSteps": steps, "learningRate": 1e-4, "batchTokens": BATCH_TOKENS, "maxSeqLen": 256},
            "publish": {"everySteps": 10_000},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--budget", type=int, default=256, help="co-serving-sized FlexLLM unit budget")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="flexllm-ft-bench-"))
    datasets = {"uniform": write_dataset(folder / "data.jsonl"), "tiny": EXAMPLE_DATA}
    model, tokenizer, _, path = build_model("smollm2-135m", torch.float32, torch.device("cpu"))
    rows = []
    for name, dataset in datasets.items():
        job = job_for(dataset, args.steps)
        hf = hf_peft_tokens_per_second(path, tokenizer, job)
        alone = flexllm_tokens_per_second(model, tokenizer, job, folder / name, BATCH_TOKENS)
        budgeted = flexllm_tokens_per_second(model, tokenizer, job, folder / name, args.budget)
        rows.append(
            {
                "dataset": name,
                "hf_peft_tokens_per_second": hf,
                "flexllm_tokens_per_second": alone,
                "ratio": alone / hf,
                f"flexllm_budget_{args.budget}_tokens_per_second": budgeted,
                f"ratio_budget_{args.budget}": budgeted / hf,
            }
        )
    print(f"{'data':8} {'HF PEFT':>9} {'FlexLLM':>9} {'ratio':>6} {'budget ' + str(args.budget):>11} {'ratio':>6}")
    for r in rows:
        budgeted = r[f"flexllm_budget_{args.budget}_tokens_per_second"]
        print(
            f"{r['dataset']:8} {r['hf_peft_tokens_per_second']:9.1f} {r['flexllm_tokens_per_second']:9.1f}"
            f" {r['ratio']:6.2f} {budgeted:11.1f} {r[f'ratio_budget_{args.budget}']:6.2f}"
        )
    result = {
        "model": "smollm2-135m",
        "device": "cpu",
        "dtype": "float32",
        "threads": args.threads,
        "steps": args.steps,
        "batch_tokens": BATCH_TOKENS,
        "budget": args.budget,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "note": "flexllm_*: units of batch_tokens (fine-tuning alone); *_budget_*: units of budget tokens",
        **{k: v for k, v in rows[0].items() if k != "dataset"},
        "runs": rows,
    }
    print(f"wrote {write_json('finetune', result)}")


if __name__ == "__main__":
    main()
