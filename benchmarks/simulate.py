"""SIMULATION: the project's own co-serving scheduler in simulated time.

A discrete-event simulation that runs the real ``CoServingEngine`` (its ``HybridScheduler``,
``WeightedShare``, online-refitted ``LatencyModel``), the engine's token-budget ``Scheduler`` and its
``BlockManager`` KV-block accounting -- everything but the model: ``SimEngine`` stands in for
``LLMEngine`` and prices each iteration with a cost model (``costmodel.py``) instead of running it,
and ``SimJob`` stands in for a ``FinetuneRunner`` with work units of the same token costs (a
micro-batch of ``batch_tokens`` goes forward in units that fit the budget, then backward).

    python benchmarks/simulate.py validate   # measured cost model vs benchmarks/results/coserve.json
    python benchmarks/simulate.py project    # the paper's experiment on GPUs (roofline cost model)

Figures from here are simulated and always labelled so; a projection counts only while the
validation errors against real runs on this machine hold (``validation_max_ft_error`` <= 0.15,
``validation_max_slo_error`` <= 0.05).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

from common import RESULTS, print_table, write_json
from costmodel import GPUS, MODELS, MeasuredCost, RooflineCost, Work
from replay import combine, replay, slices
from traces import Arrival, make_trace

from flexllm.worker.coserve.engine import CoServingEngine
from flexllm.worker.coserve.latency import LatencyModel
from flexllm.worker.engine.block_manager import BlockManager
from flexllm.worker.engine.demand import InferenceDemand, inference_demand
from flexllm.worker.engine.llm_engine import RiderPlan
from flexllm.worker.engine.outputs import RequestOutput
from flexllm.worker.engine.sampling import SamplingParams
from flexllm.worker.engine.scheduler import ScheduledBatch, Scheduler
from flexllm.worker.engine.sequence import Sequence
from flexllm.worker.finetune.runner import WorkDone
from flexllm.worker.options import SLO

MIN_ITERATION_S = 1e-5  # an iteration that schedules nothing still moves time on
MAX_FT_ERROR, MAX_SLO_ERROR = 0.15, 0.05  # a projection counts only while validation stays within these


class SimClock:
    """Simulated seconds; idle waits jump straight to the next event."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += max(seconds, MIN_ITERATION_S)

    def idle_until(self, t: float) -> None:
        self.t = max(self.t, t)


@dataclass(frozen=True)
class SimConfig:
    max_tokens_per_batch: int = 256
    max_num_seqs: int = 64
    num_kv_blocks: int = 4096
    block_size: int = 16


@dataclass
class SimUnit:
    """A fine-tuning work unit: ``cost`` tokens of ``kind`` work, ``trained`` tokens of progress."""

    kind: str  # "forward" | "backward"
    cost: int
    trained: float


