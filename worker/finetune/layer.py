"""Training's backend of the engine model's decoder layer: one packed token chunk, LoRA added, base frozen.

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
from flexllm.worker.engine.lora_targets import LORA_TARGETS
from flexllm.worker.engine.model import Attention, CausalLM, LoRALinear
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


class ChunkBackend:
    """Training's ``LayerBackend`` for one layer on one chunk: causal attention per sequence over its
    earlier K/V (``k_past``, ``v_past`` [p, H_kv, D]) plus the chunk's own, kept in ``k``, ``v``
    [n, H_kv, D]; the trainable LoRA deltas, with dropout; the pruned autograd functions."""

    def __init__(self, chunk: ChunkInput, lora: LoRAWeights, layer: int, k_past: torch.Tensor, v_past: torch.Tensor):
        self.chunk, self.scaling, self.layer = chunk, lora.scaling, layer
        self.cos, self.sin = chunk.cos, chunk.sin
        self.pairs = lora.pairs(layer)
        self.k_past, self.v_past = k_past, v_past
        self.k = self.v = torch.empty(0)  # the chunk's own K/V [n, H_kv, D], set by ``attention``

    silu_mul = staticmethod(silu_mul)

    @staticmethod
    def add_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
        return rms_norm(x, weight, eps), x

    def lora(self, module: LoRALinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [n, out] plus the deltas of the module's trained targets (out of place: autograd)."""
        if not any(t in self.pairs for t in module.out_slices):
            return y
        parts = list(module.split(y))
        for i, target in enumerate(module.out_slices):
            if target in self.pairs:
                a, b = self.pairs[target]
                xd = x if self.chunk.dropout is None else self.chunk.dropout.apply(x, self.layer, target)
                parts[i] = parts[i] + (xd @ a.t().to(x.dtype)) @ (b.t().to(x.dtype) * self.scaling)
        return torch.cat(parts, dim=-1)

    def attention(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.k, self.v = k, v
        return chunk_attention(q, k, v, self.k_past, self.v_past, self.chunk.runs, attn.scale, attn.sliding_window)


def decoder_layer(model: CausalLM, lora: LoRAWeights, layer: int, x: torch.Tensor, chunk: ChunkInput,
                  k_past: torch.Tensor, v_past: torch.Tensor) -> LayerSteps:
    """x [n, H] (residual stream) -> (out [n, H], k [n, H_kv, D], v [n, H_kv, D]).

    A generator whose frozen GEMMs are left to the driver: ``engine.fused.run_alone`` runs it on its
    own, ``run_fused`` next to the inference batch."""
    backend = ChunkBackend(chunk, lora, layer, k_past, v_past)
    out, residual = yield from model.layers[layer].steps(x, None, backend)
    return out + residual, backend.k, backend.v


def loss_sum(model: CausalLM, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the final residual x [n, H] against targets [n] (-100 = ignored).

    Only the rows with a target go through the final norm and the LM head.
    """
    rows = targets != -100
    h = rms_norm(x[rows], model.norm, model.args.rms_norm_eps)
    return cross_entropy_sum(model.compute_logits(h), targets[rows], x.dtype)  # logits [m, V] fp32
