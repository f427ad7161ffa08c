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


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_logits_match_hf_for_batch_mixing_prefill_chunks_and_decodes(model_fixture, request):
    model_dir = request.getfixturevalue(model_fixture)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = make_engine(model_dir, max_tokens_per_batch=12)
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
            diff = (logits[offset:offset + n] - reference[rid][start:start + n]).abs().max().item()
            assert diff <= 1e-4, f"request {rid} positions {start}..{start + n}: max abs diff {diff}"
            offset += n
