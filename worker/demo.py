"""``flexllm demo``: the whole system on one machine, no cluster.

An embedded Redis, the bundled model behind the OpenAI-compatible API, the example FinetuneJob
co-served with a generated inference load (Poisson arrivals, streamed over HTTP). Shows live progress,
then a summary: SLO attainment, fine-tuning tokens/s, adapter versions, a completion from the
fine-tuned adapter; saves a plot and a JSON summary.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import uvicorn
import yaml

from flexllm.worker import protocol
from flexllm.worker.api.app import ApiConfig
from flexllm.worker.coserve.policy import measure_speed
from flexllm.worker.engine.config import EngineConfig
from flexllm.worker.engine.llm_engine import LLMEngine
from flexllm.worker.finetune.spec import FinetuneJobSpec
from flexllm.worker.net import free_port
from flexllm.worker.options import SLO, WorkerOptions
from flexllm.worker.protocol import JobSubmission
from flexllm.worker.queue.connection import connect
from flexllm.worker.queue.jobs import JobQueue
from flexllm.worker.redis_server import EmbeddedRedis
from flexllm.worker.server import api_and_worker
from flexllm.worker.serving import EngineWorker

PROMPTS = [
    "Explain in one sentence why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "List three uses of a paperclip.",
    "What is the difference between a list and a tuple in Python?",
    "Give me a short tip for learning a new language.",
    "Describe a cat to someone who has never seen one.",
    "Why do we have seasons on Earth?",
    "Suggest a name for a friendly robot.",
]


@dataclass
class LoadResult:
    """Client-side latencies of the generated inference load."""

    slo: SLO
    ttfts: list[float] = field(default_factory=list)
    tpots: list[float] = field(default_factory=list)
    met: int = 0
    errors: int = 0
    tokens: int = 0
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (time, ttft)

    @property
    def done(self) -> int:
        return len(self.ttfts)

    @property
    def attainment(self) -> float:
        return self.met / self.done if self.done else 1.0


def load_job(path: Path) -> tuple[str, dict]:
    """A FinetuneJob manifest -> (name, spec) with a relative dataset made absolute (cwd, then the repo)."""
    manifest = yaml.safe_load(path.read_text())
    spec = manifest["spec"]
    source = spec["dataset"]["source"].removeprefix("file://")
    if not Path(source).is_absolute():
        candidates = [Path.cwd() / source, path.resolve().parent.parent / source]
        found = next((c for c in candidates if c.exists()), candidates[0])
        spec["dataset"]["source"] = f"file://{found}"
    FinetuneJobSpec.model_validate(spec)
    return manifest["metadata"]["name"], spec


def stream_one(client: httpx.Client, base: str, prompt: str, max_tokens: int, result: LoadResult, start: float,
               lock: threading.Lock) -> None:
    began = time.monotonic()
    first = last = None
    tokens = 0
    body = {"model": "base", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "stream": True}
    try:
        with client.stream("POST", f"{base}/v1/completions", json=body, timeout=300) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        last = time.monotonic()
                        first = first or last
                        tokens += 1
    except httpx.HTTPError:
        with lock:
            result.errors += 1
        return
    ttft = (first or time.monotonic()) - began
    tpot = (last - first) / (tokens - 1) if first and tokens > 1 else None
    with lock:
        result.ttfts.append(ttft)
        if tpot is not None:
            result.tpots.append(tpot)
        result.met += result.slo.met(ttft, tpot)
        result.tokens += tokens
        result.timeline.append((began - start, ttft))


def drive_load(base: str, rate: float, stop: threading.Event, result: LoadResult, seed: int = 0) -> None:
    """Poisson arrivals at ``rate`` req/s (the first at once) until ``stop``; waits for the requests in flight."""
    rng, lock, start = random.Random(seed), threading.Lock(), time.monotonic()
    with httpx.Client() as client, ThreadPoolExecutor(max_workers=32) as pool:
        while True:
            pool.submit(stream_one, client, base, rng.choice(PROMPTS), rng.randint(16, 64), result, start, lock)
            if stop.wait(rng.expovariate(rate)):
                break


def wait_ready(base: str, worker: EngineWorker, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if worker.failed is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not become ready: {worker.failed}")
        time.sleep(0.2)


MEAN_OUTPUT_TOKENS = 40  # of the generated requests (16-64)
LOAD_FRACTION = 1.0  # the default rate: what the machine serves one request at a time (batching leaves room)
MAX_RATE = 4.0


def size_load(engine_config: EngineConfig, rate: float | None, slo_ms: tuple[float | None, float | None],
              console) -> tuple[float, SLO]:
    """The load's rate and SLOs: given, or measured now from a lone request's latency on this machine (as
    benchmarks/coserve.py derives its SLOs), so the demo keeps its pace on a fast GPU and on a busy CPU."""
    ttft_ms, tpot_ms = slo_ms
    if rate is not None and ttft_ms is not None and tpot_ms is not None:
        return rate, SLO(ttft_ms / 1000, tpot_ms / 1000)
    with console.status("measuring this machine..."):
        engine = LLMEngine(replace(engine_config, num_kv_blocks=64))
        speed = measure_speed(engine)
        del engine
    measured = speed.slo()
    slo = SLO(ttft_ms / 1000 if ttft_ms is not None else measured.ttft_s,
              tpot_ms / 1000 if tpot_ms is not None else measured.tpot_s)
    if rate is None:
        rate = min(MAX_RATE, LOAD_FRACTION / speed.request_s(MEAN_OUTPUT_TOKENS))
    console.print(f"this machine: a lone {speed.prefill_tokens}-token prefill {speed.prefill_s * 1000:.0f} ms, "
                  f"a decode step {speed.decode_s * 1000:.0f} ms")
    return rate, slo


class ProgressLines:
    """Progress as bars on a terminal, as a plain line per step (and every 10 s) otherwise."""

    def __init__(self, console, name: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console, self.name, self.began = console, name, time.monotonic()
        self.bars = None
        self.printed: tuple[int, float] = (-1, 0.0)  # step and time of the last plain line
        if console.is_terminal:
            self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)
            self.task = self.bars.add_task(f"fine-tuning {name}", total=None, status="")

    def __enter__(self) -> ProgressLines:
        if self.bars is not None:
            self.bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.__exit__(*exc)

    def update(self, step: int, total: int | None, status: str) -> None:
        if self.bars is not None:
            self.bars.update(self.task, completed=step, total=total, status=status)
            return
        now = time.monotonic()
        if step != self.printed[0] or now - self.printed[1] >= 10:
            print(f"[{now - self.began:4.0f} s] fine-tuning {self.name}: step {step}/{total or '?'} {status}",
                  flush=True)
            self.printed = (step, now)


def run_demo(job_file: Path, model: str, rate: float | None, slo_ms: tuple[float | None, float | None],
             out_dir: Path, max_tokens_per_batch: int, max_seconds: float) -> dict:
    """The demo; ``slo_ms`` (TTFT, TPOT) and ``rate`` that are None are measured; the job is cancelled if
    it has not finished ``max_seconds`` after it was queued."""
    from rich.console import Console

    console = Console()
    name, spec = load_job(job_file)
    service = spec.get("inferenceService") or "demo"
    shutil.rmtree(out_dir / "adapters", ignore_errors=True)  # a fresh job: versions from v1, not a resumed one
    out_dir.mkdir(parents=True, exist_ok=True)
    engine_config = EngineConfig(model=model, max_tokens_per_batch=max_tokens_per_batch)
    rate, slo = size_load(engine_config, rate, slo_ms, console)
    with EmbeddedRedis() as url:
        dataset = Path(spec["dataset"]["source"].removeprefix("file://"))
        options = WorkerOptions(url, service, "demo", str(out_dir / "adapters"), slo=slo,
                                data_dirs=[str(dataset.parent)])
        app, worker = api_and_worker(engine_config, options, ApiConfig(redis_url=url, service=service,
                                                                       model_name="base"))
        stop_worker, stop_load = threading.Event(), threading.Event()
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threads = [worker.start_thread(stop_worker),
                   threading.Thread(target=server.run, name="api", daemon=True)]
        threads[1].start()
        base = f"http://127.0.0.1:{port}"
        try:
            with console.status(f"loading {model} and profiling the engine..."):
                wait_ready(base, worker)
            client = connect(url)
            queue = JobQueue(client, service)
            queue.submit(JobSubmission(name, "default", spec))
            console.print(f"FinetuneJob {name} queued on service {service}; inference load: {rate:.2f} req/s "
                          f"(SLOs: TTFT {slo.ttft_s * 1000:.0f} ms, TPOT {slo.tpot_s * 1000:.0f} ms); "
                          f"stops after {max_seconds:.0f} s at most", highlight=False)
            load = LoadResult(slo)
            load_thread = threading.Thread(target=drive_load, args=(base, rate, stop_load, load), daemon=True)
            load_thread.start()
            began = time.monotonic()
            progress_log = []
            with ProgressLines(console, name) as progress:
                while True:
                    p = queue.progress(name)
                    step, loss = p.step or 0, float("nan") if p.loss is None else p.loss
                    if not progress_log or progress_log[-1][1] != step:
                        progress_log.append((time.monotonic() - began, step, loss))
                    shown = "-" if p.loss is None else f"{loss:.3f}"
                    progress.update(step, p.total_steps, f"{p.phase or '?'} loss {shown} | requests {load.done} "
                                                         f"SLO {load.attainment:.0%}")
                    if p.phase in protocol.TERMINAL_PHASES or worker.failed is not None:
                        break
                    if time.monotonic() - began > max_seconds:
                        queue.cancel(name, f"the demo's time limit ({max_seconds:.0f} s) passed")
                        console.print(f"time limit: {max_seconds:.0f} s passed, cancelling {name} at step {step}")
                        max_seconds = float("inf")  # wait for the engine to mark it Cancelled
                    time.sleep(0.5)
            elapsed = time.monotonic() - began
            stop_load.set()
            load_thread.join(timeout=60)
            summary = summarize(name, queue, load, elapsed, base, spec, slo)
            summary["rate"] = rate
            plot(out_dir / "demo.png", load, progress_log, name)
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            print_summary(console, summary, out_dir)
            return summary
        finally:
            stop_load.set()
            server.should_exit = True
            stop_worker.set()
            for thread in threads:
                thread.join(timeout=60)


def summarize(name, queue, load, elapsed, base, spec, slo) -> dict:
    progress, versions = queue.progress(name), queue.versions(name)
    steps = progress.step or 0
    ft_tokens = steps * spec["training"].get("batchTokens", 0)
    sample_prompt = "What is the capital of France?"
    completion = complete(base, name, sample_prompt) if versions else ""
    return {
        "job": name, "phase": progress.phase, "message": progress.message,
        "steps": steps, "final_loss": float("nan") if progress.loss is None else progress.loss,
        "finetune_tokens_per_s": ft_tokens / elapsed if elapsed else 0.0,
        "elapsed_s": elapsed, "adapter_versions": [v.name for v in versions],
        "requests": load.done, "request_errors": load.errors, "slo_attainment": load.attainment,
        "slo": {"ttft_ms": slo.ttft_s * 1000, "tpot_ms": slo.tpot_s * 1000},
        "ttft_p50_s": percentile(load.ttfts, 50), "tpot_p50_s": percentile(load.tpots, 50),
        "inference_tokens_per_s": load.tokens / elapsed if elapsed else 0.0,
        "sample": {"model": name, "prompt": sample_prompt, "completion": completion,
                   "base_completion": complete(base, "base", sample_prompt)},
    }


def complete(base: str, model: str, prompt: str) -> str:
    """A greedy completion; retried while the replica hot-loads the adapter's latest version."""
    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    for _ in range(50):
        reply = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        if reply.status_code == 200:
            return reply.json()["choices"][0]["text"]
        time.sleep(0.2)
    return f"<{reply.status_code}: {reply.text}>"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def print_summary(console, s: dict, out_dir: Path) -> None:
    from rich.table import Table

    table = Table(title="FlexLLM demo: fine-tuning co-served with inference", show_header=False)
    rows = [
        ("job", f"{s['job']}: {s['phase']} after {s['steps']} steps, loss {s['final_loss']:.3f}"),
        ("fine-tuning", f"{s['finetune_tokens_per_s']:.1f} tokens/s over {s['elapsed_s']:.0f} s"),
        ("adapter versions", ", ".join(s["adapter_versions"]) or "none"),
        ("inference", f"{s['requests']} requests, {s['inference_tokens_per_s']:.1f} tokens/s, "
                      f"{s['request_errors']} errors"),
        ("SLO attainment", f"{s['slo_attainment']:.1%} (TTFT {s['slo']['ttft_ms']:.0f} ms and "
                           f"TPOT {s['slo']['tpot_ms']:.0f} ms both)"),
        (f"{s['sample']['model']} says", f"{s['sample']['prompt']!r} -> {s['sample']['completion']!r}"),
        ("base model says", f"{s['sample']['prompt']!r} -> {s['sample']['base_completion']!r}"),
        ("saved", f"{out_dir / 'demo.png'}, {out_dir / 'summary.json'}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def plot(path: Path, load: LoadResult, progress_log: list[tuple[float, int, float]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if progress_log:
        left.plot([p[0] for p in progress_log], [p[2] for p in progress_log], "o-")
    left.set(xlabel="time (s)", ylabel="training loss", title=f"FinetuneJob {name}")
    if load.timeline:
        right.scatter([t for t, _ in load.timeline], [v for _, v in load.timeline], s=10)
    right.axhline(load.slo.ttft_s, color="red", linestyle="--", label="TTFT SLO")
    right.set(xlabel="arrival (s)", ylabel="TTFT (s)", title="Inference requests while fine-tuning")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
