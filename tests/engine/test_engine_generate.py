"""Greedy outputs are token-identical to HF generate under chunked prefill, staggered arrivals and preemption."""

import torch

from flexllm.worker.engine.sampling import SamplingParams

from .conftest import make_engine, prompts_of_mixed_lengths


def hf_greedy(hf, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_greedy_matches_hf_generate_with_chunking_staggering_and_preemption(tiny_llama_dir, hf_llama):
    # 16-token batches force chunked prefill; 40 blocks of 4 tokens cannot hold every sequence at once.
    engine = make_engine(tiny_llama_dir, max_tokens_per_batch=16, num_kv_blocks=40, block_size=4)
    prompts = prompts_of_mixed_lengths(16)
    max_tokens = [8 + (i * 5) % 17 for i in range(16)]  # varied output lengths
    preempted = []
    schedule = engine.scheduler.schedule

    def spy(budget=None):
        batch = schedule(budget)
        assert batch.num_tokens <= 16
        preempted.extend(batch.preempted)
        return batch

    engine.scheduler.schedule = spy
    final = {}
    for i, prompt in enumerate(prompts):  # four arrive every two steps
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=max_tokens[i], temperature=0))
        if i % 4 == 3:
            for _ in range(2):
                final.update({o.request_id: o for o in engine.step() if o.finished})
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert preempted, "the KV pool was expected to force preemption"
    for i, prompt in enumerate(prompts):
        expected = hf_greedy(hf_llama, prompt, max_tokens[i])
        assert final[str(i)].token_ids == expected, f"request {i} differs from HF generate"
    assert engine.block_manager.num_free_blocks == 40, "blocks leaked"
