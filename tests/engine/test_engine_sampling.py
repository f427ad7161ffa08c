"""Sampling: seeds, top-k/top-p, stop strings and token ids, logprobs."""

import torch

from flexllm.worker.engine.sampling import SamplingParams, sample
from flexllm.worker.engine.sequence import Sequence

from .conftest import make_engine


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        assert sample(logits, [Sequence("a", [0], SamplingParams(top_k=2, seed=seed))], g)[0].token_id in (0, 1)
        # p(0) ~ 0.72, p(0) + p(1) ~ 0.99: top_p 0.5 keeps only token 0
        assert sample(logits, [Sequence("b", [0], SamplingParams(top_p=0.5))], g)[0].token_id == 0


def test_logprobs_are_log_softmax():
    logits = torch.randn(2, 50)
    out = sample(logits, [Sequence("a", [0], SamplingParams(temperature=0, logprobs=3))] * 2, torch.Generator())
    expected = torch.log_softmax(logits, -1)
    for row, token in enumerate(out):
        assert token.token_id == int(logits[row].argmax())
        assert abs(token.logprob - float(expected[row, token.token_id])) < 1e-6
        assert len(token.top_logprobs) == 3 and token.token_id in token.top_logprobs


def test_seeded_sampling_is_reproducible_and_stops_apply(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    a, b = engine.generate([[50, 60, 70], [50, 60, 70]], params)
    assert a.token_ids == b.token_ids
    stop_id = a.token_ids[3]
    first = a.token_ids.index(stop_id)
    stopped = engine.generate([[50, 60, 70]], SamplingParams(max_tokens=12, temperature=1.0, seed=7,
                                                             stop_token_ids=[stop_id]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == a.token_ids[:first + 1]
    stop = next(t for t in (engine.tokenizer.decode([i]) for i in a.token_ids[2:]) if t.strip())
    by_text = engine.generate([[50, 60, 70]], SamplingParams(max_tokens=12, temperature=1.0, seed=7, stop=[stop]))[0]
    assert by_text.finish_reason == "stop"
    assert by_text.text == a.text[:a.text.find(stop)]


def test_streamed_deltas_add_up_to_the_final_text(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    full = engine.generate([[50, 60, 70]], SamplingParams(max_tokens=16, temperature=0))[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    engine.add_request("s", [50, 60, 70], SamplingParams(max_tokens=16, temperature=0, stop=[stop]))
    deltas, ids = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.delta_text)
            ids.extend(out.delta_token_ids)
    assert "".join(deltas) == out.text == full[:full.find(stop)]
    assert ids == out.token_ids


def test_partial_multibyte_characters_are_held_back_while_streaming(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    emoji_ids = engine.tokenizer.encode("🙂🙂")  # byte-level BPE: pieces of a character decode to U+FFFD
    assert "\ufffd" in engine.tokenizer.decode(emoji_ids[:1])
    engine.add_request("u", [50, 60], SamplingParams(max_tokens=len(emoji_ids), temperature=0))
    seq = engine.requests["u"]
    deltas = []
    for token in emoji_ids:  # as if each piece had just been sampled
        seq.token_ids.append(token)
        engine._check_stop(seq, token)
        deltas.append(engine._output(seq).delta_text)
    assert deltas[0] == "" and "".join(deltas) == "🙂🙂" and "\ufffd" not in "".join(deltas)
    assert seq.finished and seq.finish_reason == "length"
