"""Paged attention (decode, prefill and chunked prefill, GQA) vs the torch reference."""

import pytest
import torch

from flexllm.kernels.paged_attention import paged_attention, paged_attention_reference
from flexllm.kernels.triton_ops.paged_attention import paged_attention_triton

TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 2e-3, "rtol": 2e-3}}


def _batch(seqs, block_size, q_heads, kv_heads, head_dim, dtype, seed=0):
    """seqs: [(q_len, context_len)] -> the kernel arguments, blocks scattered over a shuffled pool."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks nobody owns
    pool = torch.randperm(num_blocks, generator=g)
    width = max(blocks_per_seq) + 2  # unused trailing entries
    block_tables = torch.randint(0, num_blocks, (len(seqs), width), generator=g, dtype=torch.int32)
    offset = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = pool[offset : offset + n]
        offset += n
    q_lens = torch.tensor([q for q, _ in seqs])
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).to(torch.int32)
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    return (
        torch.randn(int(q_lens.sum()), q_heads, head_dim, generator=g).to(dtype),
        torch.randn(*cache_shape, generator=g).to(dtype),
        torch.randn(*cache_shape, generator=g).to(dtype),
        block_tables,
        query_start_loc,
        torch.tensor([ctx for _, ctx in seqs], dtype=torch.int32),
        head_dim**-0.5,
    )


BATCHES = {
    "decode": [(1, 5), (1, 8), (1, 1), (1, 13)],  # ctx of one token, ctx on a block edge
    "single_token": [(1, 3)],
    "prefill": [(7, 7)],
    "chunk_after_cached_blocks": [(5, 13)],
    "mixed_with_empty_seq": [(1, 9), (6, 6), (0, 4), (3, 20), (1, 2)],
    "long_chunk_many_q_tiles": [(37, 45), (1, 30)],
}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("block_size", [4, 3])  # 3: keys tile across cache blocks of any size
def test_matches_reference(batch, block_size):
    args = _batch(BATCHES[batch], block_size, q_heads=8, kv_heads=2, head_dim=16, dtype=torch.float32)
    torch.testing.assert_close(paged_attention_triton(*args), paged_attention_reference(*args), **TOL[torch.float32])


@pytest.mark.parametrize("q_heads,kv_heads", [(2, 2), (4, 2), (6, 2), (8, 1)])  # MHA, GQA 2, 3 (padded), MQA
@pytest.mark.parametrize("head_dim", [16, 24])  # 24: padded head dim
def test_gqa_and_head_dims(q_heads, kv_heads, head_dim):
    args = _batch([(1, 6), (4, 11)], 4, q_heads, kv_heads, head_dim, torch.float32, seed=q_heads + head_dim)
    torch.testing.assert_close(paged_attention_triton(*args), paged_attention_reference(*args), **TOL[torch.float32])


@pytest.mark.parametrize("batch", ["decode", "mixed_with_empty_seq"])
def test_fp16_inputs_fp32_accumulation(batch):
    args = _batch(BATCHES[batch], 4, 4, 2, 16, torch.float16)
    out = paged_attention_triton(*args)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, paged_attention_reference(*args), **TOL[torch.float16])


def test_dispatcher_takes_the_reference_on_cpu():
    args = _batch(BATCHES["decode"], 4, 4, 2, 16, torch.float32)
    assert torch.equal(paged_attention(*args), paged_attention_reference(*args))


def _dense(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, window):
    """Per-query softmax over the keys it sees (pos - window < key <= pos), written out plainly."""
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    for b, ctx in enumerate(context_lens.tolist()):
        s, e = query_start_loc[b].item(), query_start_loc[b + 1].item()
        slots = [(block_tables[b, t // block_size].item(), t % block_size) for t in range(ctx)]
        k = torch.stack([k_cache[blk, off] for blk, off in slots]).repeat_interleave(group, 1)  # [ctx, H_q, D]
        v = torch.stack([v_cache[blk, off] for blk, off in slots]).repeat_interleave(group, 1)
        for i in range(e - s):
            pos = ctx - (e - s) + i
            lo = max(0, pos - window + 1)
            scores = torch.einsum("hd,khd->hk", q[s + i].float(), k[lo : pos + 1].float()) * scale
            out[s + i] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[lo : pos + 1].float()).to(q.dtype)
    return out


WINDOWED = {  # (q_len, context_len): decodes and chunks whose context is longer than the window
    "decode": [(1, 5), (1, 13), (1, 2), (1, 40)],
    "prefill_longer_than_window": [(21, 21)],
    "chunk_after_cached_blocks": [(5, 30), (9, 17)],
    "mixed": [(1, 9), (6, 6), (0, 4), (3, 20), (37, 45), (1, 30)],
}


@pytest.mark.parametrize("batch", WINDOWED)
@pytest.mark.parametrize("window", [1, 4, 7])
def test_sliding_window_reference_and_kernel_match_dense_attention(batch, window):
    args = _batch(WINDOWED[batch], 4, q_heads=4, kv_heads=2, head_dim=16, dtype=torch.float32, seed=window)
    expected = _dense(*args, window)
    torch.testing.assert_close(paged_attention_reference(*args, window), expected, **TOL[torch.float32])
    torch.testing.assert_close(paged_attention_triton(*args, window), expected, **TOL[torch.float32])
    unwindowed = paged_attention_reference(*args)
    assert not torch.allclose(unwindowed, expected, atol=1e-3)  # the window matters in every batch
