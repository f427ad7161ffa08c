"""Kernel benchmark: each Triton kernel vs its torch reference (and SDPA for attention), Llama-3.1-8B shapes.

    python benchmarks/kernel_speed.py           # CUDA GPU: times every case, writes results/kernels.json
    python benchmarks/kernel_speed.py --smoke   # no GPU needed: tiny shapes through the Triton interpreter,
                                           # checks the outputs agree; no timings, nothing written

Without a GPU (and without --smoke) it says so and exits 0: it never reports numbers it did not measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "kernels.json"


@dataclass(frozen=True)
class Config:
    """Model dimensions and the workload sizes benchmarked at them."""

    hidden: int = 4096
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    rank: int = 16
    slots: int = 4  # resident LoRA slots
    block_size: int = 16  # KV-cache block
    norm_tokens: tuple[int, ...] = (1, 64, 2048, 8192)
    lora_tokens: tuple[int, ...] = (64, 2048)  # a decode batch, a prefill/fine-tuning chunk
    backward_tokens: tuple[int, ...] = (2048, 8192)
    decode: tuple[tuple[int, int], ...] = ((64, 2048), (8, 8192))  # (sequences, context)
    chunks: tuple[tuple[int, int, int], ...] = ((4, 1024, 1024), (4, 512, 2048))  # (seqs, q_len, ctx)


LLAMA_8B = Config()
SMOKE = Config(
    hidden=64, q_heads=4, kv_heads=2, head_dim=16, intermediate=48, rank=8, slots=3, block_size=4,
    norm_tokens=(1, 5), lora_tokens=(3, 20), backward_tokens=(6,), decode=((3, 10),), chunks=((2, 6, 6), (2, 3, 9)),
)  # fmt: skip


@dataclass
class Case:
    """Callables computing the same output, keyed by provider ("triton", "torch", "sdpa")."""

    kernel: str
    name: str
    providers: dict[str, Callable[[], torch.Tensor]]
    ms: dict[str, float] = field(default_factory=dict)
    max_abs_err: dict[str, float] = field(default_factory=dict)


def _randn(*shape, dtype, device, scale=1.0):
    return torch.randn(*shape, device=device).mul_(scale).to(dtype)


def _slot_indices(tokens: int, slots: int, device) -> torch.Tensor:
    """A token per slot round-robin with every fifth token on the base model (-1)."""
    idx = torch.arange(tokens, device=device) % slots
    return torch.where(torch.arange(tokens, device=device) % 5 == 4, -1, idx).to(torch.int32)


def norm_act_cases(cfg: Config, dtype, device) -> list[Case]:
    from flexllm.kernels.rms_norm import rms_norm_reference
    from flexllm.kernels.swiglu import silu_and_mul_reference
    from flexllm.kernels.triton_ops.rms_norm import rms_norm_triton
    from flexllm.kernels.triton_ops.swiglu import silu_and_mul_triton

    cases = []
    weight = _randn(cfg.hidden, dtype=dtype, device=device)
    for t in cfg.norm_tokens:
        x, res = (_randn(t, cfg.hidden, dtype=dtype, device=device) for _ in range(2))
        cases.append(Case("rms_norm+residual", f"T={t} H={cfg.hidden}", {
            "triton": lambda x=x, res=res: rms_norm_triton(x, weight, 1e-5, res)[0],
            "torch": lambda x=x, res=res: rms_norm_reference(x, weight, 1e-5, res)[0],
        }))  # fmt: skip
    for t in cfg.norm_tokens[1:]:
        gate_up = _randn(t, 2 * cfg.intermediate, dtype=dtype, device=device)
        cases.append(Case("silu_and_mul", f"T={t} I={cfg.intermediate}", {
            "triton": lambda g=gate_up: silu_and_mul_triton(g),
            "torch": lambda g=gate_up: silu_and_mul_reference(g),
        }))  # fmt: skip
    return cases


def lora_cases(cfg: Config, dtype, device) -> list[Case]:
    from flexllm.kernels.lora import lora_expand_reference, lora_shrink_reference
    from flexllm.kernels.triton_ops.lora import lora_expand_triton, lora_shrink_triton

    h, r, s = cfg.hidden, cfg.rank, cfg.slots
    lora_a = _randn(s, r, h, dtype=dtype, device=device, scale=h**-0.5)
    lora_b = _randn(s, h, r, dtype=dtype, device=device, scale=r**-0.5)
    scaling = torch.full((s,), 2.0, device=device)
    cases = []
    for t in cfg.lora_tokens:
        x = _randn(t, h, dtype=dtype, device=device)
        xa = _randn(t, r, dtype=dtype, device=device)
        idx = _slot_indices(t, s, device)
        y_triton, y_torch = (torch.zeros(t, h, dtype=dtype, device=device) for _ in range(2))
        for grouped, mode in ((False, "bgmv"), (True, "sgmv")):
            cases.append(Case(f"lora_shrink/{mode}", f"T={t} H={h} R={r} S={s}", {
                "triton": lambda x=x, idx=idx, g=grouped: lora_shrink_triton(x, lora_a, idx, grouped=g),
                "torch": lambda x=x, idx=idx: lora_shrink_reference(x, lora_a, idx),
            }))  # fmt: skip
            cases.append(Case(f"lora_expand/{mode}", f"T={t} H={h} R={r} S={s}", {  # accumulates in place
                "triton": lambda y=y_triton, xa=xa, idx=idx, g=grouped: lora_expand_triton(
                    y.zero_(), xa, lora_b, idx, scaling, grouped=g
                ),
                "torch": lambda y=y_torch, xa=xa, idx=idx: lora_expand_reference(y.zero_(), xa, lora_b, idx, scaling),
            }))  # fmt: skip
    return cases


def lora_backward_cases(cfg: Config, dtype, device) -> list[Case]:
    """The trainable adapter: forward + backward (dX, dA, dB) vs torch autograd of the plain matmuls."""
    from flexllm.kernels.lora import lora_linear

    h, r = cfg.hidden, cfg.rank
    lora_a = _randn(r, h, dtype=dtype, device=device, scale=h**-0.5).requires_grad_()
    lora_b = _randn(h, r, dtype=dtype, device=device, scale=r**-0.5).requires_grad_()

    def fwd_bwd(x, dy, fn):
        return torch.cat([g.flatten() for g in torch.autograd.grad(fn(x), (x, lora_a, lora_b), dy)])

    cases = []
    for t in cfg.backward_tokens:
        x = _randn(t, h, dtype=dtype, device=device).requires_grad_()
        dy = _randn(t, h, dtype=dtype, device=device)
        cases.append(Case("lora_fwd+bwd", f"T={t} H={h} R={r}", {
            "triton": lambda x=x, dy=dy: fwd_bwd(x, dy, lambda v: lora_linear(v, lora_a, lora_b, 2.0)),
            "torch": lambda x=x, dy=dy: fwd_bwd(x, dy, lambda v: 2.0 * (v @ lora_a.t()) @ lora_b.t()),
        }))  # fmt: skip
    return cases


def _paged_batch(cfg: Config, seqs: int, q_len: int, ctx: int, dtype, device):
    """Equal-length sequences in a shuffled block pool; also their dense K/V [B, H_kv, ctx, D] for SDPA."""
    blocks = -(-ctx // cfg.block_size)
    cache_shape = (seqs * blocks, cfg.block_size, cfg.kv_heads, cfg.head_dim)
    k_cache, v_cache = (_randn(*cache_shape, dtype=dtype, device=device) for _ in range(2))
    block_tables = torch.randperm(seqs * blocks, device=device).view(seqs, blocks).to(torch.int32)
    q = _randn(seqs * q_len, cfg.q_heads, cfg.head_dim, dtype=dtype, device=device)
    query_start_loc = torch.arange(0, seqs * q_len + 1, q_len, device=device, dtype=torch.int32)
    context_lens = torch.full((seqs,), ctx, device=device, dtype=torch.int32)

    def dense(cache):  # [B, H_kv, ctx, D]
        return cache[block_tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()

    args = (q, k_cache, v_cache, block_tables, query_start_loc, context_lens, cfg.head_dim**-0.5)
    return args, dense(k_cache), dense(v_cache)


def _sdpa(q, k, v, q_len: int, scale: float) -> torch.Tensor:
    """q [B * q_len, H_q, D] against dense k, v [B, H_kv, ctx, D], bottom-right causal -> [B * q_len, H_q, D]."""
    import torch.nn.functional as F

    batch, ctx = k.shape[0], k.shape[2]
    qb = q.view(batch, q_len, *q.shape[1:]).transpose(1, 2)  # [B, H_q, q_len, D]
    mask = None
    if 1 < q_len < ctx:
        mask = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).tril(ctx - q_len)
    out = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, is_causal=q_len == ctx, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape)


def attention_cases(cfg: Config, dtype, device) -> list[Case]:
    from flexllm.kernels.paged_attention import paged_attention_reference
    from flexllm.kernels.triton_ops.paged_attention import paged_attention_triton

    workloads = [(b, 1, ctx, "decode") for b, ctx in cfg.decode]
    workloads += [(b, q, ctx, "prefill" if q == ctx else "chunk") for b, q, ctx in cfg.chunks]
    cases = []
    for seqs, q_len, ctx, kind in workloads:
        args, k, v = _paged_batch(cfg, seqs, q_len, ctx, dtype, device)
        name = f"B={seqs} q_len={q_len} ctx={ctx} Hq/Hkv={cfg.q_heads}/{cfg.kv_heads} D={cfg.head_dim}"
        cases.append(Case(f"paged_attention/{kind}", name, {
            "triton": lambda a=args: paged_attention_triton(*a),
            "torch": lambda a=args: paged_attention_reference(*a),
            "sdpa": lambda a=args, k=k, v=v, n=q_len: _sdpa(a[0], k, v, n, a[-1]),
        }))  # fmt: skip
    return cases


def run(case: Case, timed: bool) -> None:
    """Check every provider against the reference; time them when ``timed`` (CUDA)."""
    expected = case.providers["torch"]().float()
    for provider, fn in case.providers.items():
        case.max_abs_err[provider] = (fn().float() - expected).abs().max().item()
        if timed:
            from triton.testing import do_bench

            case.ms[provider] = do_bench(fn, warmup=25, rep=100, return_mode="median")


def print_table(cases: list[Case]) -> None:
    header = f"{'kernel':<26}{'case':<50}{'triton ms':>10}{'torch ms':>10}{'sdpa ms':>10}{'speedup':>9}{'max err':>10}"
    print(header)
    print("-" * len(header))
    for c in cases:
        times = [f"{c.ms[p]:.4f}" if p in c.ms else "-" for p in ("triton", "torch", "sdpa")]
        speedup = f"{c.ms['torch'] / c.ms['triton']:.2f}x" if c.ms else "-"
        err = c.max_abs_err.get("triton", float("nan"))
        print(f"{c.kernel:<26}{c.name:<50}{times[0]:>10}{times[1]:>10}{times[2]:>10}{speedup:>9}{err:>10.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes through the Triton interpreter on CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module runs @triton.jit
        os.environ["FLEXLLM_FORCE_TRITON"] = "1"  # lora_linear's dispatch takes Triton on CPU
        cfg, dtype, device = SMOKE, torch.float32, "cpu"
    elif torch.cuda.is_available():
        cfg, dtype, device = LLAMA_8B, torch.bfloat16, "cuda"
    else:
        print("kernels benchmark: no CUDA GPU here, nothing measured and nothing written (try --smoke)")
        return 0
    torch.manual_seed(0)
    cases = [
        case
        for build in (norm_act_cases, lora_cases, lora_backward_cases, attention_cases)
        for case in build(cfg, dtype, device)
    ]
    for case in cases:
        run(case, timed=not args.smoke)
    print_table(cases)
    if args.smoke:
        return 0
    import triton

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype),
        "model": asdict(cfg),
        "cases": [
            {"kernel": c.kernel, "case": c.name, "ms": c.ms, "max_abs_err": c.max_abs_err} for c in cases
        ],
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
