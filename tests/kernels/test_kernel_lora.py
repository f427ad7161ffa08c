"""LoRA shrink/expand (SGMV and BGMV) and the trainable-adapter backward vs the torch references."""

import pytest
import torch

from flexllm.kernels.lora import lora_expand_reference, lora_linear, lora_shrink_reference
from flexllm.kernels.triton_ops.lora import lora_expand_triton, lora_shrink_triton

SLOTS, RANK, H_IN, H_OUT = 3, 12, 40, 24  # rank 12 < the 16-wide tile: padded lanes masked
INDICES = {
    "ragged": [2, -1, 0, 0, 2, 1, -1, 2, 0],  # unsorted, uneven groups, base-model tokens
    "single": [1],
    "single_base": [-1],
    "all_base": [-1, -1, -1],
    "one_slot": [0] * 20,  # more tokens than one 16-row tile
}
TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 5e-2, "rtol": 5e-2},
}


def _inputs(indices, dtype):
    g = torch.Generator().manual_seed(len(indices))
    x = torch.randn(len(indices), H_IN, generator=g).to(dtype)
    lora_a = torch.randn(SLOTS, RANK, H_IN, generator=g).to(dtype) / 4
    lora_b = torch.randn(SLOTS, H_OUT, RANK, generator=g).to(dtype) / 4
    y = torch.randn(len(indices), H_OUT, generator=g).to(dtype)
    scaling = torch.tensor([0.5, 2.0, 1.0])
    return x, lora_a, lora_b, y, scaling, torch.tensor(indices, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grouped", [True, False], ids=["sgmv", "bgmv"])
@pytest.mark.parametrize("case", INDICES)
def test_shrink_and_expand_match_reference(case, grouped, dtype):
    x, lora_a, lora_b, y, scaling, idx = _inputs(INDICES[case], dtype)
    xa = lora_shrink_triton(x, lora_a, idx, grouped=grouped)
    ref_xa = lora_shrink_reference(x, lora_a, idx)
    torch.testing.assert_close(xa, ref_xa, **TOL[dtype])
    assert not xa[idx == -1].any()
    out = lora_expand_triton(y.clone(), ref_xa, lora_b, idx, scaling, grouped=grouped)
    ref = lora_expand_reference(y.clone(), ref_xa, lora_b, idx, scaling)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(out[idx == -1], y[idx == -1], atol=0, rtol=0)


@pytest.mark.parametrize("case", ["ragged", "single"])
def test_bgmv_bf16(case):
    """bf16 only per token: the interpreter's bf16 tl.dot (SGMV) is wrong, its fp32-accumulated GEMV is not."""
    x, lora_a, lora_b, y, scaling, idx = _inputs(INDICES[case], torch.bfloat16)
    xa = lora_shrink_triton(x, lora_a, idx, grouped=False)
    torch.testing.assert_close(xa, lora_shrink_reference(x, lora_a, idx), **TOL[torch.bfloat16])
    out = lora_expand_triton(y.clone(), xa, lora_b, idx, scaling, grouped=False)
    torch.testing.assert_close(out, lora_expand_reference(y.clone(), xa, lora_b, idx, scaling), **TOL[torch.bfloat16])


@pytest.mark.parametrize("grouped", [True, False], ids=["sgmv", "bgmv"])
def test_strided_views_and_auto_mode(grouped):
    x, lora_a, lora_b, y, scaling, idx = _inputs(INDICES["ragged"], torch.float32)
    x_t = x.t().contiguous().t()  # column-major [T, H_in]
    a_t = lora_a.transpose(1, 2).contiguous().transpose(1, 2)
    ref = lora_shrink_reference(x, lora_a, idx)
    torch.testing.assert_close(lora_shrink_triton(x_t, a_t, idx, grouped=grouped), ref, **TOL[torch.float32])
    torch.testing.assert_close(lora_shrink_triton(x, lora_a, idx), ref, **TOL[torch.float32])


@pytest.mark.parametrize("grouped", [True, False], ids=["sgmv", "bgmv"])
def test_rank_wider_than_one_tile(grouped):
    """Rank 80: shrink holds it in one 128-wide tile, expand loops over two 64-wide chunks."""
    g = torch.Generator().manual_seed(2)
    x, xa, y = torch.randn(5, H_IN, generator=g), torch.randn(5, 80, generator=g), torch.randn(5, H_OUT)
    lora_a, lora_b = torch.randn(2, 80, H_IN, generator=g), torch.randn(2, H_OUT, 80, generator=g)
    idx, scaling = torch.tensor([1, 0, -1, 1, 1]), torch.tensor([1.0, 0.25])
    torch.testing.assert_close(
        lora_shrink_triton(x, lora_a, idx, grouped=grouped), lora_shrink_reference(x, lora_a, idx), **TOL[torch.float32]
    )
    torch.testing.assert_close(
        lora_expand_triton(y.clone(), xa, lora_b, idx, scaling, grouped=grouped),
        lora_expand_reference(y.clone(), xa, lora_b, idx, scaling),
        **TOL[torch.float32],
    )


def _reference_lora(x, lora_a, lora_b, scaling):
    return scaling * (x @ lora_a.t()) @ lora_b.t()


def _lora_leaves(dtype, tokens=6, h_in=H_IN, rank=RANK, h_out=H_OUT):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
        for shape in [(tokens, h_in), (rank, h_in), (h_out, rank)]
    ]


def test_lora_linear_gradcheck_reference_path():
    x, lora_a, lora_b = _lora_leaves(torch.float64, tokens=3, h_in=7, rank=4, h_out=5)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t, 1.5), (x, lora_a, lora_b))


@pytest.mark.parametrize("tokens", [1, 70])  # BGMV and SGMV launches in the backward
def test_lora_linear_triton_backward_matches_autograd(monkeypatch, tokens):
    monkeypatch.setenv("FLEXLLM_FORCE_TRITON", "1")
    leaves = _lora_leaves(torch.float32, tokens)
    dy = torch.randn(tokens, H_OUT, generator=torch.Generator().manual_seed(1))
    y = lora_linear(*leaves, 2.0)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_y = _reference_lora(*leaves, 2.0)
    ref_grads = torch.autograd.grad(ref_y, leaves, dy)
    torch.testing.assert_close(y, ref_y, **TOL[torch.float32])
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, **TOL[torch.float32])


def test_lora_linear_skips_unneeded_grads():
    x, lora_a, lora_b = _lora_leaves(torch.float32)
    x.requires_grad_(False)
    lora_linear(x, lora_a, lora_b, 1.0).sum().backward()
    assert x.grad is None and lora_a.grad is not None and lora_b.grad is not None
