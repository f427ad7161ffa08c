"""Logits of the paged, chunked engine equal Hugging Face transformers' (fp32, <= 1e-4)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexllm.worker.engine.sampling import SamplingParams

from .conftest import make_engine


def record_all_logits(engine):
    """Wrap the runner so every step also yields logits for every row: [(rows, logits [T, V])]."""
    records = []

    @torch.inference_mode()
    def execute(batch, riders=()):
        assert not riders
        rows = [(s.request_id, s.num_computed_tokens, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]
        input_ids, ctx, sample_rows = engine.runner.prepare(batch)
        logits = engine.model.compute_logits(engine.model(input_ids, ctx))
        records.append((rows, logits))
        return logits[sample_rows]

    engine.runner.execute = execute
    return records


def assert_logits_match_hf(model_dir, hf, max_tokens_per_batch: int) -> None:
    """Three requests (13, 5 and 30 prompt tokens; one joins later) in prefill chunks of at most
    ``max_tokens_per_batch`` tokens mixed with decodes: every row's logits equal HF's."""
    engine = make_engine(model_dir, max_tokens_per_batch=max_tokens_per_batch)
    records = record_all_logits(engine)
    prompts = [list(range(200, 213)), list(range(300, 305)), list(range(400, 430))]
    engine.add_request("a", prompts[0], SamplingParams(max_tokens=6, temperature=0))
    engine.add_request("b", prompts[1], SamplingParams(max_tokens=8, temperature=0))
    engine.step()
    engine.add_request("c", prompts[2], SamplingParams(max_tokens=4, temperature=0))
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert any(len(rows) > 1 and any(n == 1 for *_, n in rows) and any(n > 1 for *_, n in rows)
               for rows, _ in records), "no step mixed decodes with prefill chunks"
    sequences = {rid: p + final[rid].token_ids for rid, p in zip("abc", prompts)}
    with torch.no_grad():
        reference = {rid: hf(torch.tensor([ids])).logits[0] for rid, ids in sequences.items()}
    for rows, logits in records:
        offset = 0
        for rid, start, n in rows:
            diff = (logits[offset:offset + n].cpu() - reference[rid][start:start + n]).abs().max().item()
            assert diff <= 1e-4, f"request {rid} positions {start}..{start + n}: max abs diff {diff}"
            offset += n


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_mistral_dir",
                                           "tiny_qwen2_window_dir"])
def test_logits_match_hf_for_batch_mixing_prefill_chunks_and_decodes(model_fixture, request):
    model_dir = request.getfixturevalue(model_fixture)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert_logits_match_hf(model_dir, hf, max_tokens_per_batch=12)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_sliding_window_logits_match_hf_for_chunks_shorter_than_the_window(tiny_mistral_dir, attn_implementation):
    """Mistral's 8-token window, prompts of up to 30 tokens, prefill chunks of at most 3 tokens (the
    12-token chunks of the test above are longer than the window)."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32,
                                              attn_implementation=attn_implementation).eval()
    assert hf.config.sliding_window == 8
    assert_logits_match_hf(tiny_mistral_dir, hf, max_tokens_per_batch=3)
    ids = torch.tensor([list(range(400, 430))])
    with torch.no_grad():  # HF does apply the window: without it the logits beyond the window differ
        windowed = hf(ids).logits[0]
        hf.config.sliding_window = None
        full = hf(ids).logits[0]
    assert torch.equal(windowed[:8], full[:8]) and (windowed[8:] - full[8:]).abs().max() > 1e-2


def test_unsupported_attention_layer_types_are_refused_at_load(tiny_qwen2_window_dir, tmp_path):
    import json
    import shutil

    shutil.copytree(tiny_qwen2_window_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["layer_types"] = ["full_attention", "chunked_attention"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="only full_attention and sliding_attention.*not chunked_attention"):
        make_engine(tmp_path)
