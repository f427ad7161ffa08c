"""The batched sampler: the per-row sampler's outputs kept (golden files), penalties, min-p, seeds."""

import json
from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

from flexllm.worker.engine.sampling import (
    NUCLEUS_CANDIDATES,
    SampledToken,
    SamplingParams,
    _apply_penalties,
    _outside_nucleus,
    sample,
)
from flexllm.worker.engine.sequence import Sequence

from .conftest import DEVICE, make_engine

DATA = Path(__file__).parent / "data"
# Both golden files were written by the per-row sampler this one replaced (commit 04b5259): for each
# case and each of 6 logits rows, 3 successive draws with a fresh generator seeded as the case says.
GOLDEN = json.loads((DATA / "sampler_golden.json").read_text())
GOLDEN_LOGITS = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)) * 3


def request(params: SamplingParams, token_ids=(0,), num_prompt_tokens: int = 0) -> Sequence:
    return Sequence("r", list(token_ids), params, num_prompt_tokens=num_prompt_tokens or len(token_ids))


def shared_generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def as_golden(token: SampledToken) -> list:
    top = [list(item) for item in sorted(token.top_logprobs.items())] if token.top_logprobs else None
    return [token.token_id, token.logprob, top]


def assert_golden(actual, expected) -> None:
    """Token ids exactly, log-probabilities up to float32 rounding (another CPU's kernels round differently)."""
    if isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), (actual, expected)
        for a, e in zip(actual, expected):
            assert_golden(a, e)
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-5, abs=1e-5)
    else:
        assert actual == expected


def test_seeded_and_greedy_rows_draw_what_the_per_row_sampler_drew_all_in_one_batch():
    cases = GOLDEN["cases"]
    rows = [(c, r) for c in range(len(cases)) for r in range(GOLDEN_LOGITS.shape[0])]
    requests = [request(SamplingParams(**cases[c]["params"])) for c, _ in rows]
    logits = GOLDEN_LOGITS[[r for _, r in rows]]  # [len(rows), V]: every case in one batch
    for draw in range(3):
        out = sample(logits, requests, shared_generator())
        assert_golden([as_golden(t) for t in out], [cases[c]["rows"][r][draw] for c, r in rows])


def test_a_seed_gives_the_same_tokens_whatever_else_is_in_the_batch():
    logits = torch.randn(5, 500, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=100, seed=42)
    seeded = request(params)
    alone = [sample(logits[2:3], [seeded], shared_generator())[0].token_id for _ in range(5)]
    seeded = request(params)
    crowd = [request(SamplingParams(temperature=t)) for t in (0.5, 1.0, 1.5)] + [request(SamplingParams(seed=3))]
    in_batch = [sample(logits, [*crowd[:2], seeded, *crowd[2:]], shared_generator(i))[2].token_id for i in range(5)]
    assert in_batch == alone and len(set(alone)) > 1


def test_unseeded_rows_follow_the_truncated_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, -1.0, -3.0]]).repeat(4000, 1)  # [N, 6]
    cases = [  # params, the probabilities they leave
        (SamplingParams(), logits[0].softmax(-1)),
        (SamplingParams(temperature=0.5, top_k=3), (logits[0, :3] / 0.5).softmax(-1)),
        (SamplingParams(top_p=0.75), logits[0, :3].softmax(-1)),  # 0.44 + 0.27 < 0.75 <= + 0.16
        (SamplingParams(min_p=0.3), logits[0, :3].softmax(-1)),  # e^-1 = 0.37 >= 0.3 > e^-1.5
    ]
    generator = shared_generator(5)
    for params, expected in cases:
        tokens = torch.tensor([t.token_id for t in sample(logits, [request(params)] * len(logits), generator)])
        frequencies = torch.bincount(tokens, minlength=6) / len(tokens)
        assert torch.allclose(frequencies[:len(expected)], expected, atol=0.03), (params, frequencies, expected)
        assert frequencies[len(expected):].sum() == 0


