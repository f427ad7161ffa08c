"""Arrival traces for the co-serving benchmark and the simulator.

- ``azure``: the Azure LLM inference trace 2023, conversation service (the trace FlexLLM itself
  replays): Microsoft, `Azure/AzurePublicDataset`, file `data/AzureLLMInferenceTrace_conv.csv`
  (columns TIMESTAMP, ContextTokens, GeneratedTokens; 19,366 requests over 58 minutes, 5.5 req/s),
  licensed CC-BY 4.0, committed unchanged as ``benchmarks/azure_trace/`` with its attribution
  (``FLEXLLM_AZURE_TRACE`` names another copy). As in the paper, its inter-arrival times are rescaled to
  each target rate, from a window of the trace that arrives at its mean rate (``typical_window``;
  another seed: a random start); prompt and output lengths are multiplied by one ``length_scale`` (1.0 for a GPU
  model; the CPU benchmark uses ``CPU_LENGTH_SCALE`` so a 135M model on 2 cores sees the trace's
  shape at lengths it can serve) and clamped to the model's context.
- ``poisson`` / ``bursty``: synthetic arrivals (exponential gaps, or gamma gaps with CV 2) with
  Pareto-tailed prompt and output lengths, kept as extra cases.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AZURE_FILE = "AzureLLMInferenceTrace_conv.csv"
AZURE_PATHS = (ROOT / "benchmarks" / "azure_trace" / AZURE_FILE,)
CPU_LENGTH_SCALE = 1 / 16  # Azure conv: median prompt 1020 -> 64 tokens, median output 129 -> 8 tokens
TRACES = ("azure", "poisson", "bursty")


@dataclass(frozen=True)
class Arrival:
    """One request of a trace: when it arrives (seconds from the start) and its lengths in tokens."""

    time_s: float
    prompt_tokens: int
    output_tokens: int


def azure_path() -> Path:
    candidates = [Path(p) for p in filter(None, [os.environ.get("FLEXLLM_AZURE_TRACE")])] + list(AZURE_PATHS)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the Azure LLM inference trace is not here: put {AZURE_FILE} (public repository "
        f"Azure/AzurePublicDataset, data/{AZURE_FILE}, CC-BY 4.0) at {AZURE_PATHS[0]} or set FLEXLLM_AZURE_TRACE")


def load_azure(path: Path | None = None) -> list[Arrival]:
    """The trace as recorded: arrival times relative to its first request."""
    with open(path or azure_path(), newline="") as f:
        rows = list(csv.DictReader(f))
    stamps = [datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in rows]
    return [Arrival((t - stamps[0]).total_seconds(), int(r["ContextTokens"]), int(r["GeneratedTokens"]))
            for t, r in zip(stamps, rows, strict=True)]


def rescale(recorded: list[Arrival], rate: float, duration_s: float, length_scale: float,
            max_prompt_tokens: int, max_output_tokens: int, offset: int = 0) -> list[Arrival]:
    """Replay ``recorded`` from request ``offset`` (wrapping around) at ``rate`` requests/s on average:
    every recorded gap is stretched by the same factor, so the trace's burstiness is kept."""
    if rate <= 0 or len(recorded) < 2:
        return []
    gaps = [b.time_s - a.time_s for a, b in zip(recorded, recorded[1:])]
    gaps.append(sum(gaps) / len(gaps))  # from the last request around to the first
    stretch = 1.0 / (rate * (sum(gaps) / len(gaps)))
    out, t = [], 0.0
    for i in range(len(recorded)):
        index = (offset + i) % len(recorded)
        if t >= duration_s:
            break
        arrival = recorded[index]
        out.append(Arrival(t, _scaled(arrival.prompt_tokens, length_scale, max_prompt_tokens),
                           _scaled(arrival.output_tokens, length_scale, max_output_tokens)))
        t += gaps[index] * stretch
    return out


def typical_window(recorded: list[Arrival], count: int) -> int:
    """Where ``count`` consecutive requests of the trace arrive at its mean rate: the first request of
    the window whose span is closest to ``count`` mean gaps (a short replay from the trace's first
    request would see its sparse opening minutes)."""
    mean_gap = (recorded[-1].time_s - recorded[0].time_s) / (len(recorded) - 1)
    spans = ((abs(recorded[i + count].time_s - recorded[i].time_s - count * mean_gap), i)
             for i in range(len(recorded) - count))
    return min(spans)[1]


def _scaled(tokens: int, scale: float, cap: int) -> int:
    return max(1, min(cap, round(tokens * scale)))


def synthetic(kind: str, rate: float, duration_s: float, seed: int, max_prompt_tokens: int = 256,
              max_output_tokens: int = 96) -> list[Arrival]:
    """Poisson (exponential gaps) or bursty (gamma gaps, CV 2) arrivals; Pareto-tailed lengths."""
    rng = random.Random(f"{kind}-{rate}-{seed}")
    trace, t = [], 0.0
    while rate > 0:
        t += rng.expovariate(rate) if kind == "poisson" else rng.gammavariate(0.25, 4.0 / rate)
        if t >= duration_s:
            break
        prompt = min(max_prompt_tokens, int(rng.paretovariate(1.5) * 16))
        trace.append(Arrival(t, prompt, min(max_output_tokens, max(4, int(rng.paretovariate(1.3) * 8)))))
    return trace


def make_trace(kind: str, rate: float, duration_s: float, seed: int = 0, length_scale: float = CPU_LENGTH_SCALE,
               max_prompt_tokens: int = 256, max_output_tokens: int = 96) -> list[Arrival]:
    """A trace of ``kind`` (one of ``TRACES``) at ``rate`` req/s for ``duration_s`` seconds."""
    if kind == "azure":
        recorded = load_azure()
        if seed:
            offset = random.Random(seed).randrange(len(recorded))
        else:
            offset = typical_window(recorded, max(2, round(rate * duration_s)))
        return rescale(recorded, rate, duration_s, length_scale, max_prompt_tokens, max_output_tokens, offset)
    if kind in ("poisson", "bursty"):
        return synthetic(kind, rate, duration_s, seed, max_prompt_tokens, max_output_tokens)
    raise ValueError(f"unknown trace {kind!r}: choose one of {', '.join(TRACES)}")
