"""Iteration-time cost models for the co-serving simulator (``simulate.py``).

An iteration is described by its ``Work``: the inference rows (new tokens and the context they
attend to), the fine-tuning tokens fused into its forward, and the fine-tuning units that need a
pass of their own (a backward unit's recomputation + backpropagation, or any unit with no inference
forward to ride). Two models price it:

- ``MeasuredCost``: a linear model over the iteration's terms (``MEASURED_TERMS``: inference tokens,
  decode rows, decode context, fine-tuning forward/backward tokens, fused riders, units of their own
  pass, fixed overhead), fitted by non-negative least squares on every iteration of real
  ``coserve.py`` runs on this machine;
- ``RooflineCost``: FLOPs and bytes of each pass for a model shape on a GPU, each pass taking
  max(FLOPs / achieved FLOP/s, bytes / achieved bandwidth) plus a fixed per-pass overhead. The
  achieved fractions are the only free parameters, all in ``EFFICIENCY`` with their sources; the GPU
  day script (``benchmarks/gpu_check.sh``) measures them on a lent GPU.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from flexllm.worker.coserve.latency import IterationShape, nonnegative_lstsq


@dataclass(frozen=True)
class Work:
    """One iteration's work."""

    rows: tuple[tuple[int, int], ...] = ()  # inference (new tokens, context after them) per sequence
    finetune_forward_tokens: int = 0  # fused into the inference forward (or run alone)
    finetune_backward_tokens: int = 0
    own_passes: int = 0  # fine-tuning units that ran a pass of their own
    backward_passes: int = 0  # of those, backward units (recompute + backpropagate)

    def shape(self) -> IterationShape:
        """The latency model's features of this work."""
        decode_ctx = sum(ctx for new, ctx in self.rows if new == 1)
        return IterationShape(sum(new for new, _ in self.rows), decode_ctx, self.finetune_forward_tokens,
                              self.finetune_backward_tokens, self.own_passes)


# The measured model's terms: seconds per iteration = intercept (any work at all) + a coefficient per
# term. Decode rows pay a per-row cost beyond their token (paged attention and sampling per sequence);
# fused riders a fixed cost per forward chunk riding the inference forward; units of their own pass
# (a backward unit, or a unit with no inference forward to ride) a fixed cost each.
MEASURED_TERMS = ("inference_tokens", "decode_rows", "decode_context_tokens", "finetune_forward_tokens",
                  "finetune_backward_tokens", "fused_riders", "finetune_units")


def measured_terms(inference_tokens: int, decode_rows: int, decode_context_tokens: int, forward_tokens: int,
                   backward_tokens: int, units: int) -> list[float]:
    """One iteration's terms (``MEASURED_TERMS`` order, 1 for the intercept first)."""
    fused = float(inference_tokens > 0 and forward_tokens > 0 and units == 0)  # one job: its chunk rode along
    return [1.0, inference_tokens, decode_rows, decode_context_tokens, forward_tokens, backward_tokens, fused, units]


def record_terms(record: dict[str, float]) -> list[float]:
    """``measured_terms`` of an iteration recorded by ``replay`` (``ITERATION_COLUMNS`` as keys)."""
    return measured_terms(*(int(record[k]) for k in ("inference_tokens", "decode_rows", "decode_context_tokens",
                                                     "finetune_forward_tokens", "finetune_backward_tokens",
                                                     "finetune_units")))


