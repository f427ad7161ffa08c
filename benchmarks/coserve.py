"""Co-serving vs temporal sharing vs a separate split vs inference-only vs fine-tune-only.

The Azure LLM inference trace 2023 (conversation; see traces.py for where it lives and how it is
rescaled) and, as extra cases, synthetic traces (Poisson and bursty arrivals; heavy-tailed
prompt/output lengths) at a sweep of rates are replayed in real time against the bundled model while
a FinetuneJob trains. SLOs for this
CPU are derived from the measured single-request latency and written into the output. A request
meets its SLO only if both its TTFT and its TPOT hold. Writes benchmarks/results/coserve.json and
coserve_*.png.

    python benchmarks/coserve.py [--rates 0.75,1] [--rate-unit serial] [--duration 30] [--traces azure,bursty]

Rates are multiples of what the machine serves one request at a time (``--rate-unit serial``: a
lone 128-token prefill plus the trace's mean output in lone decode steps, measured at start like the
SLOs), so a slower or busier machine sees the same relative load; ``--rate-unit req/s`` takes them
as they are. The defaults, 0.75 and 1 (about 0.65 and 0.85 req/s on a quiet machine of this class:
inference alone keeps the engine busy 40-70 % of the time, the load FlexLLM is built for), at least
40 requests per system (an attainment resolves to 0.025; 12 requests, as before, turned one miss
into 0.92) from a window of the Azure trace arriving at its mean rate, temporal sharing at 3
frequencies, take 15-30 minutes on a 2-core machine, so the benchmark can be run twice. Each trace
is replayed in ``--slices`` consecutive slices, every system taking a slice in turn: this machine's
speed drifts by up to 2x over minutes (neighbours), and systems run one after the other for 2-3
minutes each measured the drift more than the systems. Every replay has its own prompts (a system
served from the prefix cache another one filled with the same trace would skip its prefills).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see worker/__init__.py
import torch  # noqa: E402
from common import RESULTS, print_table, write_json
from replay import ITERATION_COLUMNS, WallClock, combine, replay, slices
from traces import CPU_LENGTH_SCALE, TRACES, Arrival, make_trace

from flexllm.worker.coserve.engine import CoServingEngine
from flexllm.worker.coserve.latency import LatencyModel
from flexllm.worker.coserve.policy import SLO, measure_speed
from flexllm.worker.engine.llm_engine import LLMEngine
from flexllm.worker.finetune.runner import FinetuneRunner
from flexllm.worker.finetune.spec import FinetuneJobSpec

ROOT = Path(__file__).resolve().parents[1]
JOB = {
    "dataset": {"source": str(ROOT / "examples/data/tiny.jsonl"), "format": "prompt-completion"},
    "lora": {"rank": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
    "training": {"maxSteps": 100000, "learningRate": 1e-4, "batchTokens": 256, "maxSeqLen": 128},
    "publish": {"everySteps": 100000, "keepVersions": 1},
}
MAX_FINETUNE_TOKENS = 128


def runner_for(engine: LLMEngine, adapter_root: Path) -> FinetuneRunner:
    return FinetuneRunner(engine.model, engine.tokenizer, FinetuneJobSpec.model_validate(JOB), adapter_root,
                          "bench", resume=False)


def run_system(engine: LLMEngine, latency: LatencyModel, slo: SLO, policy: str, trace: list[Arrival],
               duration: float, temporal_period: int = 4, with_finetune: bool = True, run: str = "") -> dict:
    """Replay ``trace`` in real time; fine-tuning is counted until ``duration``, requests until drained.
    ``run`` names this replay: its prompts are its own, so no system is served from the prefix cache
    that an earlier one filled with the same trace."""
    co = CoServingEngine(engine, slo, policy, MAX_FINETUNE_TOKENS, temporal_period, copy.deepcopy(latency))
    with tempfile.TemporaryDirectory() as adapters:
        if with_finetune:
            co.add_job("bench", runner_for(engine, Path(adapters)))
        return replay(co, trace, duration, partial(prompt_ids, run, engine.vocab_size), WallClock().idle_until)


def run_idle(engine: LLMEngine, latency: LatencyModel, slo: SLO, duration: float) -> tuple[dict, dict]:
    """Fine-tune-only and co-serving with no requests (which train alike), in halves ordered A B B A,
    so that a machine whose speed drifts over the minute slows both alike: one after the other, run 1
    of 2026-12-07 measured co-serving at 0.82x fine-tune-only, where earlier runs had 1.00-1.05x."""
    halves = {"finetune-only": [], "coserve": []}
    for policy in ("finetune-only", "coserve", "coserve", "finetune-only"):
        halves[policy].append(run_system(engine, latency, slo, policy, [], duration / 2))
    return tuple(combine(runs, duration / 2) for runs in halves.values())


def prompt_ids(run: str, vocab_size: int, index: int, arrival: Arrival) -> list[int]:
    """Token ids for a trace request of replay ``run`` (only the lengths come from the trace)."""
    rng = random.Random(f"{run}/{index}")
    return [rng.randrange(100, vocab_size) for _ in range(arrival.prompt_tokens)]


def separate_child(args) -> None:
    """One half of the separate split: its own process with half the threads."""
    torch.set_num_threads(args.threads)
    engine = LLMEngine(model=args.model, dtype="auto", device=args.device)
    slo = SLO(**json.loads(args.slo))
    if args.child == "inference":
        trace = make_trace(args.trace, args.rate, args.duration, args.seed, args.length_scale)
        out = run_system(engine, LatencyModel(), slo, "inference-only", trace, args.duration, with_finetune=False)
    else:
        out = run_system(engine, LatencyModel(), slo, "finetune-only", [], args.duration)
    print(json.dumps({k: v for k, v in out.items() if k not in ("timeline", "iterations")}))


def run_separate(args, slo: SLO, trace_kind: str, rate: float, duration: float) -> dict:
    threads = max(1, torch.get_num_threads() // 2)
    common = [sys.executable, __file__, "--threads", str(threads), "--slo", json.dumps(slo.__dict__),
              "--trace", trace_kind, "--rate", str(rate), "--duration", str(duration), "--model", args.model,
              "--seed", str(args.seed), "--length-scale", str(args.length_scale), "--device", args.device]
    procs = [subprocess.Popen([*common, "--child", kind], stdout=subprocess.PIPE, text=True)
             for kind in ("inference", "finetune")]
    inf, ft = (json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs)
    return {"policy": "separate", "temporal_period": None, "slo_attainment": inf["slo_attainment"],
            "requests": inf["requests"],
            "finetune_tokens_per_s": ft["finetune_tokens_per_s"],
            "inference_tokens_per_s": inf["inference_tokens_per_s"]}


def mean_output_tokens(kind: str, seed: int, length_scale: float) -> float:
    """A request's mean output length in ``kind``'s traces (over 1000 requests)."""
    trace = make_trace(kind, 1.0, 1000.0, seed, length_scale)
    return sum(a.output_tokens for a in trace) / len(trace)


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(rows: list[dict], ft_only: float, idle: float) -> dict:
    by = {}
    for r in rows:
        by.setdefault((r["trace"], r["rate"]), []).append(r)
    ok_keys = [k for k, rs in by.items() if any(r["policy"] == "inference-only" and r["slo_attainment"] >= 0.98
                                                for r in rs)]

    def best(rs, policy, attainment):
        cands = [r["finetune_tokens_per_s"] for r in rs if r["policy"] == policy and r["slo_attainment"] >= attainment]
        return max(cands) if cands else 0.0

    ratios_temporal, ratios_separate, attainments, harvest = [], [], [], []
    for k in ok_keys:
        co = next(r for r in by[k] if r["policy"] == "coserve")
        attainments.append(co["slo_attainment"])
        inference_only = next(r for r in by[k] if r["policy"] == "inference-only")
        if co["slo_attainment"] >= 0.95 and ft_only and inference_only["idle_fraction"] > 0:
            harvest.append(co["finetune_tokens_per_s"] / (ft_only * inference_only["idle_fraction"]))
        for baseline, out in (("temporal", ratios_temporal), ("separate", ratios_separate)):
            b = best(by[k], baseline, co["slo_attainment"])
            out.append(co["finetune_tokens_per_s"] / b if b else float("inf"))
    peak = [r for r in rows if r["policy"] == "coserve" and r["slo_attainment"] >= 0.95]
    peak_row = max(peak, key=lambda r: r["rate"]) if peak else None
    finite = lambda xs: [x for x in xs if math.isfinite(x)]  # noqa: E731
    return {
        "min_slo_attainment_coserve": min(attainments) if attainments else None,
        "ft_ratio_vs_best_temporal": geomean(finite(ratios_temporal)),
        "ft_ratio_vs_separate": geomean(finite(ratios_separate)),
        "baseline_missed_slo_at": {"temporal": sum(not math.isfinite(x) for x in ratios_temporal),
                                   "separate": sum(not math.isfinite(x) for x in ratios_separate)},
        "ft_idle_ratio": idle / ft_only if ft_only else None,
        # co-serving's fine-tuning over what the capacity inference alone leaves idle would train
        "ft_harvest_ratio": geomean(harvest),
        "ft_peak_ratio": peak_row["finetune_tokens_per_s"] / ft_only if peak_row and ft_only else None,
        "ft_peak_rate": peak_row["rate"] if peak_row else None,
    }


def plot(rows: list[dict], timeline_row: dict | None, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = sorted({r["trace"] for r in rows}, key=TRACES.index)
    fig, axes = plt.subplots(len(traces), 2, figsize=(11, 3.6 * len(traces)), squeeze=False)
    periods = sorted({r["temporal_period"] for r in rows if r["policy"] == "temporal"})
    systems = [("coserve", None, "o-"), ("separate", None, "^-."), ("inference-only", None, "x:"),
               *(("temporal", p, "s--") for p in periods)]
    colors = plt.get_cmap("tab10").colors
    for row, trace in zip(axes, traces, strict=True):
        for color, (policy, period, style) in zip(colors, systems):
            pts = sorted((r["rate"], r) for r in rows if r["policy"] == policy and r["trace"] == trace
                         and r.get("temporal_period") == period)
            label = f"{policy} (FT every {period})" if period else policy
            for ax, key in zip(row, ("finetune_tokens_per_s", "slo_attainment"), strict=True):
                ax.plot([p[0] for p in pts], [p[1][key] for p in pts], style, color=color, label=label)
        row[0].set(xlabel="request rate (req/s)", ylabel="fine-tuning tokens/s",
                   title=f"Fine-tuning throughput ({trace})")
        row[1].set(xlabel="request rate (req/s)", ylabel="SLO attainment",
                   title=f"SLO attainment, TTFT and TPOT ({trace})", ylim=(0, 1.05))
    axes[0][1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}_rates.png", dpi=110)
    if timeline_row:
        t = timeline_row["timeline"]
        fig, ax = plt.subplots(figsize=(11, 3.5))
        ax.stackplot([p[0] for p in t], [p[1] for p in t], [p[2] for p in t], labels=["inference", "fine-tuning"])
        ax.set(xlabel="time (s)", ylabel="tokens per iteration",
               title=f"Token budget split, co-serving at {timeline_row['rate']} req/s ({timeline_row['trace']})")
        ax.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(RESULTS / f"{name}_timeline.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    parser.add_argument("--rates", default="0.75,1", help="request rates, in --rate-unit")
    parser.add_argument("--rate-unit", choices=["serial", "req/s"], default="serial",
                        help="serial: multiples of what this machine serves one request at a time (measured at "
                             "start, like the SLOs, so a slower or busier machine gets the same relative load)")
    parser.add_argument("--traces", default="azure", help=f"comma-separated, of {', '.join(TRACES)}")
    parser.add_argument("--length-scale", type=float, default=CPU_LENGTH_SCALE,
                        help="Azure prompt and output lengths are multiplied by this (one factor)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per run (at least)")
    parser.add_argument("--min-requests", type=float, default=40.0,
                        help="low rates run longer: duration >= min_requests / rate")
    parser.add_argument("--temporal-periods", default="4,8,16")
    parser.add_argument("--slices", type=int, default=4,
                        help="each trace is replayed in this many slices, every system taking a slice in turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="coserve", help="results/NAME.json, NAME_iterations.json, NAME_*.png")
    parser.add_argument("--child", choices=["inference", "finetune"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--slo")
    parser.add_argument("--trace", default="poisson")
    parser.add_argument("--rate", type=float, default=0.0)
    args = parser.parse_args()
    if args.child:
        return separate_child(args)
    engine = LLMEngine(model=args.model, dtype="auto", device=args.device)
    speed = measure_speed(engine)
    slo = speed.slo()
    print(f"SLOs for this machine: TTFT {slo.ttft_s:.2f}s, TPOT {slo.tpot_s * 1000:.0f}ms", flush=True)
    profiler = CoServingEngine(engine, slo)
    profiler.profile()
    latency = profiler.latency
    ft_only_row, idle_row = run_idle(engine, latency, slo, args.duration)
    ft_only, idle = ft_only_row["finetune_tokens_per_s"], idle_row["finetune_tokens_per_s"]
    print(f"fine-tune-only {ft_only:.1f} tok/s; co-serving idle {idle:.1f} tok/s", flush=True)
    rows, timeline_row = [], None
    ft_only_row.update(trace="none", rate=0.0, duration_s=args.duration)
    idle_row.update(trace="none", rate=0.0, duration_s=args.duration)
    systems = [("coserve", 4), ("inference-only", 4)] + [("temporal", int(p)) for p in args.temporal_periods.split(",")]
    for trace_kind in args.traces.split(","):
        serial = 1.0 / speed.request_s(mean_output_tokens(trace_kind, args.seed, args.length_scale))
        unit = serial if args.rate_unit == "serial" else 1.0
        print(f"{trace_kind}: one request at a time, this machine serves {serial:.2f} req/s", flush=True)
        for load in map(float, args.rates.split(",")):
            rate = load * unit
            duration = max(args.duration, args.min_requests / rate)  # enough requests for an attainment
            trace = make_trace(trace_kind, rate, duration, args.seed, args.length_scale)
            parts = slices(trace, duration, args.slices)
            replays = {system: [] for system in systems}
            for i, (part, slice_s) in enumerate(parts):  # round-robin: a drifting machine slows all alike
                print(f"{trace_kind} {rate:.3f} slice {i + 1}/{len(parts)}: {len(part)} requests", flush=True)
                for policy, period in systems:
                    replays[policy, period].append(run_system(
                        engine, latency, slo, policy, part, slice_s, period, with_finetune=policy != "inference-only",
                        run=f"{trace_kind}/{rate}/{policy}/{period}/{i}"))
            for (policy, period), parts_replayed in replays.items():
                row = combine(parts_replayed, duration / args.slices)
                row.update(trace=trace_kind, rate=rate, load=load, duration_s=duration)
                rows.append(row)
                print(f"{trace_kind} {rate} {policy}/{period}: attainment {row['slo_attainment']:.2f}, "
                      f"ft {row['finetune_tokens_per_s']:.1f} tok/s", flush=True)
            sep = run_separate(args, slo, trace_kind, rate, duration)
            sep.update(trace=trace_kind, rate=rate, load=load, duration_s=duration)
            rows.append(sep)
            print(f"{trace_kind} {rate} separate: attainment {sep['slo_attainment']:.2f}, "
                  f"ft {sep['finetune_tokens_per_s']:.1f} tok/s", flush=True)
    co_rows = [r for r in rows if r["policy"] == "coserve"]
    timeline_row = max(co_rows, key=lambda r: r["rate"]) if co_rows else None
    summary = summarize(rows, ft_only, idle)
    print_table(rows, ["trace", "rate", "policy", "temporal_period", "slo_attainment", "finetune_tokens_per_s",
                       "inference_tokens_per_s"])
    print(json.dumps(summary, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, timeline_row, args.name)
    measured = [ft_only_row, idle_row, *(r for r in rows if "iterations" in r)]
    write_json(f"{args.name}_iterations", {"columns": list(ITERATION_COLUMNS), "runs": [
        {k: r[k] for k in ("trace", "rate", "policy", "temporal_period", "iterations")} for r in measured]})
    path = write_json(args.name, {**summary, "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
                                  "finetune_only_tokens_per_s": ft_only, "coserve_idle_tokens_per_s": idle,
                                  "duration_s": args.duration, "latency_model": latency.coef,
                                  "setup": {"seed": args.seed, "length_scale": args.length_scale,
                                            "rate_unit": args.rate_unit, "slices": args.slices,
                                            "max_finetune_tokens": MAX_FINETUNE_TOKENS,
                                            "max_tokens_per_batch": engine.config.max_tokens_per_batch,
                                            "max_num_seqs": engine.config.max_num_seqs,
                                            "num_kv_blocks": engine.block_manager.num_blocks,
                                            "block_size": engine.block_manager.block_size,
                                            "batch_tokens": JOB["training"]["batchTokens"]},
                                  "rows": [{k: v for k, v in r.items() if k not in ("timeline", "iterations")}
                                           for r in rows]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
