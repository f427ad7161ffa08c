"""Backend choice: Triton for CUDA tensors when triton imports, the torch reference otherwise.

``FLEXLLM_FORCE_TRITON=1`` sends CPU tensors to Triton too: with ``TRITON_INTERPRET=1`` that runs
the kernels on CPU (tests, benchmark smoke runs).
"""

from __future__ import annotations

import functools
import os

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
    """Take the Triton path for ``t``: it is on a CUDA device (or forced) and triton is importable."""
    forced = os.environ.get("FLEXLLM_FORCE_TRITON") == "1"
    return (t.is_cuda or forced) and triton_importable()
