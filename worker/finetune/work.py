"""One micro-batch's token-level forward and split backward, in budget-sized work units.

The micro-batch's sequences are packed back to back into one stream of T tokens (per-sequence
positions, block-diagonal causal attention), so a unit crosses sequence boundaries and fills its
token budget however short the sequences are.

Forward: chunks [s, e) of the stream run through the layers without a graph, in layer blocks,
keeping each layer's input (the residual stream, ``checkpoints`` [L, T, H]) and each layer's K/V
([L, T, H_kv, D], private buffers: training K/V need gradients, live only until the micro-batch's
backward ends and never enter the inference block pool).

Backward: reverse token windows [s, e); each window walks the layers top-down in layer blocks.
A unit recomputes its layers for the window from the checkpoint (rematerialization), then
backpropagates the gradient arriving from above plus the dK/dV that later windows' attention
left for this window's K/V; it adds dK/dV of earlier positions into ``dk``/``dv`` (one layer's
slice at a time) and LoRA gradients into ``.grad``. The top window may skip its no-grad forward:
a "tail" unit runs it from the embeddings with the graph and backpropagates at once. Every term of
the full gradient is produced exactly once, so the result does not depend on how units are cut.

Unit sizes: a unit of w tokens through k of the L layers costs ceil(w k / L) tokens. A budget b at
least the ``window`` runs b tokens through all layers; a smaller one runs a span of
min(window, b L) tokens through the few layers it pays for (cheaper than all layers of b tokens).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from flexllm.worker.engine.model import CausalLM
from flexllm.worker.finetune.data import TrainingSequence
from flexllm.worker.finetune.layer import ChunkInput, Dropout, decoder_layer, loss_sum
from flexllm.worker.finetune.lora_params import LoRAWeights

DEFAULT_WINDOW = 256  # tokens of a chunk or window run in layer blocks when the budget is smaller


def _packed(seqs: list[TrainingSequence], keys: list[int]) -> dict[str, list[int]]:
    """Per-token columns of the packed stream (``targets``: the token position t predicts)."""
    cols: dict[str, list[int]] = {k: [] for k in ("ids", "targets", "positions", "segments", "starts", "keys")}
    for index, (seq, key) in enumerate(zip(seqs, keys, strict=True)):
        n, start = len(seq), len(cols["ids"])
        cols["ids"] += seq.token_ids
        cols["targets"] += [t if m else -100 for t, m in zip(seq.token_ids[1:], seq.is_target[1:], strict=True)]
        cols["targets"].append(-100)
        cols["positions"] += range(n)
        cols["segments"] += [index] * n
        cols["starts"] += [start] * n
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
        self.positions, self.segments, self.keys = cols["positions"], cols["segments"], cols["keys"]
        self.seq_starts = cols["starts"].tolist()  # [T]: stream index of the token's sequence start
        self.num_layers, self.length = args.num_layers, self.token_ids.shape[0]
        self.checkpoints = weight.new_empty(self.num_layers, self.length, args.hidden_size)
        kv_shape = (self.num_layers, self.length, args.num_kv_heads, args.head_dim)
        self.k, self.v = weight.new_empty(kv_shape), weight.new_empty(kv_shape)
        self.dk, self.dv = weight.new_zeros(kv_shape), weight.new_zeros(kv_shape)
        self.forward_pos = 0  # tokens through every layer
        self.chunk_end = 0  # end of the forward chunk in progress
        self.forward_layer = 0  # its next layer (0: no chunk in progress)
        self.window_end = self.length  # backward: windows below this are still to do
        self.span: tuple[int, int] | None = None  # the backward window in progress
        self.layer_top = self.num_layers  # layers of the current window below this are still to do
        self.grad_out: torch.Tensor | None = None  # [w, H] gradient of checkpoint ``layer_top``
        self.loss_sum = 0.0  # unscaled summed cross-entropy

    @property
    def forward_done(self) -> bool:
        return self.forward_pos == self.length

    @property
    def finished(self) -> bool:
        return self.window_end == 0

    @property
    def next_is_backward(self) -> bool:
        """Backward work comes next (a budget too small for the tail unit gets a forward unit)."""
        return self.forward_done or (self.forward_layer == 0 and self.length - self.forward_pos <= self.window)

    def unit(self, budget: int) -> tuple[int, Literal["forward", "backward"]]:
        """One unit of at most ``budget`` tokens' cost (at least one layer of a span in progress)."""
        if self.forward_done:
            return self._backward_unit(budget), "backward"
        tail = self.length - self.forward_pos
        if self.forward_layer == 0 and tail <= min(budget, self.window):
            return self._tail_unit(), "backward"
        return self._forward_unit(budget), "forward"

    # -- sizes -------------------------------------------------------------------------------
    def _span(self, budget: int, available: int) -> int:
        return min(available, max(budget, min(self.window, budget * self.num_layers)))

    def _layers(self, budget: int, width: int, left: int) -> int:
        return max(1, min(left, budget * self.num_layers // width))

    def _cost(self, width: int, layers: int) -> int:
        return math.ceil(width * layers / self.num_layers)

    def _chunk(self, start: int, end: int) -> tuple[ChunkInput, int]:
        """The chunk's inputs and ``lo``, the stream index of its first sequence's first token."""
        lo = self.seq_starts[start]
        cos, sin = self.model.rotary.cos_sin(self.positions[start:end], self.checkpoints.dtype)
        dropout = None
        if self.dropout:
            dropout = Dropout(self.dropout, self.keys[start:end], self.positions[start:end])
        return ChunkInput(cos, sin, self.segments[lo:end], dropout), lo

    # -- forward -----------------------------------------------------------------------------
    @torch.no_grad()
    def _forward_unit(self, budget: int) -> int:
        start, first = self.forward_pos, self.forward_layer
        if first == 0:  # a new chunk; it stops short of a window-sized tail for the tail unit
            left = self.length - start
            width = self._span(budget, left)
            end = self.chunk_end = start + (min(width, left - self.window) if left > self.window else width)
            self.checkpoints[0, start:end] = self.model.embed_tokens(self.token_ids[start:end])
        end = self.chunk_end
        layers = self._layers(budget, end - start, self.num_layers - first)
        chunk, lo = self._chunk(start, end)
        x = self.checkpoints[first, start:end]  # [n, H]
        for layer in range(first, first + layers):
            x, k, v = decoder_layer(
                self.model, self.lora, layer, x, chunk, self.k[layer, lo:start], self.v[layer, lo:start]
            )
            self.k[layer, start:end], self.v[layer, start:end] = k, v
            if layer + 1 < self.num_layers:
                self.checkpoints[layer + 1, start:end] = x
        self.forward_layer = (first + layers) % self.num_layers
        if self.forward_layer == 0:
            self.forward_pos = end
        return self._cost(end - start, layers)

    # -- backward ----------------------------------------------------------------------------
    def _tail_unit(self) -> int:
        """Forward the rest of the stream with the graph, all layers, and backpropagate it."""
        start = self.forward_pos
        with torch.no_grad():
            x_in = self.model.embed_tokens(self.token_ids[start:])
        self.forward_pos = self.length
        self._backward_layers(start, self.length, 0, self.num_layers, x_in)
        self.window_end = start
        return self.length - start

    def _backward_unit(self, budget: int) -> int:
        if self.span is None:
            width = self._span(budget, self.window_end)
            self.span = (self.window_end - width, self.window_end)
        start, end = self.span
        layers = self._layers(budget, end - start, self.layer_top)
        bottom = self.layer_top - layers
        self._backward_layers(start, end, bottom, self.layer_top, self.checkpoints[bottom, start:end])
        self.layer_top = bottom
        if bottom == 0:
            self.window_end, self.span, self.layer_top, self.grad_out = start, None, self.num_layers, None
        return self._cost(end - start, layers)

    def _backward_layers(self, start: int, end: int, bottom: int, top: int, x_in: torch.Tensor) -> None:
        """Recompute layers [bottom, top) of window [start, end) from x_in [w, H] and backpropagate."""
        chunk, lo = self._chunk(start, end)
        x_in = x_in.detach().requires_grad_(bottom > 0)  # layer 0's input gradient is not needed
        x, outputs, grads, past = x_in, [], [], []
        with torch.enable_grad():
            for layer in range(bottom, top):
                k_past = self.k[layer, lo:start].detach().requires_grad_(start > lo)
                v_past = self.v[layer, lo:start].detach().requires_grad_(start > lo)
                x, k, v = decoder_layer(self.model, self.lora, layer, x, chunk, k_past, v_past)
                outputs += [k, v]
                grads += [self.dk[layer, start:end], self.dv[layer, start:end]]
                past.append((layer, k_past, v_past))
            if top == self.num_layers:
                loss = loss_sum(self.model, x, self.targets[start:end])
                self.loss_sum += loss.item()
                outputs.append(loss * self.loss_scale)
                grads.append(torch.ones_like(loss))
            else:
                outputs.append(x)
                grads.append(self.grad_out)
            leaves = [x_in] if bottom > 0 else []
            leaves += [t for _, kp, vp in past for t in (kp, vp) if start > lo]
            leaves += [p for layer in range(bottom, top) for p in self.lora.layer_parameters(layer)]
            torch.autograd.backward(outputs, grads, inputs=leaves)
        self.grad_out = x_in.grad
        if start > lo:
            for layer, k_past, v_past in past:
                self.dk[layer, lo:start] += k_past.grad
                self.dv[layer, lo:start] += v_past.grad
