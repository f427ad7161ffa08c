"""The hybrid token scheduler's decisions, on a latency model with known coefficients."""

import random

import pytest

from flexllm.worker.coserve.latency import IterationShape, LatencyModel
from flexllm.worker.coserve.policy import SLO, HybridScheduler, WeightedShare
from flexllm.worker.engine.demand import InferenceDemand, inference_demand
from flexllm.worker.engine.sampling import SamplingParams
from flexllm.worker.engine.sequence import Sequence

SLO_50MS = SLO(ttft_s=2.0, tpot_s=0.050)


def latency(c0=0.010, c_tok=0.0001, c_ctx=0.0, c_fwd=0.0001, c_bwd=0.0002, c_unit=0.0, c_rider=0.0) -> LatencyModel:
    model = LatencyModel()
    model.coef = [c0, c_tok, c_ctx, c_fwd, c_bwd, c_unit, c_rider]
    return model


def scheduler(model=None, policy="coserve", max_finetune_tokens=512, **kw) -> HybridScheduler:
    return HybridScheduler(SLO_50MS, model or latency(), max_tokens_per_batch=256,
                           max_finetune_tokens=max_finetune_tokens, policy=policy, **kw)


def test_budgets_never_exceed_limits_and_decodes_are_never_starved():
    rng = random.Random(0)
    sched = scheduler()
    for _ in range(500):
        demand = InferenceDemand(decodes=rng.randint(0, 300), decode_context_tokens=rng.randint(0, 10_000),
                                 prefill_tokens=rng.randint(0, 2000), min_ttft_slack_s=rng.uniform(-1, 3))
        budget = sched.inference_budget(demand, has_finetune=True)
        assert 0 < budget <= 256 if not demand.idle else budget == 256
        assert budget >= min(demand.decodes, 256), "decodes starved"
        shape = IterationShape(inference_tokens=min(budget, demand.decodes + demand.prefill_tokens))
        ft = sched.finetune_budget(shape, "finetune_forward_tokens", idle=demand.idle)
        assert 0 <= ft <= 512


def test_finetuning_gets_exactly_the_leftover_time():
    model = latency()
    sched = scheduler(model)
    shape = IterationShape(inference_tokens=40)
    target = SLO_50MS.tpot_s * sched.margin
    expected = int((target - model.predict(shape)) / model.coef[3])
    assert sched.finetune_budget(shape, "finetune_forward_tokens", idle=False) == expected
    # a backward token costs twice as much: half the tokens fit
    assert sched.finetune_budget(shape, "finetune_backward_tokens", idle=False) == int(
        (target - model.predict(shape)) / model.coef[4])


def test_a_units_fixed_cost_comes_off_the_leftover_a_fused_forward_chunk_pays_the_riders():
    shape = IterationShape(inference_tokens=40)
    kind = "finetune_backward_tokens"
    free = scheduler(latency()).finetune_budget(shape, kind, idle=False)
    model = latency(c_unit=0.020)
    priced = scheduler(model, max_finetune_tokens=48).finetune_budget(shape, kind, idle=False)
    assert priced == int((SLO_50MS.tpot_s * 0.85 - model.predict(shape) - 0.020) / model.coef[4]) < free
    assert scheduler(latency(c_unit=0.040)).finetune_budget(shape, kind, idle=False) == 0
    forward = scheduler(latency(c_unit=0.040)).finetune_budget(shape, "finetune_forward_tokens", idle=False)
    assert forward == scheduler(latency()).finetune_budget(shape, "finetune_forward_tokens", idle=False) > 0
    rider = latency(c_unit=0.040, c_rider=0.010)
    fused = scheduler(rider).finetune_budget(shape, "finetune_forward_tokens", idle=False)
    assert fused == int((SLO_50MS.tpot_s * 0.85 - rider.predict(shape) - 0.010) / rider.coef[3]) < forward
    # the rider's cost is learnt from iterations where a forward chunk rode along (and only those)
    assert IterationShape(40, 0, 16).finetune_riders == 1
    assert IterationShape(40, 0, 16, 0, 1).finetune_riders == IterationShape(0, 0, 16, 0, 1).finetune_riders == 0


