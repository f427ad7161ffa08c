"""Inference throughput: this engine (continuous batching) vs HF generate, sequential and padded batch.

Same prompts and output lengths for every system (EOS ignored); output lengths vary as in real
traffic. Writes benchmarks/results/inference.json.

    python benchmarks/inference.py [--num-requests 16] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from common import print_table, write_json
from transformers import AutoModelForCausalLM

from flexllm.worker.engine.llm_engine import LLMEngine
from flexllm.worker.engine.loader import resolve_model
from flexllm.worker.engine.sampling import SamplingParams


def workload(n: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Prompts of 16-128 tokens; heavy-tailed output lengths of 8-128 tokens."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(16, 128))] for _ in range(n)]
    outputs = [min(128, max(8, int(rng.paretovariate(1.2) * 12))) for _ in range(n)]
    return prompts, outputs


def run_engine(model: str, prompts, lengths, max_tokens_per_batch: int) -> tuple[float, int]:
    engine = LLMEngine(model=model, max_tokens_per_batch=max_tokens_per_batch, dtype="float32", device="cpu")
    engine.generate([prompts[0]], SamplingParams(max_tokens=2))  # warm-up
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    start = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=True)
    return time.perf_counter() - start, sum(len(o.token_ids) for o in outs)


def run_hf(hf, prompts, lengths, batched: bool) -> tuple[float, int]:
    start = time.perf_counter()
    with torch.no_grad():
        if batched:  # one left-padded batch, run to the longest output
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            hf.generate(ids, attention_mask=mask, max_new_tokens=max(lengths), min_new_tokens=max(lengths),
                        do_sample=False, pad_token_id=0)
        else:
            for p, n in zip(prompts, lengths):
                hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start, sum(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-tokens-per-batch", type=int, default=256)
    args = parser.parse_args()
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32).eval()
    prompts, lengths = workload(args.num_requests, hf.config.vocab_size)
    hf.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    results = {}
    for name, fn in [("engine", lambda: run_engine(args.model, prompts, lengths, args.max_tokens_per_batch)),
                     ("hf_batched", lambda: run_hf(hf, prompts, lengths, batched=True)),
                     ("hf_sequential", lambda: run_hf(hf, prompts, lengths, batched=False))]:
        seconds, tokens = fn()
        results[name] = {"system": name, "seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds}
        print(f"{name}: {tokens} tokens in {seconds:.1f}s", flush=True)
    summary = {
        "engine_tokens_per_s": results["engine"]["tokens_per_s"],
        "hf_sequential_tokens_per_s": results["hf_sequential"]["tokens_per_s"],
        "hf_batched_tokens_per_s": results["hf_batched"]["tokens_per_s"],
        "speedup_vs_hf_sequential": results["engine"]["tokens_per_s"] / results["hf_sequential"]["tokens_per_s"],
        "speedup_vs_hf_batched": results["engine"]["tokens_per_s"] / results["hf_batched"]["tokens_per_s"],
    }
    print_table(list(results.values()), ["system", "output_tokens", "seconds", "tokens_per_s"])
    print({k: round(v, 2) for k, v in summary.items()})
    path = write_json("inference", {**summary, "model": args.model, "num_requests": args.num_requests,
                                    "output_lengths": lengths, "prompt_lengths": [len(p) for p in prompts],
                                    "systems": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
