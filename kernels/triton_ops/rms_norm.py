"""Fused residual-add + RMSNorm: the Triton kernel and its launcher."""

import torch
import triton
import triton.language as tl

from flexllm.kernels.triton_ops._launch import row_settings


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    new_res_ptr,
    x_stride,
    res_stride,
    out_stride,
    new_res_stride,
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One row per program: h = x (+ residual), out = w * (h * rsqrt(mean(h^2) + eps))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    h = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + res.to(tl.float32)).to(h.dtype)  # add in fp32, round as torch does
        tl.store(new_res_ptr + row * new_res_stride + cols, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / H + eps)
    normed = (hf * rstd).to(h.dtype).to(tl.float32)  # rounded like the reference
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H]; weight: [H] -> (normed [T, H], x + residual [T, H]); as the reference."""
    T, H = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(T, H, dtype=torch.result_type(weight, x), device=x.device)
    new_res = x
    if residual is not None:
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        new_res = torch.empty_like(x)
    if T == 0:
        return out, new_res
    block, num_warps = row_settings(H)
    res = x if residual is None else residual
    _rms_norm_kernel[(T,)](
        x, res, weight, out, new_res,
        x.stride(0), res.stride(0), out.stride(0), new_res.stride(0),
        H, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_H=block, num_warps=num_warps,
    )  # fmt: skip
    return out, new_res
