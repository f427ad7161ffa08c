"""Paged attention over block tables (decode and causal chunks, GQA): the Triton kernel and launcher.

One kernel serves decode and prefill/fine-tuning chunks alike, flash-attention style: program
(q-tile, kv-head) holds BLOCK_Q query tokens x the GROUP query heads sharing that kv head as the
rows of one [BLOCK_M = BLOCK_Q * GROUP_PAD, D] tile, walks the sequence's keys through its block
table BLOCK_N at a time (any cache block size), and keeps an fp32 online softmax. With a sliding
window W a query sees only its last W keys: the walk starts at the tile's first visible key. Sequences own
``q_start // BLOCK_Q + seq`` onward in the q-tile axis, so the grid needs no host sync.
"""

import torch
import triton
import triton.language as tl

from flexllm.kernels.triton_ops._launch import dot_block

_LOG2E = 1.4426950408889634
NO_WINDOW = 2**31 - 1  # a window no context reaches


@triton.jit
def _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Binary search: the last sequence b whose first q-tile, start_b // BLOCK_Q + b, is <= tile."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr, context_lens_ptr,
    qk_scale, num_seqs, head_dim, window,
    q_s0, q_s1, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2, o_s0, o_s1, bt_s0,
    CACHE_BLOCK: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (tile, kv_head): out for BLOCK_Q query tokens x GROUP heads of one sequence."""
    tile, kv_head = tl.program_id(0), tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    ctx_len = tl.load(context_lens_ptr + seq)

    offs_m = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = q_tile * BLOCK_Q + offs_m // GROUP_PAD  # [BLOCK_M] query index within the sequence
    head = kv_head * GROUP + offs_m % GROUP_PAD  # [BLOCK_M] query head
    row_mask = (tok < q_len) & (offs_m % GROUP_PAD < GROUP)
    pos = ctx_len - q_len + tok  # [BLOCK_M] position: sees keys pos - window < key <= pos
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_rows = (q_start + tok).to(tl.int64) * q_s0 + head * q_s1
    qo_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=qo_mask, other=0.0)  # [BLOCK_M, D]

    m_i = tl.full((BLOCK_Q * GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q * GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q * GROUP_PAD, BLOCK_D), dtype=tl.float32)
    num_keys = tl.minimum(ctx_len, ctx_len - q_len + (q_tile + 1) * BLOCK_Q)  # keys this tile can see
    first_key = tl.maximum(0, ctx_len - q_len + q_tile * BLOCK_Q - window + 1)  # the tile's first query's window
    bt_row = block_tables_ptr + seq.to(tl.int64) * bt_s0
    for start in range(first_key, num_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < num_keys
        block = tl.load(bt_row + offs_n // CACHE_BLOCK, mask=n_mask, other=0).to(tl.int64)
        k_off = block * k_s0 + (offs_n % CACHE_BLOCK) * k_s1 + kv_head * k_s2  # [BLOCK_N]
        v_off = block * v_s0 + (offs_n % CACHE_BLOCK) * v_s1 + kv_head * v_s2
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, D]

        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        visible = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] > pos[:, None] - window) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # -inf while a row has seen no key yet (its window starts further on): keep its sums at 0
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = (acc / tl.where(l_i == 0, 1.0, l_i)[:, None]).to(out_ptr.dtype.element_ty)  # 0: a padding row
    o_rows = (q_start + tok).to(tl.int64) * o_s0 + head * o_s1
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out, mask=qo_mask)


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [T, H_q, D] -> [T, H_q, D]; arguments as ``paged_attention_reference``."""
    (T, num_q_heads, head_dim), (_, cache_block, num_kv_heads, _) = q.shape, k_cache.shape
    num_seqs = context_lens.shape[0]
    out = torch.empty_like(q)
    if T == 0:
        return out
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_m = max(16 if num_seqs == T else 64, group_pad)  # T == num_seqs: a pure decode batch
    block_q = block_m // group_pad
    assert k_cache.stride(-1) == v_cache.stride(-1) == q.stride(-1) == 1, "head_dim must be contiguous"
    _paged_attention_kernel[(T // block_q + num_seqs, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, query_start_loc, context_lens,
        scale * _LOG2E, num_seqs, head_dim, NO_WINDOW if sliding_window is None else sliding_window,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        out.stride(0), out.stride(1), block_tables.stride(0),
        CACHE_BLOCK=cache_block, GROUP=group, GROUP_PAD=group_pad,
        BLOCK_Q=block_q, BLOCK_N=64, BLOCK_D=dot_block(head_dim),
    )  # fmt: skip
    return out
