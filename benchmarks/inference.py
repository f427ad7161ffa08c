"""Inference throughput: this engine (continuous batching) vs HF generate, sequential and padded batch;
and a shared-prefix chat workload on this engine with and without prefix caching.

Throughput: same prompts and output lengths for every system (EOS ignored); output lengths vary as
in real traffic. Shared prefix: conversations that all start with one long system prompt, each turn
sent when the previous answer is complete, so every prompt repeats the system prompt and its own
history; tokens/s and time to first token (TTFT) with the prefix cache on and off. Writes
benchmarks/results/inference.json.

    python benchmarks/inference.py [--num-requests 16] [--model smollm2-135m] [--workload shared-prefix]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from common import RESULTS, print_table, write_json
from transformers import AutoConfig, AutoModelForCausalLM

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
    engine.generate([[t - 1 for t in prompts[0]]], SamplingParams(max_tokens=2))  # warm-up (no prefix shared)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    start = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=True)
    return time.perf_counter() - start, sum(len(o.token_ids) for o in outs)


def chat_workload(conversations: int, turns: int, system_tokens: int, vocab: int,
                  seed: int = 0) -> tuple[list[int], list[list[list[int]]]]:
    """-> a system prompt, and per conversation its user messages (16-48 tokens each)."""
    rng = random.Random(seed)
    system = [rng.randrange(100, vocab) for _ in range(system_tokens)]
    messages = [[[rng.randrange(100, vocab) for _ in range(rng.randint(16, 48))] for _ in range(turns)]
                for _ in range(conversations)]
    return system, messages


def run_chat(model: str, system: list[int], messages: list[list[list[int]]], answer_tokens: int,
             prefix_caching: bool, max_tokens_per_batch: int) -> dict:
    """All conversations start at once; a conversation's next turn (its history + a new message) is
    sent when its previous answer is complete. -> tokens/s, TTFT p50/p99, prefix-cache hit rate."""
    engine = LLMEngine(model=model, max_tokens_per_batch=max_tokens_per_batch, dtype="float32", device="cpu",
                       enable_prefix_caching=prefix_caching)
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # warm-up (shares nothing with the workload)
    params = SamplingParams(max_tokens=answer_tokens, temperature=0, ignore_eos=True)
    history = [list(system) for _ in messages]
    turn = [0] * len(messages)

    def send(conv: int) -> None:
        history[conv] += messages[conv][turn[conv]]
        engine.add_request(f"c{conv}-t{turn[conv]}", history[conv], params)

    ttfts, tokens = [], 0
    start = time.perf_counter()
    for conv in range(len(messages)):
        send(conv)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if not out.finished:
                continue
            ttfts.append(out.first_token_time - out.arrival_time)
            tokens += len(out.token_ids)
            conv = int(out.request_id[1:out.request_id.index("-")])
            history[conv] += out.token_ids
            turn[conv] += 1
            if turn[conv] < len(messages[conv]):
                send(conv)
    seconds = time.perf_counter() - start
    bm = engine.block_manager
    print(f"shared prefix, caching {'on' if prefix_caching else 'off'}: {tokens} tokens in {seconds:.1f}s", flush=True)
    return {"prefix_caching": prefix_caching, "requests": len(ttfts), "output_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": statistics.quantiles(ttfts, n=100, method="inclusive")[98],
            "prefix_cache_hit_rate": bm.hit_tokens / bm.query_tokens if bm.query_tokens else 0.0}


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


def throughput(args) -> dict:
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
    return {**summary, "num_requests": args.num_requests, "output_lengths": lengths,
            "prompt_lengths": [len(p) for p in prompts], "systems": results}


def shared_prefix(args) -> dict:
    vocab = AutoConfig.from_pretrained(resolve_model(args.model)).vocab_size
    system, messages = chat_workload(args.conversations, args.turns, args.system_tokens, vocab)
    runs = [run_chat(args.model, system, messages, args.answer_tokens, caching, args.max_tokens_per_batch)
            for caching in (True, False)]
    print_table(runs, ["prefix_caching", "requests", "output_tokens", "seconds", "tokens_per_s", "ttft_p50_s",
                       "ttft_p99_s", "prefix_cache_hit_rate"])
    on, off = runs
    summary = {"ttft_p50_ratio_cached_vs_uncached": on["ttft_p50_s"] / off["ttft_p50_s"],
               "tokens_per_s_ratio_cached_vs_uncached": on["tokens_per_s"] / off["tokens_per_s"]}
    print({k: round(v, 3) for k, v in summary.items()})
    return {**summary, "conversations": args.conversations, "turns": args.turns,
            "system_prompt_tokens": args.system_tokens, "answer_tokens": args.answer_tokens,
            "cached": on, "uncached": off}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workload", choices=["all", "throughput", "shared-prefix"], default="all")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-tokens-per-batch", type=int, default=256)
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--system-tokens", type=int, default=384)
    parser.add_argument("--answer-tokens", type=int, default=16)
    args = parser.parse_args()
    path = RESULTS / "inference.json"  # a single workload updates its part of the results
    payload = {**(json.loads(path.read_text()) if path.exists() else {}), "model": args.model}
    payload.pop("machine", None)
    if args.workload in ("all", "throughput"):
        payload |= throughput(args)
    if args.workload in ("all", "shared-prefix"):
        payload["shared_prefix"] = shared_prefix(args)
    path = write_json("inference", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