class SimEngine:
    """``LLMEngine``'s serving surface without a model: each ``execute`` costs ``cost.seconds``."""

    def __init__(self, cost, clock: SimClock, config: SimConfig | None = None):
        self.cost, self.clock = cost, clock
        self.config = config or SimConfig()
        self.block_manager = BlockManager(self.config.num_kv_blocks, self.config.block_size)
        self.scheduler = Scheduler(self.block_manager, None, self.config.max_tokens_per_batch,
                                   self.config.max_num_seqs)
        self.max_model_len = self.config.num_kv_blocks * self.config.block_size
        self.vocab_size = 1 << 17  # token ids are never looked at

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams, lora: str | None = None,
                    arrival_time: float | None = None) -> None:
        seq = Sequence(request_id, list(prompt), params, lora_name=lora)
        seq.arrival_time = self.clock.now() if arrival_time is None else arrival_time
        self.scheduler.add(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def demand(self, now: float, slo: SLO) -> InferenceDemand:
        return inference_demand([*self.scheduler.running, *self.scheduler.waiting], now, slo)

    def step(self, token_budget: int | None = None, riders: RiderPlan | None = None) -> list[RequestOutput]:
        batch = self.scheduler.schedule(token_budget)
        return self.execute(batch, list(riders(batch)) if riders is not None else [])

    def execute(self, batch: ScheduledBatch, riders: list[SimUnit] = ()) -> list[RequestOutput]:
        """Price the fused iteration (forward units ride the inference forward; backward units and,
        with no inference rows, every unit run a pass of their own), then advance the sequences."""
        rows = tuple((n, s.num_computed_tokens + n) for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True))
        backward = [u for u in riders if u.kind == "backward"]
        alone = [u for u in riders if u.kind == "forward"] if not rows else []
        self.clock.advance(self.cost.seconds(Work(
            rows, sum(u.cost for u in riders if u.kind == "forward"), sum(u.cost for u in backward),
            len(backward) + len(alone), len(backward))))
        return self._advance(batch)

    def run_alone(self, unit: SimUnit) -> None:
        """One more unit on its own within the iteration (``CoServingEngine``'s spending with no inference)."""
        forward = unit.kind == "forward"
        self.clock.advance(self.cost.seconds(Work((), unit.cost if forward else 0, 0 if forward else unit.cost,
                                                  1, 0 if forward else 1), iteration=False))

    def _advance(self, batch: ScheduledBatch) -> list[RequestOutput]:
        now, outputs = self.clock.now(), []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prefill chunk that is not the prompt's last
            seq.token_ids.append(0)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if seq.num_output_tokens >= seq.params.max_tokens:
                self.scheduler.finish(seq, "length")
            outputs.append(RequestOutput(seq.request_id, "", seq.output_token_ids, "", [0], seq.finished,
                                         seq.finish_reason, seq.num_prompt_tokens, arrival_time=seq.arrival_time,
                                         first_token_time=seq.first_token_time))
        return outputs

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        for i, prompt in enumerate(prompts):
            self.add_request(f"gen-{self.clock.now()}-{i}", prompt, params)
        done = []
        while self.has_unfinished_requests():
            done += [o for o in self.step() if o.finished]
        return done


@dataclass(frozen=True)
class JobShape:
    """How a FinetuneJob's work comes in units: at most ``unit_tokens`` tokens of cost per unit (None: as
    many as the budget), and the training progress a token of cost buys (``Unit.trained`` per ``Unit.cost``;
    0.5 when a token's forward and backward cost the same, less where the loss's LM head adds cost)."""

    unit_tokens: int | None = None
    trained_per_token: float = 0.5

    @classmethod
    def measured(cls, records: list[dict[str, float]]) -> JobShape:
        """From iterations of a real job (``replay``'s records, e.g. a fine-tune-only run)."""
        tokens = sum(r["finetune_forward_tokens"] + r["finetune_backward_tokens"] for r in records)
        units = sum(r["finetune_units"] for r in records)
        return cls(round(tokens / units) if units else None,
                   sum(r["trained_tokens"] for r in records) / tokens if tokens else 0.5)


class SimJob:
    """A FinetuneJob's work units by token cost: each micro-batch of ``batch_tokens`` tokens goes
    forward in units of at most the budget (and ``shape.unit_tokens``), then backward; each unit
    counts ``shape.trained_per_token`` of its cost as trained (as ``FinetuneRunner`` counts ``Unit.trained``)."""

    def __init__(self, engine: SimEngine, batch_tokens: int = 256, shape: JobShape = JobShape()):
        self.engine, self.batch_tokens, self.shape = engine, batch_tokens, shape
        self.forward_left, self.backward_left = batch_tokens, batch_tokens
        self.done = False

    @property
    def next_work_is_backward(self) -> bool:
        return self.forward_left == 0

    def plan_work(self, token_budget: int) -> SimUnit:
        largest = min(token_budget, self.shape.unit_tokens or token_budget)
        kind, left = ("forward", self.forward_left) if self.forward_left else ("backward", self.backward_left)
        cost = min(largest, left)
        return SimUnit(kind, cost, cost * self.shape.trained_per_token)

    def finish_work(self, unit: SimUnit) -> WorkDone:
        if unit.kind == "forward":
            self.forward_left -= unit.cost
        else:
            self.backward_left -= unit.cost
        step_finished = self.backward_left == 0
        if step_finished:
            self.forward_left = self.backward_left = self.batch_tokens
        return WorkDone(unit.cost, unit.kind, step_finished=step_finished, trained_tokens=unit.trained)

    def run_work(self, token_budget: int) -> WorkDone:
        unit = self.plan_work(token_budget)
        self.engine.run_alone(unit)
        return self.finish_work(unit)


