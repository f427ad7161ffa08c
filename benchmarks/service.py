"""Queue overhead: the same closed-loop load through HTTP + Redis (``flexllm serve``) and on the engine directly.

    python benchmarks/service.py [--model smollm2-135m] [--requests 48] [--concurrency 8] [--max-tokens 32] [--rounds 2]

Prints a table and writes benchmarks/results/service.json. The server runs in a subprocess on 127.0.0.1
(embedded Redis); the direct run follows in this process once the server is gone, so they never share
the CPU. Ratios from one run are what count on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from common import write_json

from flexllm.worker.net import free_port


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(name: str, ttft: list[float], tpot: list[float], wall_s: float, tokens: int) -> dict:
    return {"system": name, "requests": len(ttft), "wall_s": round(wall_s, 3),
            "requests_per_s": round(len(ttft) / wall_s, 3), "output_tokens_per_s": round(tokens / wall_s, 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
            "ttft_p99_ms": round(1000 * percentile(ttft, 99), 1),
            "tpot_p50_ms": round(1000 * statistics.median(tpot), 2),
            "tpot_p99_ms": round(1000 * percentile(tpot, 99), 2)}


def prompts(n: int) -> list[str]:
    return [f"Request {i}: write a short story about a robot who learns to paint the sea at night." for i in range(n)]


# -- through HTTP + Redis ---------------------------------------------------------------------------
async def _one(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                last = time.monotonic()
                first = first or last
    return first - start, (last - first) / max(tokens - 1, 1), tokens


async def _load(base_url: str, items: list[str], concurrency: int, max_tokens: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        async def bounded(prompt: str):
            async with gate:
                return await _one(client, prompt, max_tokens)

        await bounded(items[0])  # warm-up
        start = time.monotonic()
        results = await asyncio.gather(*(bounded(p) for p in items))
        wall = time.monotonic() - start
    return summarize("http+redis", [r[0] for r in results], [r[1] for r in results], wall,
                     sum(r[2] for r in results))


def run_service(args: argparse.Namespace, items: list[str]) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "flexllm.worker.cli", "serve", "--model", args.model, "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", "bench", "--max-num-seqs", str(args.concurrency),
               "--service", "bench", "--log-level", "warning"]
    adapter_dir = tempfile.mkdtemp(prefix="flexllm-bench-adapters-")
    server = subprocess.Popen(command, env=os.environ | {"FLEXLLM_ADAPTER_DIR": adapter_dir})
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base_url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("flexllm serve did not become ready")
            time.sleep(0.2)
        return asyncio.run(_load(base_url, items, args.concurrency, args.max_tokens))
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(adapter_dir, ignore_errors=True)


# -- on the engine directly -------------------------------------------------------------------------
def run_direct(args: argparse.Namespace, items: list[str]) -> dict:
    from flexllm.worker.engine.config import EngineConfig
    from flexllm.worker.engine.llm_engine import LLMEngine
    from flexllm.worker.engine.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(model=args.model, max_num_seqs=args.concurrency))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    engine.generate(items[:1], params)  # warm-up
    waiting, ttft, tpot, tokens = list(enumerate(items)), [], [], 0
    arrival: dict[str, float] = {}
    first: dict[str, float] = {}
    start = time.monotonic()
    while waiting or engine.has_unfinished_requests():
        while waiting and len(arrival) - len(ttft) < args.concurrency:
            i, prompt = waiting.pop(0)
            arrival[f"r{i}"] = time.monotonic()
            engine.add_request(f"r{i}", prompt, params)
        for out in engine.step():
            now = time.monotonic()
            first.setdefault(out.request_id, now)
            if out.finished:
                ttft.append(first[out.request_id] - arrival[out.request_id])
                tpot.append((now - first[out.request_id]) / max(len(out.token_ids) - 1, 1))
                tokens += len(out.token_ids)
    return summarize("engine direct", ttft, tpot, time.monotonic() - start, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each system; the best counts")
    args = parser.parse_args()
    items = prompts(args.requests)
    runs = {"service": [], "direct": []}
    for _ in range(args.rounds):  # alternate, so a noisy neighbour hits both systems alike
        runs["service"].append(run_service(args, items))
        runs["direct"].append(run_direct(args, items))
    service, direct = (max(r, key=lambda row: row["requests_per_s"]) for r in runs.values())
    ratios = {key: round(service[key] / direct[key], 3) for key in direct if isinstance(direct[key], float)}
    path = write_json("service", {"config": vars(args), "results": [service, direct],
                                  "ratio_http_redis_over_direct": ratios})
    columns = ["requests_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"]
    print(f"{'system':<16}" + "".join(f"{c:>20}" for c in columns))
    for row in (service, direct):
        print(f"{row['system']:<16}" + "".join(f"{row[c]:>20}" for c in columns))
    print(f"{'ratio':<16}" + "".join(f"{ratios[c]:>20}" for c in columns))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
