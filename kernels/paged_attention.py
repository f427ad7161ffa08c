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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexllm.kernels._dispatch import use_triton


@dataclass(frozen=True)
class AttentionPlan:
    """What the torch reference reads from a step's metadata, worked out once per step (and sliding
    window) and reused by every layer: which cache slots each query's keys sit in, and its mask.

    decode_rows   [Bd]             rows of the flat batch with one query (None: every row decodes)
    decode_slots  [Bd, L]          cache slots (block * block_size + offset) of their keys, padded
    decode_mask   [Bd, 1, 1, L]    additive: 0 where a key is seen, -inf where hidden
    chunks        (start, end, slots [K], mask [n, K] additive, or None: plain causal)
    """

    decode_rows: torch.Tensor | None
    decode_slots: torch.Tensor | None
    decode_mask: torch.Tensor | None
    chunks: tuple[tuple[int, int, torch.Tensor, torch.Tensor | None], ...]


def _slots(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """block_tables [..., M], positions [K] -> cache slots [..., K] of those positions."""
    return block_tables[..., positions // block_size].long() * block_size + positions % block_size


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


def plan_attention(block_tables: torch.Tensor, query_start_loc: torch.Tensor, context_lens: torch.Tensor,
                   block_size: int, sliding_window: int | None, dtype: torch.dtype) -> AttentionPlan:
    """The step's ``AttentionPlan`` (masks in ``dtype``, the queries' dtype)."""
    device = block_tables.device
    starts, ctx = query_start_loc.tolist(), context_lens.tolist()
    decodes = [b for b in range(len(ctx)) if starts[b + 1] - starts[b] == 1]
    rows = slots = mask = None
    if decodes:
        everyone = len(decodes) == len(ctx)
        keys = torch.arange(max(ctx[b] for b in decodes), device=device)  # [L]
        tables = block_tables if everyone else block_tables[torch.tensor(decodes, device=device)]
        slots = _slots(tables, keys, block_size)  # [Bd, L]; keys past a context read a valid slot, masked
        lens = torch.tensor([ctx[b] for b in decodes], device=device)[:, None]  # [Bd, 1]
        visible = keys[None, :] < lens
        if sliding_window is not None:
            visible &= keys[None, :] >= lens - sliding_window
        mask = _additive(visible, dtype)[:, None, None, :]
        rows = None if everyone else torch.tensor([starts[b] for b in decodes], device=device)
    chunks = []
    for b in range(len(ctx)):
        s, e = starts[b], starts[b + 1]
        if e - s < 2:
            continue
        n, context = e - s, ctx[b]
        # the first key any query sees: all of them, or the window of the chunk's first query
        first = 0 if sliding_window is None else max(0, context - n - sliding_window + 1)
        keys = torch.arange(first, context, device=device)
        chunk_mask = None
        if n != context or sliding_window is not None:
            positions = torch.arange(context - n, context, device=device)[:, None]  # [n, 1]
            visible = keys[None, :] <= positions
            if sliding_window is not None:
                visible &= keys[None, :] > positions - sliding_window
            chunk_mask = _additive(visible, dtype)
        chunks.append((s, e, _slots(block_tables[b], keys, block_size), chunk_mask))
    return AttentionPlan(rows, slots, mask, tuple(chunks))


def attend(plan: AttentionPlan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           scale: float) -> torch.Tensor:
    """q [T, H_q, D] -> [T, H_q, D], over the caches [num_blocks, block_size, H_kv, D] as ``plan`` says."""
    h_kv, d = k_cache.shape[2:]
    keys, values = k_cache.view(-1, h_kv, d), v_cache.view(-1, h_kv, d)  # [slots, H_kv, D]
    decoded = None
    if plan.decode_slots is not None:
        qd = q if plan.decode_rows is None else q[plan.decode_rows]
        decoded = F.scaled_dot_product_attention(
            qd.unsqueeze(2), keys[plan.decode_slots].transpose(1, 2), values[plan.decode_slots].transpose(1, 2),
            attn_mask=plan.decode_mask, scale=scale, enable_gqa=True).squeeze(2)  # [Bd, H_q, D]
        if plan.decode_rows is None:
            return decoded
    out = torch.empty_like(q)
    if decoded is not None:
        out[plan.decode_rows] = decoded
    for s, e, slots, mask in plan.chunks:
        out[s:e] = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), keys[slots].transpose(0, 1), values[slots].transpose(0, 1),
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True).transpose(0, 1)
    return out


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
    plan = plan_attention(block_tables, query_start_loc, context_lens, k_cache.shape[1], sliding_window, q.dtype)
    return attend(plan, q, k_cache, v_cache, scale)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    plans: dict[int | None, AttentionPlan] | None = None,
) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the reference elsewhere. ``plans``: the caller's per-step memo of the
    reference's plans by sliding window (every layer of a step shares its metadata)."""
    args = (q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, sliding_window)
    if use_triton(q):
        from flexllm.kernels.triton_ops.paged_attention import paged_attention_triton

        return paged_attention_triton(*args)
    plans = {} if plans is None else plans
    if sliding_window not in plans:
        plans[sliding_window] = plan_attention(block_tables, query_start_loc, context_lens, k_cache.shape[1],
                                               sliding_window, q.dtype)
    return attend(plans[sliding_window], q, k_cache, v_cache, scale)