def simulate(cost, slo: SLO, policy: str, trace: list[Arrival], duration_s: float, config: SimConfig,
             max_finetune_tokens: int, temporal_period: int = 4, jobs: int = 1, batch_tokens: int = 256,
             latency: LatencyModel | None = None, job_shape: JobShape = JobShape()) -> dict:
    """One system on one trace in simulated time (the real ``replay`` loop); SIMULATION."""
    clock = SimClock()
    engine = SimEngine(cost, clock, config)
    co = CoServingEngine(engine, slo, policy, max_finetune_tokens, temporal_period, latency, clock=clock.now)
    if latency is None:
        co.profile()
    for j in range(jobs if policy != "inference-only" else 0):
        co.add_job(f"job{j}", SimJob(engine, batch_tokens, job_shape))
    return {**replay(co, trace, duration_s, lambda i, a: [0] * a.prompt_tokens, clock.idle_until),
            "simulated": True}


# -- validation against real runs on this machine ------------------------------------------------------
def load_run(name: str) -> tuple[dict, list[dict[str, float]]]:
    """A ``coserve.py --name NAME`` run: its results and its measured iterations (``replay``'s records)."""
    real = json.loads((RESULTS / f"{name}.json").read_text())
    measured = json.loads((RESULTS / f"{name}_iterations.json").read_text())
    columns = measured["columns"]
    return real, [{**dict(zip(columns, it, strict=True)), "policy": run["policy"]}
                  for run in measured["runs"] for it in run["iterations"]]


def validate(fit_on: str, check: list[str], seeds: int = 3) -> dict:
    """Fit the measured cost model on every iteration of the real run ``fit_on`` (``each``: of the run
    being checked, since a machine's speed differs from day to day), re-run each system, trace and
    rate of the runs ``check`` in simulation (each from its own SLOs and start-up latency model; the
    mean over ``seeds`` draws of the measured noise), and compare: fine-tuning tokens/s (relative
    error) and SLO attainment (absolute error)."""
    rows, models = [], {}
    fit_records = None if fit_on == "each" else load_run(fit_on)[1]
    for name in check:
        real, records = load_run(name)
        records = records if fit_records is None else fit_records
        cost = MeasuredCost.fit(records)
        job = JobShape.measured([r for r in records if r["policy"] == "finetune-only"])
        models[name] = {"cost_model": cost.coef, "job_shape": job.__dict__}
        setup, slo = real["setup"], SLO(**real["slo"])
        config = SimConfig(setup["max_tokens_per_batch"], setup["max_num_seqs"], setup["num_kv_blocks"],
                           setup["block_size"])
        idle = {"trace": "none", "rate": 0.0, "temporal_period": None, "duration_s": real["duration_s"],
                "slo_attainment": 1.0}
        checks = [{**idle, "policy": "finetune-only", "finetune_tokens_per_s": real["finetune_only_tokens_per_s"]},
                  {**idle, "policy": "coserve", "finetune_tokens_per_s": real["coserve_idle_tokens_per_s"]}]
        checks += [r for r in real["rows"] if r["policy"] != "separate"]  # the split runs two processes
        for row in checks:
            # as the real run replayed it: the trace in slices (the idle runs in halves), each from the
            # run's start-up latency profile and a fresh job
            parts = [([], row["duration_s"] / 2)] * 2 if row["trace"] == "none" else slices(
                make_trace(row["trace"], row["rate"], row["duration_s"], setup["seed"], setup["length_scale"]),
                row["duration_s"], setup.get("slices", 1))
            sims = []
            for seed in range(seeds):
                cost_draws, replays = MeasuredCost(cost.coef, cost.noise, seed), []
                for part, slice_s in parts:
                    latency = LatencyModel()
                    latency.coef = list(real["latency_model"])
                    replays.append(simulate(cost_draws, slo, row["policy"], part, slice_s, config,
                                            setup["max_finetune_tokens"], row["temporal_period"] or 4,
                                            batch_tokens=setup["batch_tokens"], latency=latency, job_shape=job))
                sims.append(combine(replays, parts[0][1]))
            sim = {key: sum(s[key] for s in sims) / seeds for key in ("finetune_tokens_per_s", "slo_attainment")}
            real_ft = row["finetune_tokens_per_s"]
            rows.append({"run": name, "trace": row["trace"], "rate": row["rate"], "policy": row["policy"],
                         "temporal_period": row["temporal_period"], "real_ft": real_ft,
                         "sim_ft": sim["finetune_tokens_per_s"],
                         "ft_error": abs(sim["finetune_tokens_per_s"] - real_ft) / real_ft if real_ft else None,
                         "real_slo": row["slo_attainment"], "sim_slo": sim["slo_attainment"],
                         "slo_error": abs(sim["slo_attainment"] - row["slo_attainment"])})
    ft_errors = [r["ft_error"] for r in rows if r["ft_error"] is not None]
    return {"fitted_on": fit_on, "checked": check, "models": models,
            "validation_max_ft_error": max(ft_errors, default=None),
            "validation_max_slo_error": max((r["slo_error"] for r in rows), default=None), "rows": rows}


