"""Owns the model and its KV cache; turns a scheduled batch into one forward pass."""

from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Sequence

import psutil
import torch

from flexllm.worker.engine.config import EngineConfig
from flexllm.worker.engine.context import LoRABatch, StepContext
from flexllm.worker.engine.fused import Rider
from flexllm.worker.engine.model import CausalLM
from flexllm.worker.engine.scheduler import ScheduledBatch

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: CausalLM, config: EngineConfig, max_model_len: int):
        self.model, self.config = model, config
        self.device, self.dtype = config.torch_device, config.torch_dtype
        args = model.args
        self.block_size = config.block_size
        self.num_blocks = config.num_kv_blocks or self._blocks_to_allocate(max_model_len)
        # [L, 2, num_blocks, block_size, H_kv, D]
        shape = (args.num_layers, 2, self.num_blocks, config.block_size, args.num_kv_heads, args.head_dim)
        self.kv_cache = _zeros(shape, self.dtype, self.device)
        for i, layer in enumerate(model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
        log.info("kv cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                 self.kv_cache.numel() * self.kv_cache.element_size() / 2**20)

    def _blocks_to_allocate(self, max_model_len: int) -> int:
        """As many blocks as ``kv_cache_fraction`` of the free memory holds, but no more than
        ``max_num_seqs`` sequences of ``max_model_len`` tokens can use."""
        args = self.model.args
        bytes_per_token = 2 * args.num_layers * args.num_kv_heads * args.head_dim * self.dtype.itemsize  # K and V
        bytes_per_block = bytes_per_token * self.block_size
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            free = psutil.virtual_memory().available
        fit = int(free * self.config.kv_cache_fraction) // bytes_per_block
        useful = self.config.max_num_seqs * -(-max_model_len // self.block_size)
        blocks = max(1, min(fit, useful))
        log.info("kv cache sizing: %d bytes per token; %.0f MiB free x %.2f fits %d blocks, %d sequences x %d "
                 "tokens use at most %d: %d blocks", bytes_per_token, free / 2**20, self.config.kv_cache_fraction,
                 fit, self.config.max_num_seqs, max_model_len, useful, blocks)
        return blocks

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, StepContext, torch.Tensor]:
        """-> input_ids [T], the step context, and the flat rows whose logits are sampled [N].

        Every per-token and per-sequence value goes into one int64 host buffer, copied to the
        device once per iteration (plain Python lists beat small tensor ops on the host)."""
        input_ids, positions, slots, lora_idx, starts, context_lens, sample_rows = [], [], [], [], [0], [], []
        bs = self.block_size
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            lora_idx += [seq.lora_slot] * num_new
            starts.append(starts[-1] + num_new)
            context_lens.append(end)
            if end == seq.num_tokens:
                sample_rows.append(starts[-1] - 1)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [block for s in batch.seqs for block in s.block_table + [0] * (width - len(s.block_table))]
        parts = (input_ids, positions, slots, lora_idx, sample_rows, tables, starts, context_lens)
        buffer = torch.tensor([v for part in parts for v in part], dtype=torch.int64)
        if self.device.type != "cpu":
            buffer = buffer.pin_memory().to(self.device, non_blocking=True)
        input_ids, positions, slots, lora_idx, sample_rows, tables, starts, context_lens = buffer.split(
            [len(part) for part in parts])
        ctx = StepContext(
            positions=positions,  # [T]
            slot_mapping=slots,  # [T]
            block_tables=tables.view(len(batch.seqs), width).to(torch.int32),  # [B, M]
            query_start_loc=starts.to(torch.int32),  # [B + 1]
            context_lens=context_lens.to(torch.int32),  # [B]
            lora=LoRABatch(lora_idx) if any(s.lora_slot >= 0 for s in batch.seqs) else None,
        )
        return input_ids, ctx, sample_rows

    def execute(self, batch: ScheduledBatch, riders: Sequence[Rider] = ()) -> torch.Tensor:
        """One forward over the batch (fine-tuning ``riders`` fused in) -> logits [N, V] (fp32) for
        sequences due a new token. Riders may train, so they need grad mode, not inference mode."""
        with torch.no_grad() if riders else torch.inference_mode():
            input_ids, ctx, sample_rows = self.prepare(batch)
            hidden = self.model(input_ids, ctx, riders)  # [T, H]
            return self.model.compute_logits(hidden[sample_rows])


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.zeros``; on CPU in anonymous memory, which the OS hands out zeroed and commits page by
    page on first write, so a large cache costs RAM (and start-up time) only for the blocks in use."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    return torch.frombuffer(mmap.mmap(-1, numel * dtype.itemsize), dtype=dtype, count=numel).view(shape)
