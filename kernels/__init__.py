"""Kernels of the fused co-serving iteration: Triton on CUDA, torch references elsewhere."""

from flexllm.kernels.lora import lora_expand, lora_shrink
from flexllm.kernels.paged_attention import paged_attention
from flexllm.kernels.rms_norm import rms_norm
from flexllm.kernels.swiglu import silu_and_mul

__all__ = ["lora_expand", "lora_shrink", "paged_attention", "rms_norm", "silu_and_mul"]
