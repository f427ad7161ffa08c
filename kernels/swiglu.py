"""Fused SiLU-and-multiply for SwiGLU MLPs: torch reference and dispatcher (kernel: triton_ops/swiglu.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexllm.kernels._dispatch import use_triton


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] (gate first, then up) -> silu(gate) * up: [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the reference elsewhere."""
    if use_triton(gate_up):
        from flexllm.kernels.triton_ops.swiglu import silu_and_mul_triton

        return silu_and_mul_triton(gate_up)
    return silu_and_mul_reference(gate_up)
