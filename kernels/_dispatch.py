"""Backend choice: Triton for CUDA tensors when triton imports, the torch reference otherwise."""

from __future__ import annotations

import functools

import torch


@functools.cache
def triton_importable() -> bool:
    """True when ``import triton`` succeeds (checked once, lazily: CPU-only installs never need it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Take the Triton path for ``t``: it lives on a CUDA device and triton is importable."""
    return t.is_cuda and triton_importable()