# -- the paper's experiment, projected ---------------------------------------------------------------------
@dataclass(frozen=True)
class Deployment:
    """``gpus`` GPUs of ``gpu`` serving ``model`` as replicas of ``gpus_per_replica`` (tensor parallel)."""

    model: str
    gpu: str
    gpus: int
    gpus_per_replica: int
    tpot_s: float  # the paper's TPOT SLOs span 45-75 ms (TTFT 5 s): tighter for smaller models
    ttft_s: float = 5.0

    @property
    def name(self) -> str:
        return f"{MODELS[self.model].name} on {self.gpus}x {self.gpu}"

    def cost(self, gpus: float) -> RooflineCost:
        return RooflineCost(MODELS[self.model], GPUS[self.gpu], gpus)

    def config(self, gpus: float) -> SimConfig:
        blocks = self.cost(gpus).kv_cache_tokens() // GPU_BLOCK_SIZE
        return SimConfig(GPU_TOKENS_PER_BATCH, GPU_MAX_SEQS, max(blocks, 1), GPU_BLOCK_SIZE)


DEPLOYMENTS = (
    Deployment("llama-3.1-8b", "H100", 1, 1, 0.050),
    Deployment("llama-3.1-8b", "H100", 4, 1, 0.050),
    Deployment("qwen-2.5-14b", "H100", 4, 2, 0.060),
    Deployment("qwen-2.5-32b", "H100", 4, 4, 0.075),
)
GPU_TOKENS_PER_BATCH, GPU_MAX_SEQS, GPU_BLOCK_SIZE = 2048, 256, 16
GPU_FINETUNE_TOKENS, GPU_BATCH_TOKENS = 2048, 4096
SLO_MET = 0.9  # the paper's bar: at least 90% of requests meet both SLOs
GPU_MAX_PROMPT, GPU_MAX_OUTPUT = 8192, 1024


def _replicas(d: Deployment, policy: str, trace: list[Arrival], duration_s: float, replica_gpus: float,
              replicas: int, period: int = 4) -> dict:
    """``replicas`` replicas of ``replica_gpus`` GPUs' worth each, the trace dispatched round-robin."""
    slo = SLO(d.ttft_s, d.tpot_s)
    runs = [simulate(d.cost(replica_gpus), slo, policy, trace[i::replicas], duration_s, d.config(replica_gpus),
                     GPU_FINETUNE_TOKENS, period, batch_tokens=GPU_BATCH_TOKENS) for i in range(replicas)]
    served = sum(r["requests"] for r in runs)
    return {"slo_attainment": sum(r["slo_attainment"] * r["requests"] for r in runs) / served if served else 1.0,
            "finetune_tokens_per_s": sum(r["finetune_tokens_per_s"] for r in runs)}


