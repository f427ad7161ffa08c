"""Multi-LoRA shrink/expand with a per-token adapter index (-1 = base model): torch references.

Slots are stacked: ``lora_a`` [S, R, H_in], ``lora_b`` [S, H_out, R], ``scaling`` [S]; an adapter of
rank r < R is zero-padded. ``indices`` [T] holds each token's slot or -1. The Triton kernels
(SGMV for grouped tokens, BGMV per token) live in triton_ops/lora.py. ``lora_linear`` is the
differentiable LoRA branch of the trainable adapter, its backward built from shrink and expand.
"""

from __future__ import annotations

import torch

from flexllm.kernels._dispatch import use_triton


def lora_shrink_reference(x: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x: [T, H_in] -> x @ A[idx].T: [T, R] (zeros where idx == -1)."""
    out = x.new_zeros(x.shape[0], lora_a.shape[1])
    for slot in indices.unique().tolist():
        if slot < 0:
            continue
        rows = (indices == slot).nonzero(as_tuple=True)[0]
        out[rows] = x[rows] @ lora_a[slot].t()
    return out


def lora_expand_reference(
    y: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor, scaling: torch.Tensor
) -> torch.Tensor:
    """y: [T, H_out] += scaling[idx] * xa @ B[idx].T, in place; returns y."""
    for slot in indices.unique().tolist():
        if slot < 0:
            continue
        rows = (indices == slot).nonzero(as_tuple=True)[0]
        y[rows] += (xa[rows] @ lora_b[slot].t()) * scaling[slot].to(y.dtype)
    return y


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the reference elsewhere."""
    if use_triton(x):
        from flexllm.kernels.triton_ops.lora import lora_shrink_triton

        return lora_shrink_triton(x, lora_a, indices)
    return lora_shrink_reference(x, lora_a, indices)


def lora_expand(
    y: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor, scaling: torch.Tensor
) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the reference elsewhere."""
    if use_triton(y):
        from flexllm.kernels.triton_ops.lora import lora_expand_triton

        return lora_expand_triton(y, xa, lora_b, indices, scaling)
    return lora_expand_reference(y, xa, lora_b, indices, scaling)


def _matmul_t(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x: [M, K], a: [R, K] -> x @ a.T: [M, R], as a one-slot shrink (strided views welcome)."""
    return lora_shrink(x, a[None], x.new_zeros(x.shape[0], dtype=torch.int32))


def _add_scaled_matmul_t(y: torch.Tensor, g: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """y: [M, N] += scaling * g [M, K] @ b [N, K].T, as a one-slot expand; returns y."""
    idx = y.new_zeros(y.shape[0], dtype=torch.int32)
    return lora_expand(y, g, b[None], idx, y.new_tensor([scaling], dtype=torch.float32))


class LoRAFunction(torch.autograd.Function):
    """scaling * (x @ A.T) @ B.T with dX, dA, dB from the shrink/expand kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):
        xa = _matmul_t(x, lora_a)  # [T, R]
        y = _add_scaled_matmul_t(x.new_zeros(x.shape[0], lora_b.shape[0]), xa, lora_b, scaling)
        ctx.save_for_backward(x, lora_a, lora_b, xa)
        ctx.scaling = scaling
        return y  # [T, H_out]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, lora_a, lora_b, xa = ctx.saved_tensors
        s = ctx.scaling
        dx = da = db = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dy_b = _matmul_t(dy, lora_b.t())  # dy @ B: [T, R]
        if ctx.needs_input_grad[0]:  # dX = s * (dy @ B) @ A: [T, H_in]
            dx = _add_scaled_matmul_t(torch.zeros_like(x), dy_b, lora_a.t(), s)
        if ctx.needs_input_grad[1]:  # dA = s * (dy @ B).T @ x: [R, H_in]
            da = _add_scaled_matmul_t(torch.zeros_like(lora_a), dy_b.t(), x.t(), s)
        if ctx.needs_input_grad[2]:  # dB = s * dy.T @ (x @ A.T): [H_out, R]
            db = _add_scaled_matmul_t(torch.zeros_like(lora_b), dy.t(), xa.t(), s)
        return dx, da, db, None


def lora_linear(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Differentiable LoRA branch of one adapter: x [T, H_in], A [R, H_in], B [H_out, R] -> [T, H_out]."""
    return LoRAFunction.apply(x, lora_a, lora_b, scaling)
