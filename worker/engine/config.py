"""Engine configuration: what the CLI flags and the InferenceService's `engine` spec set.

Torch-free at import: ``flexllm``'s argument parser and the operator's InferenceService model take
their defaults from these fields (one source), and neither may pull in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"  # the bundled model (loader.BUNDLED_MODELS)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available
    max_tokens_per_batch: int = 256
    max_num_seqs: int = 64
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: what max_num_seqs x max_model_len use, if kv_cache_fraction fits it
    kv_cache_fraction: float = 0.5  # of free GPU memory, or of available RAM on CPU
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_loras: int = 4
    max_lora_rank: int = 16
    enable_prefix_caching: bool = True  # share the KV blocks of common prompt prefixes across requests

    def __post_init__(self) -> None:
        if self.max_tokens_per_batch < 1 or self.max_num_seqs < 1 or self.block_size < 1:
            raise ValueError("max_tokens_per_batch, max_num_seqs and block_size must be >= 1")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError("kv_cache_fraction must be in (0, 1]")

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        from flexllm.worker.engine.loader import parse_dtype

        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return parse_dtype(self.dtype)
