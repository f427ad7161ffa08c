"""Fused residual-add + RMSNorm: the torch reference and the dispatcher (kernel: triton_ops/rms_norm.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexllm.kernels._dispatch import use_triton


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H]; weight: [H] -> (normed [T, H], new residual = x + residual [T, H])."""
    if residual is not None:
        x = x + residual
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)  # x * rsqrt(mean(x^2) + eps), in fp32
    return (weight * normed.to(x.dtype)), x


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: Triton on CUDA, the reference elsewhere."""
    if use_triton(x):
        from flexllm.kernels.triton_ops.rms_norm import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)