class MeasuredCost:
    """Seconds of an iteration from coefficients fitted on this machine's measured iterations, times a
    noise factor drawn (seeded) from the measured iterations' own ``noise``: measured / fitted seconds.
    On a machine shared with other processes an iteration's time varies well beyond its shape, and the
    scheduler reacts to that (its latency model's error margins), so the simulator replays the same spread."""

    def __init__(self, coef: dict[str, float], noise: list[float] = (), seed: int = 0):
        self.coef = coef  # "intercept" and MEASURED_TERMS -> seconds per unit of each
        self.noise = list(noise)
        self.rng = random.Random(seed)

    def seconds(self, work: Work, iteration: bool = True) -> float:
        """``iteration``: the work is a whole iteration (False: more units within one, no overhead of its own)."""
        if work == Work():
            return 0.0
        shape = work.shape()
        decode_rows = sum(1 for new, _ in work.rows if new == 1)
        terms = measured_terms(shape.inference_tokens, decode_rows, shape.decode_context_tokens,
                               shape.finetune_forward_tokens, shape.finetune_backward_tokens, shape.finetune_units)
        terms[0] = float(iteration)
        seconds = sum(c * x for c, x in zip(self.coef.values(), terms, strict=True))
        return seconds * self.rng.choice(self.noise) if self.noise else seconds

    @classmethod
    def fit(cls, records: list[dict[str, float]], seed: int = 0) -> MeasuredCost:
        """Non-negative least squares over measured iterations (``replay``'s records), and their noise."""
        terms = [record_terms(r) for r in records]
        coef = nonnegative_lstsq(terms, [r["seconds"] for r in records])
        fitted = cls(dict(zip(("intercept", *MEASURED_TERMS), (c or 0.0 for c in coef), strict=True)))
        predicted = [sum(c * x for c, x in zip(fitted.coef.values(), t, strict=True)) for t in terms]
        noise = [r["seconds"] / p for r, p in zip(records, predicted, strict=True) if p > 0]
        return cls(fitted.coef, noise, seed)


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense peak, FLOP/s
    hbm_bytes_per_s: float
    memory_bytes: float


# NVIDIA's datasheets (dense bf16 Tensor Core peak, HBM bandwidth, memory): A100 SXM4 80GB
# (312 TFLOP/s, 2.039 TB/s), H100 SXM5 (989 TFLOP/s, 3.35 TB/s, 80 GB), H200 SXM (989 TFLOP/s,
# 4.8 TB/s, 141 GB).
GPUS = {
    "A100": GPU("A100-SXM4-80GB", 312e12, 2.039e12, 80e9),
    "H100": GPU("H100-SXM5-80GB", 989e12, 3.35e12, 80e9),
    "H200": GPU("H200-SXM-141GB", 989e12, 4.8e12, 141e9),
}

# The only free parameters of the roofline model. Until benchmarks/gpu_check.sh has measured them on
# a lent GPU they are assumptions, stated as such; gpu.json replaces them when present.
EFFICIENCY: dict[str, tuple[float, str]] = {
    "gemm": (0.70, "assumed: large bf16 GEMMs reach ~70% of dense peak; measure with gpu_check.sh"),
    "hbm": (0.80, "assumed: streaming kernels reach ~80% of HBM bandwidth; measure with gpu_check.sh"),
    "pass_overhead_s": (0.004, "assumed: host overhead of one forward pass (launches, scheduling, "
                               "sampling) without CUDA graphs; measure with gpu_check.sh"),
    "tensor_parallel": (0.90, "assumed: all-reduce overhead leaves 90% of N GPUs' throughput"),
}


CALIBRATION = Path(__file__).resolve().parent / "results" / "gpu.json"  # from calibrate_gpu.py, if run


def efficiency() -> dict[str, float]:
    """``EFFICIENCY``'s values, with what ``calibrate_gpu.py`` measured on a GPU in their place."""
    factors = {k: v for k, (v, _) in EFFICIENCY.items()}
    if CALIBRATION.exists():
        measured = json.loads(CALIBRATION.read_text()).get("calibration", {})
        factors |= {k: float(measured[k]) for k in factors if k in measured}
    return factors


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("q", "v")
    bytes_per_param: int = 2  # bf16

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o + k, v
        return attn + 3 * self.hidden * self.intermediate  # gate, up, down

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param

    @property
    def lora_params_per_layer(self) -> int:
        dims = {"q": (self.hidden, self.heads * self.head_dim), "k": (self.hidden, self.kv_heads * self.head_dim),
                "v": (self.hidden, self.kv_heads * self.head_dim), "o": (self.heads * self.head_dim, self.hidden)}
        return sum(self.lora_rank * (i + o) for i, o in (dims[t] for t in self.lora_targets))