def test_repetition_presence_and_frequency_penalties_match_their_references():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)) * 4
    prompt, output = [3, 4, 4, 9], [9, 9, 17, 3, 30]
    logits[:, 9] = logits.amax(-1) + 1  # the most likely token, and repeated: the penalties must move the argmax
    params = [SamplingParams(temperature=0, repetition_penalty=100.0),
              SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=2.0),
              SamplingParams(temperature=0)]
    requests = [request(p, prompt + output, len(prompt)) for p in params]
    expected = logits.clone()
    expected[:1] = RepetitionPenaltyLogitsProcessor(100.0)(torch.tensor([prompt + output]), logits[:1].clone())
    for token in set(output):  # OpenAI's definition
        expected[1, token] -= 1.5 + 2.0 * output.count(token)
    assert torch.equal(_apply_penalties(logits, requests), expected)
    out = sample(logits, requests, shared_generator())
    assert [t.token_id for t in out] == expected.argmax(-1).tolist()
    assert [t.token_id for t in out][2] == 9 != out[0].token_id and out[1].token_id != 9


def test_min_p_keeps_what_hugging_face_keeps():
    logits = torch.randn(1, 200, generator=torch.Generator().manual_seed(3)) * 3
    kept = torch.isfinite(MinPLogitsWarper(0.05)(None, logits.clone()))[0]
    generator = shared_generator(9)
    drawn = {t.token_id for t in sample(logits.repeat(3000, 1), [request(SamplingParams(min_p=0.05))] * 3000,
                                        generator)}
    assert drawn == set(kept.nonzero().flatten().tolist())


def test_a_non_finite_row_fails_alone():
    logits = torch.randn(3, 20)
    logits[1, 4] = float("nan")
    out = sample(logits, [request(SamplingParams(temperature=t, seed=1)) for t in (0, 1, 1)], shared_generator())
    assert isinstance(out[0], SampledToken) and isinstance(out[2], SampledToken)
    assert isinstance(out[1], ValueError) and "non-finite" in str(out[1])


@pytest.mark.skipif(DEVICE != "cpu", reason="the golden tokens come from CPU logits")
def test_engine_outputs_match_the_per_row_sampler(tiny_llama_dir):
    golden = json.loads((DATA / "engine_sampling_golden.json").read_text())
    engine = make_engine(tiny_llama_dir)
    outs = engine.generate([g["prompt"] for g in golden], [SamplingParams(**g["params"]) for g in golden])
    for g, out in zip(golden, outs, strict=True):
        assert out.token_ids == g["token_ids"] and out.text == g["text"]
        assert_golden([[*as_golden(t)[:2], as_golden(t)[2] or []] for t in out.logprobs], g["logprobs"])


def test_top_p_from_the_sorted_candidates_equals_top_p_over_the_whole_vocabulary():
    """Up to float32 rounding: the candidates' probabilities are normalised by a sum taken in vocabulary
    order, not sorted order, so a token whose cumulative probability lies within ~1e-6 of top_p may
    fall on the other side (there is no such token in the 1000-token golden cases)."""
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(4)) * 5  # peaky: the nucleus is small
    logits[5] /= 50  # nearly flat: 0.9 of it lies beyond the candidates, so whole rows are sorted
    for top_p in (0.5, 0.9, 0.99):
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # the reference: sort everything
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = torch.empty_like(sorted_probs).scatter(-1, order, sorted_probs.cumsum(dim=-1) - sorted_probs)
        expected = before >= top_p
        expected[torch.arange(6), order[:, 0]] = False
        threshold = torch.full((6, 1), top_p)
        for rows in (slice(0, 5), slice(0, 6)):  # the candidates suffice; one row needs whole rows sorted
            differ = _outside_nucleus(logits[rows], threshold[rows]) != expected[rows]
            assert ((before[rows][differ] - top_p).abs() < 1e-5).all()
            assert differ.sum() <= 1
        assert (~expected[:5]).sum(-1).max() < NUCLEUS_CANDIDATES < (~expected[5]).sum()
