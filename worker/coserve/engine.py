"""The co-serving loop: each iteration runs the inference tokens the hybrid scheduler admits and
gives the time that is left to fine-tuning work units of every job, shared by weight.

An iteration is one fused forward on the shared model: the scheduled decode tokens and prefill
chunks plus one work unit per job (a forward chunk, or a backward unit's recomputation), every
frozen projection one GEMM over all their rows (``engine.fused``); then the backward units
backpropagate. All of it fits one latency budget; its measured time refits the latency model.
With no inference batch the jobs' units run alone until their share is spent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from flexllm.worker.coserve.latency import IterationShape, LatencyModel
from flexllm.worker.coserve.policy import SLO, HybridScheduler, WeightedShare
from flexllm.worker.engine.demand import InferenceDemand
from flexllm.worker.engine.llm_engine import LLMEngine, RidersFailed
from flexllm.worker.engine.outputs import RequestOutput
from flexllm.worker.engine.sampling import SamplingParams
from flexllm.worker.engine.scheduler import ScheduledBatch
from flexllm.worker.finetune.runner import FinetuneRunner, WorkDone
from flexllm.worker.finetune.work import Unit

log = logging.getLogger(__name__)
PROFILE_PROMPT_TOKENS = (8, 32, 96, 192)


@dataclass
class Job:
    runner: FinetuneRunner
    weight: float = 1.0


@dataclass
class JobWork:
    """Fine-tuning work one job did in one iteration."""

    forward_tokens: int = 0
    backward_tokens: int = 0
    trained_tokens: float = 0.0  # training progress in tokens (fine-tuning throughput counts these)
    units: int = 0
    steps_finished: int = 0
    loss: float | None = None
    version: int | None = None

    @property
    def tokens(self) -> int:
        return self.forward_tokens + self.backward_tokens

    def add(self, work: WorkDone, own_pass: bool = True) -> None:
        """``own_pass``: the unit cost a pass of its own (a forward chunk fused into the inference
        forward does not; a backward unit's backpropagation always does)."""
        self.units += own_pass
        self.trained_tokens += work.trained_tokens
        if work.kind == "forward":
            self.forward_tokens += work.tokens
        else:
            self.backward_tokens += work.tokens
        if work.step_finished:
            self.steps_finished += 1
            self.loss = work.loss
        if work.version is not None:
            self.version = work.version


@dataclass
class FinetunePlan:
    """The fine-tuning part of one iteration, planned once its inference batch is scheduled."""

    shape: IterationShape = field(default_factory=IterationShape)  # the scheduled inference
    alone: bool = True  # no inference rows: the units run on their own
    budget: int = 0  # fine-tuning tokens the inference leaves time for
    shares: dict[str, int] = field(default_factory=dict)  # job -> its share of ``budget``
    units: dict[str, Unit] = field(default_factory=dict)  # job -> its unit riding the forward


@dataclass
class IterationResult:
    outputs: list[RequestOutput]
    finetune: dict[str, JobWork]
    shape: IterationShape
    seconds: float
    finetune_budget: int


@dataclass
class SLOTracker:
    """Per-request SLO outcome: both TTFT and TPOT must hold."""

    slo: SLO
    met: int = 0
    missed: int = 0
    ttft_missed: int = 0  # requests whose TTFT missed (their TPOT may have too)
    tpot_missed: int = 0
    ttfts: list[float] = field(default_factory=list)
    tpots: list[float] = field(default_factory=list)

    def record(self, out: RequestOutput, finished_at: float) -> tuple[float, float | None]:
        """Count a finished request; returns its TTFT and TPOT (None for a one-token output)."""
        ttft = (out.first_token_time or finished_at) - out.arrival_time
        tpot = (finished_at - out.first_token_time) / (len(out.token_ids) - 1) if len(out.token_ids) > 1 else None
        self.ttfts.append(ttft)
        if tpot is not None:
            self.tpots.append(tpot)
        ok = self.slo.met(ttft, tpot)
        self.met += ok
        self.missed += not ok
        self.ttft_missed += not self.slo.met(ttft, None)
        self.tpot_missed += not self.slo.met(0.0, tpot)
        return ttft, tpot

    @property
    def attainment(self) -> float:
        total = self.met + self.missed
        return self.met / total if total else 1.0


class CoServingEngine:
    """``clock`` (seconds, ``time.monotonic``'s epoch for real engines) times iterations and SLOs; the
    simulator (benchmarks/simulate.py) passes its own."""

    def __init__(self, engine: LLMEngine, slo: SLO, policy: str = "coserve", max_finetune_tokens: int = 256,
                 temporal_period: int = 4, latency: LatencyModel | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.engine, self.slo, self.clock = engine, slo, clock
        self.latency = latency or LatencyModel()
        self.scheduler = HybridScheduler(slo, self.latency, engine.config.max_tokens_per_batch,
                                         max_finetune_tokens, policy, temporal_period)
        self.jobs: dict[str, Job] = {}
        self.share = WeightedShare()
        self.slo_tracker = SLOTracker(slo)
        self.failed: dict[str, str] = {}  # jobs whose work raised, taken out of the loop: name -> error

    # -- jobs ------------------------------------------------------------------------------
    def add_job(self, name: str, runner: FinetuneRunner, weight: float = 1.0) -> None:
        if weight <= 0:
            raise ValueError("job weight must be > 0")
        self.jobs[name] = Job(runner, weight)

    def remove_job(self, name: str) -> FinetuneRunner | None:
        job = self.jobs.pop(name, None)
        return job.runner if job else None

    def active_jobs(self) -> dict[str, Job]:
        return {name: job for name, job in self.jobs.items() if not job.runner.done}

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests() or bool(self.active_jobs())

    # -- the loop --------------------------------------------------------------------------
    def profile(self) -> None:
        """Fit a first latency model from inference forwards of a few sizes (fine-tuning is primed as
        1x / 2x an inference token forward / backward plus one forward's fixed cost per work unit, and
        refitted once fine-tuning runs)."""
        params = SamplingParams(max_tokens=1)
        vocab = self.engine.vocab_size
        for sample, n in enumerate(_profile_lengths(self.engine) * 2):
            began = self.clock()  # (each prompt starts on its own token: a prefix-cache hit would time nothing)
            self.engine.generate([[(100 + sample + i) % vocab for i in range(n)]], params)
            self.latency.samples.append((IterationShape(inference_tokens=n).vector(), self.clock() - began))
        self.latency.fit()
        per_token, per_pass = self.latency.coef[1], self.latency.coef[0]
        self.latency.coef[3:6] = [per_token, 2 * per_token, per_pass]
        log.info("latency model: %s", self.latency.coef)

    def step(self) -> IterationResult:
        began = self.clock()
        demand = self.engine.demand(began, self.scheduler.pacing_slo)
        active = self.active_jobs()
        budget = self.scheduler.inference_budget(demand, has_finetune=bool(active))
        plan = FinetunePlan()
        try:
            outputs = self.engine.step(budget, partial(self._plan_riders, plan, demand, active))
        except RidersFailed as failure:  # fine-tuning work broke the fused forward: its jobs fail
            log.error("fused iteration failed; failing jobs %s", sorted(plan.units), exc_info=failure.error)
            for name in plan.units:
                self._fail(name, failure.error)
            plan.units.clear()
            outputs = failure.outputs
        finetune = {name: self._finish(name, active[name].runner, unit, plan.shares[name], plan.alone)
                    for name, unit in plan.units.items()}
        fwd = sum(w.forward_tokens for w in finetune.values())
        bwd = sum(w.backward_tokens for w in finetune.values())
        units_run = sum(w.units for w in finetune.values())
        shape = IterationShape(plan.shape.inference_tokens, plan.shape.decode_context_tokens, fwd, bwd, units_run)
        now = self.clock()
        seconds = now - began
        if shape != IterationShape():
            self.latency.observe(shape, seconds)
            self.scheduler.observe_iteration(seconds, plan.shape)
        for out in outputs:
            if out.finished:
                self.scheduler.observe_request(*self.slo_tracker.record(out, now))
        return IterationResult(outputs, finetune, shape, seconds, plan.budget)

    def _plan_riders(self, plan: FinetunePlan, demand: InferenceDemand, active: dict[str, Job],
                     batch: ScheduledBatch) -> list[Unit]:
        """Once the inference batch is scheduled: the fine-tuning budget its time leaves, each job's share
        of it, and each job's unit for that share (recorded in ``plan``)."""
        plan.shape = _inference_shape(batch)
        plan.alone = not batch.seqs
        if active:
            kind = "finetune_backward_tokens" if _next_is_backward(active) else "finetune_forward_tokens"
            plan.budget = self.scheduler.finetune_budget(plan.shape, kind, idle=demand.idle)
            plan.shares = self.share.split(plan.budget, {name: job.weight for name, job in active.items()})
        for name, tokens in plan.shares.items():
            unit = self._guarded(name, active[name].runner.plan_work, tokens) if tokens > 0 else None
            if unit is not None:
                plan.units[name] = unit
        return list(plan.units.values())

    def _finish(self, name: str, runner: FinetuneRunner, unit: Unit, share: int, alone: bool) -> JobWork:
        """Backpropagate a job's unit once the forward ran; with no inference batch (``alone``), more
        units on their own until its share is spent. Charges the job what it spent."""
        work = JobWork()
        done = self._guarded(name, runner.finish_work, unit)
        if done is not None:
            work.add(done, own_pass=alone or done.kind == "backward")
            if alone:
                self._guarded(name, _spend, runner, share - done.tokens, work)
        self.share.charge(name, work.tokens)
        return work

    def _guarded(self, name: str, fn, *args):
        """Run one job's work; a failure (e.g. its data) fails that job only, never the loop."""
        try:
            return fn(*args)
        except Exception as error:
            log.exception("fine-tuning job %s failed", name)
            self._fail(name, error)
            return None

    def _fail(self, name: str, error: Exception) -> None:
        self.failed[name] = f"{type(error).__name__}: {error}"
        self.jobs.pop(name, None)


def _profile_lengths(engine: LLMEngine) -> tuple[int, ...]:
    """PROFILE_PROMPT_TOKENS, capped so that a prompt and its one new token fit the model's context
    and the KV cache."""
    capacity = engine.block_manager.num_blocks * engine.block_manager.block_size
    longest = max(1, min(engine.max_model_len, capacity) - 1)
    return tuple(sorted({min(n, longest) for n in PROFILE_PROMPT_TOKENS}))


def _spend(runner: FinetuneRunner, tokens: int, done: JobWork) -> None:
    """Run work units of one job on their own until ``tokens`` are used up."""
    while tokens > 0 and not runner.done:
        work = runner.run_work(tokens)
        if work.tokens == 0:
            break
        done.add(work)
        tokens -= work.tokens


def _inference_shape(batch: ScheduledBatch) -> IterationShape:
    ctx = sum(s.num_computed_tokens + n for s, n in zip(batch.seqs, batch.num_new_tokens) if n == 1)
    return IterationShape(inference_tokens=batch.num_tokens, decode_context_tokens=ctx)


def _next_is_backward(jobs: dict[str, Job]) -> bool:
    return any(job.runner.next_work_is_backward for job in jobs.values())
