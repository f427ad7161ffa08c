"""Multi-LoRA shrink/expand with a per-token slot index (-1 = none): Triton kernels and launchers.

Two launch shapes over the same stacked slots:
- SGMV (grouped): tokens are grouped by slot on the device (argsort + counts, no host sync); program
  (m, [n,] s) multiplies the m-th tile of slot s's tokens with ``tl.dot``. For prefill chunks,
  fine-tuning tokens and any large batch.
- BGMV (per token): program t does a GEMV with its own slot's matrix. For decode batches, one
  token per sequence, each with its own adapter.
All operands are read through their strides, so transposed views work without copies (the
LoRA backward uses that).
"""

import torch
import triton
import triton.language as tl

from flexllm.kernels.triton_ops._launch import dot_block

BGMV_MAX_TOKENS = 64  # auto mode: per-token kernels at or below this many tokens (untuned)


@triton.jit
def _segment_rows(order_ptr, seg_start_ptr, seg_len_ptr, slot, pid_m, BLOCK_M: tl.constexpr):
    """Token rows [BLOCK_M] of the pid_m-th tile of slot's group, and their mask."""
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = offs < tl.load(seg_len_ptr + slot)
    rows = tl.load(order_ptr + tl.load(seg_start_ptr + slot) + offs, mask=mask, other=0)
    return rows.to(tl.int64), mask


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, out_ptr, order_ptr, seg_start_ptr, seg_len_ptr,
    K, R,
    x_s0, x_s1, a_s0, a_s1, a_s2, o_s0, o_s1,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (m, s): out[rows] = x[rows] @ A[s].T for the m-th tile of slot s's tokens."""
    pid_m, slot = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(seg_len_ptr + slot):
        return
    rows, row_mask = _segment_rows(order_ptr, seg_start_ptr, seg_len_ptr, slot, pid_m, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + slot.to(tl.int64) * a_s0
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x_mask = row_mask[:, None] & (k[None, :] < K)  # x tile: [BLOCK_M, BLOCK_K]
        x = tl.load(x_ptr + rows[:, None] * x_s0 + k[None, :] * x_s1, mask=x_mask, other=0.0)
        a_mask = (offs_r[None, :] < R) & (k[:, None] < K)  # A[s].T tile: [BLOCK_K, BLOCK_R]
        a_t = tl.load(a_base + offs_r[None, :] * a_s1 + k[:, None] * a_s2, mask=a_mask, other=0.0)
        acc += tl.dot(x, a_t)
    out_mask = row_mask[:, None] & (offs_r[None, :] < R)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * o_s0 + offs_r[None, :] * o_s1, out, mask=out_mask)


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, out_ptr, idx_ptr,
    K, R,
    x_s0, x_s1, a_s0, a_s1, a_s2, o_s0, o_s1,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program t: out[t] = x[t] @ A[idx[t]].T, a GEMV; rows with idx -1 keep their zeros."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(idx_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_ptr + t * x_s0 + k * x_s1, mask=k < K, other=0.0).to(tl.float32)  # [BLOCK_K]
        a_mask = (offs_r[:, None] < R) & (k[None, :] < K)  # A[s] tile: [BLOCK_R, BLOCK_K]
        a = tl.load(a_ptr + slot * a_s0 + offs_r[:, None] * a_s1 + k[None, :] * a_s2, mask=a_mask, other=0.0)
        acc += tl.sum(a.to(tl.float32) * x[None, :], axis=1)
    tl.store(out_ptr + t * o_s0 + offs_r * o_s1, acc.to(out_ptr.dtype.element_ty), mask=offs_r < R)


