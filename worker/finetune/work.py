"""One micro-batch's token-level forward and split backward, in budget-sized work units.

The micro-batch's sequences are packed back to back into one stream of T tokens (per-sequence
positions, block-diagonal causal attention), so a unit crosses sequence boundaries and fills its
token budget however short the sequences are. The stream is worked through in groups of whole
sequences (up to ``window`` tokens, or one longer sequence); no token attends across a sequence
boundary, so each group's forward and backward are independent of the others'.

Forward: chunks [s, e) of the stream run through the layers without a graph, in layer blocks,
keeping each layer's input (the residual stream, ``checkpoints`` [L, G, H] for the G tokens of the
group) and each layer's K/V ([L, G, H_kv, D], private buffers: training K/V need gradients, live
only until the group's backward ends and never enter the inference block pool).

Backward: reverse token windows [s, e); each window walks the layers top-down in layer blocks.
A unit recomputes its layers for the window from the checkpoint (rematerialization), then
backpropagates the gradient arriving from above plus the dK/dV that later windows' attention
left for this window's K/V; it adds dK/dV of earlier positions into ``dk``/``dv`` (one layer's
slice at a time) and LoRA gradients into ``.grad``. A group's top window may skip its no-grad
forward: a "tail" unit runs it from the embeddings with the graph and backpropagates at once (a
group that fits the budget is a single tail unit: no rematerialization at all). Every term of the
full gradient is produced exactly once, so the result does not depend on how units are cut.

Unit sizes: a unit of w tokens through k of the L layers costs ceil(w k / L) tokens. A budget b at
least the ``window`` runs b tokens through all layers; a smaller one starts a span of
min(window, b L) tokens and runs it through the few layers it pays for (cheaper than all layers
of b tokens). A span in progress that one layer of exceeds a later, smaller budget is split: its
first (forward) or last (backward) b L tokens go on alone, so no unit costs more than its budget.
"""

from __future__ import annotations

import bisect
import itertools
import math
from typing import Literal

import torch

from flexllm.worker.engine.model import CausalLM
from flexllm.worker.finetune.data import TrainingSequence
from flexllm.worker.finetune.layer import ChunkInput, Dropout, decoder_layer, loss_sum
from flexllm.worker.finetune.lora_params import LoRAWeights

DEFAULT_WINDOW = 256  # most tokens of a group of sequences; span of layer-blocked units for small budgets


def _packed(seqs: list[TrainingSequence], keys: list[int]) -> dict[str, list[int]]:
    """Per-token columns of the packed stream (``targets``: the token position t predicts)."""
    cols: dict[str, list[int]] = {k: [] for k in ("ids", "targets", "positions", "keys")}
    for seq, key in zip(seqs, keys, strict=True):
        n = len(seq)
        cols["ids"] += seq.token_ids
        cols["targets"] += [t if m else -100 for t, m in zip(seq.token_ids[1:], seq.is_target[1:], strict=True)]
        cols["targets"].append(-100)
        cols["positions"] += range(n)
        cols["keys"] += [key] * n
    return cols


