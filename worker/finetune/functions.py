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
        d_gate = torch.ops.aten.silu_backward(dy * up, gate)  # fused silu'(gate) * dy * up
        return torch.cat((d_gate, dy * F.silu(gate)), dim=-1)


Run = tuple[int, int, int]  # one sequence's queries in a chunk: (first key, first query, query end)
BLOCK_ROWS = 64  # runs are merged into blocks of up to this many queries, attended with one masked product
# (measured on CPU: per-run products lose to one masked block for short runs, win over long blocks)


def _blocks(runs: list[Run], sliding_window: int | None) -> list[tuple[int, int, int, list[Run]]]:
    """Merge consecutive runs (short sequences) into blocks (first key, first query, query end, runs)
    of at most BLOCK_ROWS queries, so a chunk of many short sequences costs a few products, not a
    few per sequence. A block's first key is the first one any of its queries sees (with a sliding
    window W, the first query's window: pos - W < key)."""
    blocks: list[tuple[int, int, int, list[Run]]] = []
    for run in runs:
        if blocks and run[2] - blocks[-1][1] <= BLOCK_ROWS:
            ks, qs, _, members = blocks[-1]
            blocks[-1] = (ks, qs, run[2], [*members, run])
        else:
            blocks.append((run[0], run[1], run[2], [run]))
    if sliding_window is None:
        return blocks
    return [(max(ks, qs - sliding_window + 1), qs, qe, members) for ks, qs, qe, members in blocks]


def _block_mask(ks: int, qs: int, qe: int, runs: list[Run], sliding_window: int | None,
                device: torch.device) -> torch.Tensor:
    """[qe - qs, qe - ks] True where a query may attend a key: its own sequence's keys, causally, and
    with a sliding window W only its last W of them."""
    first = torch.cat([torch.full((e - q,), k - ks, device=device) for k, q, e in runs])  # [m]
    keys = torch.arange(qe - ks, device=device)[None, :]
    queries = torch.arange(qs - ks, qe - ks, device=device)[:, None]
    mask = (keys >= first[:, None]) & (keys <= queries)
    if sliding_window is not None:
        mask &= keys > queries - sliding_window
    return mask


