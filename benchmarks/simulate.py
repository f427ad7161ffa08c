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

from dataclasses import dataclass

from costmodel import Work
from replay import replay
from traces import Arrival

from flexllm.worker.coserve.engine import CoServingEngine
from flexllm.worker.coserve.latency import LatencyModel
from flexllm.worker.coserve.policy import SLO
from flexllm.worker.engine.block_manager import BlockManager
from flexllm.worker.engine.outputs import RequestOutput
from flexllm.worker.engine.sampling import SamplingParams
from flexllm.worker.engine.scheduler import ScheduledBatch, Scheduler
from flexllm.worker.engine.sequence import Sequence
from flexllm.worker.finetune.runner import WorkDone

MIN_ITERATION_S = 1e-5  # an iteration that schedules nothing still moves time on


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

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams, lora: str | None = None,
                    arrival_time: float | None = None) -> None:
        seq = Sequence(request_id, list(prompt), params, lora_name=lora)
        seq.arrival_time = self.clock.now() if arrival_time is None else arrival_time
        self.scheduler.add(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

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
        forward = unit.kind == "forward"
        self.clock.advance(self.cost.seconds(Work((), unit.cost if forward else 0, 0 if forward else unit.cost,
                                                  1, 0 if forward else 1)))

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
            done += [o for o in self.execute(self.scheduler.schedule()) if o.finished]
        return done


class SimJob:
    """A FinetuneJob's work units by token cost: each micro-batch of ``batch_tokens`` tokens goes
    forward in units of at most the budget, then backward; a token counts as trained once its
    backward is done (as ``FinetuneRunner`` counts ``Unit.trained``)."""

    def __init__(self, engine: SimEngine, batch_tokens: int = 256):
        self.engine, self.batch_tokens = engine, batch_tokens
        self.forward_left, self.backward_left = batch_tokens, batch_tokens
        self.done = False

    @property
    def next_work_is_backward(self) -> bool:
        return self.forward_left == 0

    def plan_work(self, token_budget: int) -> SimUnit:
        if self.forward_left:
            return SimUnit("forward", min(token_budget, self.forward_left), 0.0)
        cost = min(token_budget, self.backward_left)
        return SimUnit("backward", cost, float(cost))

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
             latency: LatencyModel | None = None) -> dict:
    """One system on one trace in simulated time (the real ``replay`` loop); SIMULATION."""
    clock = SimClock()
    engine = SimEngine(cost, clock, config)
    co = CoServingEngine(engine, slo, policy, max_finetune_tokens, temporal_period, latency, clock=clock.now)
    if latency is None:
        co.profile()
    for j in range(jobs if policy != "inference-only" else 0):
        co.add_job(f"job{j}", SimJob(engine, batch_tokens))
    return {**replay(co, trace, duration_s, lambda i, a: [0] * a.prompt_tokens, clock.idle_until),
            "simulated": True}
