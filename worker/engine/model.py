"""Llama-family decoder (Llama, Mistral, Qwen2): one decoder layer for serving and training.

The layer's code is written once (``DecoderLayer.steps``); a ``LayerBackend`` supplies what differs:
serving's ``PagedBackend`` (a flat token batch over the paged KV cache, LoRA from stacked adapter
slots) or training's ``finetune.layer.ChunkBackend`` (a packed chunk's attention, trainable LoRA).
Parameter names follow Hugging Face's, except that q/k/v and gate/up projections are merged into
``qkv_proj`` and ``gate_up_proj`` (one GEMM each, ``lora_targets.MERGED``); ``load_hf_state_dict``
merges them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from flexllm.kernels.lora import lora_expand, lora_shrink
from flexllm.kernels.paged_attention import paged_attention
from flexllm.kernels.rms_norm import rms_norm
from flexllm.kernels.swiglu import silu_and_mul
from flexllm.worker.engine.context import StepContext
from flexllm.worker.engine.fused import LayerSteps, Rider, run_alone, run_fused
from flexllm.worker.engine.lora_targets import MERGED, TARGETS

# architecture name -> whether q/k/v projections carry a bias (None: the config's attention_bias)
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": None, "MistralForCausalLM": None, "Qwen2ForCausalLM": True}


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a decoder, read from a Hugging Face config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    qkv_bias: bool
    tie_word_embeddings: bool
    sliding_windows: tuple[int | None, ...]  # per layer: a query sees its last W keys, or None: all of them

    def target_features(self) -> dict[str, tuple[int, int]]:
        """LoRA target -> (in, out) features of its projection."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @classmethod
    def from_hf_config(cls, config) -> ModelArgs:
        arch = (getattr(config, "architectures", None) or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}: supported are {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        qkv_bias = SUPPORTED_ARCHITECTURES[arch]
        if qkv_bias is None:
            qkv_bias = bool(getattr(config, "attention_bias", False))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            qkv_bias=qkv_bias,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            sliding_windows=_sliding_windows(config, arch),
        )


def _sliding_windows(config, arch: str) -> tuple[int | None, ...]:
    """Each layer's sliding window as Hugging Face applies it: Mistral's ``sliding_window`` on every
    layer; Qwen2's, with ``use_sliding_window``, on the layers its ``layer_types`` mark
    "sliding_attention" (from ``max_window_layers`` on). Raises ``ValueError`` for what is not honoured."""
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if arch == "LlamaForCausalLM" or window is None:
        return (None,) * layers
    if arch == "Qwen2ForCausalLM" and not getattr(config, "use_sliding_window", False):
        return (None,) * layers
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window must be a positive number of tokens, not {window!r}")
    if arch == "MistralForCausalLM":
        return (window,) * layers
    types = getattr(config, "layer_types", None) or [
        "sliding_attention" if i >= config.max_window_layers else "full_attention" for i in range(layers)
    ]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != layers:
        raise ValueError(f"layer_types {types!r}: only full_attention and sliding_attention layers, one per layer, "
                         f"are supported (not {', '.join(unknown) or f'{len(types)} for {layers} layers'})")
    return tuple(window if kind == "sliding_attention" else None for kind in types)


class LoRALinear(nn.Linear):
    """A frozen linear whose output slices (e.g. q, k, v) are LoRA targets.

    Serving slots: ``lora_a[name]`` [S, R, in], ``lora_b[name]`` [S, out_slice, R], ``lora_scaling[name]``
    [S] (filled by ``lora.LoRAManager``; the per-token slot index comes with the step's ``LoRABatch``).
    """

    def __init__(self, args: ModelArgs, merged: str, bias: bool = False):
        features, targets = args.target_features(), MERGED[merged]
        ends = list(itertools.accumulate(features[t][1] for t in targets))
        super().__init__(features[targets[0]][0], ends[-1], bias=bias)
        self.out_slices = {t: (end - features[t][1], end) for t, end in zip(targets, ends, strict=True)}
        self.lora_a: dict[str, torch.Tensor] = {}
        self.lora_b: dict[str, torch.Tensor] = {}
        self.lora_scaling: dict[str, torch.Tensor] = {}

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """y [T, out] -> its target slices, e.g. q, k, v."""
        return y.split([end - start for start, end in self.out_slices.values()], dim=-1)

    def steps(self, x: torch.Tensor, backend: LayerBackend) -> LayerSteps:
        """x [T, in] -> y [T, out]: the base GEMM is left to the driver (``fused``), the LoRA deltas to the backend."""
        y = yield self, x
        return backend.lora(self, x, y)