class ChunkAttentionFn(torch.autograd.Function):
    """Causal attention of a packed chunk's queries over earlier K/V plus its own, per sequence.

    q [n, H_q, D]; k_past, v_past [p, H_kv, D] (views of the stream's K/V storage, starting at the
    first token of the chunk's first sequence); k, v [n, H_kv, D]. ``runs``: per sequence in the
    chunk, (first key, first query, query end) in key coordinates (0 = first past key); each run's
    queries attend causally to its own keys only (short runs are merged into masked blocks). Query
    head h reads kv head h // (H_q / H_kv). Saves only q, k, v and the past views; backward
    recomputes the probabilities and returns dK/dV of the past positions too, which the caller
    accumulates for the earlier chunks. With ``sliding_window`` W a query sees only its last W keys.
    """

    @staticmethod
    def _probs(q_r, k_r, mask: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
        """q_r [H_kv, g m, D], k_r [H_kv, l, D], mask [m, l] -> fp32 probabilities [H_kv, g m, l]."""
        h_kv, rows, width = q_r.shape[0], q_r.shape[1] // groups, k_r.shape[1]
        scores = (torch.matmul(q_r, k_r.transpose(1, 2)).float() * scale).view(h_kv, groups, rows, width)
        scores.masked_fill_(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1).view(h_kv, groups * rows, width)

    @staticmethod
    def forward(ctx, q, k, v, k_past, v_past, runs: list[Run], scale: float, sliding_window: int | None):
        n, h_q, d = q.shape
        h_kv, past = k.shape[1], k_past.shape[0]
        groups = h_q // h_kv
        keys = torch.cat((k_past, k)).transpose(0, 1)  # [H_kv, p+n, D]
        values = torch.cat((v_past, v)).transpose(0, 1)
        qg = q.view(n, h_kv, groups, d).permute(1, 2, 0, 3)  # [H_kv, g, n, D]
        out = q.new_empty(h_kv, groups, n, d)
        blocks = _blocks(runs, sliding_window)
        for ks, qs, qe, members in blocks:
            rows = slice(qs - past, qe - past)
            q_r = qg[:, :, rows].reshape(h_kv, groups * (qe - qs), d)
            mask = _block_mask(ks, qs, qe, members, sliding_window, q.device)
            probs = ChunkAttentionFn._probs(q_r, keys[:, ks:qe], mask, scale, groups)
            out[:, :, rows] = torch.matmul(probs.to(q.dtype), values[:, ks:qe]).view(h_kv, groups, qe - qs, d)
        ctx.save_for_backward(q, k, v, k_past, v_past)
        ctx.blocks, ctx.scale, ctx.sliding_window = blocks, scale, sliding_window
        return out.permute(2, 0, 1, 3).reshape(n, h_q, d)  # [n, H_q, D]

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, k_past, v_past = ctx.saved_tensors
        n, h_q, d = q.shape
        h_kv, past = k.shape[1], k_past.shape[0]
        groups = h_q // h_kv
        keys = torch.cat((k_past, k)).transpose(0, 1)  # [H_kv, p+n, D]
        values = torch.cat((v_past, v)).transpose(0, 1)
        qg, dog = (t.view(n, h_kv, groups, d).permute(1, 2, 0, 3) for t in (q, d_out))  # [H_kv, g, n, D]
        dq = torch.zeros_like(qg)
        dk, dv = torch.zeros_like(keys), torch.zeros_like(values)  # [H_kv, p+n, D]
        for ks, qs, qe, members in ctx.blocks:
            rows, m = slice(qs - past, qe - past), qe - qs
            q_r, do_r = (t[:, :, rows].reshape(h_kv, groups * m, d) for t in (qg, dog))
            k_r, v_r = keys[:, ks:qe], values[:, ks:qe]
            mask = _block_mask(ks, qs, qe, members, ctx.sliding_window, q.device)
            probs = ChunkAttentionFn._probs(q_r, k_r, mask, ctx.scale, groups)  # [H_kv, g m, l]
            dv[:, ks:qe] += torch.matmul(probs.to(q.dtype).transpose(1, 2), do_r)
            d_probs = torch.matmul(do_r, v_r.transpose(1, 2)).float()
            d_scores = torch.ops.aten._softmax_backward_data(d_probs, probs, -1, torch.float32).to(q.dtype)
            dq[:, :, rows] = (torch.matmul(d_scores, k_r) * ctx.scale).view(h_kv, groups, m, d)
            dk[:, ks:qe] += torch.matmul(d_scores.transpose(1, 2), q_r) * ctx.scale
        dq = dq.permute(2, 0, 1, 3).reshape(n, h_q, d)
        dk, dv = dk.transpose(0, 1), dv.transpose(0, 1)  # [p+n, H_kv, D]
        return dq, dk[past:], dv[past:], dk[:past], dv[:past], None, None, None


class CrossEntropySumFn(torch.autograd.Function):
    """Summed cross-entropy of fp32 logits [m, V] made by upcasting ``dtype`` values (the LM head's
    output) against targets [m]. Saves the logits back in ``dtype`` (lossless) and the row
    log-sum-exp [m], not an fp32 log-softmax [m, V]."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)  # [m]
        ctx.save_for_backward(logits.to(dtype), targets, lse)
        return (lse - logits.gather(1, targets[:, None])[:, 0]).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        d_logits = torch.exp(logits.float() - lse[:, None])  # softmax [m, V]
        d_logits[torch.arange(targets.shape[0], device=targets.device), targets] -= 1
        return d_logits * grad, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFn.apply(x, weight, eps)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return CrossEntropySumFn.apply(logits, targets, dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return SiluMulFn.apply(gate_up)


def chunk_attention(q, k, v, k_past, v_past, runs: list[Run], scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    return ChunkAttentionFn.apply(q, k, v, k_past, v_past, runs, scale, sliding_window)
