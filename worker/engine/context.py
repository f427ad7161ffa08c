"""Per-step inputs that every layer of the model reads (nano-vllm's context, passed explicitly)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRABatch:
    """Which adapter slot each token uses: ``indices`` [T] (int64, -1 = base model)."""

    indices: torch.Tensor


@dataclass
class StepContext:
    """Flat token batch of one engine step: sequences laid end to end.

    positions        [T]      int64, position of each token in its sequence
    slot_mapping     [T]      int64, KV-cache slot (block * block_size + offset) each token writes
    block_tables     [B, M]   int32, per-sequence KV blocks (padded with 0)
    query_start_loc  [B + 1]  int32, cumulative query lengths
    context_lens     [B]      int32, cached tokens per sequence including this step's
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    context_lens: torch.Tensor
    lora: LoRABatch | None = None
