"""Replays an arrival trace against a ``CoServingEngine`` while its jobs train: one loop for the real
engine (``coserve.py``, wall-clock time) and the simulator (``simulate.py``, simulated time).

Each iteration is recorded as ``ITERATION_COLUMNS``: the latency model's features, the decode rows
among the inference tokens, the fine-tuning tokens trained, and the measured seconds."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from traces import Arrival

from flexllm.worker.coserve.engine import CoServingEngine
from flexllm.worker.coserve.latency import FEATURES
from flexllm.worker.engine.sampling import SamplingParams

ITERATION_COLUMNS = (*FEATURES, "decode_rows", "trained_tokens", "seconds")


class WallClock:
    """Real time: idle waits sleep (in short slices, so new arrivals are noticed)."""

    now = staticmethod(time.monotonic)

    def idle_until(self, t: float) -> None:
        time.sleep(max(0.0, min(0.01, t - self.now())))


def replay(co: CoServingEngine, trace: list[Arrival], duration_s: float, prompt: Callable[[int, Arrival], list[int]],
           idle_until: Callable[[float], None]) -> dict:
    """Serve ``trace`` (arrivals relative to now) while the jobs train; fine-tuning is counted until
    ``duration_s``, then the jobs stop and the requests drain. ``prompt(i, arrival)`` makes the
    i-th request's token ids. Returns throughput, SLO attainment and the per-iteration token split."""
    engine, clock = co.engine, co.clock
    start = clock()
    pending = deque(enumerate(trace))
    ft_tokens = inf_tokens = busy_s = 0.0
    timeline, iterations = [], []
    while True:
        now = clock() - start  # (arrivals compared in absolute time: a jump to one lands on it exactly)
        while pending and start + pending[0][1].time_s <= clock():
            i, arrival = pending.popleft()
            params = SamplingParams(max_tokens=arrival.output_tokens, temperature=0, ignore_eos=True)
            engine.add_request(f"r{i}", prompt(i, arrival), params, arrival_time=start + arrival.time_s)
        busy = engine.has_unfinished_requests()
        if clock() >= start + duration_s:
            co.jobs.clear()  # the fine-tuning window is over: drain the requests
            if not pending and not busy:
                break
        if not busy and not co.active_jobs():
            idle_until(start + (pending[0][1].time_s if pending else duration_s))
            continue
        result = co.step()
        busy_s += result.seconds if now < duration_s else 0.0
        inf_tokens += len(result.outputs)  # one sampled token per output
        ft = sum(w.trained_tokens for w in result.finetune.values())
        ft_tokens += ft
        timeline.append((round(now, 3), result.shape.inference_tokens, ft))
        decode_rows = sum(len(out.token_ids) > 1 for out in result.outputs)  # (a prefill's last chunk: 1 token)
        iterations.append([*result.shape.vector()[1:], decode_rows, ft, result.seconds])
    return {"policy": co.scheduler.policy,
            "temporal_period": co.scheduler.temporal_period if co.scheduler.policy == "temporal" else None,
            "slo_attainment": co.slo_tracker.attainment, "requests": len(trace),
            "ttft_missed": co.slo_tracker.ttft_missed, "tpot_missed": co.slo_tracker.tpot_missed,
            "worst_ttft_vs_slo": max(co.slo_tracker.ttfts, default=0.0) / co.slo.ttft_s,
            "worst_tpot_vs_slo": max(co.slo_tracker.tpots, default=0.0) / co.slo.tpot_s,
            "finetune_tokens_per_s": ft_tokens / duration_s, "inference_tokens_per_s": inf_tokens / duration_s,
            "idle_fraction": max(0.0, 1.0 - busy_s / duration_s), "timeline": timeline,
            "iterations": iterations}


def slices(trace: list[Arrival], duration_s: float, count: int) -> list[tuple[list[Arrival], float]]:
    """``trace`` cut into ``count`` consecutive slices of ``duration_s / count`` seconds, each rebased to
    start at 0 (``coserve.py`` runs its systems round-robin, a slice each, so that a machine whose speed
    drifts over the quarter hour slows every system alike)."""
    width = duration_s / count
    return [([Arrival(a.time_s - i * width, a.prompt_tokens, a.output_tokens) for a in trace
              if i * width <= a.time_s < (i + 1) * width or (i == count - 1 and a.time_s >= duration_s)], width)
            for i in range(count)]


def combine(results: list[dict], slice_s: float) -> dict:
    """One system's replays of a trace's consecutive ``slice_s``-second slices (``slices``) as one replay."""
    requests = sum(r["requests"] for r in results)
    offsets = [0.0]
    for r in results[:-1]:  # a slice's requests drain past its end: the next one starts after them
        offsets.append(offsets[-1] + max([slice_s, *(t for t, *_ in r["timeline"][-1:])]))
    mean = lambda key: sum(r[key] for r in results) / len(results)  # noqa: E731
    return {**results[0], "requests": requests,
            "slo_attainment": sum(r["slo_attainment"] * r["requests"] for r in results) / requests if requests else 1.0,
            **{k: sum(r[k] for r in results) for k in ("ttft_missed", "tpot_missed")},
            **{k: max(r[k] for r in results) for k in ("worst_ttft_vs_slo", "worst_tpot_vs_slo")},
            **{k: mean(k) for k in ("finetune_tokens_per_s", "inference_tokens_per_s", "idle_fraction")},
            "timeline": [(round(t + offset, 3), *rest) for r, offset in zip(results, offsets, strict=True)
                         for t, *rest in r["timeline"]],
            "iterations": [it for r in results for it in r["iterations"]]}