# Public model configs (config.json on the Hugging Face hub).
MODELS = {
    "llama-3.1-8b": ModelShape("Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, 128256),
    "qwen-2.5-14b": ModelShape("Qwen2.5-14B", 48, 5120, 40, 8, 128, 13824, 152064),
    "qwen-2.5-32b": ModelShape("Qwen2.5-32B", 64, 5120, 40, 8, 128, 27648, 152064),
}


@dataclass
class RooflineCost:
    """Seconds of one iteration of ``model`` on ``gpus`` GPUs (tensor parallel) of kind ``gpu``."""

    model: ModelShape
    gpu: GPU
    gpus: float = 1  # tensor parallel over several; a fraction: that share of one GPU (a separate split)
    efficiency: dict[str, float] = field(default_factory=efficiency)

    def _pass_seconds(self, flops: float, bytes_moved: float) -> float:
        scale = self.gpus * (self.efficiency["tensor_parallel"] if self.gpus > 1 else 1.0)  # GPUs' worth
        compute = flops / (self.gpu.bf16_flops * self.efficiency["gemm"] * scale)
        memory = bytes_moved / (self.gpu.hbm_bytes_per_s * self.efficiency["hbm"] * scale)
        return max(compute, memory) + self.efficiency["pass_overhead_s"]

    def _forward(self, rows: tuple[tuple[int, int], ...], extra_tokens: int) -> tuple[float, float]:
        """FLOPs and bytes of one forward pass over ``rows`` plus ``extra_tokens`` fine-tuning rows
        (those attend within their own short sequences: counted as linear work only)."""
        m = self.model
        tokens = sum(new for new, _ in rows) + extra_tokens
        linear = 2 * m.layers * m.layer_params * tokens
        # attention: QK^T and PV over the context each new token sees
        attended = sum(new * (ctx - (new - 1) / 2) for new, ctx in rows)
        attention = 4 * m.layers * m.heads * m.head_dim * attended
        sampled = sum(1 for new, _ in rows if new) * 2 * m.hidden * m.vocab
        weights = m.params * m.bytes_per_param
        kv_read = sum(ctx for _, ctx in rows) * m.kv_bytes_per_token
        return linear + attention + sampled, weights + kv_read

    def _finetune_extra(self, forward_tokens: int, backward_tokens: int) -> float:
        """FLOPs beyond the fused linear rows: LoRA (forward; backward input and weight grads) and the
        LM head + loss on every fine-tuning token."""
        m = self.model
        lora = 2 * m.layers * m.lora_params_per_layer
        head = 2 * m.hidden * m.vocab
        return forward_tokens * (lora + head) + backward_tokens * 2 * (lora + head)

    def seconds(self, work: Work, iteration: bool = True) -> float:
        """(Every pass carries its own overhead, so ``iteration`` changes nothing here.)"""
        total = 0.0
        m = self.model
        if work.rows or work.finetune_forward_tokens:
            flops, moved = self._forward(work.rows, work.finetune_forward_tokens)
            flops += self._finetune_extra(work.finetune_forward_tokens, 0)
            # forward units with no inference forward to ride each read the weights in a pass of their own
            passes = 1 if work.rows else max(1, work.own_passes - work.backward_passes)
            moved += (passes - 1) * m.params * m.bytes_per_param
            total += self._pass_seconds(flops, moved) + (passes - 1) * self.efficiency["pass_overhead_s"]
        if work.finetune_backward_tokens:
            # frozen base: recompute the forward, then input gradients only (dX = dY W): 2x the linear
            # FLOPs of a forward, the weights read twice, once per backward unit's pass
            linear = 2 * m.layers * m.layer_params * work.finetune_backward_tokens
            flops = 2 * linear + self._finetune_extra(0, work.finetune_backward_tokens)
            passes = max(1, work.backward_passes)
            moved = 2 * passes * m.params * m.bytes_per_param
            total += self._pass_seconds(flops, moved) + (passes - 1) * self.efficiency["pass_overhead_s"]
        return total

    def kv_cache_tokens(self, memory_fraction: float = 0.9) -> int:
        """KV-cache capacity in tokens: the GPUs' memory left after the weights and a 10% reserve."""
        free = self.gpus * self.gpu.memory_bytes * memory_fraction - self.model.params * self.model.bytes_per_param
        return max(0, int(free // self.model.kv_bytes_per_token))

