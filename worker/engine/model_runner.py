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

        The host gathers only per-sequence values into one int64 buffer, copied to the device once;
        per-token positions and KV slots are derived there with tensor ops."""
        seqs, num_new = batch.seqs, batch.num_new_tokens
        width = max(len(s.block_table) for s in seqs)
        host: list[int] = []  # [input_ids T | computed B | num_new B | lora slot B | due seqs N | tables B*width]
        due = []
        for i, (seq, n) in enumerate(zip(seqs, num_new, strict=True)):
            host += seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n]
            if seq.num_computed_tokens + n == seq.num_tokens:
                due.append(i)
        num_tokens, num_seqs = len(host), len(seqs)
        host += [s.num_computed_tokens for s in seqs]
        host += num_new
        host += [s.lora_slot for s in seqs]
        host += due
        for seq in seqs:
            host += seq.block_table
            host += [0] * (width - len(seq.block_table))
        buffer = torch.tensor(host, dtype=torch.int64)
        if self.device.type == "cuda":
            buffer = buffer.pin_memory().to(self.device, non_blocking=True)
        input_ids, computed, new, lora_slots, due_seqs, tables = buffer.split(
            [num_tokens, num_seqs, num_seqs, num_seqs, len(due), num_seqs * width])
        ends = torch.cumsum(new, 0)  # [B] end of each sequence's tokens in the flat batch
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=self.device), new,
                                               output_size=num_tokens)  # [T]
        positions = computed[seq_of_token] + torch.arange(num_tokens, device=self.device) - (ends - new)[seq_of_token]
        tables = tables.view(num_seqs, width)
        bs = self.block_size
        ctx = StepContext(
            positions=positions,
            slot_mapping=tables[seq_of_token, positions // bs] * bs + positions % bs,
            block_tables=tables.to(torch.int32),
            query_start_loc=torch.nn.functional.pad(ends, (1, 0)).to(torch.int32),
            context_lens=(computed + new).to(torch.int32),
            lora=LoRABatch(lora_slots[seq_of_token]) if any(s.lora_slot >= 0 for s in seqs) else None,
        )
        return input_ids, ctx, ends[due_seqs] - 1

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
