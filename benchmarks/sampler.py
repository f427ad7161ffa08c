"""Per-step time of output processing: sampling + incremental detokenization + stop checks.

A batch of requests that each already generated ``--history`` tokens of real text (the bundled
model's tokenizer and 49152-token vocabulary) takes ``--steps`` steps of ``process_outputs`` on
fixed random logits; the sampler alone is timed on the same rows. Writes results/sampler.json.

    OMP_NUM_THREADS=1 python benchmarks/sampler.py [--batch 32] [--history 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import print_table, write_json

from flexllm.worker.engine.llm_engine import LLMEngine
from flexllm.worker.engine.sampling import SamplingParams, sample
from flexllm.worker.engine.scheduler import ScheduledBatch

WORKLOADS = {
    "greedy": dict(temperature=0),
    "temperature 0.8, top_p 0.95": dict(temperature=0.8, top_p=0.95),
    "temperature 1, top_k 50, 2 stop strings": dict(temperature=1.0, top_k=50, stop=["never1", "xyzzy"]),
    "seeded, temperature 0.7": dict(temperature=0.7, seed=1),
    "greedy, top-5 logprobs": dict(temperature=0, logprobs=5),
    "penalties, min_p 0.05": dict(temperature=1.0, min_p=0.05, frequency_penalty=0.5, repetition_penalty=1.1),
}
TEXT = ("The history of the city begins in the ninth century, when traders settled on the river bank. "
        "Über die Brücke 🙂 gingen 日本語 the merchants, and their goods — wool, salt, timber — ") * 80


def measure(engine: LLMEngine, name: str, settings: dict, batch: int, history: list[int], steps: int) -> dict:
    seqs = []
    for i in range(batch):
        seed = {"seed": settings["seed"] + i} if "seed" in settings else {}
        params = SamplingParams(**{**settings, **seed, "max_tokens": len(history) + steps + 1, "ignore_eos": True})
        engine.add_request(f"{name}-{i}", [100 + i] * 16, params)
        seqs.append(engine.requests[f"{name}-{i}"])
        seqs[-1].token_ids += history
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(batch, engine.vocab_size, generator=g) * 4 for _ in range(4)]  # [B, V]
    step_times, sampler_times = [], []
    for step in range(steps):
        for seq in seqs:
            seq.num_computed_tokens = seq.num_tokens - 1
        start = time.perf_counter()
        engine.process_outputs(ScheduledBatch(list(seqs), [1] * batch), logits[step % 4])
        step_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        sample(logits[step % 4], seqs, engine.sampling_generator)
        sampler_times.append(time.perf_counter() - start)
    for seq in seqs:
        engine.abort(seq.request_id)
    return {"workload": name, "step_ms": statistics.median(step_times) * 1e3,
            "sampler_ms": statistics.median(sampler_times) * 1e3,
            "step_min_ms": min(step_times) * 1e3, "sampler_min_ms": min(sampler_times) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--history", type=int, default=256, help="output tokens each request already has")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    context = args.history + args.steps + 64
    # the requests skip the scheduler, so the KV pool only has to admit one of them
    engine = LLMEngine(model=args.model, dtype="float32", device="cpu", max_model_len=context,
                       num_kv_blocks=context // 16 + 1, block_size=16)
    history = engine.tokenizer.encode(TEXT)[:args.history]
    rows = [measure(engine, name, settings, args.batch, history, args.steps) for name, settings in WORKLOADS.items()]
    print_table(rows, ["workload", "step_ms", "sampler_ms", "step_min_ms", "sampler_min_ms"])
    write_json("sampler", {"batch": args.batch, "history": args.history, "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