class LayerBackend(Protocol):
    """What a decoder layer leaves to its caller, serving (``PagedBackend``) or training
    (``finetune.layer.ChunkBackend``): ``add_norm`` x, residual [T, H] -> (rms_norm(x + residual),
    x + residual); ``silu_mul`` gate_up [T, 2I] -> [T, I]; ``lora`` the base output y [T, out] of x
    [T, in] plus the module's LoRA deltas; ``attention`` rotated q [T, H_q, D], k, v [T, H_kv, D] ->
    causal attention output [T, H_q, D]."""

    cos: torch.Tensor  # [T, 1, D/2]: the rotary tables of the rows' positions
    sin: torch.Tensor

    def add_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...

    def lora(self, module: LoRALinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def attention(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class RotaryEmbedding(nn.Module):
    """RoPE with Hugging Face's frequency and scaling rules (default, linear, llama3, yarn, ...)."""

    def __init__(self, hf_config, head_dim: int):
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = getattr(hf_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = float(scaling)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, D/2] in ``dtype``."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        cos = (freqs.cos() * self.attention_scaling).to(dtype)
        sin = (freqs.sin() * self.attention_scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by cos/sin [T, 1, D/2] (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.sliding_window = args.sliding_windows[layer]
        self.head_dim, self.num_heads, self.num_kv_heads = args.head_dim, args.num_heads, args.num_kv_heads
        self.kv_width = args.num_kv_heads * args.head_dim
        self.qkv_proj = LoRALinear(args, "qkv_proj", bias=args.qkv_bias)
        self.o_proj = LoRALinear(args, "o_proj")
        self.scale = args.head_dim**-0.5
        self.k_cache = torch.empty(0)  # [num_blocks, block_size, H_kv, D], set by the model runner
        self.v_cache = torch.empty(0)

    def steps(self, x: torch.Tensor, backend: LayerBackend) -> LayerSteps:
        T, D = x.shape[0], self.head_dim
        qkv = yield from self.qkv_proj.steps(x, backend)  # [T, (H_q + 2 H_kv) * D]: q, k, v side by side
        qk = apply_rotary(qkv[:, :-self.kv_width].view(T, -1, D), backend.cos, backend.sin)  # one rotation for q and k
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, H_q, D], [T, H_kv, D]
        v = qkv[:, -self.kv_width:].view(T, -1, D)  # [T, H_kv, D]
        out = backend.attention(self, q, k, v)
        return (yield from self.o_proj.steps(out.reshape(T, -1), backend))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = LoRALinear(args, "gate_up_proj")
        self.down_proj = LoRALinear(args, "down_proj")

    def steps(self, x: torch.Tensor, backend: LayerBackend) -> LayerSteps:
        gate_up = yield from self.gate_up_proj.steps(x, backend)
        return (yield from self.down_proj.steps(backend.silu_mul(gate_up), backend))


class DecoderLayer(nn.Module):
    """One decoder layer for serving and training alike; what differs is the ``LayerBackend``."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = nn.Parameter(torch.ones(args.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(args.hidden_size))
        self.eps = args.rms_norm_eps

    def steps(self, x: torch.Tensor, residual: torch.Tensor | None, backend: LayerBackend) -> LayerSteps:
        """x, residual [T, H] -> (mlp output, residual), whose sum is the layer's output (vLLM's fused
        add + norm; residual None: x is the layer's input). A generator: the frozen GEMMs are left to
        the driver, ``fused.run_alone`` or ``run_fused``."""
        h, residual = backend.add_norm(x, self.input_layernorm, self.eps, residual)
        h = yield from self.self_attn.steps(h, backend)
        h, residual = backend.add_norm(h, self.post_attention_layernorm, self.eps, residual)
        return (yield from self.mlp.steps(h, backend)), residual


@dataclass
class PagedBackend:
    """Serving: the step's flat batch writes its K/V into the paged cache and attends over it; each
    token adds the LoRA deltas of its adapter slot."""

    ctx: StepContext
    cos: torch.Tensor  # [T, 1, D/2]
    sin: torch.Tensor
    attention_plans: dict = field(default_factory=dict)  # the torch reference's per-step plans, by window
    add_norm = staticmethod(rms_norm)
    silu_mul = staticmethod(silu_and_mul)

    def lora(self, module: LoRALinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each token's slot's deltas, added to y in place."""
        if self.ctx.lora is not None:
            indices = self.ctx.lora.indices
            for name, lora_a in module.lora_a.items():
                start, end = module.out_slices[name]
                xa = lora_shrink(x, lora_a, indices)  # [T, R]
                lora_expand(y[:, start:end], xa, module.lora_b[name], indices, module.lora_scaling[name])
        return y

    def attention(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx, (h_kv, d) = self.ctx, k.shape[1:]
        attn.k_cache.view(-1, h_kv, d)[ctx.slot_mapping] = k
        attn.v_cache.view(-1, h_kv, d)[ctx.slot_mapping] = v
        return paged_attention(q, attn.k_cache, attn.v_cache, ctx.block_tables, ctx.query_start_loc,
                               ctx.context_lens, attn.scale, attn.sliding_window, self.attention_plans)


class CausalLM(nn.Module):
    """The decoder plus LM head; ``forward`` returns hidden states [T, H] of the flat batch."""

    def __init__(self, args: ModelArgs, hf_config):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = nn.Parameter(torch.ones(args.hidden_size))
        self.rotary = RotaryEmbedding(hf_config, args.head_dim)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, ctx: StepContext, riders: Sequence[Rider] = ()) -> torch.Tensor:
        """``riders``: fine-tuning rows that share each of their layers' projections with the batch."""
        x = self.embed_tokens(input_ids)  # [T, H]
        backend = PagedBackend(ctx, *self.rotary.cos_sin(ctx.positions, x.dtype))
        residual = None
        for i, layer in enumerate(self.layers):
            groups = [(layer.steps(x, residual, backend), False)]
            groups += [(r.layer_steps(i), r.requires_grad) for r in riders if i in r.layers]
            x, residual = run_fused(groups)[0] if len(groups) > 1 else run_alone(groups[0][0])
        x, _ = rms_norm(x, self.norm, self.args.rms_norm_eps, residual)
        return x

    def projection(self, layer: int, target: str) -> LoRALinear:
        """The merged projection of decoder layer ``layer`` that holds LoRA target ``target``."""
        block, merged = TARGETS[target]
        return getattr(getattr(self.layers[layer], block), merged)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] in fp32."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a Hugging Face ``*ForCausalLM`` state dict in, merging q/k/v and gate/up."""
        own = self.state_dict()
        for name, target in own.items():
            hf = _hf_name(name)
            parent, _, leaf = hf.rpartition(".")
            base, _, module = parent.rpartition(".")
            parts = [f"{base}.{p}.{leaf}" for p in MERGED[module]] if module in MERGED else [hf]
            source = torch.cat([state[p] for p in parts]) if len(parts) > 1 else state[parts[0]]
            if source.shape != target.shape:
                raise ValueError(f"weight {hf}: shape {tuple(source.shape)} != expected {tuple(target.shape)}")
            target.copy_(source)


def _hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face one (norms are bare parameters here)."""
    if name.startswith("lm_head."):
        return name
    if name.endswith(("input_layernorm", "post_attention_layernorm")) or name == "norm":
        name += ".weight"
    return "model." + name