@triton.jit
def _sgmv_expand_kernel(
    y_ptr, xa_ptr, b_ptr, scaling_ptr, order_ptr, seg_start_ptr, seg_len_ptr,
    N, R,
    y_s0, y_s1, xa_s0, xa_s1, b_s0, b_s1, b_s2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program (m, n, s): y[rows, n-tile] += scaling[s] * xa[rows] @ B[s, n-tile].T."""
    pid_m, pid_n, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if pid_m * BLOCK_M >= tl.load(seg_len_ptr + slot):
        return
    rows, row_mask = _segment_rows(order_ptr, seg_start_ptr, seg_len_ptr, slot, pid_m, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    b_base = b_ptr + slot.to(tl.int64) * b_s0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + offs_r
        xa_mask = row_mask[:, None] & (r[None, :] < R)  # xa tile: [BLOCK_M, BLOCK_R]
        xa = tl.load(xa_ptr + rows[:, None] * xa_s0 + r[None, :] * xa_s1, mask=xa_mask, other=0.0)
        b_mask = (offs_n[None, :] < N) & (r[:, None] < R)  # B[s].T tile: [BLOCK_R, BLOCK_N]
        b_t = tl.load(b_base + offs_n[None, :] * b_s1 + r[:, None] * b_s2, mask=b_mask, other=0.0)
        acc += tl.dot(xa, b_t)
    scale = tl.load(scaling_ptr + slot).to(tl.float32)
    y_ptrs = y_ptr + rows[:, None] * y_s0 + offs_n[None, :] * y_s1
    y_mask = row_mask[:, None] & (offs_n[None, :] < N)
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + scale * acc).to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _bgmv_expand_kernel(
    y_ptr, xa_ptr, b_ptr, scaling_ptr, idx_ptr,
    N, R,
    y_s0, y_s1, xa_s0, xa_s1, b_s0, b_s1, b_s2,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program (t, n): y[t, n-tile] += scaling[idx[t]] * B[idx[t], n-tile] @ xa[t]; idx -1 skips."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(idx_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + offs_r
        xa = tl.load(xa_ptr + t * xa_s0 + r * xa_s1, mask=r < R, other=0.0).to(tl.float32)  # [BLOCK_R]
        b_mask = (offs_n[:, None] < N) & (r[None, :] < R)  # B[s] tile: [BLOCK_N, BLOCK_R]
        b = tl.load(b_ptr + slot * b_s0 + offs_n[:, None] * b_s1 + r[None, :] * b_s2, mask=b_mask, other=0.0)
        acc += tl.sum(b.to(tl.float32) * xa[None, :], axis=1)
    scale = tl.load(scaling_ptr + slot).to(tl.float32)
    y_ptrs = y_ptr + t * y_s0 + offs_n * y_s1
    y = tl.load(y_ptrs, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + scale * acc).to(y_ptr.dtype.element_ty), mask=offs_n < N)


def _group_by_slot(indices: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, ...]:
    """indices [T] -> (order [T]: token ids grouped by slot, seg_start [S], seg_len [S]); no host sync."""
    idx = indices.long()
    order = torch.argsort(idx, stable=True)  # slot -1 tokens first, then slot 0, 1, ...
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=idx.device)
    counts.scatter_add_(0, idx + 1, torch.ones_like(idx))
    starts = torch.cumsum(counts, 0) - counts
    return order, starts[1:], counts[1:]


def _per_token(num_tokens: int, grouped: bool | None) -> bool:
    return num_tokens <= BGMV_MAX_TOKENS if grouped is None else not grouped


def lora_shrink_triton(
    x: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor, grouped: bool | None = None
) -> torch.Tensor:
    """x: [T, H_in], lora_a: [S, R, H_in], indices: [T] -> x @ A[idx].T: [T, R] (0 where idx -1).

    ``grouped``: True = SGMV, False = BGMV, None = BGMV up to ``BGMV_MAX_TOKENS`` tokens.
    """
    (T, K), (S, R, _) = x.shape, lora_a.shape
    out = torch.zeros(T, R, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    strides = (*x.stride(), *lora_a.stride(), *out.stride())
    block_r = dot_block(R)  # the whole rank in one tile
    if _per_token(T, grouped):
        block_k = max(16, 4096 // block_r)
        _bgmv_shrink_kernel[(T,)](x, lora_a, out, indices, K, R, *strides, BLOCK_R=block_r, BLOCK_K=block_k)
        return out
    order, seg_start, seg_len = _group_by_slot(indices, S)
    block_m = dot_block(T, 64)
    _sgmv_shrink_kernel[(triton.cdiv(T, block_m), S)](
        x, lora_a, out, order, seg_start, seg_len, K, R, *strides,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=64,
    )  # fmt: skip
    return out


def lora_expand_triton(
    y: torch.Tensor,
    xa: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scaling: torch.Tensor,
    grouped: bool | None = None,
) -> torch.Tensor:
    """y: [T, H_out] += scaling[idx] * xa [T, R] @ B[idx].T (B: [S, H_out, R]), in place; returns y.

    ``grouped`` as in ``lora_shrink_triton``.
    """
    (T, N), (S, _, R) = y.shape, lora_b.shape
    if T == 0:
        return y
    strides = (*y.stride(), *xa.stride(), *lora_b.stride())
    block_r = dot_block(R, 64)
    if _per_token(T, grouped):
        block_n = min(256, triton.next_power_of_2(N))
        _bgmv_expand_kernel[(T, triton.cdiv(N, block_n))](
            y, xa, lora_b, scaling, indices, N, R, *strides, BLOCK_N=block_n, BLOCK_R=block_r
        )
        return y
    order, seg_start, seg_len = _group_by_slot(indices, S)
    block_m, block_n = dot_block(T, 64), dot_block(N, 128)
    _sgmv_expand_kernel[(triton.cdiv(T, block_m), triton.cdiv(N, block_n), S)](
        y, xa, lora_b, scaling, order, seg_start, seg_len, N, R, *strides,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
    )  # fmt: skip
    return y