def test_a_busy_iteration_gets_only_fine_tuning_that_trains_as_fast_as_a_full_unit_alone():
    """Lent time comes off the idle time later, where a unit runs full size: a few backward tokens that
    pay a whole pass of their own are not worth lending; a full unit is, once a request's slack pays for it."""
    model = latency(c_unit=0.020)  # a backward unit's own pass: 20 ms
    sched = scheduler(model)
    shape = IterationShape(inference_tokens=40)
    # 42 tokens fit the on-pace target (42 in 28.4 ms), a full unit alone trains 512 in 132 ms: none lent
    assert sched.finetune_budget(shape, "finetune_backward_tokens", idle=False) == 0
    assert scheduler(model, max_finetune_tokens=48).finetune_budget(shape, "finetune_backward_tokens",
                                                                   idle=False) == 42  # smaller units: worth it
    saved = InferenceDemand(decodes=40, min_tpot_slack_s=1.0)  # a target of 4 TPOTs: a full unit fits
    sched.inference_budget(saved, has_finetune=True)
    assert sched.finetune_budget(shape, "finetune_backward_tokens", idle=False) == 512
    assert sched.finetune_budget(IterationShape(), "finetune_backward_tokens", idle=True) == 512
    # near saturation there is no idle time for lending to take from: the few tokens are worth it
    sched = scheduler(model)
    busy = IterationShape(inference_tokens=1000)  # 110 ms of inference
    for _ in range(2000):  # a few minutes where inference needed every moment: none of it idle
        sched.observe_iteration(model.predict(busy), busy)
    assert sched.idle_share < 0.01
    assert sched.finetune_budget(shape, "finetune_backward_tokens", idle=False) == 42
    for _ in range(2000):  # the same inference work in iterations lengthened 4x by lending: 3/4 idle
        sched.observe_iteration(4 * model.predict(busy), busy)
    assert sched.idle_share == pytest.approx(0.75, abs=0.01)
    sched.observe_iteration(60.0, IterationShape())  # fine-tuning alone for a minute: idle
    assert sched.idle_share > 0.95


def test_budget_shrinks_when_the_latency_model_says_tpot_would_be_missed():
    demand = InferenceDemand(decodes=10, prefill_tokens=1000, min_ttft_slack_s=100.0,
                             min_tpot_slack_s=SLO_50MS.tpot_s)  # on pace: no slack saved up
    cheap = scheduler(latency(c_tok=0.0001)).inference_budget(demand, has_finetune=True)
    costly = scheduler(latency(c_tok=0.0004)).inference_budget(demand, has_finetune=True)
    assert cheap > costly >= 10
    assert latency(c_tok=0.0004).predict(IterationShape(inference_tokens=costly)) <= SLO_50MS.tpot_s


def test_ttft_at_risk_outranks_one_tpot_by_just_enough():
    sched = scheduler(latency(c_tok=0.0004))
    # slack for 42.5 ms iterations
    on_pace = dict(decodes=10, prefill_tokens=400, min_tpot_slack_s=0.0425 / sched.slack_margin)
    # relaxed: the prefill that fits the iteration, (42.5 - 10 - 10 * 0.4) / 0.4 = 71 tokens
    assert sched.inference_budget(InferenceDemand(**on_pace, min_ttft_slack_s=100.0), has_finetune=True) == 10 + 71
    # 4 iterations left to the deadline: a quarter of the prompts per iteration
    demand = InferenceDemand(**on_pace, min_ttft_slack_s=4.5 * 0.0425)
    assert sched.inference_budget(demand, has_finetune=True) == 10 + 100
    # the deadline is this iteration: all of it, up to the batch limit
    demand = InferenceDemand(**on_pace, min_ttft_slack_s=0.01)
    assert sched.inference_budget(demand, has_finetune=True) == 256


