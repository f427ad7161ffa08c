"""Training forward of the engine model's layers on one packed token chunk, LoRA added, base frozen.

A chunk is a slice of a micro-batch's packed token stream: several sequences back to back, each
with its own positions and causal (block-diagonal) attention. The same code serves the no-grad
forward units and the backward units' recomputation, so a unit's graph is exactly the chunk's
forward. Dropout masks are a hash of (sequence key, position in the sequence, feature): identical
however the stream is cut into chunks, windows or layer blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexllm.worker.engine.fused import LayerSteps
from flexllm.worker.engine.model import LORA_TARGETS, CausalLM, LoRALinear, apply_rotary
from flexllm.worker.finetune.functions import Run, chunk_attention, cross_entropy_sum, rms_norm, silu_mul
from flexllm.worker.finetune.lora_params import LoRAWeights

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 tensors holding values < 2**32)."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


@dataclass(frozen=True)
class Dropout:
    """LoRA input dropout with probability ``p``; ``keys`` [n] and ``positions`` [n] name each token."""

    p: float
    keys: torch.Tensor  # [n] int64: the token's sequence key (one per sequence and step)
    positions: torch.Tensor  # [n] int64: the token's position in its sequence

    def apply(self, x: torch.Tensor, layer: int, target: str) -> torch.Tensor:
        """x [n, in] -> dropped and rescaled x."""
        width = x.shape[1]
        salt = _hash32((self.keys * 131 + layer * len(LORA_TARGETS) + LORA_TARGETS.index(target)) & _MASK32)
        index = self.positions[:, None] * width + torch.arange(width, device=x.device)  # [n, in]
        bits = _hash32((index ^ salt[:, None]) & _MASK32)
        keep = bits.double() >= self.p * 2**32
        return x * keep.to(x.dtype) / (1 - self.p)


@dataclass
class ChunkInput:
    """A chunk's rotary tables, its sequences' attention runs (block-diagonal attention), dropout."""

    cos: torch.Tensor  # [n, 1, D/2]
    sin: torch.Tensor
    runs: list[Run]  # per sequence: (first key, first query, query end), 0 = the first past key
    dropout: Dropout | None


def project(module: LoRALinear, x: torch.Tensor, lora: LoRAWeights, layer: int, chunk: ChunkInput) -> LayerSteps:
    """Frozen merged projection of x [n, in] (left to the driver) plus the LoRA deltas of its trained
    slices -> [n, out]."""
    y = yield module, x
    pairs = lora.pairs(layer)
    if not any(t in pairs for t in module.out_slices):
        return y
    parts = list(y.split([end - start for start, end in module.out_slices.values()], dim=-1))
    for i, target in enumerate(module.out_slices):
        if target in pairs:
            a, b = pairs[target]
            xd = x if chunk.dropout is None else chunk.dropout.apply(x, layer, target)
            parts[i] = parts[i] + (xd @ a.t().to(x.dtype)) @ (b.t().to(x.dtype) * lora.scaling)
    return torch.cat(parts, dim=-1)


def decoder_layer(
    model: CausalLM,
    lora: LoRAWeights,
    layer: int,
    x: torch.Tensor,
    chunk: ChunkInput,
    k_past: torch.Tensor,
    v_past: torch.Tensor,
) -> LayerSteps:
    """x [n, H] (residual stream) -> (out [n, H], k [n, H_kv, D], v [n, H_kv, D]).

    A generator whose frozen GEMMs are left to the driver: ``engine.fused.run_alone`` runs it on its
    own, ``run_fused`` next to the inference batch."""
    block, args = model.layers[layer], model.args
    attn, mlp = block.self_attn, block.mlp
    n = x.shape[0]
    h = rms_norm(x, block.input_layernorm, args.rms_norm_eps)
    qkv = yield from project(attn.qkv_proj, h, lora, layer, chunk)
    q, k, v = qkv.split(
        [
            args.num_heads * args.head_dim,
            args.num_kv_heads * args.head_dim,
            args.num_kv_heads * args.head_dim,
        ],
        dim=-1,
    )
    q = apply_rotary(q.view(n, args.num_heads, args.head_dim), chunk.cos, chunk.sin)
    k = apply_rotary(k.view(n, args.num_kv_heads, args.head_dim), chunk.cos, chunk.sin)
    v = v.view(n, args.num_kv_heads, args.head_dim)
    o = chunk_attention(q, k, v, k_past, v_past, chunk.runs, attn.scale, attn.sliding_window).reshape(n, -1)
    x = x + (yield from project(attn.o_proj, o, lora, layer, chunk))
    h = rms_norm(x, block.post_attention_layernorm, args.rms_norm_eps)
    gate_up = yield from project(mlp.gate_up_proj, h, lora, layer, chunk)
    return x + (yield from project(mlp.down_proj, silu_mul(gate_up), lora, layer, chunk)), k, v


def loss_sum(model: CausalLM, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the final residual x [n, H] against targets [n] (-100 = ignored).

    Only the rows with a target go through the final norm and the LM head.
    """
    rows = targets != -100
    h = rms_norm(x[rows], model.norm, model.args.rms_norm_eps)
    return cross_entropy_sum(model.compute_logits(h), targets[rows], x.dtype)  # logits [m, V] fp32
