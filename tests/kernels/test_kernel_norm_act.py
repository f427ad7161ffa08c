"""Fused RMSNorm(+residual) and SiLU-and-mul: Triton (interpreter) vs the torch references."""

import pytest
import torch

from flexllm.kernels.rms_norm import rms_norm, rms_norm_reference
from flexllm.kernels.swiglu import silu_and_mul, silu_and_mul_reference
from flexllm.kernels.triton_ops import rms_norm as rms_norm_ops
from flexllm.kernels.triton_ops import swiglu as swiglu_ops
from flexllm.kernels.triton_ops.rms_norm import rms_norm_triton
from flexllm.kernels.triton_ops.swiglu import silu_and_mul_triton

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,hidden", [(1, 32), (5, 48)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, tokens, hidden, with_residual):
    g = torch.Generator().manual_seed(tokens * hidden)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    weight = torch.randn(hidden, generator=g).to(dtype)
    residual = torch.randn(tokens, hidden, generator=g).to(dtype) if with_residual else None
    normed, new_res = rms_norm_triton(x, weight, 1e-6, residual)
    ref_normed, ref_res = rms_norm_reference(x, weight, 1e-6, residual)
    assert normed.dtype == ref_normed.dtype and new_res.dtype == ref_res.dtype
    torch.testing.assert_close(normed, ref_normed, **TOL[dtype])
    torch.testing.assert_close(new_res, ref_res, **TOL[dtype])  # the interpreter may round bf16 differently


def test_rms_norm_strided_rows():
    x = torch.randn(4, 64)[:, :32]  # row stride 64
    weight = torch.rand(32)
    torch.testing.assert_close(rms_norm_triton(x, weight, 1e-5)[0], rms_norm_reference(x, weight, 1e-5)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,inter", [(1, 16), (3, 40)])
def test_silu_and_mul_matches_reference(dtype, tokens, inter):
    gate_up = (3 * torch.randn(tokens, 2 * inter, generator=torch.Generator().manual_seed(inter))).to(dtype)
    torch.testing.assert_close(silu_and_mul_triton(gate_up), silu_and_mul_reference(gate_up), **TOL[dtype])


def test_dispatchers_take_the_reference_on_cpu():
    x, weight = torch.randn(2, 8), torch.rand(8)
    assert torch.equal(rms_norm(x, weight, 1e-6, x)[0], rms_norm_reference(x, weight, 1e-6, x)[0])
    assert torch.equal(silu_and_mul(x), silu_and_mul_reference(x))


def test_forced_dispatch_takes_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("FLEXLLM_FORCE_TRITON", "1")
    monkeypatch.setattr(rms_norm_ops, "rms_norm_triton", lambda *args: "triton")
    monkeypatch.setattr(swiglu_ops, "silu_and_mul_triton", lambda *args: "triton")
    x = torch.randn(2, 8)
    assert rms_norm(x, torch.rand(8), 1e-6) == "triton" and silu_and_mul(x) == "triton"
