"""The hybrid token scheduler's decisions: how many tokens inference and fine-tuning get per iteration.

``coserve`` (FlexLLM): decodes always run; prefill chunks fill what the iteration's time target leaves
(or more, when a waiting request would otherwise miss its TTFT); fine-tuning gets exactly the time
that is left, priced by the latency model. TPOT is an average over a request's tokens, so the target
is the least slack of the running requests (time left before one falls behind its TPOT pace), with a
margin, at most ``max_target_tpots`` TPOTs: requests ahead of pace lend fine-tuning longer iterations.
The pace is ``pace`` of the SLOs, not all of them, and it tightens whenever a finished request came
near an SLO (``observe_request``): lending spends slack to the pace, so requests end near it, and the
rest of the SLO absorbs what the latency model did not foresee.
Baselines: ``temporal`` (every ``temporal_period``-th iteration is fine-tune-only, as long as an
inference iteration may last; all of it when no request waits), ``inference-only``, ``finetune-only``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from flexllm.worker.coserve.latency import IterationShape, LatencyModel
from flexllm.worker.engine.demand import InferenceDemand
from flexllm.worker.options import POLICIES, SLO


@dataclass(frozen=True)
class MachineSpeed:
    """A lone request's latency on this machine, measured at start (``measure_speed``)."""

    prefill_s: float  # a lone prefill of ``prefill_tokens`` tokens
    decode_s: float  # a lone decode step
    prefill_tokens: int

    def slo(self) -> SLO:
        """SLOs this machine can keep: TTFT 10x a lone prefill (at least 1 s), TPOT 3x a lone decode step."""
        return SLO(ttft_s=max(1.0, 10 * self.prefill_s), tpot_s=3 * self.decode_s)

    def request_s(self, output_tokens: int) -> float:
        """How long one request with ``output_tokens`` tokens takes alone."""
        return self.prefill_s + output_tokens * self.decode_s