def project(deployment: Deployment, rates: list[float], duration_s: float, periods: list[int]) -> dict:
    """Every system at every rate for one deployment; SIMULATION (roofline cost model)."""
    d, replicas = deployment, deployment.gpus // deployment.gpus_per_replica
    ft_only = _replicas(d, "finetune-only", [], duration_s, d.gpus_per_replica, replicas)["finetune_tokens_per_s"]
    # a separate split: k of N GPUs serve inference, the rest fine-tune (on one GPU: a share of it)
    splits = [k / 4 for k in (1, 2, 3)] if d.gpus == 1 else [k / d.gpus for k in range(1, d.gpus)]
    rows = []
    for rate in rates:
        trace = make_trace("azure", rate, duration_s, length_scale=1.0, max_prompt_tokens=GPU_MAX_PROMPT,
                           max_output_tokens=GPU_MAX_OUTPUT)
        systems = {("coserve", None): _replicas(d, "coserve", trace, duration_s, d.gpus_per_replica, replicas),
                   ("inference-only", None): _replicas(d, "inference-only", trace, duration_s, d.gpus_per_replica,
                                                       replicas)}
        for p in periods:
            systems["temporal", p] = _replicas(d, "temporal", trace, duration_s, d.gpus_per_replica, replicas, p)
        for share in splits:
            inference_gpus = share * d.gpus
            n = max(1, int(inference_gpus // d.gpus_per_replica))
            inf = _replicas(d, "inference-only", trace, duration_s, inference_gpus / n, n)
            systems["separate", share] = {"slo_attainment": inf["slo_attainment"],
                                          "finetune_tokens_per_s": ft_only * (1 - share)}
        for (policy, param), out in systems.items():
            rows.append({"rate": rate, "policy": policy, "param": param, **out})
        co = systems["coserve", None]
        print(f"SIMULATION {d.name} {rate} req/s: co-serving attainment {co['slo_attainment']:.2f}, "
              f"ft {co['finetune_tokens_per_s']:.0f} tok/s", flush=True)
    return {"deployment": d.name, "slo": {"ttft_s": d.ttft_s, "tpot_s": d.tpot_s},
            "finetune_only_tokens_per_s": ft_only, **_summary(rows, ft_only), "rows": rows}


def _summary(rows: list[dict], ft_only: float) -> dict:
    def best(rate: float, policy: str) -> float:
        ok = [r["finetune_tokens_per_s"] for r in rows
              if r["rate"] == rate and r["policy"] == policy and r["slo_attainment"] >= SLO_MET]
        return max(ok, default=0.0)

    co = {r["rate"]: r for r in rows if r["policy"] == "coserve"}
    served = [rate for rate, r in co.items() if r["slo_attainment"] >= SLO_MET]
    vs_separate = [co[rate]["finetune_tokens_per_s"] / best(rate, "separate") for rate in served
                   if best(rate, "separate")]
    vs_temporal = [co[rate]["finetune_tokens_per_s"] / best(rate, "temporal") for rate in served
                   if best(rate, "temporal")]
    inference_ok = {r["rate"] for r in rows if r["policy"] == "inference-only" and r["slo_attainment"] >= SLO_MET}
    peak = max(served, default=None)
    return {"sim_ft_ratio_vs_separate": geomean(vs_separate), "sim_ft_ratio_vs_best_temporal": geomean(vs_temporal),
            "sim_ft_peak_ratio": co[peak]["finetune_tokens_per_s"] / ft_only if peak is not None and ft_only else None,
            "sim_peak_rate": peak,
            "sim_min_slo_attainment": min((co[r]["slo_attainment"] for r in inference_ok if r in co), default=None)}


# -- fleet scale -----------------------------------------------------------------------------------------
def redis_ops_capacity(commands: int = 20_000) -> float:
    """Stream commands per second one Valkey server thread can execute on this machine: 1e6 / the mean
    server-side microseconds per call (INFO commandstats) over the request protocol's commands (XADD,
    XREAD, XDEL), so the client's own speed does not count; network I/O is excluded too, so it is an upper
    bound: the queue saturates no earlier than this."""
    import redis

    from flexllm.worker.redis_server import EmbeddedRedis

    with EmbeddedRedis() as url:
        client = redis.Redis.from_url(url)
        client.config_resetstat()
        for _ in range(commands // 1000):
            pipe = client.pipeline(transaction=False)
            for _ in range(250):
                pipe.xadd("bench:out", {"data": "x" * 64})
                pipe.xread({"bench:out": "0-0"}, count=1)
                pipe.xadd("bench:req", {"data": "y" * 256})
                pipe.xdel("bench:req", "0-1")
            pipe.execute()
        stats = [v for k, v in client.info("commandstats").items() if k.split("_")[-1] in ("xadd", "xread", "xdel")]
        return 1e6 * sum(s["calls"] for s in stats) / sum(s["usec"] for s in stats)


def redis_ops_per_s(run: dict) -> float:
    """Redis commands one replica's traffic costs per second (``worker/protocol.py``'s flow): per request
    XADD (API), XACK + XDEL, DEL of its output stream; per token an XADD + EXPIRE of its chunk and the
    client's XREAD; per iteration one XREADGROUP; housekeeping (XCLAIM heartbeat, MGET cancel flags) at 4 Hz."""
    seconds = max(run["timeline"][-1][0], 1e-9) if run["timeline"] else 1.0
    requests = run["requests"] / seconds
    tokens = run["inference_tokens_per_s"]
    iterations = len(run["timeline"]) / seconds
    return 4 * requests + 3 * tokens + iterations + 8


def fleet(deployment: Deployment, rate_per_replica: float, replicas: list[int], jobs: int, duration_s: float) -> dict:
    """A fleet of replicas consuming one request stream (dispatch balanced, so a replica's traffic does
    not depend on the fleet's size) with ``jobs`` FinetuneJobs, each claimed by one replica. Simulates a
    replica with a job and one without at ``rate_per_replica``, then adds them up; SIMULATION."""
    d = deployment
    slo = SLO(d.ttft_s, d.tpot_s)
    trace = make_trace("azure", rate_per_replica, duration_s, length_scale=1.0, max_prompt_tokens=GPU_MAX_PROMPT,
                       max_output_tokens=GPU_MAX_OUTPUT)
    runs = {kind: simulate(d.cost(d.gpus_per_replica), slo, policy, trace, duration_s, d.config(d.gpus_per_replica),
                           GPU_FINETUNE_TOKENS, batch_tokens=GPU_BATCH_TOKENS)
            for kind, policy in (("with_job", "coserve"), ("without_job", "inference-only"))}
    capacity = redis_ops_capacity()
    rows = []
    for n in replicas:
        trained = min(jobs, n)
        attainment = (trained * runs["with_job"]["slo_attainment"]
                      + (n - trained) * runs["without_job"]["slo_attainment"]) / n
        ops = trained * redis_ops_per_s(runs["with_job"]) + (n - trained) * redis_ops_per_s(runs["without_job"])
        rows.append({"replicas": n, "request_rate": n * rate_per_replica, "jobs": jobs,
                     "slo_attainment": attainment,
                     "finetune_tokens_per_s": trained * runs["with_job"]["finetune_tokens_per_s"],
                     "idle_replica_share": (n - trained) / n, "redis_ops_per_s": ops,
                     "redis_utilization": ops / capacity})
    return {"deployment": d.name, "rate_per_replica": rate_per_replica, "redis_capacity_ops_per_s": capacity,
            "bottleneck": _fleet_bottleneck(rows), "rows": rows}


def _fleet_bottleneck(rows: list[dict]) -> str:
    saturated = [r["replicas"] for r in rows if r["redis_utilization"] >= 1.0]
    idle = [r["replicas"] for r in rows if r["idle_replica_share"] > 0.5]
    parts = []
    if idle:
        parts.append(f"job placement from {min(idle)} replicas: a FinetuneJob trains on the one replica that claimed "
                     "it, so most replicas' spare capacity trains nothing")
    if saturated:
        parts.append(f"the Redis queue from {min(saturated)} replicas (one server's measured capacity)")
    return "; ".join(parts) or "none within the fleet sizes simulated"


def plot(projections: list[dict]) -> None:
    """The paper's axes: fine-tuning throughput and SLO attainment against the request rate, per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(projections), 2, figsize=(11, 3.4 * len(projections)), squeeze=False)
    for row, projection in zip(axes, projections, strict=True):
        systems = sorted({(r["policy"], r["param"]) for r in projection["rows"]}, key=str)
        for policy, param in systems:
            pts = sorted((r["rate"], r) for r in projection["rows"] if (r["policy"], r["param"]) == (policy, param))
            label = policy if param is None else (f"{policy} (FT every {param})" if policy == "temporal"
                                                  else f"{policy} ({param:.0%} for inference)")
            style = {"coserve": "o-", "temporal": "s--", "separate": "^-.", "inference-only": "x:"}[policy]
            for ax, key in zip(row, ("finetune_tokens_per_s", "slo_attainment"), strict=True):
                ax.plot([p[0] for p in pts], [p[1][key] for p in pts], style, label=label)
        row[0].set(xlabel="request rate (req/s, Azure conv trace)", ylabel="fine-tuning tokens/s",
                   title=f"SIMULATION: {projection['deployment']}")
        row[1].set(xlabel="request rate (req/s, Azure conv trace)", ylabel="SLO attainment (TTFT and TPOT)",
                   ylim=(0, 1.05), title=f"SIMULATION: {projection['deployment']}")
        row[1].axhline(SLO_MET, color="grey", linewidth=0.8)
    axes[0][1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(RESULTS / "simulation.png", dpi=110)


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["validate", "project", "fleet", "all"])
    parser.add_argument("--fit", default="each",
                        help="the coserve.py run (--name) the cost model is fitted on; each: every checked run's own")
    parser.add_argument("--check", default="coserve,coserve_run2",
                        help="coserve.py runs (--name) to predict; those present are checked")
    parser.add_argument("--rates", default="2,5,10,20,30,40,60",
                        help="Azure trace rescaled to these req/s per GPU (a 4-GPU deployment gets 4x), light to "
                             "past saturation")
    parser.add_argument("--duration", type=float, default=30.0, help="simulated seconds per run")
    parser.add_argument("--temporal-periods", default="4,16")
    parser.add_argument("--fleet-rate", type=float, default=8.0, help="req/s per replica in the fleet")
    parser.add_argument("--fleet-jobs", type=int, default=4, help="FinetuneJobs on the fleet")
    args = parser.parse_args()
    out = json.loads((RESULTS / "simulation.json").read_text()) if (RESULTS / "simulation.json").exists() else {}
    out.pop("machine", None)
    out["label"] = "SIMULATION: the real scheduler in simulated time; see benchmarks/simulate.py"
    if args.command in ("validate", "all"):
        checked = [name for name in args.check.split(",") if (RESULTS / f"{name}.json").exists()]
        out["validation"] = validate(args.fit, checked)
        for key in ("validation_max_ft_error", "validation_max_slo_error"):
            out[key] = out["validation"][key]
        print_table(out["validation"]["rows"], ["run", "trace", "rate", "policy", "temporal_period", "real_ft",
                                                 "sim_ft", "ft_error", "real_slo", "sim_slo", "slo_error"])
    ft_error, slo_error = out.get("validation_max_ft_error"), out.get("validation_max_slo_error")
    out["projections_valid"] = (ft_error is not None and slo_error is not None and len(
        out["validation"]["checked"]) >= 2 and ft_error <= MAX_FT_ERROR and slo_error <= MAX_SLO_ERROR)
    if args.command in ("project", "all"):
        rates = [float(r) for r in args.rates.split(",")]
        periods = [int(p) for p in args.temporal_periods.split(",")]
        out["projections"] = [project(d, [r * d.gpus for r in rates], args.duration, periods) for d in DEPLOYMENTS]
        headline = out["projections"][0]
        out.update({k: headline[k] for k in ("sim_ft_ratio_vs_separate", "sim_ft_ratio_vs_best_temporal",
                                              "sim_ft_peak_ratio", "sim_min_slo_attainment")})
        out["headline_deployment"] = headline["deployment"]
        plot(out["projections"])
    if args.command in ("fleet", "all"):
        out["fleet"] = fleet(DEPLOYMENTS[0], args.fleet_rate, [8, 16, 32, 64, 128, 256], args.fleet_jobs,
                             args.duration)
        print_table(out["fleet"]["rows"], list(out["fleet"]["rows"][0]))
        print(f"SIMULATION fleet bottleneck: {out['fleet']['bottleneck']}")
    print(json.dumps({k: v for k, v in out.items() if k not in ("validation", "projections", "fleet")}, indent=2))
    print(f"wrote {write_json('simulation', out)}")


if __name__ == "__main__":
    main()
