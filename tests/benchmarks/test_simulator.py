"""The co-serving simulator's parts: trace rescaling, the measured cost model's fit, and the real
scheduler driven in simulated time (benchmarks/traces.py, costmodel.py, simulate.py)."""

import random

import pytest

BENCHMARKS = __import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import costmodel
        import simulate
        import traces

        yield simulate, costmodel, traces
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_rescaling_keeps_the_traces_gaps_in_proportion_at_the_target_rate(bench):
    _, _, traces = bench
    rng = random.Random(1)
    recorded, t = [], 0.0
    for _ in range(400):
        recorded.append(traces.Arrival(t, rng.randint(1, 4000), rng.randint(1, 900)))
        t += rng.expovariate(5.0)
    out = traces.rescale(recorded, rate=2.0, duration_s=100.0, length_scale=1 / 16, max_prompt_tokens=128,
                         max_output_tokens=32)
    assert 150 <= len(out) <= 250 and out[-1].time_s < 100.0
    stretch = out[1].time_s / (recorded[1].time_s - recorded[0].time_s)
    for a, b, ra, rb in zip(out, out[1:], recorded, recorded[1:]):
        assert b.time_s - a.time_s == pytest.approx((rb.time_s - ra.time_s) * stretch)
    for arrival, original in zip(out, recorded):
        assert arrival.prompt_tokens == max(1, min(128, round(original.prompt_tokens / 16)))
        assert 1 <= arrival.output_tokens <= 32
    # from an offset the trace wraps around to its first request
    wrapped = traces.rescale(recorded, 2.0, 1000.0, 1.0, 10**6, 10**6, offset=390)
    assert [a.prompt_tokens for a in wrapped[10:13]] == [r.prompt_tokens for r in recorded[:3]]


def test_the_committed_azure_trace_is_the_published_file(bench):
    import hashlib

    _, _, traces = bench
    path = traces.azure_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == (
        "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8")  # benchmarks/azure_trace/README.md
    recorded = traces.load_azure(path)
    assert len(recorded) == 19366 and 3400 < recorded[-1].time_s < 3600
    trace = traces.make_trace("azure", 0.5, 120.0, seed=0)
    assert 40 <= len(trace) <= 80 and all(a.prompt_tokens >= 1 and a.output_tokens >= 1 for a in trace)


def test_measured_cost_fit_recovers_known_per_term_costs(bench):
    _, costmodel, _ = bench
    true = dict(zip(("intercept", *costmodel.MEASURED_TERMS), (0.010, 2e-4, 1e-3, 1e-6, 3e-4, 7e-4, 0.004, 0.020)))
    rng = random.Random(0)
    records = []
    for _ in range(300):
        inference, forward, backward = rng.randint(0, 200), rng.choice([0, rng.randint(1, 128)]), 0
        decodes = rng.randint(0, min(inference, 30))
        units = 0 if inference and forward else rng.randint(0, 2)
        if units and rng.random() < 0.5:
            forward, backward = 0, rng.randint(1, 128)
        record = {"inference_tokens": inference, "decode_rows": decodes,
                  "decode_context_tokens": decodes * rng.randint(20, 300), "finetune_forward_tokens": forward,
                  "finetune_backward_tokens": backward, "finetune_units": units}
        terms = costmodel.record_terms(record)
        record["seconds"] = sum(c * x for c, x in zip(true.values(), terms)) * (1 + rng.uniform(-0.01, 0.01))
        records.append(record)
    fitted = costmodel.MeasuredCost.fit(records)
    for term, value in true.items():
        assert fitted.coef[term] == pytest.approx(value, rel=0.1, abs=2e-7), term
    # the measured spread around the fit is replayed: here the generator's +-1 %
    assert len(fitted.noise) == len(records) and all(0.98 < x < 1.02 for x in fitted.noise)
    # a unit spent within an iteration pays no iteration overhead of its own
    exact = costmodel.MeasuredCost(fitted.coef)
    unit = costmodel.Work((), 0, 64, 1, 1)
    assert exact.seconds(unit) - exact.seconds(unit, iteration=False) == pytest.approx(fitted.coef["intercept"])
    assert exact.seconds(costmodel.Work()) == 0.0