def test_the_pace_tightens_after_a_near_miss_and_relaxes_slowly():
    sched = scheduler()
    assert sched.pacing_slo == SLO(ttft_s=2.0 * 0.9, tpot_s=0.050 * 0.9)
    sched.observe_request(ttft_s=0.1, tpot_s=0.049)  # 0.98x of the TPOT: a near miss
    assert sched.pace == pytest.approx(0.8)
    sched.observe_request(ttft_s=1.95, tpot_s=None)  # a one-token output near its TTFT counts too
    assert sched.pace == pytest.approx(0.7)
    for _ in range(10):
        sched.observe_request(ttft_s=0.1, tpot_s=0.2)  # missed outright
    assert sched.pace == pytest.approx(0.5)  # never below min_pace
    sched.observe_request(ttft_s=0.1, tpot_s=0.040)  # 0.8x: well within, a tenth of a step back
    assert sched.pace == pytest.approx(0.51)
    for _ in range(100):
        sched.observe_request(ttft_s=0.1, tpot_s=0.040)
    assert sched.pace == pytest.approx(0.9)  # never past where it started


def test_a_tighter_pace_lends_fine_tuning_less_of_a_requests_slack():
    """Slack is measured against the pacing SLO: after near misses the same request lends less."""
    seq = Sequence("r", [1] * 9, SamplingParams(max_tokens=50), num_prompt_tokens=5, num_computed_tokens=8,
                   arrival_time=0.0)
    seq.first_token_time = 1.0  # 4 tokens out by t=1.05: 0.15 s ahead of the SLO's pace (1 + 4 * 0.05)
    shape = IterationShape(inference_tokens=1, decode_context_tokens=9)
    budgets = []
    for near_misses in (0, 2):
        sched = scheduler(latency(c_fwd=0.001))
        for _ in range(near_misses):
            sched.observe_request(ttft_s=0.1, tpot_s=0.05)
        sched.inference_budget(inference_demand([seq], 1.05, sched.pacing_slo), has_finetune=True)
        budgets.append(sched.finetune_budget(shape, "finetune_forward_tokens", idle=False))
    assert budgets[0] > budgets[1] > 0


def test_finetuning_falls_to_zero_under_a_spike_and_takes_everything_when_idle():
    sched = scheduler(latency(c_ctx=1e-6))
    spike = IterationShape(inference_tokens=256, decode_context_tokens=50_000)  # predicted 86 ms > 42.5 ms
    assert sched.finetune_budget(spike, "finetune_forward_tokens", idle=False) == 0
    assert sched.finetune_budget(IterationShape(), "finetune_forward_tokens", idle=True) == 512


def test_baseline_policies():
    """The baselines differ from co-serving only in how fine-tuning gets its turn: inference alone, and
    temporal sharing's inference turns, chunk prefills to the same SLO-aware budget (a full 256-token
    chunk next to running decodes misses their TPOT where prefill is compute-bound)."""
    busy = InferenceDemand(decodes=4, prefill_tokens=100, min_tpot_slack_s=0.02)
    paced = scheduler().inference_budget(busy, True)
    assert 4 < paced < 104
    only_inf = scheduler(policy="inference-only")
    assert only_inf.inference_budget(busy, True) == paced
    assert only_inf.inference_budget(InferenceDemand(prefill_tokens=300), True) == 256  # no decodes to keep
    assert only_inf.finetune_budget(IterationShape(inference_tokens=104), "finetune_forward_tokens", False) == 0
    only_ft = scheduler(policy="finetune-only")
    assert only_ft.inference_budget(busy, True) == 0
    assert only_ft.finetune_budget(IterationShape(), "finetune_forward_tokens", False) == 512
    temporal = scheduler(policy="temporal", temporal_period=3)
    budgets = [temporal.inference_budget(busy, True) for _ in range(6)]
    assert budgets == [paced, paced, 0, paced, paced, 0]
    turn = temporal.finetune_budget(IterationShape(), "finetune_forward_tokens", False)
    assert turn == int((SLO_50MS.tpot_s * 0.85 - 0.010) / 0.0001)  # a turn lasts one iteration's target
    assert temporal.finetune_budget(IterationShape(inference_tokens=104), "finetune_forward_tokens", False) == 0
    assert temporal.finetune_budget(IterationShape(), "finetune_forward_tokens", True) == 512  # idle: all
    with pytest.raises(ValueError, match="unknown policy"):
        scheduler(policy="fastest")