class BatchWork:
    """``unit(budget)`` until ``finished``; ``next_is_backward`` says which kind comes next.

    The loss is scaled by ``loss_scale`` (1 / loss tokens of the optimizer step) before backward.
    ``dropout_keys`` (one per sequence) seed the LoRA dropout masks when ``dropout`` > 0.
    """

    def __init__(
        self,
        model: CausalLM,
        lora: LoRAWeights,
        seqs: list[TrainingSequence],
        loss_scale: float,
        dropout: float = 0.0,
        dropout_keys: list[int] | None = None,
        window: int | None = None,
    ):
        self.model, self.lora, self.loss_scale, self.dropout = model, lora, loss_scale, dropout
        self.window = window or DEFAULT_WINDOW
        args, weight = model.args, model.embed_tokens.weight
        device = weight.device
        cols = {k: torch.tensor(v, device=device) for k, v in _packed(seqs, dropout_keys or [0] * len(seqs)).items()}
        self.token_ids, self.targets = cols["ids"], cols["targets"]  # [T]
        self.positions, self.keys = cols["positions"], cols["keys"]
        self.bounds = list(itertools.accumulate((len(s) for s in seqs), initial=0))  # sequence i: [b_i, b_i+1)
        self.num_layers, self.length = args.num_layers, self.token_ids.shape[0]
        # the group of whole sequences in progress: forward, then backward, then the next group
        self.group_start = self.group_end = 0
        self.forward_pos = 0  # tokens of the group through every layer (from group_start)
        self.window_end = 0  # backward: tokens of the group below this are in no window yet
        # forward pieces in progress, left to right: (start, end, next layer)
        self._ahead: list[tuple[int, int, int]] = []
        # backward pieces in progress, right to left: (start, end, top layer, gradient at the top [w, H])
        self._behind: list[tuple[int, int, int, torch.Tensor | None]] = []
        self.loss_sum = 0.0  # unscaled summed cross-entropy
        self._next_group()

    @property
    def forward_done(self) -> bool:
        """The current group's forward is done."""
        return self.forward_pos == self.group_end

    @property
    def finished(self) -> bool:
        return self.group_end == self.length and self.window_end == self.group_start and not self._behind

    @property
    def next_is_backward(self) -> bool:
        """Backward work comes next (a budget too small for the tail unit gets a forward unit)."""
        return self.forward_done or (not self._ahead and self.group_end - self.forward_pos <= self.window)

    def unit(self, budget: int) -> tuple[int, Literal["forward", "backward"]]:
        """One unit costing at most ``budget`` tokens."""
        if self.forward_done:
            result = self._backward_unit(budget), "backward"
        elif not self._ahead and self.group_end - self.forward_pos <= min(budget, self.window):
            result = self._tail_unit(), "backward"
        else:
            result = self._forward_unit(budget), "forward"
        if self.window_end == self.group_start and not self._behind and self.group_end < self.length:
            self._next_group()
        return result

    def _next_group(self) -> None:
        """Start the next run of whole sequences of up to ``window`` tokens (at least one sequence).

        No token attends across a sequence boundary, so groups are independent: a group that fits
        the budget is one tail unit, with no no-grad forward and no rematerialization.
        """
        start = self.group_end
        first = self.bounds.index(start)
        end = self.bounds[first + 1]
        for bound in self.bounds[first + 2 :]:
            if bound - start > self.window:
                break
            end = bound
        self.group_start = self.forward_pos = start
        self.group_end = self.window_end = end
        args, weight = self.model.args, self.model.embed_tokens.weight
        # the group's buffers, replaced by the next group's (rows: the group's tokens, see ``_rows``)
        self.checkpoints = weight.new_empty(self.num_layers, end - start, args.hidden_size)
        kv_shape = (self.num_layers, end - start, args.num_kv_heads, args.head_dim)
        self.k, self.v = weight.new_empty(kv_shape), weight.new_empty(kv_shape)
        self.dk, self.dv = weight.new_zeros(kv_shape), weight.new_zeros(kv_shape)

    def _rows(self, start: int, end: int) -> slice:
        """Stream tokens [start, end) of the current group as rows of its buffers."""
        return slice(start - self.group_start, end - self.group_start)

    # -- sizes -------------------------------------------------------------------------------
    def _span(self, budget: int, available: int) -> int:
        return min(available, max(budget, min(self.window, budget * self.num_layers)))

    def _cost(self, width: int, layers: int) -> int:
        return math.ceil(width * layers / self.num_layers)

    def _chunk(self, start: int, end: int) -> tuple[ChunkInput, int]:
        """The chunk's inputs and ``lo``, the stream index of its first sequence's first token."""
        cos, sin = self.model.rotary.cos_sin(self.positions[start:end], self.model.embed_tokens.weight.dtype)
        dropout = None
        if self.dropout:
            dropout = Dropout(self.dropout, self.keys[start:end], self.positions[start:end])
        first = bisect.bisect_right(self.bounds, start) - 1
        lo, runs = self.bounds[first], []
        for s0, s1 in itertools.pairwise(self.bounds[first:]):
            if s0 >= end:
                break
            runs.append((s0 - lo, max(s0, start) - lo, min(s1, end) - lo))
        return ChunkInput(cos, sin, runs, dropout), lo

    # -- forward -----------------------------------------------------------------------------
    @torch.no_grad()
    def _forward_unit(self, budget: int) -> int:
        if not self._ahead:  # a new chunk; it stops short of a window-sized tail for the tail unit
            start, left = self.forward_pos, self.group_end - self.forward_pos
            width = self._span(budget, left)
            end = start + (min(width, left - self.window) if left > self.window else width)
            self.checkpoints[0, self._rows(start, end)] = self.model.embed_tokens(self.token_ids[start:end])
            self._ahead = [(start, end, 0)]
        start, end, first = self._ahead.pop(0)
        layers = budget * self.num_layers // (end - start)
        if layers == 0:  # split: the first b L tokens go one layer on
            self._ahead.insert(0, (start + budget * self.num_layers, end, first))
            end, layers = start + budget * self.num_layers, 1
        layers = min(layers, self.num_layers - first)
        chunk, lo = self._chunk(start, end)
        x = self.checkpoints[first, self._rows(start, end)]  # [n, H]
        for layer in range(first, first + layers):
            past, rows = self._rows(lo, start), self._rows(start, end)
            x, k, v = decoder_layer(self.model, self.lora, layer, x, chunk, self.k[layer, past], self.v[layer, past])
            self.k[layer, rows], self.v[layer, rows] = k, v
            if layer + 1 < self.num_layers:
                self.checkpoints[layer + 1, rows] = x
        if first + layers < self.num_layers:
            self._ahead.insert(0, (start, end, first + layers))
        else:
            self.forward_pos = end
        return self._cost(end - start, layers)

    # -- backward ----------------------------------------------------------------------------
    def _tail_unit(self) -> int:
        """Forward the rest of the group with the graph, all layers, and backpropagate it."""
        start, end = self.forward_pos, self.group_end
        with torch.no_grad():
            x_in = self.model.embed_tokens(self.token_ids[start:end])
        self.forward_pos, self.window_end = end, start
        self._backward_layers(start, end, 0, self.num_layers, x_in, None)
        return end - start

    def _backward_unit(self, budget: int) -> int:
        if not self._behind:  # a new window
            width = self._span(budget, self.window_end - self.group_start)
            self.window_end -= width
            self._behind = [(self.window_end, self.window_end + width, self.num_layers, None)]
        start, end, top, grad = self._behind.pop(0)
        layers = budget * self.num_layers // (end - start)
        if layers == 0:  # split: the last b L tokens go one layer down
            cut = end - budget * self.num_layers
            left, right = (None, None) if grad is None else (grad[: cut - start], grad[cut - start :])
            self._behind.insert(0, (start, cut, top, left))
            start, grad, layers = cut, right, 1
        bottom = top - min(layers, top)
        grad = self._backward_layers(start, end, bottom, top, self.checkpoints[bottom, self._rows(start, end)], grad)
        if bottom > 0:
            self._behind.insert(0, (start, end, bottom, grad))
        return self._cost(end - start, top - bottom)

    def _backward_layers(
        self, start: int, end: int, bottom: int, top: int, x_in: torch.Tensor, grad_top: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Recompute layers [bottom, top) of [start, end) from x_in [w, H] and backpropagate.

        ``grad_top`` [w, H]: the gradient of layer ``top``'s input (None at the top: the loss).
        Returns the gradient of x_in (None for layer 0, whose input gradient is not needed).
        """
        chunk, lo = self._chunk(start, end)
        past_rows, rows = self._rows(lo, start), self._rows(start, end)
        x_in = x_in.detach().requires_grad_(bottom > 0)
        x, outputs, grads, past = x_in, [], [], []
        with torch.enable_grad():
            for layer in range(bottom, top):
                k_past = self.k[layer, past_rows].detach().requires_grad_(start > lo)
                v_past = self.v[layer, past_rows].detach().requires_grad_(start > lo)
                x, k, v = decoder_layer(self.model, self.lora, layer, x, chunk, k_past, v_past)
                outputs += [k, v]
                grads += [self.dk[layer, rows], self.dv[layer, rows]]
                past.append((layer, k_past, v_past))
            if top == self.num_layers:
                loss = loss_sum(self.model, x, self.targets[start:end])
                self.loss_sum += loss.item()
                outputs.append(loss * self.loss_scale)
                grads.append(torch.ones_like(loss))
            else:
                outputs.append(x)
                grads.append(grad_top)
            leaves = [x_in] if bottom > 0 else []
            leaves += [t for _, kp, vp in past for t in (kp, vp) if start > lo]
            leaves += [p for layer in range(bottom, top) for p in self.lora.layer_parameters(layer)]
            torch.autograd.backward(outputs, grads, inputs=leaves)
        if start > lo:
            for layer, k_past, v_past in past:
                self.dk[layer, past_rows] += k_past.grad
                self.dv[layer, past_rows] += v_past.grad
        return x_in.grad
