"""Pruned autograd functions: each saves only what its backward truly needs.

Frozen linears need nothing saved (torch's ``F.linear`` already keeps only the weight when the
input alone needs a gradient); these cover the ops whose plain autograd keeps more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNormFn(torch.autograd.Function):
    """y = w * x / rms(x) with a frozen ``w``: saves x [n, H] and rstd [n, 1] (fp32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # [n, 1]
        ctx.save_for_backward(x, rstd, weight)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        x_hat = x.float() * rstd
        g = (dy * weight).float()  # [n, H]
        dx = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        return dx.to(x.dtype), None, None


class SiluMulFn(torch.autograd.Function):
    """silu(gate) * up for gate_up [n, 2I] (gate first): saves gate_up only."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        d_gate = dy * up * sig * (1 + gate * (1 - sig))
        return torch.cat((d_gate, dy * silu), dim=-1)


def _expand_kv(kv: torch.Tensor, groups: int) -> torch.Tensor:
    """[L, H_kv, D] -> [H_q, L, D] (query head h reads kv head h // groups)."""
    return kv.transpose(0, 1).repeat_interleave(groups, dim=0)


def _fold_kv(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """[H_q, L, D] -> [L, H_kv, D], summing the query heads of each kv head."""
    h_q, length, d = grad.shape
    return grad.view(h_q // groups, groups, length, d).sum(1).transpose(0, 1)


def _mask(segments: torch.Tensor, past: int) -> torch.Tensor:
    """[n, p+n] True where query i (key index p+i) may attend key j: same sequence, j <= p+i."""
    keys = torch.arange(segments.shape[0], device=segments.device)
    causal = keys[None, :] <= keys[past:, None]
    return causal & (segments[None, :] == segments[past:, None])


class ChunkAttentionFn(torch.autograd.Function):
    """Causal attention of a packed chunk's queries over earlier K/V plus its own, per sequence.

    q [n, H_q, D]; k_past, v_past [p, H_kv, D] (views of the stream's K/V storage, starting at the
    first token of the chunk's first sequence); k, v [n, H_kv, D]; segments [p+n] the sequence id
    of each key (a query sees only keys of its own sequence). Saves q, k, v, the past views,
    segments, out and the row log-sum-exp [H_q, n]; backward recomputes the probabilities
    (flash-attention style) and returns dK/dV of the past positions too, which the caller
    accumulates for the earlier chunks.
    """

    @staticmethod
    def forward(ctx, q, k, v, k_past, v_past, segments, scale: float):
        groups = q.shape[1] // k.shape[1]
        keys = _expand_kv(torch.cat((k_past, k)), groups)  # [H_q, p+n, D]
        values = _expand_kv(torch.cat((v_past, v)), groups)
        scores = torch.matmul(q.transpose(0, 1), keys.transpose(1, 2)).float() * scale  # [H_q, n, p+n]
        scores = scores.masked_fill(~_mask(segments, k_past.shape[0]), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [H_q, n]
        probs = torch.exp(scores - lse[..., None]).to(q.dtype)
        out = torch.matmul(probs, values).transpose(0, 1).contiguous()  # [n, H_q, D]
        ctx.save_for_backward(q, k, v, k_past, v_past, segments, out, lse)
        ctx.scale, ctx.groups = scale, groups
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, k_past, v_past, segments, out, lse = ctx.saved_tensors
        scale, groups, past = ctx.scale, ctx.groups, k_past.shape[0]
        keys = _expand_kv(torch.cat((k_past, k)), groups)  # [H_q, p+n, D]
        values = _expand_kv(torch.cat((v_past, v)), groups)
        qt, dot = q.transpose(0, 1), d_out.transpose(0, 1)  # [H_q, n, D]
        scores = torch.matmul(qt, keys.transpose(1, 2)).float() * scale
        scores = scores.masked_fill(~_mask(segments, past), float("-inf"))
        probs = torch.exp(scores - lse[..., None])  # [H_q, n, p+n]
        d_values = torch.matmul(probs.to(q.dtype).transpose(1, 2), dot)  # [H_q, p+n, D]
        d_probs = torch.matmul(dot, values.transpose(1, 2)).float()
        delta = (dot.float() * out.transpose(0, 1).float()).sum(-1, keepdim=True)  # [H_q, n, 1]
        d_scores = (probs * (d_probs - delta) * scale).to(q.dtype)
        dq = torch.matmul(d_scores, keys).transpose(0, 1)  # [n, H_q, D]
        dk_all = _fold_kv(torch.matmul(d_scores.transpose(1, 2), qt), groups)  # [p+n, H_kv, D]
        dv_all = _fold_kv(d_values, groups)
        return dq, dk_all[past:], dv_all[past:], dk_all[:past], dv_all[:past], None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFn.apply(x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return SiluMulFn.apply(gate_up)


def chunk_attention(q, k, v, k_past, v_past, segments: torch.Tensor, scale: float) -> torch.Tensor:
    return ChunkAttentionFn.apply(q, k, v, k_past, v_past, segments, scale)