def test_nonnegative_least_squares_clamps_and_refits(bench):
    from flexllm.worker.coserve.latency import nonnegative_lstsq

    rows = [[1.0, x, 0.0, -x] for x in range(1, 20)]  # column 3 would take a negative coefficient
    coef = nonnegative_lstsq(rows, [0.5 + 0.1 * x for x in range(1, 20)])
    assert coef[0] == pytest.approx(0.5) and coef[1] == pytest.approx(0.1)
    assert coef[2] is None and coef[3] == 0.0


def test_simulated_finetune_only_and_light_load_follow_the_cost_model(bench):
    simulate, costmodel, traces = bench
    cost = costmodel.MeasuredCost(dict(zip(("intercept", *costmodel.MEASURED_TERMS),
                                           (0.010, 2e-4, 5e-4, 0.0, 2e-4, 4e-4, 0.0, 0.005))))
    slo = simulate.SLO(ttft_s=2.0, tpot_s=0.100)
    config = simulate.SimConfig(max_tokens_per_batch=256, max_num_seqs=64, num_kv_blocks=512, block_size=16)
    alone = simulate.simulate(cost, slo, "finetune-only", [], 20.0, config, max_finetune_tokens=128)
    # each 128-token unit forward (0.010 + 0.005 + 128 * 2e-4) or backward (... + 128 * 4e-4): 0.5 trained/token
    per_pair = (0.010 + 0.005 + 128 * 2e-4) + (0.010 + 0.005 + 128 * 4e-4)
    assert alone["finetune_tokens_per_s"] == pytest.approx(128 / per_pair, rel=0.05)
    assert alone["simulated"] and alone["slo_attainment"] == 1.0
    trace = [traces.Arrival(0.5 * i, 32, 8) for i in range(20)]
    co = simulate.simulate(cost, slo, "coserve", trace, 10.0, config, max_finetune_tokens=128)
    only = simulate.simulate(cost, slo, "inference-only", trace, 10.0, config, max_finetune_tokens=128)
    assert co["slo_attainment"] == only["slo_attainment"] == 1.0 and co["requests"] == 20
    assert 0 < co["finetune_tokens_per_s"] <= alone["finetune_tokens_per_s"] * 1.05
    assert only["finetune_tokens_per_s"] == 0.0


def test_a_trace_replayed_in_slices_is_the_whole_trace_once(bench):
    _, _, traces = bench
    import replay

    trace = traces.make_trace("azure", 0.5, 80.0, length_scale=1 / 16)
    parts = replay.slices(trace, 80.0, 4)
    assert [width for _, width in parts] == [20.0] * 4
    assert [(a.prompt_tokens, a.output_tokens) for part, _ in parts for a in part] == \
        [(a.prompt_tokens, a.output_tokens) for a in trace]
    assert all(0 <= a.time_s < 20.0 for part, _ in parts for a in part)

    def result(requests, attainment, ft, end_s):
        return {"policy": "coserve", "requests": requests, "slo_attainment": attainment, "ttft_missed": 0,
                "tpot_missed": requests - round(attainment * requests), "worst_ttft_vs_slo": 0.5,
                "worst_tpot_vs_slo": attainment and 1 / attainment, "finetune_tokens_per_s": ft,
                "inference_tokens_per_s": 1.0, "idle_fraction": 0.2, "timeline": [(0.0, 1, 0), (end_s, 1, 0)],
                "iterations": [[1]]}

    whole = replay.combine([result(10, 1.0, 30.0, 25.0), result(30, 0.9, 10.0, 5.0)], 20.0)
    assert whole["requests"] == 40 and whole["tpot_missed"] == 3
    assert whole["slo_attainment"] == pytest.approx(37 / 40)
    assert whole["finetune_tokens_per_s"] == 20.0  # slices of equal length: the mean rate
    assert [t for t, *_ in whole["timeline"]] == [0.0, 25.0, 25.0, 30.0]  # the next slice after the drain
    assert whole["iterations"] == [[1], [1]]