@pytest.mark.parametrize("least_unit", [0, 40])
def test_weighted_share_is_fair_and_exact(least_unit):
    """Shares add up to the budget; what the jobs spend follows their weights, even when a job's
    least unit overshoots its share (it pays back later)."""
    share = WeightedShare()
    spent = {"a": 0, "b": 0}
    for budget in [7, 100, 33, 1, 250] * 40:
        split = share.split(budget, {"a": 3.0, "b": 1.0})
        assert sum(split.values()) == budget
        for job, tokens in split.items():
            used = max(tokens, least_unit) if tokens else 0
            share.charge(job, used)
            spent[job] += used
    assert abs(spent["a"] / spent["b"] - 3.0) < 0.05


def test_latency_model_refits_to_measurements():
    model = LatencyModel(refit_every=1000)
    rng = random.Random(1)
    for _ in range(200):
        shape = IterationShape(rng.randint(1, 256), rng.randint(0, 5000), rng.randint(0, 256), rng.randint(0, 256),
                               rng.randint(0, 3))
        seconds = 0.005 + 2e-4 * shape.inference_tokens + 1e-6 * shape.decode_context_tokens \
            + 3e-4 * shape.finetune_forward_tokens + 6e-4 * shape.finetune_backward_tokens + 0.01 * shape.finetune_units
        model.observe(shape, seconds)
    model.fit()
    for got, want in zip(model.coef, [0.005, 2e-4, 1e-6, 3e-4, 6e-4, 0.01]):
        assert got == pytest.approx(want, rel=1e-3)


def test_underpredicted_backward_iterations_shrink_backward_budgets_only():
    model = latency()
    model.refit_every = 10**9  # the coefficients stay put; only the error margins move
    sched = scheduler(model)
    shape = IterationShape(inference_tokens=40)
    before = {k: sched.finetune_budget(shape, k, idle=False) for k in ("finetune_forward_tokens",
                                                                       "finetune_backward_tokens")}
    for _ in range(20):  # backward iterations run 10 ms over the model, the others on it
        with_backward = IterationShape(inference_tokens=40, finetune_backward_tokens=50)
        model.observe(with_backward, model.predict(with_backward) + 0.010)
        model.observe(shape, model.predict(shape))
    assert model.error_margin("finetune_backward_tokens") == pytest.approx(0.010)
    assert model.error_margin("finetune_forward_tokens") == model.error_margin() == 0
    assert sched.finetune_budget(shape, "finetune_forward_tokens", idle=False) == before["finetune_forward_tokens"]
    assert sched.finetune_budget(shape, "finetune_backward_tokens", idle=False) == int(
        (SLO_50MS.tpot_s * 0.85 - model.predict(shape) - 0.010) / model.coef[4]) < before["finetune_backward_tokens"]


def test_requests_ahead_of_their_tpot_pace_lend_finetuning_longer_iterations():
    model = latency()
    shape = IterationShape(inference_tokens=8)
    budgets = {}
    for name, slack in (("behind", 0.010), ("on pace", SLO_50MS.tpot_s), ("ahead", 0.150), ("far ahead", 10.0)):
        sched = scheduler(model)
        sched.inference_budget(InferenceDemand(decodes=8, min_tpot_slack_s=slack), has_finetune=True)
        budgets[name] = sched.finetune_budget(shape, "finetune_forward_tokens", idle=False)
        assert sched.current_target_s <= 4 * SLO_50MS.tpot_s
    assert budgets["behind"] == 0 < budgets["on pace"] < budgets["ahead"] <= budgets["far ahead"]
