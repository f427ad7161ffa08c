"""Paged attention over block tables (decode and causal chunks, GQA): the torch reference.

Layout: ``k_cache``/``v_cache`` [num_blocks, block_size, H_kv, D]; ``block_tables`` [B, max_blocks]
(int32, unused entries any valid block); ``query_start_loc`` [B + 1] (int32, cumulative query
lengths over the flat token batch); ``context_lens`` [B] (int32, tokens in the cache for each
sequence *including* this step's queries, whose K/V the caller has already written).
Query i of sequence b sits at position ``context_lens[b] - q_len_b + i`` and sees keys up to it, or
with a ``sliding_window`` W only the last W of them (keys k with pos - W < k <= pos, as Hugging Face's
Mistral and Qwen2). The Triton kernel lives in triton_ops/paged_attention.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexllm.kernels._dispatch import use_triton


def _gather(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """cache [N, BS, H_kv, D], block_table [..., M] -> [..., M * BS, H_kv, D] (first blocks only)."""
    block_size = cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    blocks = cache[block_table[..., :num_blocks]]  # [..., nb, BS, H_kv, D]
    return blocks.flatten(-4, -3)


def _attend_decodes(q, k_cache, v_cache, block_tables, rows, seqs, ctx, scale, sliding_window):
    """One padded SDPA call for all single-token queries."""
    max_ctx = max(ctx[b] for b in seqs)
    everyone = len(seqs) == len(ctx)  # a pure decode step: no selection to copy
    tables = block_tables if everyone else block_tables[torch.tensor(seqs, device=q.device)]
    k = _gather(k_cache, tables, max_ctx).transpose(1, 2)  # [Bd, H_kv, L, D]
    v = _gather(v_cache, tables, max_ctx).transpose(1, 2)
    lens = torch.tensor([ctx[b] for b in seqs], device=q.device)
    keys = torch.arange(k.shape[2], device=q.device)[None, :]
    mask = keys < lens[:, None]  # [Bd, L]
    if sliding_window is not None:
        mask &= keys >= lens[:, None] - sliding_window
    qd = (q if everyone else q[torch.tensor(rows, device=q.device)]).unsqueeze(2)  # [Bd, H_q, 1, D]
    out = F.scaled_dot_product_attention(
        qd, k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out.squeeze(2)  # [Bd, H_q, D]


def _attend_chunk(q_chunk, k_cache, v_cache, block_table, context_len, scale, sliding_window):
    """q_chunk [n, H_q, D] for the last n positions of a context of context_len tokens."""
    n = q_chunk.shape[0]
    # the first key any query sees: all of them, or the window of the chunk's first query
    first = 0 if sliding_window is None else max(0, context_len - n - sliding_window + 1)
    k = _gather(k_cache, block_table, context_len)[first:context_len].transpose(0, 1)  # [H_kv, ctx - first, D]
    v = _gather(v_cache, block_table, context_len)[first:context_len].transpose(0, 1)
    qt = q_chunk.transpose(0, 1)  # [H_q, n, D]
    if n == context_len and sliding_window is None:
        out = F.scaled_dot_product_attention(qt, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        positions = torch.arange(context_len - n, context_len, device=q_chunk.device)[:, None]  # [n, 1]
        keys = torch.arange(first, context_len, device=q_chunk.device)[None, :]
        mask = keys <= positions
        if sliding_window is not None:
            mask &= keys > positions - sliding_window
        out = F.scaled_dot_product_attention(qt, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)  # [n, H_q, D]


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [T, H_q, D] -> [T, H_q, D]."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    ctx = context_lens.tolist()
    decode_seqs = [b for b in range(len(ctx)) if starts[b + 1] - starts[b] == 1]
    if decode_seqs:
        rows = [starts[b] for b in decode_seqs]
        out[rows] = _attend_decodes(q, k_cache, v_cache, block_tables, rows, decode_seqs, ctx, scale, sliding_window)
    for b in range(len(ctx)):
        s, e = starts[b], starts[b + 1]
        if e - s > 1:
            out[s:e] = _attend_chunk(q[s:e], k_cache, v_cache, block_tables[b], ctx[b], scale, sliding_window)
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the reference elsewhere."""
    args = (q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, sliding_window)
    if use_triton(q):
        from flexllm.kernels.triton_ops.paged_attention import paged_attention_triton

        return paged_attention_triton(*args)
    return paged_attention_reference(*args)
