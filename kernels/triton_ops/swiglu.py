"""Fused SiLU-and-multiply: the Triton kernel and its launcher."""

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, in_stride, out_stride, I, BLOCK: tl.constexpr):
    """Program (t, j): out[t, j*BLOCK:(j+1)*BLOCK] = silu(gate) * up, computed in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(gate_up_ptr + row * in_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * in_stride + I + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] (gate first, then up) -> silu(gate) * up: [T, I]."""
    gate_up = gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous()
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(T, I, dtype=gate_up.dtype, device=gate_up.device)
    if T == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(I))
    _silu_and_mul_kernel[(T, triton.cdiv(I, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), I, BLOCK=block
    )
    return out