def measure_speed(engine) -> MachineSpeed:
    """Time a lone prefill (128 tokens, or half the context if shorter) and a lone decode step of an
    ``LLMEngine`` (after a warm-up)."""
    from flexllm.worker.engine.sampling import SamplingParams

    token = min(101, len(engine.tokenizer) - 1)  # each prompt its own token: no prefix-cache hits
    n = min(128, engine.max_model_len // 2)
    engine.generate([[token - 1] * 16], SamplingParams(max_tokens=4))
    began = time.perf_counter()
    engine.generate([[token] * n], SamplingParams(max_tokens=1))
    prefill = time.perf_counter() - began
    began = time.perf_counter()
    engine.generate([[token - 2] * 8], SamplingParams(max_tokens=33, ignore_eos=True))
    return MachineSpeed(prefill, (time.perf_counter() - began) / 33, n)


class HybridScheduler:
    """``margin``: the share of a TPOT an iteration on pace may take. ``slack_margin``: the share of a
    request's slack an iteration may spend, at most ``max_target_tpots`` TPOTs. A request's TPOT is the
    mean over its tokens, so spending its slack to the last 15 % (as before) ended requests right at
    their SLO whenever the latency model under-predicted: in simulation on this machine's measured cost
    model (benchmarks/simulate.py) that missed 1 request in 6-10 at light load; keeping a quarter of the
    slack met every SLO at the same rates with as much fine-tuning. (Lending at most one TPOT per
    iteration did as well here, but cut fine-tuning 10x in the GPU projection, where a unit's own pass
    costs a large share of a TPOT: long iterations are how fine-tuning gets done there.)

    ``pace``: the share of the SLOs that requests are paced to (``pacing_slo``); each finished request
    that came within ``near_miss`` of an SLO takes ``pace_step`` off it (down to ``min_pace``), each
    other one gives back a tenth of a step (up to the initial ``pace``). Spending slack to the very
    SLO ended requests at 0.96-0.98x of their TPOT on this machine whenever fine-tuning was hungry, and
    9 in 40 past it at the serial rate on a slower day, while inference alone kept 0.81x.

    ``idle_horizon_s``: the time constant of ``idle_share``, the share of recent time inference did not
    need (``observe_iteration``), which prices what lending to a busy iteration costs later."""

    def __init__(self, slo: SLO, latency: LatencyModel, max_tokens_per_batch: int, max_finetune_tokens: int,
                 policy: str = "coserve", temporal_period: int = 4, margin: float = 0.85,
                 max_target_tpots: float = 4.0, slack_margin: float = 0.75, pace: float = 0.9,
                 min_pace: float = 0.5, pace_step: float = 0.1, near_miss: float = 0.95,
                 idle_horizon_s: float = 30.0):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
        self.slo, self.latency, self.policy = slo, latency, policy
        self.max_tokens_per_batch, self.max_finetune_tokens = max_tokens_per_batch, max_finetune_tokens
        self.temporal_period, self.margin, self.max_target_tpots = temporal_period, margin, max_target_tpots
        self.slack_margin = slack_margin
        self.pace = self.max_pace = pace
        self.min_pace, self.pace_step, self.near_miss = min_pace, pace_step, near_miss
        self.idle_share, self.idle_horizon_s = 0.5, idle_horizon_s  # of recent time inference did not need
        self.iteration = 0
        self.current_target_s = self.target_s

    @property
    def target_s(self) -> float:
        """Iteration time that keeps a request on its TPOT pace when it has no slack saved up."""
        return self.slo.tpot_s * self.margin

    @property
    def pacing_slo(self) -> SLO:
        """The SLOs requests are paced to (their slack in ``InferenceDemand`` is measured against these)."""
        return SLO(ttft_s=self.slo.ttft_s * self.pace, tpot_s=self.slo.tpot_s * self.pace)

    def observe_request(self, ttft_s: float, tpot_s: float | None) -> None:
        """A request finished with these latencies: tighten the pace after a near miss, else relax it."""
        worst = max(ttft_s / self.slo.ttft_s, (tpot_s or 0.0) / self.slo.tpot_s)
        if worst >= self.near_miss:
            self.pace = max(self.min_pace, self.pace - self.pace_step)
        else:
            self.pace = min(self.max_pace, self.pace + self.pace_step / 10)

    def iteration_target(self, demand: InferenceDemand) -> float:
        """This iteration's time target: the least slack of the running requests (and of the waiting
        ones' TTFT), ``slack_margin`` of it, at most ``max_target_tpots`` TPOTs."""
        if demand.decodes == 0:
            return self.target_s
        slack = min(demand.min_tpot_slack_s, demand.min_ttft_slack_s)
        return min(slack * self.slack_margin, self.max_target_tpots * self.slo.tpot_s)

    def inference_budget(self, demand: InferenceDemand, has_finetune: bool) -> int:
        """Tokens for decodes + prefill chunks this iteration (call once per iteration). Every policy
        chunks prefills to what keeps the running requests on their TPOT pace (and the waiting ones
        on their TTFT): the baselines differ from co-serving only in how fine-tuning gets its turn. A
        full chunk beside running decodes costs ~10x a decode step where prefill is compute-bound
        (a CPU): inference alone at the full budget missed the SLOs of 1 request in 3 at 0.75x the serial rate."""
        self.iteration += 1
        full = self.max_tokens_per_batch
        if self.policy == "finetune-only" or (self.policy == "temporal" and has_finetune and self._finetune_turn()):
            return 0
        if demand.idle:
            return full
        self.current_target_s = self.iteration_target(demand)
        base = IterationShape(inference_tokens=demand.decodes, decode_context_tokens=demand.decode_context_tokens)
        room = self.latency.max_extra_tokens(base, self.current_target_s, "inference_tokens",
                                             full - demand.decodes)
        # TTFT outranks one TPOT: at least the prefill per iteration that still meets the nearest deadline
        prefill = min(demand.prefill_tokens, full - demand.decodes, max(room, self._prefill_for_ttft(demand)))
        return min(full, demand.decodes + max(prefill, 0)) if demand.decodes else max(prefill, 1)

    def _finetune_turn(self) -> bool:
        return self.iteration % self.temporal_period == 0

    def _prefill_for_ttft(self, demand: InferenceDemand) -> int:
        """Prefill tokens per iteration that finish all waiting prompts by the nearest TTFT deadline."""
        if demand.prefill_tokens == 0 or math.isinf(demand.min_ttft_slack_s):
            return 0
        iterations_left = int(demand.min_ttft_slack_s / max(self.current_target_s, 1e-6))
        if iterations_left < 1:
            return demand.prefill_tokens
        return -(-demand.prefill_tokens // iterations_left)

    def finetune_budget(self, scheduled: IterationShape, kind: str, idle: bool) -> int:
        """Fine-tuning tokens of ``kind`` (a latency FEATURES name) left after the scheduled inference."""
        cap = self.max_finetune_tokens
        if self.policy == "inference-only":
            return 0
        if self.policy == "finetune-only" or idle:
            return cap if scheduled.inference_tokens == 0 else 0
        target = self.current_target_s
        if self.policy == "temporal":  # a fine-tuning turn lasts what one inference iteration may
            if scheduled.inference_tokens:
                return 0
            target = self.target_s
        # a unit's own pass (a backward's backpropagation, or any unit with no inference forward to
        # ride) has a fixed cost; so has a forward chunk fused into the inference forward, a smaller one
        own_pass = kind == "finetune_backward_tokens" or scheduled.inference_tokens == 0
        unit_s = self.latency.seconds_per("finetune_units" if own_pass else "finetune_riders")
        tokens = self.latency.max_extra_tokens(scheduled, target, kind, cap, fixed_s=unit_s)
        if scheduled.inference_tokens and not self._trains_as_fast_as_alone(tokens, kind, unit_s):
            return 0
        return tokens

    def observe_iteration(self, seconds: float, inference: IterationShape) -> None:
        """An iteration with ``inference`` work took ``seconds``. Inference's share of the time is what its
        work alone would have taken (the latency model's price) over the time that passed: lending makes
        iterations longer, not inference's work larger, so the share does not fall as lending grows."""
        if seconds <= 0:
            return
        needed = self.latency.predict(inference) if inference.inference_tokens else 0.0
        keep = math.exp(-seconds / self.idle_horizon_s)
        self.idle_share = keep * self.idle_share + (1 - keep) * max(0.0, 1.0 - needed / seconds)

    def _trains_as_fast_as_alone(self, tokens: int, kind: str, unit_s: float) -> bool:
        """Whether ``tokens`` of ``kind`` lent to a busy iteration (at ``unit_s`` fixed cost) train at least
        ``idle_share`` of what a full unit trains per second in an iteration of its own. Time lent to a
        busy iteration delays inference by as much, and so comes off the idle time later (as much of it as
        there is), where fine-tuning runs full units: lending below that rate trains less in all. On 2 CPU
        cores a backward unit of a few tokens next to a decode costs a whole pass of its own; on a GPU's
        memory-bound decode riders cost little, and near saturation there is no idle time to lose."""
        per_token = self.latency.seconds_per(kind)
        full = self.max_finetune_tokens
        alone_s = self.latency.seconds_per("intercept") + self.latency.seconds_per("finetune_units") + full * per_token
        return tokens * alone_s >= self.idle_share * full * (unit_s + tokens * per_token)


class WeightedShare:
    """Splits fine-tuning budgets across jobs by weight (deficit round robin).

    Every job earns credit in proportion to its weight; the jobs with credit left share each budget
    (the least indebted one takes it, should none have any) and ``charge`` takes off what a job
    really spent, so a unit that overshoots a small share is paid back later and the long-run split
    follows the weights.
    """

    def __init__(self) -> None:
        self.credit: dict[str, float] = {}

    def split(self, budget: int, weights: dict[str, float]) -> dict[str, int]:
        if budget <= 0 or sum(weights.values()) <= 0:
            return {job: 0 for job in weights}
        self.credit = {job: self.credit.get(job, 0.0) for job in weights}
        total = sum(weights.values())
        for job, weight in weights.items():
            self.credit[job] += budget * weight / total
        eligible = {job: w for job, w in weights.items() if self.credit[job] > 0}
        if not eligible:  # all in debt (units overshooting their shares): the least indebted goes
            job = max(weights, key=lambda j: self.credit[j] / weights[j])
            eligible = {job: weights[job]}
        part = sum(eligible.values())
        exact = {job: budget * w / part for job, w in eligible.items()}
        shares = {job: int(exact.get(job, 0)) for job in weights}
        leftover = budget - sum(shares.values())
        for job in sorted(exact, key=lambda j: exact[j] - shares[j], reverse=True)[:leftover]:
            shares[job] += 1
        return shares

    def charge(self, job: str, tokens: int) -> None:
        """``job`` spent ``tokens`` of fine-tuning budget."""
        if job in self.credit:
            self.credit[job] -= tokens
